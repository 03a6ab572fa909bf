"""Per-device memory of sampling, computed from abstract shapes (nothing is allocated).

  report = memory.sampling_memory(config, mesh=mesh, rules=sharding.LOGICAL_RULES,
                                  quantize="int8", mode="edit", image_size=1024)
  print(memory.format_report(report))

What one device holds while a conversation of `batch_size` rows generates an image:

  weights   every parameter's shard on the device, in the sampling dtype (or int8 with its
            scales for the kernels `quantize.py` replaces): each parameter's logical axes go
            through the rules to mesh axes exactly as `load.load_model` places them.
  caches    the conversation's three contexts (cond, text_uncond, image_uncond; `chat.py`),
            `capacity` slots each, plus the copy the guided denoising step stacks them into
            (`image.sample`); rows and KV heads are sharded as `cache.cache_specs` says.
  phases    XLA's buffer assignment of the programs sampling runs, each compiled for the mesh
            from abstract inputs: the prefill of the conditional context (the prompt, or the
            source image's VAE latents and ViT tokens and the instruction when editing), one
            guided denoising step of the image's tokens against the stacked contexts, and the
            VAE decode. `temp` is the scratch a program needs beyond its arguments and outputs.

The peak is weights + caches + the largest phase's temp + output. The phases' figures are
those of the compiler of the platform the report runs on: the same program compiled for TPU or
GPU fuses differently, so they are an estimate of the accelerator's figures, while weights and
caches are exact for any platform.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unijax.data.plan import TextItem
from unijax.data.tokenizer import ByteTokenizer
from unijax.inference import cache as cache_lib
from unijax.inference import chat as chat_lib
from unijax.inference import image as image_lib
from unijax.inference import load
from unijax.inference import quantize as quantize_lib
from unijax.models import mot, unified

MODES = ("t2i", "edit")
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Phase:
    """XLA's per-device buffer assignment of one compiled program (bytes)."""

    name: str
    argument: int
    output: int
    temp: int
    alias: int

    @property
    def working(self) -> int:
        """What the program adds to its arguments: outputs (less those written in place of an
        argument) and scratch."""
        return self.output - self.alias + self.temp


@dataclasses.dataclass(frozen=True)
class Report:
    """Bytes one device holds while sampling (see the module docstring)."""

    devices: int
    mesh: dict
    dtype: str
    quantize: str | None
    mode: str
    image_size: int
    batch_size: int
    capacity: int
    context_tokens: int
    weights: int
    caches: int
    phases: tuple[Phase, ...] = ()

    @property
    def peak(self) -> int:
        return self.weights + self.caches + max((p.working for p in self.phases), default=0)


def _mesh_shape(mesh) -> dict:
    return dict(mesh.shape) if mesh is not None else {}


def _shard_bytes(shape: Sequence[int], dtype, spec: PartitionSpec, mesh_shape: dict) -> int:
    """Bytes of one device's shard of an array of `shape` placed by `spec`."""
    elements = 1
    for i, size in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        elements *= size // math.prod(mesh_shape.get(n, 1) for n in names)
    return elements * jnp.dtype(dtype).itemsize


def abstract_model(config: ml_collections.ConfigDict, *, dtype=None,
                   quantize: str | None = None) -> tuple[nnx.Module, dict]:
    """(the UnifiedModel of `config` as ShapeDtypeStructs, {path: logical axes}).

    Floating parameters are cast to `dtype` (as `load.load_model(dtype=...)` reads them), then
    the decoder kernels quantised with `quantize` (as `quantize.quantize_weights` does); a
    quantised kernel's values and scales keep the kernel's logical axes.
    """

    def build():
        model = unified.UnifiedModel(config, rngs=nnx.Rngs(0))
        if dtype is not None:
            state = nnx.state(model, nnx.Param)
            cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
            nnx.update(model, jax.tree.map(cast, state))
        return model

    model = nnx.eval_shape(build)
    logical = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.get_partition_spec(
        nnx.state(model))))
    if quantize is not None:
        model = nnx.eval_shape(lambda m: quantize_lib.quantize_weights(m, quantize), model)
    return model, logical


def _specs(path, leaf, logical: dict, mesh, rules) -> list[PartitionSpec]:
    """The mesh spec of each array of one weight (a quantised kernel: its values and its
    scales), from the weight's logical axes as `load.load_model` places it."""
    spec = logical.get(path)
    axes = tuple(spec) if isinstance(spec, PartitionSpec) else ()
    return [load.mesh_spec(axes, x.shape, mesh, rules) if mesh is not None else PartitionSpec()
            for x in jax.tree.leaves(leaf)]


