"""`attention(q, k, v, meta)`: the one way the models call attention.

The mask is computed from per-token metadata (`kernels/mask.py`), never passed as an L x L
array. Backends (`impl=`):
  xla         tiled flash attention in jnp (`kernels/xla_flash.py`): visits only the
              (query chunk, key chunk) tiles the mask does not hide, online softmax, a
              one-pass custom VJP; memory O(L * chunk) per head; runs everywhere.
  pallas_tpu  Mosaic flash kernels with the mask evaluated in-kernel from the metadata and
              block sparsity from a scalar-prefetched schedule (`kernels/pallas_tpu.py`).
  pallas_gpu  the same through Triton-lowered Pallas (`kernels/pallas_gpu.py`).
  cudnn       cuDNN flash attention (`jax.nn.dot_product_attention`) with the mask given as a
              dense [B, 1, Lq, Lk] boolean built from the metadata: exact for every layout, but
              O(B Lq Lk) memory and no block skipping, so for short rows and comparisons.
              cuDNN alone has no packed bidirectional-span mask; use pallas_gpu for long rows.
  auto        pallas_tpu on TPU, pallas_gpu on GPU, xla on CPU (jax.default_backend()).
The Pallas kernels tile the sequence in blocks (`block_q`, `block_kv`, and `block_q_bwd`,
`block_kv_bwd` for the backward; None: the backend's default); the lengths must be multiples
of the blocks. `shard=(batch_axes, head_axes)` runs them under `jax.shard_map` over the mesh
set by `jax.set_mesh` (or `mesh=`), rows and heads split as named, since XLA cannot
partition a Pallas call itself; `interpret=True` runs the kernels in the Pallas interpreter.

Shapes: q [B, Lq, H, D]; k, v [B, Lk, Hkv, D] with H a multiple of Hkv (grouped-query
attention, K/V never repeated in memory); output [B, Lq, H, D] in q's dtype. Softmax and
accumulation run in float32. A query that sees no key (padding) gets zeros, not NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.sharding import PartitionSpec as P

from unijax.batch import TokenMeta
from unijax.kernels import _flash_common as common
from unijax.kernels import mask as mask_lib
from unijax.kernels import xla_flash

# The Pallas tile arguments (forward, then backward), as `attention` and `config.attention`
# name them.
BLOCK_NAMES = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_meta: TokenMeta,
    kv_meta: TokenMeta | None = None,
    *,
    impl: str = "xla",
    scale: float | None = None,
    chunk_size: int = 512,
    block_q: int | None = None,
    block_kv: int | None = None,
    block_q_bwd: int | None = None,
    block_kv_bwd: int | None = None,
    interpret: bool = False,
    shard: tuple | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """Masked multi-head attention over packed rows.

    Args:
      q: [B, Lq, H, D] queries.
      k, v: [B, Lk, Hkv, D] keys and values.
      q_meta: metadata of the queries, fields [B, Lq].
      kv_meta: metadata of the keys, fields [B, Lk] (default: q_meta, self-attention).
      impl: backend name (see module docstring).
      scale: logit scale (default 1/sqrt(D)).
      chunk_size: query and key tile of the xla backend.
      block_q, block_kv: forward tile of the Pallas backends (None or 0: per-platform default).
      block_q_bwd, block_kv_bwd: backward tile of the Pallas backends (likewise).
      interpret: run the Pallas kernels in the interpreter (CPU tests).
      shard: (batch mesh axes, head mesh axes) of q/k/v, e.g. (("data", "fsdp"), "tensor"):
        the Pallas and cuDNN backends then run per shard under `jax.shard_map`.
      mesh: the mesh for `shard` (default: the one set by `jax.set_mesh`).

    Returns:
      [B, Lq, H, D] attention output.
    """
    kv_meta = q_meta if kv_meta is None else kv_meta
    b, lq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"attention: q {q.shape} / k {k.shape} / v {v.shape} are not "
                         "[B, Lq, H, D] / [B, Lk, Hkv, D] with H a multiple of Hkv")
    if impl == "auto":
        impl = resolve_auto()
    if impl not in _BACKENDS:
        raise ValueError(f"attention: unknown impl {impl!r}; known: {sorted(_BACKENDS)} "
                         "or 'auto'")
    scale = d**-0.5 if scale is None else float(scale)
    if impl == "xla":
        return _xla(q, k, v, q_meta, kv_meta, scale=scale, chunk_size=chunk_size)
    blocks = {name: value for name, value in zip(
        BLOCK_NAMES, (block_q, block_kv, block_q_bwd, block_kv_bwd)) if value}
    fn = functools.partial(_BACKENDS[impl], scale=scale, interpret=interpret, **blocks)
    if shard is not None:
        fn = _shard_mapped(fn, shard, mesh, k.shape[2])
    return fn(q, k, v, q_meta, kv_meta)


def resolve_auto(platform: str | None = None) -> str:
    """The backend `impl="auto"` picks for a platform (default: jax.default_backend())."""
    platform = jax.default_backend() if platform is None else platform
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu",
            "rocm": "pallas_gpu"}.get(platform, "xla")


def _pallas_module(impl: str):
    """The kernel module of a Pallas backend (imported on first use)."""
    if impl == "pallas_tpu":
        from unijax.kernels import pallas_tpu as module
    else:
        from unijax.kernels import pallas_gpu as module
    return module


def kernel_head_dim(impl: str, head_dim: int) -> int:
    """The head dim to run `impl` with: the Pallas kernels get a power of two >= 64, other
    head dims are zero-padded up to one (exact: zero features add nothing to q.k and give zero
    outputs; keep the scale of the true head dim); xla and cudnn take any head dim."""
    if impl in ("xla", "cudnn") or (head_dim >= 64 and head_dim & (head_dim - 1) == 0):
        return head_dim
    return max(64, 1 << (head_dim - 1).bit_length())


def layout_problems(impl: str, length: int, head_dim: int, blocks=(0, 0, 0, 0), *,
                    interpret: bool = False) -> dict[str, str]:
    """Why rows of `length` tokens with heads of `head_dim` cannot run on `impl` with these
    tiles ((block_q, block_kv, block_q_bwd, block_kv_bwd), 0: the backend's default), keyed
    by "head_dim" or the block's name; empty when they can. Lets a config fail before anything
    compiles."""
    if impl not in ("pallas_tpu", "pallas_gpu"):
        return {}
    module = _pallas_module(impl)
    problems = {}
    if head_dim not in module.HEAD_DIMS:
        problems["head_dim"] = (f"{impl}: head dim {head_dim} is not supported; supported: "
                                f"{module.HEAD_DIMS}")
    for name, block, default in zip(BLOCK_NAMES, blocks, module.DEFAULT_BLOCKS):
        try:
            common.resolve_block(impl, name, block or default, length,
                                 module.tile_multiple(interpret))
        except ValueError as e:
            problems[name] = str(e) + ("" if block else " (the backend's default)")
    return problems


def kwargs_from_config(attention_config) -> dict:
    """`config.attention` -> keyword arguments of `attention` (impl, chunk size, blocks)."""
    keys = ("impl", "chunk_size", *BLOCK_NAMES)
    return {key: attention_config[key] for key in keys if key in attention_config}


def _shard_mapped(fn: Callable, shard: tuple, mesh, num_kv_heads: int) -> Callable:
    """Runs fn(q, k, v, q_meta, kv_meta) per (row shard, head shard) with jax.shard_map."""
    if len(shard) != 2:
        raise ValueError(f"attention: shard must be (batch_axes, head_axes), got {shard!r}")
    batch_axes, head_axes = shard
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        raise ValueError("attention: shard= needs a mesh: pass mesh= or use jax.set_mesh(mesh)")
    if head_axes is not None:
        names = (head_axes,) if isinstance(head_axes, str) else tuple(head_axes)
        shards = 1
        for name in names:
            shards *= mesh.shape[name]
        if num_kv_heads % shards:
            raise ValueError(f"attention: {num_kv_heads} kv heads cannot be split over the "
                             f"{shards} devices of mesh axes {names}")
    qkv = P(batch_axes, None, head_axes, None)
    meta = TokenMeta(*(P(batch_axes, None),) * 4)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, meta, meta), out_specs=qkv,
                         check_vma=False)


# ------------------------------------------------------------------------------------------
# xla backend (kernels/xla_flash.py).
# ------------------------------------------------------------------------------------------


def _xla(q, k, v, q_meta, kv_meta, *, scale, chunk_size):
    # [B, Lq, H, D] -> [B, Hkv, G, Lq, D]: each KV head serves a group of G query heads.
    qg = rearrange(q, "b l (hk g) d -> b hk g l d", hk=k.shape[2])
    out = xla_flash.flash(qg, k, v, q_meta, kv_meta, scale, chunk_size)
    return rearrange(out, "b hk g l d -> b l (hk g) d").astype(q.dtype)


# ------------------------------------------------------------------------------------------
# cuDNN: exact through a dense mask (see module docstring).
# ------------------------------------------------------------------------------------------


def _cudnn(q, k, v, q_meta, kv_meta, *, scale, interpret=False, **_):
    if interpret:
        raise ValueError("attention: impl='cudnn' has no interpret mode (needs an NVIDIA GPU)")
    allowed = mask_lib.dense_mask(q_meta, kv_meta)[:, None]  # [B, 1, Lq, Lk]
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale,
                                       implementation="cudnn")
    # cuDNN averages the values of a row that sees nothing; the contract says zeros.
    sees_any = allowed.any(-1)[:, 0, :, None, None]  # [B, Lq, 1, 1]
    return jnp.where(sees_any, out, 0).astype(q.dtype)


def _pallas(impl: str, q, k, v, q_meta, kv_meta, **kwargs):
    return _pallas_module(impl).attention(q, k, v, q_meta, kv_meta, **kwargs)


_BACKENDS: dict[str, Callable] = {"xla": _xla, "cudnn": _cudnn,
                                  "pallas_tpu": functools.partial(_pallas, "pallas_tpu"),
                                  "pallas_gpu": functools.partial(_pallas, "pallas_gpu")}
