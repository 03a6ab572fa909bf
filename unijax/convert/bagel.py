r"""The released BAGEL-7B-MoT checkpoint directory <-> unijax, both ways, tensor by tensor.

  config, model = load("/ckpt/BAGEL-7B-MoT")      # a UnifiedModel holding the release's weights
  config, model = load(path, dtype="float32", mesh=mesh, rules=sharding.LOGICAL_RULES)

  python -m unijax.convert.bagel --src=/ckpt/BAGEL-7B-MoT --dst=/ckpt/bagel_unijax
  python -m unijax.sample --workdir=/ckpt/bagel_unijax --prompt="a red fox in the snow"
  python -m unijax.main --config=configs/bagel_7b_mot.py --workdir=W \
      --config.init.checkpoint=/ckpt/bagel_unijax                # fine-tune from the release
  python -m unijax.convert.bagel --to_official --src=/ckpt/bagel_unijax --dst=/ckpt/bagel_back

Files, names, layouts and the model arguments BAGEL hard-codes: `bagel_layout.py`. Everything
is checked before any tensor is read: one `InitError` lists every missing, mis-shaped and
unmapped tensor (unijax name <- file:official name) and every stored sin-cos table that is not
the table unijax computes (with the largest difference; unijax does not store them).

Dtypes are kept: the release's bf16 weights stay bf16 (`config.model.param_dtype` is set to
the checkpoint's), FLUX's fp32 autoencoder stays fp32; `dtype` casts everything. Each tensor
is read once with a positioned read (`SafetensorsFile.read`: no page stays mapped), changed to
the unijax layout and placed (or written) before the next is read, so the host never holds
more than one parameter besides the result.

`--dst` gets a one-step unijax checkpoint in the trainer's layout
(`DST/checkpoints/0/{state,config}`, read by `unijax.inference.load`): `state` holds `ema`
(the released weights are BAGEL's EMA) and `frozen` (the VAE), written by Orbax one array at a
time (`_Lazy` leaves); `DST/tokenizer/` the tokenizer files, `DST/official.json` the JSON
files and every tensor's dtype, so `--to_official` writes back the same names, shapes and
dtypes (a checkpoint trained in unijax gets JSONs made from its config instead).
"""

from __future__ import annotations

import asyncio
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import app, flags, logging
from flax import nnx, traverse_util
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.serialization import ocdbt_utils, types
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from unijax.convert import bagel_layout as layout
from unijax.convert import safetensors_io
from unijax.convert.bagel_export import peak_rss_mib, to_official
from unijax.convert.released import InitError, raise_problems
from unijax.inference import load as load_lib

# Bytes of arrays made and written at once (host memory beyond the largest array).
WRITE_BUDGET = 256 * 2**20


def _base() -> ml_collections.ConfigDict:
    try:
        from configs import bagel_7b_mot
    except ImportError as e:  # configs/ sits next to the package, not inside it
        raise ImportError("unijax.convert.bagel builds on configs/bagel_7b_mot.py: run from the "
                          "repository root or pass base=<ConfigDict>") from e
    return bagel_7b_mot.get_config()


def _json(path: str, name: str) -> dict:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a BAGEL checkpoint directory: no {name}")
    with open(file) as f:
        return json.load(f)


def open_official(path: str) -> dict:
    """{"ema": ..., "ae": ...}: the checkpoint's safetensors files, opened (headers only)."""
    files = {}
    for part, name in layout.FILES.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path} is not a BAGEL checkpoint directory: no {name}")
        files[part] = safetensors_io.open_safetensors(file)
    return files


def _prepare(path: str, files: dict, base, dtype):
    """The config, the sources of every parameter and the model's shapes, all checked."""
    config, problems = layout.build_config(_json(path, layout.LLM_JSON),
                                           _json(path, layout.VIT_JSON), base or _base(),
                                           ema=files[layout.EMA], ae=files[layout.AE],
                                           dtype=dtype)
    graphdef, state, paths, abstract, trainable = layout.abstract_model(config)
    shapes = {n: tuple(a.shape) for n, a in abstract.items()}
    sources, unmapped = layout.plan(config, shapes)
    problems += [f"{n}: no tensor of the BAGEL checkpoint maps to it" for n in unmapped]
    problems += layout.problems(config, sources, shapes, files)
    raise_problems(f"BAGEL checkpoint {path}", problems)
    return config, sources, (graphdef, state, paths, abstract, trainable)


