"""Packed-sequence flash attention as Pallas kernels lowered through Triton (NVIDIA GPUs).

One program per (q-block, row, query head) walks the compacted list of kv-blocks of its q-block
(`block_sparsity.schedule`): partial tiles first, with the mask evaluated from the encoded
metadata (`_flash_common`), then full tiles without it. Empty tiles are never touched. Online
softmax in base 2, float32 statistics and accumulators, bf16 (or the input dtype) operands of
the matrix products. K/V are indexed by `head // group` (grouped-query attention without
repeating K/V).

Backward (`jax.custom_vjp`, logsumexp residual): a dq kernel over the same schedule, and a
dk/dv kernel with one program per (kv-block, row, kv head) that walks the transposed schedule
for each query head of its group and accumulates in registers (no atomics).

Shapes: q [B, Lq, H, D], k/v [B, Lk, Hkv, D]; Lq, Lk multiples of the blocks; D a power of
two in [16, 256].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from unijax.batch import TokenMeta
from unijax.kernels import _flash_common as common
from unijax.kernels import block_sparsity

HEAD_DIMS = (16, 32, 64, 128, 256)
NAME = "pallas_gpu"
# (block_q, block_kv, block_q_bwd, block_kv_bwd) when the config leaves them at 0.
DEFAULT_BLOCKS = (128, 64, 64, 64)


def tile_multiple(interpret: bool) -> int:
    """What a block must be a multiple of, unless it spans the whole row (Triton's minimum
    matrix-product tile, in interpret mode too so that tests see the hardware rule)."""
    del interpret
    return 16


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Static kernel parameters (hashable: a nondiff argument of the custom VJP)."""

    scale: float
    block_q: int = DEFAULT_BLOCKS[0]
    block_kv: int = DEFAULT_BLOCKS[1]
    block_q_bwd: int = DEFAULT_BLOCKS[2]
    block_kv_bwd: int = DEFAULT_BLOCKS[3]
    num_warps: int | None = None
    num_stages: int = 2
    interpret: bool = False


def _resolve(cfg: GpuConfig, field: str, length: int) -> int:
    return common.resolve_block(NAME, field, getattr(cfg, field), length,
                                tile_multiple(cfg.interpret))


def _walk(step, n_part: jax.Array, n_vis: jax.Array, carry):
    """Folds step(t, carry, masked=...) over a schedule row: its partial tiles [0, n_part)
    with the mask, then its full tiles [n_part, n_vis) without."""
    carry = lax.fori_loop(0, n_part, functools.partial(step, masked=True), carry)
    return lax.fori_loop(n_part, n_vis, functools.partial(step, masked=False), carry)


def _compiler_params(cfg: GpuConfig, block_a: int, block_b: int, head_dim: int):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    warps = cfg.num_warps or (4 if block_a * block_b <= 64 * 64 or head_dim <= 64 else 8)
    return pl_triton.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


# ------------------------------------------------------------------------------------------
# Forward.
# ------------------------------------------------------------------------------------------


