"""Building blocks of the unijax transformers: RMSNorm, RoPE, projections, SwiGLU, embedding.

A `Dense` can carry a low-rank adapter (`lora_rank > 0`: an `nnx.LoRA` beside the kernel, whose
`nnx.LoRAParam`s are what a LoRA run trains) and its kernel can be an int8 `qwix.QArray`
(weight-only quantised sampling, `unijax.inference.quantize`).

Every parameter is created by `sharded_param`, which attaches logical axis names
(`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, `norm`, ...; the table that maps
them to mesh axes is `unijax.training.sharding.LOGICAL_RULES`). Modules compute in `dtype`
(bfloat16 by default) and keep parameters in `param_dtype`; norms and RoPE angles are
computed in float32 and cast back, as HF Qwen2 does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from flax.core import spmd as flax_spmd

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

# Qwen2's `initializer_range`: weights start as N(0, 0.02^2), biases at zero, norms at one.
default_init: Initializer = nnx.initializers.normal(0.02)


def _mesh_is_set() -> bool:
    return not jax.sharding.get_abstract_mesh().empty


def sharded_param(
    init: Initializer,
    key: jax.Array | None,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
    """An `nnx.Param` of `shape` carrying the logical axis names `axes`.

    Under `jax.set_mesh(mesh)` + `nnx.logical_axis_rules(rules)` the value is created already
    sharded (flax eager sharding); without a mesh, eager sharding is switched off for this
    variable so construction also works on a single device and under `nnx.eval_shape`. The
    logical names stay in the metadata either way (`nnx.get_partition_spec`).
    """
    if len(axes) != len(shape):
        raise ValueError(f"sharded_param: {len(axes)} axis names {tuple(axes)} for shape "
                         f"{tuple(shape)}")
    key = jax.random.key(0) if key is None else key
    value = init(key, tuple(shape), dtype)
    eager = bool(nnx.using_eager_sharding()) and _mesh_is_set()
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=eager)


def attention_shard(impl: str, batch_size: int, num_kv_heads: int,
                    heads_axis: str = "heads") -> tuple | None:
    """`shard=` for `kernels.attention` under the current mesh and logical axis rules.

    XLA partitions the `xla` backend itself, but not a Pallas or cuDNN custom call: given
    sharded inputs it would gather them and run the whole attention on every device. So under
    `jax.set_mesh` + `nnx.logical_axis_rules`, the other backends run per shard (rows split as
    the `batch` rule says, heads as `heads_axis`'s rule). A split that does not divide the
    rows (or the kv heads) is dropped; None when nothing is split (no mesh, no rules, `xla`).
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = dict(flax_spmd.get_logical_axis_rules())
    if impl == "xla" or mesh.empty or not rules:
        return None

    def axes_for(logical: str, size: int):
        target = rules.get(logical)
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)
        if not names or size % math.prod(mesh.shape[n] for n in names):
            return None
        return names[0] if len(names) == 1 else names

    batch_axes = axes_for("batch", batch_size)
    head_axes = axes_for(heads_axis, num_kv_heads)
    if batch_axes is None and head_axes is None:
        return None
    return batch_axes, head_axes


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis with a learned scale (HF `Qwen2RMSNorm`).

    y = x / sqrt(mean(x^2) + eps) * scale, the statistics in float32; output in `dtype`.
    """

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = sharded_param(nnx.initializers.ones, None, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> [..., dim]."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return x32.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Dense(nnx.Module):
    """A linear map from the trailing `in_features` axes of x to `out_features` axes.

    The kernel has shape (*in_features, *out_features), so a per-head projection keeps heads
    as their own (shardable) axis: q_proj is [embed, heads, head_dim], o_proj is
    [heads, head_dim, embed].

    With `lora_rank > 0` the output gains `lora_alpha / lora_rank * (x A) B`, an `nnx.LoRA` on
    the flattened axes (A [prod(in), r], B [r, prod(out)], B zero at init so the adapted layer
    starts equal to the base). A kernel that is a `qwix.QArray` (int8 values with per-output
    channel scales) is multiplied through `qwix.dot_general`.
    """

    def __init__(
        self,
        in_features: Sequence[int],
        out_features: Sequence[int],
        *,
        in_axes: Sequence[str],
        out_axes: Sequence[str],
        use_bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        kernel_init: Initializer = default_init,
        lora_rank: int = 0,
        lora_alpha: float = 1.0,
    ):
        self.num_in = len(in_features)
        self.dtype = dtype
        self.kernel = sharded_param(kernel_init, rngs.params(), (*in_features, *out_features),
                                    (*in_axes, *out_axes), param_dtype)
        self.bias = (sharded_param(nnx.initializers.zeros, None, tuple(out_features),
                                   tuple(out_axes), param_dtype) if use_bias else None)
        adapter, self.lora_scale = None, 0.0
        if lora_rank > 0:
            # Adapters are small: replicated (the stacked-layers transform adds its axis name).
            axes = {"out_sharding": (None, None),
                    "eager_sharding": bool(nnx.using_eager_sharding()) and _mesh_is_set()}
            adapter = nnx.LoRA(math.prod(in_features), int(lora_rank), math.prod(out_features),
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               a_metadata=axes, b_metadata=axes)
            self.lora_scale = float(lora_alpha) / int(lora_rank)
        self.lora = adapter

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., *in_features] -> [..., *out_features] in `dtype`."""
        x = x.astype(self.dtype)
        kernel = self.kernel[...]
        if isinstance(kernel, qwix.QArray):
            contract = tuple(range(x.ndim - self.num_in, x.ndim))
            y = qwix.dot_general(x, kernel.astype(self.dtype),
                                 ((contract, tuple(range(self.num_in))), ((), ())))
            y = y.astype(self.dtype)
        else:
            y = jnp.tensordot(x, kernel.astype(self.dtype), axes=self.num_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            lead = x.shape[:x.ndim - self.num_in]
            delta = self.lora(x.reshape(*lead, -1)).reshape(y.shape)
            y = y + (self.lora_scale * delta).astype(self.dtype)
        return y


def lora_kwargs(lora: dict[str, tuple[int, float]] | None, name: str) -> dict:
    """`Dense`'s lora_rank / lora_alpha for projection `name` ({} when it has no adapter)."""
    return dict(zip(("lora_rank", "lora_alpha"), (lora or {}).get(name, ())))


class SwiGLU(nnx.Module):
    """Gated MLP: down(silu(gate(x)) * up(x)), no biases (Qwen2 / LLaMA).

    `lora` maps projection names ("gate_proj", "up_proj", "down_proj") to (rank, alpha) for the
    ones that carry an adapter.
    """

    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs, lora: dict[str, tuple[int, float]] | None = None):
        common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",),
                               **common, **lora_kwargs(lora, "gate_proj"))
        self.up_proj = Dense((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",), **common,
                             **lora_kwargs(lora, "up_proj"))
        self.down_proj = Dense((hidden,), (dim,), in_axes=("mlp",), out_axes=("embed",),
                               **common, **lora_kwargs(lora, "down_proj"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> [..., dim]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Embedding(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` is the tied output projection."""

    def __init__(self, vocab_size: int, dim: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = sharded_param(default_init, rngs.params(), (vocab_size, dim),
                                       ("vocab", "embed"), param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [...] int -> [..., embed] in `dtype`."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [..., embed] -> logits [..., vocab] against the embedding table."""
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype),
                          self.embedding[...].astype(self.dtype))


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Rotary angles of HF Qwen2 (rotate-half layout, default rope type).

    Args:
      positions: [B, L] integer RoPE positions.
      head_dim: rotated dimension (even); frequencies theta^(-2i/head_dim), i < head_dim/2.
      theta: RoPE base.
      dtype: the angles are computed in float32 and cast to this dtype, as HF does.

    Returns:
      cos, sin: [B, L, head_dim], each half repeated ([f, f]).
    """
    if head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, L, H, D] by cos/sin [B, L, D]: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]

