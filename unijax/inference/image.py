"""Image generation over cached contexts: the Euler ODE of the flow with classifier-free guidance.

  guidance = Guidance.from_config(config, "t2i")
  tokens = sample(engine, cond, grid=(8, 8), text_uncond=empty, guidance=guidance, seed=0)
  images = decode(engine, tokens, grid=(8, 8))          # uint8 [B, H, W, 3]

The schedule is BAGEL's: `t = linspace(1, 0, N)`, shifted `t' = s t / (1 + (s - 1) t)`, and
N - 1 Euler steps `x <- x - v(x, t'_i) (t'_i - t'_{i+1})` from Gaussian noise at t' = 1 (so t' = 0
is never evaluated); x is the image's latent tokens [B, h * w, p * p * C] and v the predicted
velocity `noise - x0` (`training/flow.py`).

Guidance (BAGEL `bagel.py` generate_image), with v_c, v_ut, v_ui the velocities given the full
context, the text-unconditional one and the image-unconditional one:

  v_t' = v_ut + s_text (v_c - v_ut)
  global / channel:  v' = v_ui + s_img (v_t' - v_ui)  (when s_img > 1, else v' = v_t')
                     v  = v' * clamp(|v_c| / |v'|, renorm_min, 1)
  text_channel:      v_t'' = v_t' * clamp(|v_c| / |v_t'|, renorm_min, 1)
                     v  = v_ui + s_img (v_t'' - v_ui)  (when s_img > 1, else v = v_t'')

where |.| is the norm over every token and channel of a row's image for `global` and over the
channels of each token for `channel` and `text_channel`. Guidance applies only while the
shifted time lies in `(interval[0], interval[1]]`; outside it, v = v_c and only the conditional
pass runs. (One deliberate difference: BAGEL skips the whole combination when s_text <= 1, so
image guidance alone never applies there; here s_text = 1 with s_img > 1 applies the image
guidance and the renorm, with v_t' = v_c.)

The guidance contexts (`chat.py` builds them): text-unconditional, the context before the last
text (empty for plain text-to-image); image-unconditional, every text but no image. Each is
prefilled once; a denoising step runs only the image's tokens (its markers and latents, noisy,
at the row's next position) against the cached contexts, the conditional and unconditional
rows stacked into one batched call, and writes nothing into the caches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unijax.data.plan import ImageItem
from unijax.inference.cache import Context, Engine

RENORM_MODES = ("global", "channel", "text_channel")


@dataclasses.dataclass(frozen=True)
class Guidance:
    """The sampler's settings (BAGEL's text-to-image defaults).

    Attributes:
      num_steps: N points of the time grid (N - 1 model evaluations).
      shift: the time shift s.
      text_scale, image_scale: guidance scales (<= 1: that pass does not run).
      interval: guidance applies for interval[0] < t' <= interval[1] (shifted time).
      renorm: "global", "channel" or "text_channel".
      renorm_min: lower clamp of the renorm factor.
    """

    num_steps: int = 50
    shift: float = 3.0
    text_scale: float = 4.0
    image_scale: float = 1.0
    interval: tuple[float, float] = (0.4, 1.0)
    renorm: str = "global"
    renorm_min: float = 0.0

    def __post_init__(self):
        if self.num_steps < 2:
            raise ValueError(f"Guidance: num_steps={self.num_steps} must be >= 2")
        if self.shift <= 0:
            raise ValueError(f"Guidance: shift={self.shift} must be > 0")
        if self.renorm not in RENORM_MODES:
            raise ValueError(f"Guidance: renorm={self.renorm!r} must be one of {RENORM_MODES}")
        if len(self.interval) != 2 or not 0 <= self.interval[0] <= self.interval[1] <= 1:
            raise ValueError(f"Guidance: interval={self.interval} must be (lo, hi) with "
                             "0 <= lo <= hi <= 1")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, mode: str = "t2i",
                    **overrides) -> Guidance:
        """`config.sample` (steps, shift) with `config.sample.<mode>` (t2i or edit) scales;
        BAGEL's defaults (`DEFAULTS`) for a config without a `sample` section."""
        if mode not in DEFAULTS:
            raise ValueError(f"Guidance: mode must be one of {tuple(DEFAULTS)}, got {mode!r}")
        values = dataclasses.asdict(DEFAULTS[mode])
        sample = config.get("sample")
        if sample is not None:
            m = sample[mode]
            values.update(num_steps=int(sample.steps), shift=float(sample.shift),
                          text_scale=float(m.text_scale), image_scale=float(m.image_scale),
                          interval=tuple(float(x) for x in m.interval), renorm=str(m.renorm),
                          renorm_min=float(m.renorm_min))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def uses_text(self) -> bool:
        return self.text_scale > 1.0

    @property
    def uses_image(self) -> bool:
        return self.image_scale > 1.0

    def active(self, t: float) -> bool:
        """Whether guidance applies at shifted time t."""
        lo, hi = self.interval
        return (self.uses_text or self.uses_image) and lo < t <= hi


