"""Pieces shared by the Pallas flash-attention kernels (TPU and GPU).

Metadata encoding. The kernels evaluate the rule of `kernels/mask.py` from three int32 fields
per token instead of four, with the noise flag folded into the key's order:

  queries: doc = doc_id (0: padding), order, split = split_id if >= 0 else -2
  keys:    doc = doc_id if != 0 else -1, order = INT32_MAX if noisy else order,
           split = split_id if >= 0 else -1

  visible = (q.doc == k.doc) & ((k.order <= q.order) | (q.split == k.split))

which equals the rule for any metadata: a padding query (doc 0) matches no key, a padding key
(doc -1) no query; text splits (-2 vs -1) never match; and a noisy key, being "later" than
every query, is seen only through a shared split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from unijax.batch import TokenMeta

INT32_MAX = jnp.iinfo(jnp.int32).max
# dot_general dimension numbers of the two tile products: a @ b.T and a @ b.
NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))
# log2(e): the GPU kernels work in base 2 (exp2 is the cheap instruction).
LOG2E = 1.4426950408889634


def encode_queries(meta: TokenMeta) -> jax.Array:
    """Query metadata [B, L] fields -> int32 [B, 3, L] (doc, order, split)."""
    doc = jnp.asarray(meta.doc_id, jnp.int32)
    split = jnp.asarray(meta.split_id, jnp.int32)
    return jnp.stack([doc, jnp.asarray(meta.order, jnp.int32),
                      jnp.where(split >= 0, split, -2)], axis=1)


def encode_keys(meta: TokenMeta) -> jax.Array:
    """Key metadata [B, L] fields -> int32 [B, 3, L] (doc, order, split)."""
    doc = jnp.asarray(meta.doc_id, jnp.int32)
    split = jnp.asarray(meta.split_id, jnp.int32)
    order = jnp.where(jnp.asarray(meta.noisy, bool), INT32_MAX,
                      jnp.asarray(meta.order, jnp.int32))
    return jnp.stack([jnp.where(doc != 0, doc, -1), order,
                      jnp.where(split >= 0, split, -1)], axis=1)


def visible(q_doc, q_order, q_split, k_doc, k_order, k_split):
    """The rule on encoded fields (broadcastable, e.g. q fields [bq, 1], k fields [1, bk])."""
    return (q_doc == k_doc) & ((k_order <= q_order) | (q_split == k_split))


def resolve_block(backend: str, field: str, block: int, length: int, multiple: int) -> int:
    """The block size to use along a sequence of `length` tokens.

    A block larger than the sequence shrinks to it. Raises ValueError naming the field when
    the length is not a multiple of the block or the block breaks the hardware tiling.
    """
    if block <= 0:
        raise ValueError(f"{backend}: {field}={block} must be positive")
    block = min(block, length)
    if length % block:
        raise ValueError(f"{backend}: sequence length {length} is not a multiple of "
                         f"{field}={block}; pad the packed rows to a multiple of the block")
    if block % multiple and block != length:
        raise ValueError(f"{backend}: {field}={block} must be a multiple of {multiple}")
    return block


def check_shapes(backend: str, q: jax.Array, k: jax.Array, head_dims: tuple[int, ...]) -> None:
    """Raises ValueError for a head dim the kernel does not support."""
    d = q.shape[-1]
    if d not in head_dims:
        raise ValueError(f"{backend}: head dim {d} is not supported; supported: {head_dims}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{backend}: {q.shape[2]} query heads are not a multiple of "
                         f"{k.shape[2]} kv heads")


def delta(out: jax.Array, d_out: jax.Array) -> jax.Array:
    """rowsum(dO * O) in float32: [B, L, H, D] x 2 -> [B, H, L] (the softmax backward term)."""
    return jnp.einsum("blhd,blhd->bhl", d_out.astype(jnp.float32), out.astype(jnp.float32))


def with_flash_vjp(forward: Callable, backward: Callable) -> Callable:
    """Wires a kernel pair into one differentiable `flash(cfg, q, k, v, q_meta, kv_meta)`.

    Args:
      forward: (cfg, q, k, v, q_meta, kv_meta) -> (out, lse); lse is the logsumexp residual.
      backward: (cfg, q, k, v, q_meta, kv_meta, out, lse, d_out) -> (dq, dk, dv).

    `cfg` is static (hashable); the metadata gets no cotangent.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def flash(cfg, q, k, v, q_meta, kv_meta):
        return forward(cfg, q, k, v, q_meta, kv_meta)[0]

    def flash_fwd(cfg, q, k, v, q_meta, kv_meta):
        out, lse = forward(cfg, q, k, v, q_meta, kv_meta)
        return out, (q, k, v, q_meta, kv_meta, out, lse)

    def flash_bwd(cfg, residuals, d_out):
        q, k, v, q_meta, kv_meta, out, lse = residuals
        dq, dk, dv = backward(cfg, q, k, v, q_meta, kv_meta, out, lse, d_out)
        return dq, dk, dv, None, None

    flash.defvjp(flash_fwd, flash_bwd)
    return flash


def dot_f32(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    """A tile product with float32 accumulation (bf16 inputs stay bf16 on the MXU/tensor cores)."""
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
