"""Rectified flow on latent tokens: time shift, noising, the velocity target and its loss.

Conventions (BAGEL's, `modeling/bagel/bagel.py`): t = 1 is pure noise, t = 0 the data.

    t'   = s t / (1 + (s - 1) t)            timestep shift (s = config.train.timestep_shift)
    x_t  = (1 - t') x0 + t' noise           noisy latent tokens; clean images keep t' = 0
    v    = noise - x0                       the velocity the model predicts (llm2vae)
    loss = sum_tok w_tok mean_F (v_pred - v)^2  /  sum_tok w_tok   (w: PackedBatch flow_weight)

Latent tokens live on the row's latent-token grid, [B, T, F] with T = N * gh * gw (N VAE image
slots of gh x gw tokens, F = p * p * C features); a gen-slice token of the packed row reads
grid token `payload_index`. Per-image times are [B, N].

Noise comes from one key per global row (`row_keys`), so a row's noise does not depend on how
the batch is split into micro-batches or over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """t' = s t / (1 + (s - 1) t): s > 1 moves times towards noise; 0 and 1 stay fixed."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def grid_times(image_times: jax.Array, tokens_per_image: int) -> jax.Array:
    """Per-image times [B, N] -> per grid token [B, N * tokens_per_image, 1]."""
    return jnp.repeat(image_times, tokens_per_image, axis=1)[..., None]


def row_noise(row_keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal noise [B, *shape], row b drawn from `row_keys[b]` alone (float32)."""
    return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(row_keys)


def noise_latents(x0: jax.Array, noise: jax.Array, image_times: jax.Array):
    """The flow pair of clean latent tokens.

    Args:
      x0: [B, T, F] clean latent tokens (T = N * tokens per image).
      noise: [B, T, F] standard normal.
      image_times: [B, N] time t' of each image slot (already shifted; 0 = clean).

    Returns:
      (x_t [B, T, F], v [B, T, F]): x_t = (1 - t') x0 + t' noise and the target noise - x0.
    """
    num_images = image_times.shape[1]
    if x0.shape[1] % num_images:
        raise ValueError(f"flow: {x0.shape[1]} latent tokens per row do not split over "
                         f"{num_images} image slots")
    t = grid_times(image_times.astype(jnp.float32), x0.shape[1] // num_images)
    return (1.0 - t) * x0 + t * noise, noise - x0


def gather_tokens(grid: jax.Array, payload_index: jax.Array) -> jax.Array:
    """Grid tokens [B, T, F] -> the gen slice's tokens [B, L_gen, F] (padding reads token 0)."""
    index = jnp.clip(payload_index, 0, grid.shape[1] - 1)
    return jnp.take_along_axis(grid, index[..., None], axis=1)


def flow_loss_sum(velocity: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """sum_tok weight * mean over features of (velocity - target)^2, float32 scalar.

    velocity, target: [B, L_gen, F]; weight: [B, L_gen] (`flow_weight`, 0 on tokens without
    flow loss). Dividing by the global sum of `weight` gives BAGEL's loss: the mean over the
    features, then the token mean over the whole batch.
    """
    err = jnp.mean(jnp.square(velocity.astype(jnp.float32) - target.astype(jnp.float32)), -1)
    return jnp.sum(weight.astype(jnp.float32) * err)