def official_config(path: str, *, base: ml_collections.ConfigDict | None = None,
                    dtype: str | None = None) -> ml_collections.ConfigDict:
    """The unijax config of the BAGEL checkpoint directory `path` (checked like `load`)."""
    return _prepare(path, open_official(path), base, dtype)[0]


def _read(src: layout.Source, tensors, shape: tuple[int, ...], dtype=None) -> np.ndarray:
    """One unijax parameter of `shape` from its official tensors (each read once)."""
    dtype = np.dtype(dtype or tensors.dtype(src.keys[0]))
    if src.stacked:
        out = np.empty(shape, dtype)
        for i, key in enumerate(src.keys):
            out[i] = src.to_unijax(tensors.read(key), shape[1:])
        return out
    return np.ascontiguousarray(src.to_unijax(tensors.read(src.keys[0]), shape), dtype)


def load(path: str, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
         rules=None, base: ml_collections.ConfigDict | None = None):
    """The BAGEL checkpoint directory `path` as (config, UnifiedModel).

    Args:
      path: holds ema.safetensors, ae.safetensors, llm_config.json, vit_config.json.
      dtype: cast every weight to it (default: keep each tensor's dtype; the config's
        param_dtype is then the LLM's).
      mesh, rules: place each weight sharded on `mesh` as its logical axes and `rules` say
        (`unijax.training.sharding.LOGICAL_RULES`); default: the default device.
      base: the config whose non-model sections are kept (default configs/bagel_7b_mot.py).

    Raises:
      InitError: listing every missing / mis-shaped / unmapped tensor and wrong table.
    """
    if mesh is not None and rules is None:
        raise ValueError("load: a mesh needs the logical axis rules: pass "
                         "rules=unijax.training.sharding.LOGICAL_RULES")
    files = open_official(path)
    config, sources, (graphdef, state, paths, abstract, _) = _prepare(path, files, base,
                                                                        dtype)
    specs = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.get_partition_spec(state)))
    values = {}
    for name, p in paths.items():
        src, shape, sharding = sources[name], abstract[name].shape, None
        if mesh is not None:  # the placement sampling gives a checkpoint's weights
            spec = specs.get(p)
            sharding = jax.sharding.NamedSharding(mesh, load_lib.mesh_spec(
                spec if isinstance(spec, jax.sharding.PartitionSpec) else (), shape, mesh,
                rules))
        values[p] = jax.device_put(_read(src, files[src.file], shape, dtype), sharding)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return config, nnx.merge(graphdef, state)


# --- official -> a unijax checkpoint ----------------------------------------------------------


class _Lazy:
    """An Orbax leaf made only when written: shape and dtype now, `make()` the array later."""

    def __init__(self, shape, dtype, make):
        self.shape, self.dtype, self.make = tuple(shape), np.dtype(dtype), make
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize


class _LazyHandler(ocp.type_handlers.NumpyHandler):
    """Makes and writes `_Lazy` leaves in groups of at most WRITE_BUDGET bytes (Orbax's numpy
    handler takes every array at once, so the whole model would exist together); on disk they
    are Orbax's numpy arrays, restored as usual. One process (the converter's)."""

    async def _write(self, value, info, arg) -> None:
        await info.await_path_creation()
        spec = ts_utils.build_array_write_spec(
            info=info, arg=arg, global_shape=value.shape, local_shape=value.shape,
            dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
            process_index=ocdbt_utils.get_process_index_for_subdir(
                use_ocdbt=info.is_ocdbt_checkpoint),
            metadata_key=self._metadata_key).json
        store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
        await store.write(value.make())

    async def _background_serialize(self, values, infos, args):
        # Groups of at most WRITE_BUDGET bytes are made and written together (one write at
        # a time pays a commit per array: slow for a checkpoint of many small tensors).
        group, size = [], 0
        for value, info, arg in zip(values, infos, args):
            if group and size + value.nbytes > WRITE_BUDGET:
                await asyncio.gather(*group)
                group, size = [], 0
            group.append(self._write(value, info, arg))
            size += value.nbytes
        await asyncio.gather(*group)

    async def serialize(self, values, infos, args=None):
        args = args or [types.SaveArgs()] * len(values)
        return [future.CommitFutureAwaitingContractedSignals(
            self._background_serialize(values, infos, args), name="bagel_lazy")]