# BAGEL's notebook settings per mode (configs/base.py writes the same into `config.sample`).
DEFAULTS = {
    "t2i": Guidance(),
    "edit": Guidance(text_scale=4.0, image_scale=2.0, interval=(0.0, 1.0),
                     renorm="text_channel"),
}


def timesteps(num_steps: int, shift: float) -> np.ndarray:
    """The shifted time grid [N], from 1 down to 0."""
    t = np.linspace(1.0, 0.0, num_steps)
    return shift * t / (1.0 + (shift - 1.0) * t)


def _norm(x: jax.Array, per_token: bool) -> jax.Array:
    x = x.astype(jnp.float32)
    if per_token:
        return jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))


def combine(v_c: jax.Array, v_ut: jax.Array, v_ui: jax.Array, guidance: Guidance) -> jax.Array:
    """The guided velocity from the three predictions [B, T, F] (see the module docstring)."""
    g = guidance
    v_text = v_ut + g.text_scale * (v_c - v_ut) if g.uses_text else v_c
    clamp = lambda ratio: jnp.clip(ratio, g.renorm_min, 1.0)
    if g.renorm == "text_channel":
        v_text = v_text * clamp(_norm(v_c, True) / (_norm(v_text, True) + 1e-8))
        return v_ui + g.image_scale * (v_text - v_ui) if g.uses_image else v_text
    v = v_ui + g.image_scale * (v_text - v_ui) if g.uses_image else v_text
    per_token = g.renorm == "channel"
    return v * clamp(_norm(v_c, per_token) / (_norm(v, per_token) + 1e-8))


def image_item(grid: tuple[int, int], cell: int) -> ImageItem:
    """The noisy VAE image being generated (its pixels are unused: latents are given)."""
    h, w = grid
    return ImageItem("vae", np.zeros((h * cell, w * cell, 3), np.uint8), (h, w), noisy=True,
                     t=1.0, step=0)


