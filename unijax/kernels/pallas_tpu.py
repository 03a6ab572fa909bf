"""Packed-sequence flash attention as Pallas Mosaic kernels (TPU).

Splash-attention style: the block schedule (`block_sparsity.schedule`) is scalar-prefetched
into SMEM and the index maps read it, so grid step (row, head, q-block, t) loads the t-th
visited kv-block of its q-block. Steps past the q-block's count repeat the last index (no new
copy) and compute nothing, so empty tiles are never loaded or computed; partial tiles evaluate
the mask from the encoded metadata (`_flash_common`), full tiles skip it. Online softmax with
float32 statistics (kept lane-replicated, [bq, 128], as TPU kernels do) and accumulators;
bf16 (or the input dtype) operands of the matrix products. K/V blocks are indexed by
`head // group` (grouped-query attention without repeating K/V).

Backward (`jax.custom_vjp`, logsumexp residual): a dq kernel over the same schedule and a
dk/dv kernel whose grid walks, per kv-block, the transposed schedule for every query head of
the kv head's group (the accumulator stays in VMEM, no cross-step revisits).

Shapes: q [B, Lq, H, D], k/v [B, Lk, Hkv, D]; Lq, Lk multiples of the blocks; on hardware the
blocks are multiples of 128 and D one of `HEAD_DIMS` (interpret mode accepts blocks of 8).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unijax.batch import TokenMeta
from unijax.kernels import _flash_common as common
from unijax.kernels import block_sparsity

HEAD_DIMS = (32, 64, 128, 256)
NAME = "pallas_tpu"
LANES = 128
# (block_q, block_kv, block_q_bwd, block_kv_bwd) when the config leaves them at 0.
DEFAULT_BLOCKS = (512, 512, 256, 256)


def tile_multiple(interpret: bool) -> int:
    """What a block must be a multiple of, unless it spans the whole row."""
    return 8 if interpret else LANES


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Static kernel parameters (hashable: a nondiff argument of the custom VJP)."""

    scale: float
    block_q: int = DEFAULT_BLOCKS[0]
    block_kv: int = DEFAULT_BLOCKS[1]
    block_q_bwd: int = DEFAULT_BLOCKS[2]
    block_kv_bwd: int = DEFAULT_BLOCKS[3]
    interpret: bool = False