def _fwd_kernel(index_ref, npart_ref, nvis_ref, qm_ref, km_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *visits_ref, scale, block_kv):
    i, b = pl.program_id(0), pl.program_id(1)
    q = q_ref[...]
    bq = q.shape[0]
    q_doc, q_order, q_split = (qm_ref[f, :][:, None] for f in range(3))
    qk_scale = scale * common.LOG2E

    def step(t, carry, masked):
        acc, m, l, visits = carry
        start = pl.multiple_of(index_ref[b, i, t] * block_kv, block_kv)
        kv = pl.ds(start, block_kv)
        s = common.dot_f32(q, k_ref[kv, :], common.NT) * qk_scale
        if masked:
            seen = common.visible(q_doc, q_order, q_split, *(km_ref[f, kv][None, :]
                                                             for f in range(3)))
            s = jnp.where(seen, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # A row that has seen nothing yet keeps m = -inf; exp2(-inf - 0) = 0 keeps it empty.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        v = v_ref[kv, :]
        acc = acc * alpha[:, None] + common.dot_f32(p.astype(v.dtype), v, common.NN)
        return acc, m_new, l * alpha + p.sum(axis=-1), visits + 1

    n_part, n_vis = npart_ref[b, i], nvis_ref[b, i]
    carry = (jnp.zeros((bq, q.shape[1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32), jnp.int32(0))
    acc, m, l, visits = _walk(step, n_part, n_vis, carry)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    # A query that sees nothing gets lse = +inf, so the backward's exp2(s - lse) is 0.
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), jnp.inf)
    if visits_ref:
        visits_ref[0][...] = jnp.full((1,), visits, jnp.int32)


def _q_block_specs(bq: int, lk: int, d: int, group: int) -> list:
    """Inputs of a program (q-block i, row r, query head hh) of the forward and dq kernels:
    the schedule (index, num_partial, num_visible: whole arrays, read as scalars), the
    q-block's and the row's encoded metadata, the q-block of q, and the row's K and V of the
    head's kv head."""
    whole = pl.no_block_spec
    kv = pl.BlockSpec((None, lk, None, d), lambda i, r, hh: (r, 0, hh // group, 0))
    return [whole, whole, whole,
            pl.BlockSpec((None, 3, bq), lambda i, r, hh: (r, 0, i)),
            pl.BlockSpec((None, 3, lk), lambda i, r, hh: (r, 0, 0)),
            pl.BlockSpec((None, bq, None, d), lambda i, r, hh: (r, i, hh, 0)),
            kv, kv]


def _forward(cfg: GpuConfig, q, k, v, q_meta: TokenMeta, kv_meta: TokenMeta,
             count_visits: bool = False):
    """Returns out [B, Lq, H, D], lse [B, H, Lq] (base 2) and, if asked, visits [B, H, nq]."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    bq = _resolve(cfg, "block_q", lq)
    bk = _resolve(cfg, "block_kv", lk)
    nq = lq // bq
    sched = block_sparsity.schedule(block_sparsity.classify(q_meta, kv_meta, bq, bk))
    qm, km = common.encode_queries(q_meta), common.encode_keys(kv_meta)
    in_specs = _q_block_specs(bq, lk, d, group)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq), jnp.float32)]
    out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, r, hh: (r, i, hh, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, r, hh: (r, hh, i))]
    if count_visits:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nq), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 1), lambda i, r, hh: (r, hh, i)))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=cfg.scale, block_kv=bk),
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg, bq, bk, d),
        interpret=cfg.interpret,
        name="unijax_packed_flash_fwd",
    )(sched.index, sched.num_partial, sched.num_visible, qm, km, q, k, v)
    return tuple(outs)


# ------------------------------------------------------------------------------------------
# Backward: dq over the schedule, dk/dv over the transposed schedule.
# ------------------------------------------------------------------------------------------


def _dq_kernel(index_ref, npart_ref, nvis_ref, qm_ref, km_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, scale, block_kv):
    i, b = pl.program_id(0), pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_doc, q_order, q_split = (qm_ref[f, :][:, None] for f in range(3))
    qk_scale = scale * common.LOG2E

    def step(t, dq, masked):
        start = pl.multiple_of(index_ref[b, i, t] * block_kv, block_kv)
        kv = pl.ds(start, block_kv)
        k, v = k_ref[kv, :], v_ref[kv, :]
        s = common.dot_f32(q, k, common.NT) * qk_scale
        if masked:
            seen = common.visible(q_doc, q_order, q_split, *(km_ref[f, kv][None, :]
                                                             for f in range(3)))
            s = jnp.where(seen, s, -jnp.inf)
        p = jnp.exp2(s - lse)
        ds = p * (common.dot_f32(do, v, common.NT) - delta)
        return dq + common.dot_f32(ds.astype(k.dtype), k, common.NN)

    n_part, n_vis = npart_ref[b, i], nvis_ref[b, i]
    dq = _walk(step, n_part, n_vis, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(index_ref, npart_ref, nvis_ref, qm_ref, km_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, scale, block_q, group):
    j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_doc, k_order, k_split = (km_ref[f, :][:, None] for f in range(3))
    qk_scale = scale * common.LOG2E

    def step(t, carry, head, masked):
        dk, dv = carry
        start = pl.multiple_of(index_ref[b, j, t] * block_q, block_q)
        rows = pl.ds(start, block_q)
        q, do = q_ref[rows, head, :], do_ref[rows, head, :]
        # Transposed tile [bk, bq]: keys along rows, so dk/dv accumulate without transposes.
        s_t = common.dot_f32(k, q, common.NT) * qk_scale
        if masked:
            seen = common.visible(*(qm_ref[f, rows][None, :] for f in range(3)),
                                  k_doc, k_order, k_split)
            s_t = jnp.where(seen, s_t, -jnp.inf)
        p_t = jnp.exp2(s_t - lse_ref[head, rows][None, :])
        dv = dv + common.dot_f32(p_t.astype(do.dtype), do, common.NN)
        ds_t = p_t * (common.dot_f32(v, do, common.NT) - delta_ref[head, rows][None, :])
        return dk + common.dot_f32(ds_t.astype(q.dtype), q, common.NN), dv

    n_part, n_vis = npart_ref[b, j], nvis_ref[b, j]

    def per_head(g, carry):
        head = hk * group + g
        return _walk(functools.partial(step, head=head), n_part, n_vis, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, per_head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(cfg: GpuConfig, q, k, v, q_meta, kv_meta, out, lse, d_out):
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    bq = _resolve(cfg, "block_q_bwd", lq)
    bk = _resolve(cfg, "block_kv_bwd", lk)
    cls = block_sparsity.classify(q_meta, kv_meta, bq, bk)
    sched, sched_t = block_sparsity.schedule(cls), block_sparsity.transposed_schedule(cls)
    qm, km = common.encode_queries(q_meta), common.encode_keys(kv_meta)
    delta = common.delta(out, d_out)
    d_out = d_out.astype(q.dtype)
    whole = pl.no_block_spec

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.scale, block_kv=bk),
        grid=(lq // bq, b, h),
        in_specs=[
            *_q_block_specs(bq, lk, d, group),
            pl.BlockSpec((None, bq, None, d), lambda i, r, hh: (r, i, hh, 0)),  # d_out
            pl.BlockSpec((None, None, bq), lambda i, r, hh: (r, hh, i)),  # lse
            pl.BlockSpec((None, None, bq), lambda i, r, hh: (r, hh, i)),  # delta
        ],
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, r, hh: (r, i, hh, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, bq, bk, d),
        interpret=cfg.interpret,
        name="unijax_packed_flash_dq",
    )(sched.index, sched.num_partial, sched.num_visible, qm, km, q, k, v, d_out, lse, delta)

    kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, r, hh: (r, j, hh, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.scale, block_q=bq, group=group),
        grid=(lk // bk, b, hkv),
        in_specs=[
            whole, whole, whole,
            pl.BlockSpec((None, 3, lq), lambda j, r, hh: (r, 0, 0)),
            pl.BlockSpec((None, 3, bk), lambda j, r, hh: (r, 0, j)),
            pl.BlockSpec((None, lq, h, d), lambda j, r, hh: (r, 0, 0, 0)),
            kv_spec, kv_spec,
            pl.BlockSpec((None, lq, h, d), lambda j, r, hh: (r, 0, 0, 0)),
            pl.BlockSpec((None, h, lq), lambda j, r, hh: (r, 0, 0)),
            pl.BlockSpec((None, h, lq), lambda j, r, hh: (r, 0, 0)),
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg, bq, bk, d),
        interpret=cfg.interpret,
        name="unijax_packed_flash_dkv",
    )(sched_t.index, sched_t.num_partial, sched_t.num_visible, qm, km, q, k, v, d_out, lse,
      delta)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------
# Custom VJP and the backend entry.
# ------------------------------------------------------------------------------------------


_flash = common.with_flash_vjp(_forward, _backward)


def attention(q, k, v, q_meta: TokenMeta, kv_meta: TokenMeta, *, scale: float,
              block_q: int = DEFAULT_BLOCKS[0], block_kv: int = DEFAULT_BLOCKS[1],
              block_q_bwd: int = DEFAULT_BLOCKS[2], block_kv_bwd: int = DEFAULT_BLOCKS[3],
              interpret: bool = False,
              num_warps: int | None = None, num_stages: int = 2) -> jax.Array:
    """Packed flash attention on GPU (see module docstring).

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D]; q_meta / kv_meta: fields [B, Lq] / [B, Lk].
      scale: logit scale.
      block_q, block_kv: forward tile; block_q_bwd, block_kv_bwd: backward tile.
      interpret: run the kernels in the Pallas interpreter (CPU tests).
      num_warps, num_stages: Triton launch parameters (default: chosen from the tile).

    Returns:
      [B, Lq, H, D] in q's dtype; a query that sees no key gets zeros.
    """
    common.check_shapes(NAME, q, k, HEAD_DIMS)
    cfg = GpuConfig(scale=float(scale), block_q=block_q, block_kv=block_kv,
                    block_q_bwd=block_q_bwd, block_kv_bwd=block_kv_bwd, num_warps=num_warps,
                    num_stages=num_stages, interpret=interpret)
    return _flash(cfg, q, k, v, q_meta, kv_meta)


def visit_counts(q, k, v, q_meta: TokenMeta, kv_meta: TokenMeta, *, scale: float,
                 block_q: int, block_kv: int, interpret: bool = False) -> jax.Array:
    """int32 [B, H, Lq // block_q]: kv-blocks the forward kernel actually processed per
    q-block (counted inside the kernel; for tests of the block sparsity)."""
    cfg = GpuConfig(scale=float(scale), block_q=block_q, block_kv=block_kv,
                    interpret=interpret)
    return _forward(cfg, q, k, v, q_meta, kv_meta, count_visits=True)[2]