def placed_state(model: nnx.Module, logical: dict, mesh: Mesh | None, rules) -> nnx.State:
    """The model's state with every array a ShapeDtypeStruct carrying its sharding on `mesh`
    (None: one device, no sharding)."""
    state = nnx.state(model)
    placed = {}
    for path, leaf in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items():
        arrays, tree = jax.tree.flatten(leaf)
        placed[path] = jax.tree.unflatten(tree, [
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=None if mesh is None else
                                 NamedSharding(mesh, spec))
            for x, spec in zip(arrays, _specs(path, leaf, logical, mesh, rules), strict=True)])
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(placed))
    return state


def weight_bytes(config: ml_collections.ConfigDict, mesh=None, rules=None, *, dtype=None,
                 quantize: str | None = None) -> int:
    """Bytes of the weights on one device (`mesh`: a Mesh or an AbstractMesh; None: all of
    them on one device)."""
    model, logical = abstract_model(config, dtype=dtype, quantize=quantize)
    return _state_bytes(nnx.state(model), logical, mesh, rules)


def _state_bytes(state, logical: dict, mesh, rules) -> int:
    shape = _mesh_shape(mesh)
    return sum(_shard_bytes(x.shape, x.dtype, spec, shape)
               for path, leaf in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()
               for x, spec in zip(jax.tree.leaves(leaf), _specs(path, leaf, logical, mesh, rules),
                                  strict=True))


def cache_bytes(config: ml_collections.ConfigDict, mesh=None, rules=None, *, batch_size: int,
                capacity: int) -> int:
    """Bytes of one context's KV cache and token metadata on one device."""
    cfg = mot.DecoderConfig.from_config(config)
    cache = jax.eval_shape(lambda: cache_lib.empty_cache(cfg, batch_size, capacity))
    kv, meta = cache_lib.cache_specs(mesh, rules, batch_size, cfg.num_kv_heads) if mesh \
        is not None else (PartitionSpec(), PartitionSpec())
    shape = _mesh_shape(mesh)
    return (sum(_shard_bytes(x.shape, x.dtype, kv, shape) for x in (cache.k, cache.v)) +
            sum(_shard_bytes(x.shape, x.dtype, meta, shape) for x in jax.tree.leaves(cache.meta)))


