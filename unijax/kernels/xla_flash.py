"""The `xla` attention backend: tiled flash attention in plain jnp that skips masked tiles.

The rows are cut into (query block, key block) tiles of `chunk` tokens. The same per-block
metadata summaries the Pallas kernels use (`kernels/block_sparsity.py`) classify each tile,
and only tiles in which some query sees some key are visited: for each query block a
`while` loop walks its compacted list of visible key blocks. A packed row of documents thus
costs about the attention of its documents (a 2048-token row of 4 documents visits ~1/4 of
its tiles), not L^2. Row padding (doc 0) is never visited.

Forward: online softmax over the visited key blocks; per query block the running max `m`,
normaliser `l` and accumulator are carried in float32, then `out = acc / l` and
`lse = m + log l` are kept for the backward (memory O(L * chunk) per head).
Backward: one pass over the same tiles; each visited tile recomputes its probabilities
`p = exp(s - lse)` once and yields its share of dq (accumulated per query block) and of dk,
dv (added into the key block it came from), with the usual `ds = p * (dp - delta) * scale`,
`delta = sum(dout * out)`.

Everything is vectorised over the batch: the loop of a query block runs for the largest
visible count among the rows, and a row with fewer visible blocks masks the extra steps out
(its schedule repeats its last block, contributing exactly zero). Nothing depends on the
batch's values at trace time, so one compiled step serves every mask.

Shapes: qg [B, Hkv, G, Lq, D] (queries grouped per KV head), k, v [B, Lk, Hkv, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from unijax.batch import TokenMeta
from unijax.kernels import block_sparsity
from unijax.kernels import mask as mask_lib


def flash(qg, k, v, q_meta: TokenMeta, kv_meta: TokenMeta, scale: float, chunk: int):
    """Masked attention of grouped queries qg [B, Hkv, G, Lq, D] over k, v [B, Lk, Hkv, D];
    returns [B, Hkv, G, Lq, D] in qg's dtype (differentiable in qg, k, v)."""
    return _flash(qg, k, v, q_meta, kv_meta, scale, chunk)


