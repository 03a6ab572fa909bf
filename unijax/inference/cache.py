"""The KV cache of a unified-model context, and the engine that fills and reads it.

  engine = Engine(model, config)                       # jitted prefill / denoise functions
  ctx = Context.empty(engine, batch_size=2, capacity=1024)
  ctx = ctx.append(engine, [[text_item, vit_item], [text_item]])   # prefill, one row each
  ctx.cache.k                                          # [N, B, C, Hkv, Dh] per layer

A context is what the model has read so far, one row per conversation: per layer the keys
(after QK-norm and RoPE) and values of every token already in it (text, ViT tokens, clean VAE
latents, the image markers), plus each token's attention metadata (doc id, causal order, split
id, noisy flag), so a new token sees exactly what the training mask lets it see: the cached
tokens and the new ones are masked by the same rule (`kernels/mask.py`) from the same metadata,
through `kernels.attention`. Empty slots hold doc id 0, which nothing ever sees.

New items are laid out by the training packer (`data.packing.layout`, BAGEL's token layout:
`<|im_start|> ids <|im_end|>` text, `<|vision_start|> tokens <|vision_end|>` images) into one
chunk, whose metadata then continues each row's context: causal order, RoPE position and split
ids after the row's (`Context.next_*`). Rows of a batch may take different items; a chunk pads
every row to the longest and writes the whole chunk at the same slots of every row (padding
slots stay invisible), so one scalar `length` says how far the cache is filled and every call
of one chunk shape compiles once. The capacity is fixed when the context is made; appending
beyond it raises `CacheFullError` before anything runs.

A `Context` is immutable: `append` returns a new one, so a snapshot (the guidance contexts of
`image.py`) is just a reference to an earlier context. Contexts of the same capacity stack
along the batch (`concat`), and rows can be repeated (`repeat`, several samples per prompt).

Under a mesh (`Engine(..., mesh=mesh, rules=LOGICAL_RULES)`) the model runs inside
`jax.set_mesh` with the logical axis rules, and cache arrays are placed with the rows over the
`batch` rule's mesh axes and the KV heads over the `kv_heads` rule's (as training shards
activations), so a model that does not fit one device samples across several. Cached steps use
the `xla` attention backend (a query chunk of a few tokens does not fill a Pallas tile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from unijax import batch as batch_lib
from unijax.batch import PackedBatch, TokenMeta
from unijax.data import packing
from unijax.data.plan import DocKey, ImageItem, SequencePlan, TextItem

# Chunk capacities are rounded up to a multiple of this, so prompts of similar lengths share
# one compiled prefill.
CHUNK_MULTIPLE = 16


class CacheFullError(ValueError):
    """Appending would write beyond the context's fixed capacity."""


@struct.dataclass
class KVCache:
    """Per-layer keys and values of the cached tokens, with their attention metadata."""

    k: jax.Array  # [N, B, C, Hkv, Dh]
    v: jax.Array  # [N, B, C, Hkv, Dh]
    meta: TokenMeta  # fields [B, C]; doc_id 0 on empty slots

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


