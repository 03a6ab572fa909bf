"""Block sparsity of the packed attention mask, from per-block metadata summaries.

The mask of `kernels/mask.py` is tiled into (q-block, kv-block) tiles. Each tile is classified
from min/max summaries of its q and kv blocks (documents, causal orders, splits, noise) as

  EMPTY    no query of the q-block sees any key of the kv-block: never loaded, never computed;
  FULL     every query sees every key: computed without evaluating the mask;
  PARTIAL  anything else: computed with the mask evaluated per element.

The classification is conservative: a tile is called EMPTY or FULL only when it truly is (a
PARTIAL tile may happen to be empty or full). From it `schedule` builds, per q-block, the
compacted list of kv-blocks to visit (partial ones first, then full ones) and the counts, the
form the Pallas kernels consume (scalar prefetch on TPU, an in-kernel loop on GPU);
`transposed_schedule` gives, per kv-block, the q-blocks to visit (the dk/dv backward pass).

Everything is pure jnp on [B, L] metadata with static shapes, so it runs under `jax.jit` and
the sparsity follows the batch with no recompilation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange

from unijax.batch import TokenMeta

EMPTY, PARTIAL, FULL = 0, 1, 2
_BIG = jnp.iinfo(jnp.int32).max
_SMALL = jnp.iinfo(jnp.int32).min


class BlockSchedule(NamedTuple):
    """Which blocks a kernel visits, per row and per outer block.

    index:       int32 [B, n_outer, n_inner]: the inner blocks to visit, partial ones first (in
                 ascending order), then full ones; entries past `num_visible` repeat the last
                 visited index (0 if none), so a pipelined kernel issues no new copy for them.
    num_partial: int32 [B, n_outer]: how many leading entries need the mask evaluated.
    num_visible: int32 [B, n_outer]: how many entries are visited (partial + full).
    """

    index: jax.Array
    num_partial: jax.Array
    num_visible: jax.Array


class _Summary(NamedTuple):
    """Per-block summaries, each [B, n] (min over no token gives _BIG, max gives _SMALL)."""

    any_live: jax.Array
    all_live: jax.Array
    doc_min: jax.Array
    doc_max: jax.Array
    order_min: jax.Array
    order_max: jax.Array
    clean_order_min: jax.Array  # min order of live keys that are not noisy
    any_noisy: jax.Array
    split_min: jax.Array  # over live tokens with split >= 0
    split_max: jax.Array
    all_one_split: jax.Array  # every token is live and in the single split split_min


def _summarize(meta: TokenMeta, block: int) -> _Summary:
    length = meta.doc_id.shape[1]
    if length % block:
        raise ValueError(f"block_sparsity: sequence length {length} is not a multiple of the "
                         f"block size {block}")

    def blocks(x):
        return rearrange(jnp.asarray(x), "b (n k) -> b n k", k=block)

    doc, order, split = blocks(meta.doc_id), blocks(meta.order), blocks(meta.split_id)
    noisy = blocks(meta.noisy).astype(bool)
    live = doc != 0
    in_split = live & (split >= 0)
    clean = live & ~noisy

    def lo(mask, x):
        return jnp.min(jnp.where(mask, x, _BIG), axis=-1)

    def hi(mask, x):
        return jnp.max(jnp.where(mask, x, _SMALL), axis=-1)

    split_min, split_max = lo(in_split, split), hi(in_split, split)
    return _Summary(
        any_live=live.any(-1), all_live=live.all(-1),
        doc_min=lo(live, doc), doc_max=hi(live, doc),
        order_min=lo(live, order), order_max=hi(live, order),
        clean_order_min=lo(clean, order), any_noisy=(live & noisy).any(-1),
        split_min=split_min, split_max=split_max,
        all_one_split=in_split.all(-1) & (split_min == split_max))


def classify(q_meta: TokenMeta, kv_meta: TokenMeta, block_q: int, block_kv: int) -> jax.Array:
    """Classifies every (q-block, kv-block) tile of the mask.

    Args:
      q_meta: query metadata, fields [B, Lq]; kv_meta: key metadata, fields [B, Lk].
      block_q, block_kv: tile sizes (must divide Lq and Lk).

    Returns:
      int32 [B, Lq // block_q, Lk // block_kv] of EMPTY / PARTIAL / FULL.
    """
    q = _summarize(q_meta, block_q)
    k = _summarize(kv_meta, block_kv)
    qx = {name: x[:, :, None] for name, x in q._asdict().items()}  # [B, nq, 1]
    kx = {name: x[:, None, :] for name, x in k._asdict().items()}  # [B, 1, nk]

    docs_disjoint = (qx["doc_max"] < kx["doc_min"]) | (kx["doc_max"] < qx["doc_min"])
    # A shared split is the only way to see a key that is later in causal order or noisy.
    may_share_split = ((qx["split_min"] <= kx["split_max"]) & (kx["split_min"] <= qx["split_max"])
                       & (qx["split_max"] >= 0) & (kx["split_max"] >= 0))
    no_causal_key = kx["clean_order_min"] > qx["order_max"]
    empty = (~qx["any_live"] | ~kx["any_live"] | docs_disjoint
             | (~may_share_split & no_causal_key))

    one_doc = ((qx["doc_min"] == qx["doc_max"]) & (kx["doc_min"] == kx["doc_max"])
               & (qx["doc_min"] == kx["doc_min"]))
    all_causal = ~kx["any_noisy"] & (kx["order_max"] <= qx["order_min"])
    one_split = qx["all_one_split"] & kx["all_one_split"] & (qx["split_min"] == kx["split_min"])
    full = qx["all_live"] & kx["all_live"] & one_doc & (all_causal | one_split)
    return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def _compact(cls: jax.Array) -> BlockSchedule:
    """[B, n_outer, n_inner] classes -> the schedule over the last axis."""
    rank = jnp.where(cls == PARTIAL, 0, jnp.where(cls == FULL, 1, 2))
    order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
    num_partial = jnp.sum(cls == PARTIAL, axis=-1, dtype=jnp.int32)
    num_visible = jnp.sum(cls != EMPTY, axis=-1, dtype=jnp.int32)
    steps = jnp.arange(cls.shape[-1], dtype=jnp.int32)
    last = jnp.maximum(num_visible - 1, 0)[..., None]
    index = jnp.take_along_axis(order, jnp.minimum(steps, last), axis=-1)
    index = jnp.where(num_visible[..., None] > 0, index, 0)
    return BlockSchedule(index=index, num_partial=num_partial, num_visible=num_visible)


def schedule(cls: jax.Array) -> BlockSchedule:
    """Per q-block: the kv-blocks to visit. cls: [B, nq, nk] from `classify`."""
    return _compact(cls)


def transposed_schedule(cls: jax.Array) -> BlockSchedule:
    """Per kv-block: the q-blocks to visit (dk/dv pass). cls: [B, nq, nk] from `classify`;
    the schedule's index is [B, nk, nq]."""
    return _compact(jnp.swapaxes(cls, 1, 2))


def skipped_fraction(cls: jax.Array) -> jax.Array:
    """Fraction of tiles that are EMPTY (never loaded or computed), a float32 scalar."""
    return jnp.mean((cls == EMPTY).astype(jnp.float32))


def tile_counts(cls: jax.Array) -> dict[str, jax.Array]:
    """Numbers of EMPTY, PARTIAL and FULL tiles (int32 scalars), for reports and benchmarks."""
    return {name: jnp.sum(cls == value, dtype=jnp.int32)
            for name, value in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