class _Tiles:
    """The tiling of one call: block sizes, counts, padded metadata and the visit schedule."""

    def __init__(self, lq: int, lk: int, q_meta: TokenMeta, kv_meta: TokenMeta, chunk: int):
        self.lq, self.lk = lq, lk
        self.cq, self.ck = min(chunk, lq), min(chunk, lk)
        self.nq, self.nk = -(-lq // self.cq), -(-lk // self.ck)
        q_meta = _pad_meta(q_meta, self.nq * self.cq)
        kv_meta = _pad_meta(kv_meta, self.nk * self.ck)
        sched = block_sparsity.schedule(
            block_sparsity.classify(q_meta, kv_meta, self.cq, self.ck))
        # Per query block (leading axis, for lax.map): its metadata, visit list and count.
        self.q_meta = _map_meta(lambda x: rearrange(x, "b (n c) -> n b c", c=self.cq), q_meta)
        self.index = jnp.moveaxis(sched.index, 1, 0)  # [nq, B, nk]
        self.count = jnp.moveaxis(sched.num_visible, 1, 0)  # [nq, B]
        self.kv_meta = _map_meta(lambda x: rearrange(x, "b (n c) -> b n c", c=self.ck), kv_meta)

    def q_blocks(self, x, fill=0.0):
        """[B, Hkv, G, Lq, ...] -> [nq, B, Hkv, G, cq, ...] (padded with `fill`)."""
        pad = [(0, 0)] * x.ndim
        pad[3] = (0, self.nq * self.cq - self.lq)
        x = jnp.pad(x, pad, constant_values=fill)
        x = x.reshape(*x.shape[:3], self.nq, self.cq, *x.shape[4:])
        return jnp.moveaxis(x, 3, 0)

    def from_q_blocks(self, x):
        """[nq, B, Hkv, G, cq, ...] -> [B, Hkv, G, Lq, ...]."""
        x = jnp.moveaxis(x, 0, 3)
        return x.reshape(*x.shape[:3], self.nq * self.cq, *x.shape[5:])[:, :, :, :self.lq]

    def kv_blocks(self, x):
        """[B, Lk, Hkv, D] -> [B, nk, ck, Hkv, D] (zero padded)."""
        x = jnp.pad(x, ((0, 0), (0, self.nk * self.ck - self.lk), (0, 0), (0, 0)))
        return x.reshape(x.shape[0], self.nk, self.ck, *x.shape[2:])

    def visit(self, j, index, count, q_meta):
        """Step j of a query block's loop: per row, the key block to visit [B] and the mask
        [B, 1, 1, cq, ck] of that tile (all False for rows with fewer than j + 1 blocks)."""
        block = index[:, j]
        k_meta = _map_meta(lambda x: _take(x, block), self.kv_meta)
        allowed = mask_lib.dense_mask(q_meta, k_meta) & (j < count)[:, None, None]
        return block, allowed[:, None, None]


def _map_meta(fn, meta: TokenMeta) -> TokenMeta:
    return TokenMeta(*(fn(jnp.asarray(x)) for x in
                       (meta.doc_id, meta.order, meta.split_id, meta.noisy)))


def _pad_meta(meta: TokenMeta, length: int) -> TokenMeta:
    """Pads [B, L] metadata to `length` with doc 0 (padding: sees nothing, seen by nothing)."""
    return _map_meta(lambda x: jnp.pad(x, ((0, 0), (0, length - x.shape[1]))), meta)


# Per-row block access written as vmaps over the batch, so that the gather / scatter carry the
# batch as a batching dimension and partition along a sharded batch axis like everything else.
def _take(blocks, block):
    """blocks [B, n, ...], block [B] -> [B, ...]: each row's block."""
    return jax.vmap(lambda x, i: x[i])(blocks, block)


def _add(blocks, block, update):
    """blocks [B, n, ...] with update [B, ...] added into each row's block `block` [B]."""
    return jax.vmap(lambda x, i, u: x.at[i].add(u))(blocks, block, update)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(qg, k, v, q_meta, kv_meta, scale, chunk):
    return _forward(qg, k, v, q_meta, kv_meta, scale, chunk)[0]


def _forward(qg, k, v, q_meta, kv_meta, scale, chunk):
    b, hkv, g, lq, d = qg.shape
    tiles = _Tiles(lq, k.shape[1], q_meta, kv_meta, chunk)
    ks, vs = tiles.kv_blocks(k), tiles.kv_blocks(v)

    def q_block(xs):
        q_i, q_meta_i, index, count = xs
        q32 = q_i.astype(jnp.float32) * scale

        def step(j, carry):
            m, l, acc = carry
            block, allowed = tiles.visit(j, index, count, q_meta_i)
            k_j, v_j = _take(ks, block).astype(jnp.float32), _take(vs, block).astype(jnp.float32)
            s = jnp.einsum("bhgqd,bkhd->bhgqk", q32, k_j)
            s = jnp.where(allowed, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            l = l * correction + p.sum(-1)
            acc = acc * correction[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, v_j)
            return m_new, l, acc

        init = (jnp.full((b, hkv, g, tiles.cq), -jnp.inf, jnp.float32),
                jnp.zeros((b, hkv, g, tiles.cq), jnp.float32),
                jnp.zeros((b, hkv, g, tiles.cq, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, jnp.max(count), step, init)
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        # Rows that see nothing get lse = +inf so that the backward's exp(s - lse) is 0.
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return out, lse

    out, lse = jax.lax.map(q_block, (tiles.q_blocks(qg), tiles.q_meta, tiles.index,
                                     tiles.count))
    out, lse = tiles.from_q_blocks(out), tiles.from_q_blocks(lse)
    return out.astype(qg.dtype), (qg, k, v, q_meta, kv_meta, out, lse)


def _backward(scale, chunk, residuals, d_out):
    qg, k, v, q_meta, kv_meta, out, lse = residuals
    lk = k.shape[1]
    tiles = _Tiles(qg.shape[3], lk, q_meta, kv_meta, chunk)
    ks, vs = tiles.kv_blocks(k), tiles.kv_blocks(v)
    do = d_out.astype(jnp.float32)
    delta = jnp.sum(do * out, axis=-1)  # [B, Hkv, G, Lq]

    def q_block(carry, xs):
        q_i, do_i, lse_i, delta_i, q_meta_i, index, count = xs
        q32 = q_i.astype(jnp.float32)

        def step(j, inner):
            dq, dk, dv = inner
            block, allowed = tiles.visit(j, index, count, q_meta_i)
            k_j, v_j = _take(ks, block).astype(jnp.float32), _take(vs, block).astype(jnp.float32)
            s = jnp.einsum("bhgqd,bkhd->bhgqk", q32 * scale, k_j)
            p = jnp.exp(jnp.where(allowed, s, -jnp.inf) - lse_i[..., None])
            dp = jnp.einsum("bhgqd,bkhd->bhgqk", do_i, v_j)
            ds = p * (dp - delta_i[..., None]) * scale
            dv = _add(dv, block, jnp.einsum("bhgqk,bhgqd->bkhd", p, do_i))
            dk = _add(dk, block, jnp.einsum("bhgqk,bhgqd->bkhd", ds, q32))
            return dq + jnp.einsum("bhgqk,bkhd->bhgqd", ds, k_j), dk, dv

        dq, dk, dv = jax.lax.fori_loop(0, jnp.max(count), step,
                                       (jnp.zeros_like(q32), *carry))
        return (dk, dv), dq

    zeros = jnp.zeros(ks.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(
        q_block, (zeros, zeros),
        (tiles.q_blocks(qg), tiles.q_blocks(do), tiles.q_blocks(lse, jnp.inf),
         tiles.q_blocks(delta), tiles.q_meta, tiles.index, tiles.count))
    dq = tiles.from_q_blocks(dq)
    dk = dk.reshape(dk.shape[0], -1, *dk.shape[3:])[:, :lk]
    dv = dv.reshape(dv.shape[0], -1, *dv.shape[3:])[:, :lk]
    return dq.astype(qg.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_forward, _backward)
