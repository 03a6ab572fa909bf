"""Fixed 2D sin-cos position embeddings and the flow-timestep embedder of the unified model.

The 2D tables (BAGEL's `vit_pos_embed` / `latent_pos_embed`, MAE/DiT layout) are not
parameters in unijax: row `id = r * side + c` is computed on the fly from the id, so they cost
no memory, no checkpoint entry and work for any `side`. Layout of row (r, c), width D:

    concat(sincos(D/2, c), sincos(D/2, r)),  sincos(d, p) = concat(sin(p w), cos(p w)),
    w_i = 10000^(-i / (d/2)), i < d/2

(the column comes first: MAE's swapped `meshgrid(grid_w, grid_h)` naming).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unijax.models.layers import Dense


def _omega(num: int) -> np.ndarray:
    """The `num` angular frequencies of one axis, float64 (as the reference tables are built)."""
    return 1.0 / 10000 ** (np.arange(num, dtype=np.float64) / num)


def sincos_2d(pos_id: jax.Array, dim: int, side: int) -> jax.Array:
    """Rows `pos_id` of the fixed 2D sin-cos table of a `side x side` grid.

    Args:
      pos_id: [...] int, `row * side + col` (PackedBatch `patch_pos`).
      dim: embedding width, a multiple of 4.
      side: the table's side (ViT `max_grid`, or the model's `max_latent_size`).

    Returns:
      [..., dim] float32.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    row, col = jnp.divmod(pos_id.astype(jnp.int32), side)
    omega = jnp.asarray(_omega(dim // 4), jnp.float32)

    def one_axis(p):
        angles = p.astype(jnp.float32)[..., None] * omega
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

    return jnp.concatenate([one_axis(col), one_axis(row)], axis=-1)


def sincos_2d_table(dim: int, side: int) -> np.ndarray:
    """The whole [side * side, dim] table in float64 numpy (the reference layout, for tests
    and for comparing with checkpoints that store it)."""
    omega = _omega(dim // 4)
    r, c = np.divmod(np.arange(side * side), side)

    def one_axis(p):
        angles = p[:, None] * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

    return np.concatenate([one_axis(c), one_axis(r)], axis=-1)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """DiT sinusoidal features [cos(t f), sin(t f)], f_i = max_period^(-i / (dim/2)).

    Args:
      t: [...] flow time in [0, 1] (not multiplied by 1000, as BAGEL).
      dim: feature width (even).

    Returns:
      [..., dim] float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """fc2(silu(fc1(timestep_features(t)))): flow time -> [..., hidden] (BAGEL `time_embedder`,
    its `mlp.0` / `mlp.2`)."""

    def __init__(self, hidden: int, *, frequency_dim: int = 256, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.frequency_dim = frequency_dim
        common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense((frequency_dim,), (hidden,), in_axes=(None,), out_axes=("mlp",),
                         **common)
        self.fc2 = Dense((hidden,), (hidden,), in_axes=("mlp",), out_axes=("embed",), **common)

    def __call__(self, t: jax.Array) -> jax.Array:
        """t [...] in [0, 1] -> [..., hidden]."""
        return self.fc2(jax.nn.silu(self.fc1(timestep_features(t, self.frequency_dim))))