@dataclasses.dataclass(frozen=True)
class Context:
    """A KV cache and, per row, where its context continues (host-side bookkeeping).

    Attributes:
      cache: the device arrays.
      length: cache slots written so far (the same for every row; padding slots included).
      next_position: [B] RoPE position of the row's next token.
      next_order: [B] causal order of the row's next token.
      next_split: [B] first unused split id of the row.
    """

    cache: KVCache
    length: int
    next_position: np.ndarray
    next_order: np.ndarray
    next_split: np.ndarray

    @property
    def batch_size(self) -> int:
        return len(self.next_position)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @classmethod
    def empty(cls, engine: Engine, batch_size: int, capacity: int) -> Context:
        """A context of `batch_size` rows with room for `capacity` tokens each."""
        if capacity < 1:
            raise ValueError(f"Context.empty: capacity must be >= 1, got {capacity}")
        cfg = engine.model_config
        with engine.scope():
            cache = jax.jit(lambda: empty_cache(cfg, batch_size, capacity),
                            out_shardings=engine.cache_shardings(batch_size))()
        zeros = np.zeros(batch_size, np.int64)
        return cls(cache, 0, zeros, zeros.copy(), zeros.copy())

    def append(self, engine: Engine, rows: Sequence[Sequence[TextItem | ImageItem]]) -> Context:
        """Prefills the items of each row (one list per row; [] leaves a row unchanged).

        Raises:
          CacheFullError: when the chunk does not fit the remaining capacity.
        """
        return self.append_with_logits(engine, rows, logits=False)[0]

    def append_with_logits(self, engine: Engine, rows: Sequence[Sequence[TextItem | ImageItem]],
                           *, logits: bool = True) -> tuple[Context, tuple | None]:
        """`append`, also returning (logits [B, U, V] of the chunk's und slice, chunk) so a
        caller can read the logits of given tokens (None when nothing was appended)."""
        if len(rows) != self.batch_size:
            raise ValueError(f"Context.append: {len(rows)} rows of items for a context of "
                             f"{self.batch_size} rows")
        if not any(rows):
            return self, None
        chunk, advance = engine.chunk(self, rows)
        self.check_room(chunk.length)
        cache, out = engine.prefill(self.cache, chunk, self.length, logits=logits)
        ctx = dataclasses.replace(self, cache=cache, length=self.length + chunk.length,
                                  **advance)
        return ctx, ((out, chunk) if logits else None)

    def check_room(self, tokens: int) -> None:
        """Raises CacheFullError unless `tokens` more slots fit."""
        if self.length + tokens > self.capacity:
            raise CacheFullError(
                f"KV cache full: {self.length} of {self.capacity} slots are used and "
                f"{tokens} more are needed; make the context with a larger capacity")

    def advanced(self, cache: KVCache, tokens: int, next_position, next_order) -> Context:
        """This context after `tokens` slots were written by a decoding loop."""
        return dataclasses.replace(self, cache=cache, length=self.length + tokens,
                                   next_position=np.asarray(next_position, np.int64),
                                   next_order=np.asarray(next_order, np.int64))

    def repeat(self, n: int) -> Context:
        """Each row repeated n times in place (rows r, r, ..., r+1, ...)."""
        rep = lambda x: jnp.repeat(x, n, axis=1 if x.ndim == 5 else 0)
        return dataclasses.replace(
            self, cache=jax.tree.map(rep, self.cache),
            next_position=np.repeat(self.next_position, n),
            next_order=np.repeat(self.next_order, n), next_split=np.repeat(self.next_split, n))

    @staticmethod
    def concat(contexts: Sequence[Context]) -> Context:
        """The rows of several contexts of one capacity as one context (batch axis).

        The length is the largest of theirs: slots a shorter context never wrote are empty
        (doc id 0) and stay invisible.
        """
        caps = {c.capacity for c in contexts}
        if len(caps) != 1:
            raise ValueError(f"Context.concat: contexts of different capacities {sorted(caps)}")
        cat = lambda *xs: jnp.concatenate(xs, axis=1 if xs[0].ndim == 5 else 0)
        return Context(
            cache=jax.tree.map(cat, *[c.cache for c in contexts]),
            length=max(c.length for c in contexts),
            next_position=np.concatenate([c.next_position for c in contexts]),
            next_order=np.concatenate([c.next_order for c in contexts]),
            next_split=np.concatenate([c.next_split for c in contexts]))