def sampling_memory(config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                    rules=None, dtype="bfloat16", quantize: str | None = None,
                    mode: str = "t2i", image_size: int = 1024, prompt_tokens: int = 64,
                    batch_size: int = 1, capacity: int | None = None,
                    compile_phases: bool = True) -> Report:
    """What one device of `mesh` holds while `batch_size` conversations generate a square
    `image_size` image (`mode` "t2i": from a prompt of `prompt_tokens` tokens; "edit": of a
    source image of that size, laid out as `Chat.edit` does, and the instruction).

    Args:
      mesh, rules: a mesh of real devices (the phases are compiled for it) and the logical
        axis rules (`unijax.training.sharding.LOGICAL_RULES`); None: one device.
      dtype: the sampling dtype of the floating weights (`load_model(dtype=...)`).
      quantize: None or "int8" (`quantize.quantize_weights`).
      capacity: KV-cache slots per row (default: `chat.default_capacity(config)`, what
        `Chat` uses).
      compile_phases: False leaves the phases out (weights and caches only, no compile).

    Raises:
      ValueError: an unknown mode, a mesh without rules, or a context that does not fit the
        capacity.
    """
    if mode not in MODES:
        raise ValueError(f"sampling_memory: mode must be one of {MODES}, got {mode!r}")
    if mesh is not None and rules is None:
        raise ValueError("sampling_memory: a mesh needs its logical axis rules (rules=...)")
    model, logical = abstract_model(config, dtype=dtype, quantize=quantize)
    state = placed_state(model, logical, mesh, rules)
    weights = _state_bytes(state, logical, mesh, rules)
    graphdef = nnx.graphdef(model)
    # Token ids only fill slots; their values change no size, so any tokenizer's markers do.
    chat = chat_lib.Chat(nnx.merge(graphdef, state), config, ByteTokenizer(), mesh=mesh,
                         rules=rules, capacity=capacity)
    engine = chat.engine
    prompt = TextItem(np.zeros(prompt_tokens, np.int32), loss=False)
    if mode == "edit":
        source = np.zeros((image_size, image_size, 3), np.uint8)
        vae = chat.vae_item(source)
        row = [vae] + ([chat.vit_item(source)] if chat.has_vit else []) + [prompt]
        grid = vae.grid
    else:
        row, grid = [prompt], chat.grid_for((image_size, image_size))
    guidance = chat.guidance(mode)
    copies = 1 + int(guidance.uses_text) + int(guidance.uses_image)

    empty = _abstract_context(engine, batch_size, chat.capacity)
    chunk, advance = engine.chunk(empty, [row] * batch_size)
    context_tokens = int(chunk.length)
    image_tokens = grid[0] * grid[1] + 2  # the latents between the two image markers
    if context_tokens + image_tokens > chat.capacity:
        raise ValueError(f"sampling_memory: a {mode} context of {context_tokens} tokens and "
                         f"the image's {image_tokens} do not fit the capacity "
                         f"{chat.capacity} (config.sample.capacity)")
    one = cache_bytes(config, mesh, rules, batch_size=batch_size, capacity=chat.capacity)
    caches = (3 + (copies if copies > 1 else 0)) * one

    phases = []
    if compile_phases:
        after = dataclasses.replace(empty, length=context_tokens, **advance)
        item = image_lib.image_item(grid, engine.latent_cell)
        step_chunk = engine.chunk(after, [[item]] * batch_size, latent_grid=grid)[0]
        step_chunk = jax.tree.map(lambda *xs: np.concatenate(xs), *[step_chunk] * copies)
        stacked = _abstract_context(engine, copies * batch_size, chat.capacity).cache
        tokens = jax.ShapeDtypeStruct((batch_size, grid[0] * grid[1], engine.token_dim),
                                      jnp.float32, sharding=image_lib._rows_sharding(empty))
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        step = image_lib._denoise_step(engine, batch_size, guidance if copies > 1 else None)
        with engine.scope():
            phases.append(_phase("prefill", engine._prefill.lower(
                engine.state, empty.cache, chunk, jax.ShapeDtypeStruct((), jnp.int32), False)))
            phases.append(_phase("denoise step", step.lower(
                engine.state, stacked, step_chunk, tokens, scalar, scalar)))
            phases.append(_phase("decode", image_lib._decode_fn(engine, grid).lower(
                engine.state, tokens)))
    return Report(devices=1 if mesh is None else mesh.size, mesh=_mesh_shape(mesh),
                  dtype=str(jnp.dtype(dtype)) if dtype is not None else "as built",
                  quantize=quantize, mode=mode, image_size=image_size, batch_size=batch_size,
                  capacity=chat.capacity, context_tokens=context_tokens, weights=weights,
                  caches=caches, phases=tuple(phases))


def _abstract_context(engine: cache_lib.Engine, batch_size: int,
                      capacity: int) -> cache_lib.Context:
    """An empty Context whose cache is ShapeDtypeStructs placed as `Context.empty` places it."""
    cache = jax.eval_shape(lambda: cache_lib.empty_cache(engine.model_config, batch_size,
                                                          capacity))
    where = engine.cache_shardings(batch_size)
    if where is not None:
        cache = jax.tree.map(lambda x, w: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=w),
                             cache, where)
    zeros = np.zeros(batch_size, np.int64)
    return cache_lib.Context(cache, 0, zeros, zeros.copy(), zeros.copy())


def _phase(name: str, lowered) -> Phase:
    stats = lowered.compile().memory_analysis()
    if stats is None:
        raise RuntimeError(f"sampling_memory: this platform's compiler gives no memory "
                           f"analysis for the {name} program")
    return Phase(name, int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                 int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes))


def format_report(report: Report) -> str:
    """A few lines of GiB figures."""
    gib = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB // 8 else f"{b / (1 << 20):.2f} MiB"
    mesh = " x ".join(f"{k} {v}" for k, v in report.mesh.items() if v > 1) or "one device"
    lines = [f"{report.mode} {report.image_size} px, {report.batch_size} row(s), {mesh}, "
             f"weights {report.quantize or report.dtype}: per device",
             f"  weights   {gib(report.weights)}",
             f"  caches    {gib(report.caches)}  (capacity {report.capacity} slots, context "
             f"{report.context_tokens} tokens)"]
    for p in report.phases:
        lines.append(f"  {p.name:<13} temp {gib(p.temp)}, output {gib(p.output)}, "
                     f"arguments {gib(p.argument)}")
    lines.append(f"  peak      {gib(report.peak)}")
    return "\n".join(lines)