def _lanes(x, n):
    """Lane-replicated [rows, 128] statistics -> [rows, n]."""
    if n % LANES == 0:
        return jnp.tile(x, (1, n // LANES))
    return x[:, :n]  # blocks below 128 lanes: interpret mode only


def _resolve(cfg: TpuConfig, field: str, length: int) -> int:
    return common.resolve_block(NAME, field, getattr(cfg, field), length,
                                tile_multiple(cfg.interpret))


def _mask(s, qm_ref, km_ref, transposed: bool = False):
    """Scores with the invisible (query, key) pairs at -inf: s is [bq, bk] (queries along
    rows) or, transposed, [bk, bq]; qm_ref / km_ref hold the encoded metadata [3, block]."""
    column = lambda ref: [jnp.expand_dims(ref[f], -1) for f in range(3)]
    row = lambda ref: [ref[f:f + 1, :] for f in range(3)]
    q_fields, k_fields = ((row(qm_ref), column(km_ref)) if transposed
                          else (column(qm_ref), row(km_ref)))
    return jnp.where(common.visible(*q_fields, *k_fields), s, -jnp.inf)


def _visit(body, t, row, npart_ref, nvis_ref):
    """Grid step t along schedule row `row`: body(True) on its partial tiles (mask evaluated),
    body(False) on its full ones, nothing past the row's visible count."""
    visited = t < nvis_ref[row]
    masked = t < npart_ref[row]
    pl.when(visited & masked)(lambda: body(True))
    pl.when(visited & ~masked)(lambda: body(False))


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ------------------------------------------------------------------------------------------
# Forward.
# ------------------------------------------------------------------------------------------


def _fwd_kernel(index_ref, npart_ref, nvis_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref,
                lse_ref, *rest, scale, nq, nk, count_visits):
    if count_visits:
        visits_ref, m_ref, l_ref, acc_ref, count_ref = rest
    else:
        m_ref, l_ref, acc_ref = rest
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * nq + i

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        if count_visits:
            count_ref[0] = 0

    def body(masked):
        s = common.dot_f32(q_ref[...], k_ref[...], common.NT) * scale
        bk = s.shape[1]
        if masked:
            s = _mask(s, qm_ref, km_ref)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, s.max(axis=-1)[:, None])
        # A row that has seen nothing yet keeps m = -inf; exp(-inf - 0) = 0 keeps it empty.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
        p = jnp.exp(s - _lanes(m_safe, bk))
        alpha = jnp.exp(m_prev - m_safe)
        m_ref[...] = m_next
        l_ref[...] = alpha * l_ref[...] + lax.broadcast_in_dim(p.sum(axis=-1), m_prev.shape, (0,))
        v = v_ref[...]
        acc_ref[...] = (_lanes(alpha, acc_ref.shape[1]) * acc_ref[...]
                        + common.dot_f32(p.astype(v.dtype), v, common.NN))
        if count_visits:
            count_ref[0] += 1

    _visit(body, t, row, npart_ref, nvis_ref)

    @pl.when(t == nk - 1)
    def _finish():
        l, d = l_ref[...], acc_ref.shape[1]
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(_lanes(seen, d), acc_ref[...] / _lanes(l_safe, d),
                               0.0).astype(o_ref.dtype)
        # A query that sees nothing gets lse = +inf, so the backward's exp(s - lse) is 0.
        lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l_safe), jnp.inf)
        if count_visits:
            visits_ref[...] = jnp.full(visits_ref.shape, count_ref[0], jnp.int32)


def _kv_index_maps(nq: int, nk: int, group: int):
    """Index maps of grid step (row, head, q-block, t) -> its t-th scheduled kv-block, for
    K/V blocks and for key-metadata blocks (the schedule is the first prefetched operand)."""

    def kv_block(r, i, t, index_ref):
        return index_ref[(r * nq + i) * nk + t]

    def kv_map(r, hh, i, t, index_ref, *_):
        return r, lax.div(hh, group), kv_block(r, i, t, index_ref), 0

    def kv_meta_map(r, hh, i, t, index_ref, *_):
        return r, 0, kv_block(r, i, t, index_ref)

    return kv_map, kv_meta_map


def _forward(cfg: TpuConfig, q, k, v, q_meta: TokenMeta, kv_meta: TokenMeta,
             count_visits: bool = False):
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> out [B, H, Lq, D], lse [B, H, Lq] (and, if
    asked, visits [B, H, nq])."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = h // hkv
    bq = _resolve(cfg, "block_q", lq)
    bk = _resolve(cfg, "block_kv", lk)
    nq, nk = lq // bq, lk // bk
    sched = block_sparsity.schedule(block_sparsity.classify(q_meta, kv_meta, bq, bk))
    qm, km = common.encode_queries(q_meta), common.encode_keys(kv_meta)

    kv_map, kv_meta_map = _kv_index_maps(nq, nk, group)
    in_specs = [
        pl.BlockSpec((None, None, bq, d), lambda r, hh, i, t, *_: (r, hh, i, 0)),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, 3, bq), lambda r, hh, i, t, *_: (r, 0, i)),
        pl.BlockSpec((None, 3, bk), kv_meta_map),
    ]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq, LANES), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, bq, d), lambda r, hh, i, t, *_: (r, hh, i, 0)),
                 pl.BlockSpec((None, None, bq, LANES), lambda r, hh, i, t, *_: (r, hh, i, 0))]
    scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, d), jnp.float32)]
    if count_visits:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nq * 8, LANES), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 8, LANES),
                                      lambda r, hh, i, t, *_: (r, hh, i, 0)))
        scratch.append(pltpu.SMEM((1,), jnp.int32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=cfg.scale, nq=nq, nk=nk,
                          count_visits=count_visits),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, nq, nk), in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="unijax_packed_flash_fwd",
    )(sched.index.reshape(-1), sched.num_partial.reshape(-1), sched.num_visible.reshape(-1),
      q, k, v, qm, km)
    out, lse = outs[0], outs[1][..., 0]
    if count_visits:
        return out, lse, outs[2][:, :, ::8, 0]
    return out, lse