def item_advance(items: Sequence[TextItem | ImageItem]) -> int:
    """How far the RoPE position moves over `items` (the packer's rule: text one per token,
    markers included; an image by its step; gaps of dropped images)."""
    pos = 0
    for item in items:
        pos += item.gap
        if isinstance(item, TextItem):
            pos += len(item.ids) + 1 + int(item.closed)
        else:
            pos += item.step
    return pos


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class Engine:
    """A model's jitted context functions: prefill (write a chunk into the cache) and the
    forward of new tokens against a cache (`extend`, no write).

    Args:
      model: the UnifiedModel (its weights are read once; they stay where they are, sharded or
        not).
      config: the model's config (for the token layout: capacities, patch sizes, tokenizer
        markers come from `special`).
      special: the tokenizer's marker ids (`tokenizer.special`).
      mesh, rules: the mesh the weights live on and the logical axis rules (e.g.
        `unijax.training.sharding.LOGICAL_RULES`); None: one device.
    """

    def __init__(self, model, config: ml_collections.ConfigDict, special, *, mesh=None,
                 rules=None):
        if mesh is not None and rules is None:
            raise ValueError("Engine: a mesh needs its logical axis rules (rules=...)")
        self.graphdef, self.state = nnx.split(model)
        self.model_config = model.llm_config
        self.config = config
        self.mesh, self.rules = mesh, rules
        self.spec = packing.PackSpec.from_config(config, special)
        self.special = special
        self.latent_cell = model.latent_cell
        self.patch = model.patch
        self.token_dim = model.patch * model.patch * model.latent_channels
        self._prefill = jax.jit(self._prefill_fn, static_argnums=(4,))
        self._extend = jax.jit(self._extend_fn, static_argnames=("logits",))
        self._functions = {}

    def set_weights(self, model) -> None:
        """Serves `model`'s weights from now on (same architecture: the compiled functions are
        kept, e.g. to sample from a training run's weights at several steps)."""
        graphdef, state = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("Engine.set_weights: the model's structure differs from the "
                             "engine's; make a new Engine")
        self.state = state

    def function(self, key, build):
        """`build()`'s jitted function, built once per key (a decoding loop per settings)."""
        if key not in self._functions:
            self._functions[key] = build()
        return self._functions[key]

    # --- placement ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def scope(self):
        """The mesh and logical axis rules the model runs under (nothing without a mesh)."""
        if self.mesh is None:
            yield
            return
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield

    def cache_shardings(self, batch_size: int):
        """KVCache of NamedShardings (rows over `batch`, KV heads over `kv_heads`), or None."""
        if self.mesh is None:
            return None
        kv, meta = cache_specs(self.mesh, self.rules, batch_size, self.model_config.num_kv_heads)
        kv, meta = NamedSharding(self.mesh, kv), NamedSharding(self.mesh, meta)
        return KVCache(k=kv, v=kv, meta=TokenMeta(meta, meta, meta, meta))

    def _constrain(self, cache: KVCache) -> KVCache:
        shardings = self.cache_shardings(cache.k.shape[1])
        if shardings is None:
            return cache
        return jax.lax.with_sharding_constraint(cache, shardings)

    # --- chunks -------------------------------------------------------------------------------

    def chunk(self, ctx: Context, rows: Sequence[Sequence[TextItem | ImageItem]],
              latent_grid: tuple[int, int] | None = None) -> tuple[PackedBatch, dict]:
        """The items of each row laid out as one expert-major chunk continuing `ctx`.

        Args:
          latent_grid: the VAE canvas of the chunk (default: the config's); an image being
            generated uses its own grid, so its payload indices are its token indices.

        Returns:
          (chunk, advance): the host PackedBatch and the context's next_* after it.
        """
        plans = [SequencePlan(list(items), DocKey("", "", -1)) if items else None
                 for items in rows]
        costs = np.array([p.cost() if p else (0, 0, 0, 0) for p in plans])
        und, gen, vit, vae = costs.max(axis=0)
        spec = dataclasses.replace(
            self.spec, num_und=_round_up(int(und), CHUNK_MULTIPLE),
            num_gen=_round_up(int(gen), CHUNK_MULTIPLE) if gen else 0,
            max_vit_patches=_round_up(int(vit), CHUNK_MULTIPLE) if vit else 0,
            max_vae_images=max(1, int(vae)), latent_grid=latent_grid or self.spec.latent_grid)
        arrays = packing.layout([[p] if p else [] for p in plans], spec)
        live = arrays["doc_id"] > 0
        arrays["order"] = np.where(live, arrays["order"] + ctx.next_order[:, None], 0)
        arrays["position"] = np.where(live, arrays["position"] + ctx.next_position[:, None], 0)
        split = arrays["split_id"]
        arrays["split_id"] = np.where(split >= 0, split + ctx.next_split[:, None], -1)
        splits = np.array([split[r][split[r] >= 0].max() + 1 if (split[r] >= 0).any() else 0
                           for r in range(len(rows))])
        for name in ("order", "position", "split_id"):
            arrays[name] = arrays[name].astype(np.int32)
        chunk = packing.to_packed_batch(arrays, spec)
        advance = dict(
            next_position=ctx.next_position + np.array([item_advance(r) for r in rows]),
            next_order=ctx.next_order + live.sum(axis=1),
            next_split=ctx.next_split + splits)
        return chunk, advance

    # --- jitted functions ---------------------------------------------------------------------

    def _model(self, state):
        return nnx.merge(self.graphdef, state)

    def _prefill_fn(self, state, cache: KVCache, chunk: PackedBatch, length, logits: bool):
        out, (k, v) = self._model(state).extend(chunk, cache.k, cache.v, cache.meta,
                                                logits=logits)
        cache = self._constrain(write(cache, k, v, chunk.token_meta(), length))
        return cache, out.logits

    def _extend_fn(self, state, cache: KVCache, chunk: PackedBatch, latent_tokens, timesteps,
                   *, logits: bool):
        out, kv = self._model(state).extend(chunk, cache.k, cache.v, cache.meta,
                                            latent_tokens, timesteps, logits=logits)
        return out, kv

    def prefill(self, cache: KVCache, chunk: PackedBatch, length: int, *,
                logits: bool = False) -> tuple[KVCache, jax.Array | None]:
        """(`cache` with the chunk's keys, values and metadata written from slot `length`,
        the chunk's und logits [B, U, V] or None)."""
        with self.scope():
            return self._prefill(self.state, cache, chunk, jnp.int32(length), logits)

    def extend(self, cache: KVCache, chunk: PackedBatch, latent_tokens=None, timesteps=None,
               *, logits: bool = True):
        """(UnifiedOutput, (k, v)) of the chunk's tokens against the cache; nothing written."""
        with self.scope():
            return self._extend(self.state, cache, chunk, latent_tokens, timesteps,
                                logits=logits)