def to_unijax(src: str, dst: str, *, dtype: str | None = None,
              base: ml_collections.ConfigDict | None = None) -> dict:
    """Writes the BAGEL directory `src` as a unijax checkpoint in `dst` (module docstring).

    Returns: a report {"checkpoint", "tensors", "bytes", "peak_rss_mib"}.
    """
    dst = os.path.abspath(dst)
    ckpt_dir = os.path.join(dst, "checkpoints")
    if os.path.exists(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} exists: convert into a new directory")
    files = open_official(src)
    config, sources, (_, _, paths, abstract, trainable) = _prepare(src, files, base, dtype)
    tokenizer = layout.copy_tokenizer(src, os.path.join(dst, "tokenizer"))
    if tokenizer is None:
        logging.warning("convert: %s has no tokenizer files; config.data.tokenizer stays %r",
                        src, config.data.tokenizer)
    else:
        config.data.tokenizer = tokenizer
    items: dict[str, dict] = {"ema": {}, "frozen": {}}
    total = 0
    for name, p in paths.items():
        s = sources[name]
        tensors, shape = files[s.file], abstract[name].shape
        leaf = _Lazy(shape, dtype or tensors.dtype(s.keys[0]),
                     lambda s=s, t=tensors, shape=shape: _read(s, t, shape, dtype))
        items["ema" if p in trainable else "frozen"][p] = leaf
        total += leaf.nbytes
    registry = ocp.type_handlers.create_type_handler_registry((_Lazy, _LazyHandler()))
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False), item_handlers={
            "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
            "config": ocp.JsonCheckpointHandler()})
    tree = {k: traverse_util.unflatten_dict(v) for k, v in items.items() if v}
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(tree),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))
    manager.wait_until_finished()
    manager.close()
    meta = {"llm_config": _json(src, layout.LLM_JSON), "vit_config": _json(src, layout.VIT_JSON),
            "dtypes": {part: {k: safetensors_io.DTYPE_NAMES[t.dtype(k)] for k in t}
                       for part, t in files.items()}}
    with open(os.path.join(dst, layout.OFFICIAL_META), "w") as f:
        json.dump(meta, f)
    return {"checkpoint": os.path.join(ckpt_dir, "0"), "tensors": len(paths), "bytes": total,
            "peak_rss_mib": peak_rss_mib()}


# --- the command line ------------------------------------------------------------------------

_SRC = flags.DEFINE_string("src", None, "BAGEL directory (or, with --to_official, a unijax "
                           "workdir / checkpoint directory).")
_DST = flags.DEFINE_string("dst", None, "Directory to write.")
_TO_OFFICIAL = flags.DEFINE_bool("to_official", False, "unijax -> BAGEL's files instead.")
_DTYPE = flags.DEFINE_string("dtype", None, "Cast every weight to this dtype (default: keep).")
_STEP = flags.DEFINE_integer("step", None, "--to_official: the step (default: the newest).")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "--to_official: which weights.")


def main(argv) -> None:
    """The command line: official -> unijax (or back with --to_official), then a report."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not (_SRC.value and _DST.value):
        raise app.UsageError("--src and --dst are required")
    try:
        if _TO_OFFICIAL.value:
            report = to_official(_SRC.value, _DST.value, step=_STEP.value,
                                 weights=_WEIGHTS.value, dtype=_DTYPE.value)
        else:
            report = to_unijax(_SRC.value, _DST.value, dtype=_DTYPE.value)
    except (InitError, FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for key, value in report.items():
        if key != "peak_rss_mib":
            print(f"{key}: {value}", flush=True)
    print(f"peak RSS: {report['peak_rss_mib']:.0f} MiB ({report['bytes'] / 2**20:.0f} MiB of "
          "weights)", flush=True)


if __name__ == "__main__":
    app.run(main)