# ------------------------------------------------------------------------------------------
# Backward: dq over the schedule, dk/dv over the transposed schedule.
# ------------------------------------------------------------------------------------------


def _dq_kernel(index_ref, npart_ref, nvis_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, qm_ref, km_ref, dq_ref, acc_ref, *, scale, nq, nk):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * nq + i

    @pl.when(t == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def body(masked):
        k, v = k_ref[...], v_ref[...]
        s = common.dot_f32(q_ref[...], k, common.NT) * scale
        if masked:
            s = _mask(s, qm_ref, km_ref)
        p = jnp.exp(s - jnp.expand_dims(lse_ref[0], -1))
        ds = p * (common.dot_f32(do_ref[...], v, common.NT) - jnp.expand_dims(delta_ref[0], -1))
        acc_ref[...] += common.dot_f32(ds.astype(k.dtype), k, common.NN)

    _visit(body, t, row, npart_ref, nvis_ref)

    @pl.when(t == nk - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(index_ref, npart_ref, nvis_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, qm_ref, km_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, scale, nq, nk,
                group):
    b, j, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    t = lax.rem(step, nq)
    row = b * nk + j

    @pl.when(step == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def body(masked):
        k, v, q, do = k_ref[...], v_ref[...], q_ref[...], do_ref[...]
        # Transposed tile [bk, bq]: keys along rows, so dk/dv accumulate without transposes.
        s_t = common.dot_f32(k, q, common.NT) * scale
        if masked:
            s_t = _mask(s_t, qm_ref, km_ref, transposed=True)
        p_t = jnp.exp(s_t - lse_ref[...])
        dv_acc[...] += common.dot_f32(p_t.astype(do.dtype), do, common.NN)
        ds_t = p_t * (common.dot_f32(v, do, common.NT) - delta_ref[...])
        dk_acc[...] += common.dot_f32(ds_t.astype(q.dtype), q, common.NN)

    _visit(body, t, row, npart_ref, nvis_ref)

    @pl.when(step == group * nq - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward(cfg: TpuConfig, q, k, v, q_meta, kv_meta, out, lse, d_out):
    """All [B, heads, L, D]; lse [B, H, Lq]. Returns dq, dk, dv in the same layout."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = h // hkv
    bq = _resolve(cfg, "block_q_bwd", lq)
    bk = _resolve(cfg, "block_kv_bwd", lk)
    nq, nk = lq // bq, lk // bk
    cls = block_sparsity.classify(q_meta, kv_meta, bq, bk)
    sched, sched_t = block_sparsity.schedule(cls), block_sparsity.transposed_schedule(cls)
    qm, km = common.encode_queries(q_meta), common.encode_keys(kv_meta)
    delta = jnp.einsum("bhld,bhld->bhl", d_out.astype(jnp.float32), out.astype(jnp.float32))
    rows = lambda x: x[:, :, None, :]  # [B, H, L] -> [B, H, 1, L]: a lane-major row per block
    d_out = d_out.astype(q.dtype)

    kv_map, kv_meta_map = _kv_index_maps(nq, nk, group)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda r, hh, i, t, *_: (r, hh, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), kv_map)
    stat_spec = pl.BlockSpec((None, None, 1, bq), lambda r, hh, i, t, *_: (r, hh, 0, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.scale, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec,
                      pl.BlockSpec((None, 3, bq), lambda r, hh, i, t, *_: (r, 0, i)),
                      pl.BlockSpec((None, 3, bk), kv_meta_map)],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="unijax_packed_flash_dq",
    )(sched.index.reshape(-1), sched.num_partial.reshape(-1), sched.num_visible.reshape(-1),
      q, k, v, d_out, rows(lse), rows(delta), qm, km)

    # dk/dv grid step (row, kv head, kv-block, s): query head group * kv_head + s // nq and
    # the (s % nq)-th q-block of the kv-block's transposed schedule.
    def q_block(r, j, s, idx):
        return idx[(r * nk + j) * nq + lax.rem(s, nq)]

    def q_head(hh, s):
        return hh * group + lax.div(s, nq)

    def qt_map(r, hh, j, s, idx, *_):
        return r, q_head(hh, s), q_block(r, j, s, idx), 0

    def statt_map(r, hh, j, s, idx, *_):
        return r, q_head(hh, s), 0, q_block(r, j, s, idx)

    qt_spec = pl.BlockSpec((None, None, bq, d), qt_map)
    kt_spec = pl.BlockSpec((None, None, bk, d), lambda r, hh, j, s, *_: (r, hh, j, 0))
    statt_spec = pl.BlockSpec((None, None, 1, bq), statt_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.scale, nq=nq, nk=nk, group=group),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hkv, nk, group * nq),
            in_specs=[qt_spec, kt_spec, kt_spec, qt_spec, statt_spec, statt_spec,
                      pl.BlockSpec((None, 3, bq),
                                   lambda r, hh, j, s, idx, *_: (r, 0, q_block(r, j, s, idx))),
                      pl.BlockSpec((None, 3, bk), lambda r, hh, j, s, *_: (r, 0, j))],
            out_specs=[kt_spec, kt_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="unijax_packed_flash_dkv",
    )(sched_t.index.reshape(-1), sched_t.num_partial.reshape(-1),
      sched_t.num_visible.reshape(-1), q, k, v, d_out, rows(lse), rows(delta), qm, km)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------
# Custom VJP (on the head-major layout) and the backend entry.
# ------------------------------------------------------------------------------------------


_flash = common.with_flash_vjp(_forward, _backward)


def _head_major(x):
    return rearrange(x, "b l h d -> b h l d")


def attention(q, k, v, q_meta: TokenMeta, kv_meta: TokenMeta, *, scale: float,
              block_q: int = DEFAULT_BLOCKS[0], block_kv: int = DEFAULT_BLOCKS[1],
              block_q_bwd: int = DEFAULT_BLOCKS[2], block_kv_bwd: int = DEFAULT_BLOCKS[3],
              interpret: bool = False) -> jax.Array:
    """Packed flash attention on TPU (see module docstring).

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D]; q_meta / kv_meta: fields [B, Lq] / [B, Lk].
      scale: logit scale.
      block_q, block_kv: forward tile; block_q_bwd, block_kv_bwd: backward tile.
      interpret: run the kernels in the Pallas interpreter (CPU tests).

    Returns:
      [B, Lq, H, D] in q's dtype; a query that sees no key gets zeros.
    """
    common.check_shapes(NAME, q, k, HEAD_DIMS)
    cfg = TpuConfig(scale=float(scale), block_q=block_q, block_kv=block_kv,
                    block_q_bwd=block_q_bwd, block_kv_bwd=block_kv_bwd, interpret=interpret)
    out = _flash(cfg, _head_major(q), _head_major(k), _head_major(v), q_meta, kv_meta)
    return rearrange(out, "b h l d -> b l h d")


def visit_counts(q, k, v, q_meta: TokenMeta, kv_meta: TokenMeta, *, scale: float,
                 block_q: int, block_kv: int, interpret: bool = False) -> jax.Array:
    """int32 [B, H, Lq // block_q]: kv-blocks the forward kernel actually processed per
    q-block (counted inside the kernel; for tests of the block sparsity)."""
    cfg = TpuConfig(scale=float(scale), block_q=block_q, block_kv=block_kv,
                    interpret=interpret)
    return _forward(cfg, _head_major(q), _head_major(k), _head_major(v), q_meta, kv_meta,
                    count_visits=True)[2]