def empty_cache(cfg, batch_size: int, capacity: int) -> KVCache:
    """A KVCache of `batch_size` empty rows of `capacity` slots for the decoder config `cfg`
    (traceable: `Context.empty` runs it under jit, `memory.py` takes its shapes)."""
    shape = (cfg.num_layers, batch_size, capacity, cfg.num_kv_heads, cfg.head_dim)
    slots = (batch_size, capacity)
    return KVCache(k=jnp.zeros(shape, cfg.compute_dtype), v=jnp.zeros(shape, cfg.compute_dtype),
                   meta=TokenMeta(doc_id=jnp.zeros(slots, jnp.int32),
                                  order=jnp.zeros(slots, jnp.int32),
                                  split_id=jnp.full(slots, -1, jnp.int32),
                                  noisy=jnp.zeros(slots, bool)))


def cache_specs(mesh, rules, batch_size: int,
                num_kv_heads: int) -> tuple[PartitionSpec, PartitionSpec]:
    """(k / v spec [N, B, C, Hkv, Dh], metadata spec [B, C]) of a cache on `mesh` (a Mesh or an
    AbstractMesh): rows over the `batch` rule's mesh axes and KV heads over the `kv_heads`
    rule's, each only where those axes divide the dimension (else replicated)."""
    table = dict(rules or ())

    def axes(logical: str, size: int):
        target = table.get(logical)
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
        if not names or size % math.prod(mesh.shape[n] for n in names):
            return None
        return names[0] if len(names) == 1 else names

    rows, heads = axes("batch", batch_size), axes("kv_heads", num_kv_heads)
    return PartitionSpec(None, rows, None, heads, None), PartitionSpec(rows, None)


def write(cache: KVCache, k: jax.Array, v: jax.Array, meta: TokenMeta, length) -> KVCache:
    """The cache with k, v [N, B, L, Hkv, Dh] and meta [B, L] written at slots
    [length, length + L) of every row (inside jit: `length` may be traced)."""
    zero = jnp.zeros((), jnp.int32)
    length = jnp.asarray(length, jnp.int32)
    put = lambda buf, new: jax.lax.dynamic_update_slice(
        buf, new.astype(buf.dtype), (zero, zero, length, zero, zero))
    put_meta = lambda buf, new: jax.lax.dynamic_update_slice(
        buf, jnp.asarray(new).astype(buf.dtype), (zero, length))
    return KVCache(k=put(cache.k, k), v=put(cache.v, v),
                   meta=jax.tree.map(put_meta, cache.meta, meta))


def text_chunk(tokens: jax.Array, position: jax.Array, order: jax.Array,
               live: jax.Array) -> PackedBatch:
    """A one-token-per-row chunk of text (a decoding step; traceable): `tokens`, `position`,
    `order` [B]; rows where `live` is False hold padding (never seen, no position used)."""
    b = tokens.shape[0]
    col = lambda x, dtype: jnp.asarray(x, dtype).reshape(b, 1)
    zeros = lambda *shape, dtype=jnp.int32: jnp.zeros((b, *shape), dtype)
    live = col(live, bool)
    return PackedBatch(
        modality=jnp.where(live, batch_lib.TEXT, batch_lib.PAD).astype(jnp.int32),
        doc_id=live.astype(jnp.int32), order=jnp.where(live, col(order, jnp.int32), 0),
        split_id=jnp.full((b, 1), -1, jnp.int32), noisy=zeros(1, dtype=bool),
        position=jnp.where(live, col(position, jnp.int32), 0),
        text_ids=jnp.where(live, col(tokens, jnp.int32), 0), text_targets=zeros(1),
        text_weight=zeros(1, dtype=jnp.float32), flow_weight=zeros(1, dtype=jnp.float32),
        payload_index=jnp.full((b, 1), -1, jnp.int32), patch_pos=zeros(1),
        vit_patches=zeros(0, 3, dtype=jnp.uint8), vit_patch_rc=zeros(0, 2),
        vit_grid_hw=zeros(0, 2), vit_image_id=zeros(0), vae_images=zeros(0, 1, 1, 3,
                                                                         dtype=jnp.uint8),
        vae_grid_hw=zeros(0, 2), vae_timestep=zeros(0, dtype=jnp.float32), num_und=1)