def sample(engine: Engine, cond: Context, grid: tuple[int, int], *,
           text_uncond: Context | None = None, image_uncond: Context | None = None,
           guidance: Guidance = Guidance(), seed: int = 0, noise: jax.Array | None = None,  # noqa: B008
           progress: bool = False) -> jax.Array:
    """Generates one image per row of `cond` at latent grid `grid` = (h, w).

    Args:
      engine, cond: the model and the conditional contexts (B rows).
      grid: latent-token grid of the images.
      text_uncond, image_uncond: the guidance contexts (B rows each), needed when the
        corresponding scale is > 1.
      guidance: schedule and guidance settings.
      seed: noise of row r is drawn from fold_in(key(seed), r).
      noise: [B, h * w, F] starting noise instead of the seeded draw.
      progress: show a tqdm bar over the denoising steps.

    Returns:
      [B, h * w, F] float32 latent tokens at t' = 0.
    """
    b = cond.batch_size
    needed = [("text_uncond", text_uncond, guidance.uses_text),
              ("image_uncond", image_uncond, guidance.uses_image)]
    contexts = [cond]
    for name, ctx, used in needed:
        if used and ctx is None:
            raise ValueError(f"sample: guidance scale > 1 needs the {name} context")
        if used:
            if ctx.batch_size != b:
                raise ValueError(f"sample: {name} has {ctx.batch_size} rows, cond has {b}")
            contexts.append(ctx)
    item = image_item(grid, engine.latent_cell)
    chunks = [engine.chunk(ctx, [[item]] * b, latent_grid=grid)[0] for ctx in contexts]
    cond_chunk = chunks[0]
    guided_chunk = jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
    guided_cache = Context.concat(contexts).cache if len(contexts) > 1 else None

    h, w = grid
    if noise is None:
        key = jax.random.key(seed)
        noise = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r),
                                                     (h * w, engine.token_dim)))(jnp.arange(b))
    # Placed like the cache rows, so the first step compiles for the same input placement as
    # the later ones (a host array would compile the step twice).
    x = jax.device_put(jnp.asarray(noise, jnp.float32), _rows_sharding(cond))
    plain = _denoise_step(engine, b, None)
    guided = _denoise_step(engine, b, guidance) if len(contexts) > 1 else None
    ts = timesteps(guidance.num_steps, guidance.shift)
    steps = range(len(ts) - 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="denoising", unit="step")
    with engine.scope():
        for i in steps:
            t, dt = float(ts[i]), float(ts[i] - ts[i + 1])
            if guided is not None and guidance.active(t):
                x = guided(engine.state, guided_cache, guided_chunk, x, jnp.float32(t),
                           jnp.float32(dt))
            else:
                x = plain(engine.state, cond.cache, cond_chunk, x, jnp.float32(t),
                          jnp.float32(dt))
    return x


def _rows_sharding(ctx: Context):
    """The sharding of [B, ...] arrays whose rows follow the cache's (its metadata's)."""
    return ctx.cache.meta.doc_id.sharding


def _denoise_step(engine: Engine, batch_size: int, guidance: Guidance | None):
    """jit(state, cache, chunk, x [B, T, F], t, dt) -> x - v dt, v guided when `guidance`."""

    def build():
        def step(state, cache, chunk, x, t, dt):
            copies = chunk.batch_size // batch_size
            xs = jnp.concatenate([x] * copies) if copies > 1 else x
            times = jnp.full((chunk.batch_size, 1), t, jnp.float32)
            out, _ = engine._model(state).extend(chunk, cache.k, cache.v, cache.meta, xs,
                                                 times, logits=False)
            v = out.velocity[:, :x.shape[1]].astype(jnp.float32)
            if guidance is not None:
                parts = jnp.split(v, copies)
                v_c = parts[0]
                v_ut = parts[1] if guidance.uses_text else v_c
                v_ui = parts[-1] if guidance.uses_image else v_c
                v = combine(v_c, v_ut, v_ui, guidance)
            return x - v * dt

        return jax.jit(step)

    return engine.function(("denoise", batch_size, guidance), build)


def decode(engine: Engine, tokens: jax.Array, grid: tuple[int, int]) -> np.ndarray:
    """Latent tokens [B, h * w, F] -> uint8 images [B, H, W, 3] (VAE decode, or the pixels
    themselves without a VAE), BAGEL's `(x * 0.5 + 0.5).clamp(0, 1) * 255`."""
    with engine.scope():
        return np.asarray(jax.device_get(_decode_fn(engine, grid)(engine.state, tokens)))


def _decode_fn(engine: Engine, grid: tuple[int, int]):
    """jit(state, tokens [B, h * w, F]) -> uint8 images [B, H, W, 3]."""

    def build():
        def run(state, tokens):
            images = engine._model(state).decode_latent_tokens(tokens, grid)[:, 0]
            return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

        return jax.jit(run)

    return engine.function(("decode", grid), build)
