"""The unified model: text, ViT and VAE-latent embeddings in one packed sequence, the MoT
decoder over it, and the two heads (BAGEL's `Bagel` module).

  model = UnifiedModel(config, rngs=nnx.Rngs(0))
  x0 = model.latent_tokens(batch, rng)            # clean latent tokens [B, N*gh*gw, p*p*C]
  out = model(batch, latent_tokens=x_t, timesteps=t)
  out.logits    [B, L_und, V]      LM head on the und slice (text CE)
  out.velocity  [B, L_gen, p*p*C]  llm2vae on the gen slice (flow velocity, noise - x0)
  out.hidden    [B, L, D]          decoder output (after the per-expert final norms)
  out, (k, v) = model.extend(chunk, past_k, past_v, past_meta, ...)   # against a KV cache
  opt = nnx.Optimizer(model, tx, wrt=trainable_filter(config))

Input embeddings, per token of an expert-major PackedBatch row:
  TEXT  `llm.embed(text_ids)` (image start/end markers included);
  VIT   `connector(vit(patches))[payload_index] + sincos_2d(patch_pos, max_grid)`; the
        connector is fc1 -> gelu_tanh -> fc2 with biases;
  VAE   `vae2llm(latent_tokens[payload_index]) + time_embedder(t[image]) +
        sincos_2d(patch_pos, max_latent_size)`;
  PAD   zeros.
Pixel payloads (`vit_patches`, `vae_images`) may be uint8 or float32; they enter the model
through `batch.normalize_pixels` (uint8 x / 127.5 - 1), inside the jitted step, so uint8 is what
travels to the device. Canvas pixels outside an image's `vae_grid_hw` area are set to 0 (in
[-1, 1]) before encoding, BAGEL's padding, whatever the batch holds there.
Latent tokens are the VAE latents of `vae_images` (scaled, `z = s (sample - shift)`, frozen:
`FrozenParam` weights under `stop_gradient`) patchified `latent_patch_size` x
`latent_patch_size` with features in (p_row, p_col, channel) order, row-major over each canvas'
(gh, gw) grid; with `config.model.vae = None` they are patches of raw pixels instead. The
trainer noises them (x_t = (1 - t) x0 + t noise on noisy images) and passes them with the
per-image times it used; by default the forward uses clean tokens and `batch.vae_timestep`.
`llm2vae` starts at zero, as BAGEL's.

Not parameters: the 2D sin-cos tables (computed from the ids, see `embeddings.py`) and the
VAE (`FrozenParam`). With `config.model.vit = None` the model has no ViT and connector (a
batch must then hold no ViT tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from einops import rearrange
from flax import nnx, struct

from unijax import config as config_lib
from unijax.batch import PAD, VAE, VIT, PackedBatch, TokenMeta, normalize_pixels
from unijax.models import mot, param_count
from unijax.models.embeddings import TimestepEmbedder, sincos_2d
from unijax.models.layers import Dense
from unijax.models.vae import AutoencoderKL, FrozenParam
from unijax.models.vit import GeluMLP, VisionTransformer


@struct.dataclass
class UnifiedOutput:
    """What one forward returns (a pytree)."""

    logits: jax.Array | None  # [B, L_und, V] (None when called with logits=False)
    velocity: jax.Array  # [B, L_gen, p*p*C]
    hidden: jax.Array  # [B, L, D]


def patchify(latents: jax.Array, patch: int) -> jax.Array:
    """latents [B, N, gh*p, gw*p, C] -> tokens [B, N*gh*gw, p*p*C] ((p_row, p_col, C) order)."""
    return rearrange(latents, "b n (gh p) (gw q) c -> b (n gh gw) (p q c)", p=patch, q=patch)


def unpatchify(tokens: jax.Array, grid: tuple[int, int], patch: int) -> jax.Array:
    """tokens [B, N*gh*gw, p*p*C] -> latents [B, N, gh*p, gw*p, C] (inverse of `patchify`)."""
    gh, gw = grid
    return rearrange(tokens, "b (n gh gw) (p q c) -> b n (gh p) (gw q) c", gh=gh, gw=gw,
                     p=patch, q=patch)


class UnifiedModel(nnx.Module):
    """MoT decoder + ViT tower + VAE codec + connectors and heads, built from a full config.

    Submodules (parameter path prefixes): `llm` (MoTDecoder), `vit` and `connector` (when
    `config.model.vit` is set), `vae` (when `config.model.vae` is set; FrozenParam),
    `time_embedder`, `vae2llm`, `llm2vae`.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        model = config.model
        self.llm_config = mot.DecoderConfig.from_config(config)
        d = self.llm_config.hidden_size
        if d % 4:
            raise ValueError(f"unified: config.model.llm.hidden_size={d} must be a multiple of 4")
        dt = dict(dtype=self.llm_config.compute_dtype, param_dtype=self.llm_config.weight_dtype)
        self.dtype = self.llm_config.compute_dtype
        self.patch = int(model.latent_patch_size)
        self.latent_channels = int(model.latent_channels)
        self.max_latent_size = int(model.max_latent_size)
        self.latent_cell = config_lib.latent_cell(model)  # pixels per latent-token side
        token_dim = self.patch * self.patch * self.latent_channels

        self.llm = mot.MoTDecoder(self.llm_config, rngs=rngs)
        if model.vit is not None:
            self.vit_max_grid = int(model.vit.max_grid)
            self.vit = VisionTransformer(
                model.vit, attention_impl=self.llm_config.attention_impl,
                chunk_size=self.llm_config.attention_chunk_size,
                attention_interpret=self.llm_config.attention_interpret,
                remat_policy=self.llm_config.remat_policy, rngs=rngs, **dt)
            self.connector = GeluMLP(model.vit.hidden_size, d, d, in_axis="vit_embed",
                                     hidden_axis="mlp", out_axis="embed", rngs=rngs, **dt)
        else:
            self.vit_max_grid = 0
            self.vit = self.connector = None
        if model.vae is not None:
            if model.vae.latent_channels != self.latent_channels:
                raise ValueError(f"unified: config.model.vae.latent_channels="
                                 f"{model.vae.latent_channels} differs from "
                                 f"config.model.latent_channels={self.latent_channels}")
            self.sample_posterior = bool(model.vae.sample_posterior)
            self.vae = AutoencoderKL(model.vae, param_type=FrozenParam, rngs=rngs, **dt)
        else:
            if self.latent_channels != 3:
                raise ValueError("unified: config.model.latent_channels must be 3 (pixels) "
                                 f"without a VAE, got {self.latent_channels}")
            self.sample_posterior = False
            self.vae = None
        self.time_embedder = TimestepEmbedder(d, rngs=rngs, **dt)
        self.vae2llm = Dense((token_dim,), (d,), in_axes=("patch",), out_axes=("embed",),
                             use_bias=True, rngs=rngs, **dt)
        self.llm2vae = Dense((d,), (token_dim,), in_axes=("embed",), out_axes=("patch",),
                             use_bias=True, kernel_init=nnx.initializers.zeros, rngs=rngs, **dt)

    # --- latents ------------------------------------------------------------------------------

    def latent_tokens(self, batch: PackedBatch, rng: jax.Array | None = None) -> jax.Array:
        """Clean latent tokens of `batch.vae_images`, no gradient.

        Args:
          batch: the PackedBatch (`vae_images` [B, N, H, W, 3], uint8 or float32 in [-1, 1];
            pixels outside each image's `vae_grid_hw` area are read as 0 in [-1, 1]).
          rng: samples the VAE posterior when given and `config.model.vae.sample_posterior`
            (BAGEL's training); otherwise the posterior mean is used. One key, or [B] keys:
            row b's sample then depends on `rng[b]` alone (however the batch is split).

        Returns:
          [B, N * gh * gw, p*p*C] float32, gh = H / (downsample * p), gw likewise;
          token `image * gh * gw + r * gw + c` is PackedBatch's VAE `payload_index`.
        """
        images = self.vae_pixels(batch)
        b, n = images.shape[:2]
        flat = rearrange(images, "b n h w c -> (b n) h w c")
        if self.vae is not None:
            rng = rng if self.sample_posterior else None
            noise = None
            if rng is not None and rng.shape == (b,) and jax.dtypes.issubdtype(
                    rng.dtype, jax.dtypes.prng_key):
                down = images.shape[2] // self.vae.downsample
                shape = (n, down, images.shape[3] // self.vae.downsample, self.latent_channels)
                noise = rearrange(jax.vmap(lambda k: jax.random.normal(k, shape))(rng),
                                  "b n h w c -> (b n) h w c")
                rng = None
            latents = self.vae.encode(flat, rng, noise)
        else:
            latents = flat
        latents = jax.lax.stop_gradient(latents)
        return patchify(rearrange(latents, "(b n) h w c -> b n h w c", b=b, n=n), self.patch)

    def vae_pixels(self, batch: PackedBatch) -> jax.Array:
        """`batch.vae_images` as float32 [B, N, H, W, 3] in [-1, 1], zero outside each image's
        `vae_grid_hw` * latent_cell area (so uint8 and float canvases encode alike)."""
        images = normalize_pixels(jnp.asarray(batch.vae_images))
        extent = jnp.asarray(batch.vae_grid_hw) * self.latent_cell  # [B, N, 2] pixels
        rows = jnp.arange(images.shape[2])[None, None, :, None] < extent[..., 0, None, None]
        cols = jnp.arange(images.shape[3])[None, None, None, :] < extent[..., 1, None, None]
        return jnp.where((rows & cols)[..., None], images, 0.0)

    def decode_latent_tokens(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """Latent tokens [B, N*gh*gw, p*p*C] -> images [B, N, H, W, 3] (VAE decode, or the
        pixels themselves without a VAE)."""
        latents = unpatchify(tokens, grid, self.patch)
        if self.vae is None:
            return latents.astype(jnp.float32)
        b, n = latents.shape[:2]
        images = self.vae.decode(rearrange(latents, "b n h w c -> (b n) h w c"))
        return rearrange(images, "(b n) h w c -> b n h w c", b=b, n=n)

    # --- forward ------------------------------------------------------------------------------

    def __call__(self, batch: PackedBatch, latent_tokens: jax.Array | None = None,
                 timesteps: jax.Array | None = None, *, rng: jax.Array | None = None,
                 logits: bool = True) -> UnifiedOutput:
        """One forward over a PackedBatch.

        Args:
          batch: expert-major rows ([0, num_und) text + ViT, [num_und, L) VAE latents).
          latent_tokens: [B, N*gh*gw, p*p*C] tokens the VAE slots hold: x_t for noisy images,
            x0 for clean ones (default: `self.latent_tokens(batch, rng)`, all clean).
          timesteps: [B, N] flow time each image's tokens were noised with (after any shift;
            0 for clean images); default `batch.vae_timestep`.
          rng: only used to encode latents when `latent_tokens` is None.
          logits: False skips the LM head (out.logits None), e.g. for a chunked CE on
            `out.hidden[:, :num_und]` with `self.llm.logits`.

        Returns:
          UnifiedOutput(logits [B, L_und, V] | None, velocity [B, L_gen, p*p*C], hidden).
        """
        x = self.embed(batch, latent_tokens, timesteps, rng=rng)
        hidden = self.llm(x, jnp.asarray(batch.position), batch.token_meta(), batch.num_und)
        return self._heads(hidden, batch.num_und, logits)

    def extend(self, batch: PackedBatch, past_k: jax.Array, past_v: jax.Array,
               past_meta: TokenMeta, latent_tokens: jax.Array | None = None,
               timesteps: jax.Array | None = None, *, logits: bool = True):
        """One forward over new tokens (`batch`) that also attend to the tokens of a KV cache.

        Args:
          batch: the new tokens as expert-major rows (metadata continuing the cached context:
            causal order, RoPE positions and split ids after the cache's).
          past_k, past_v: [N, B, C, Hkv, Dh] cached keys and values of every layer.
          past_meta: TokenMeta [B, C] of the cached tokens (doc_id 0 on empty slots).
          latent_tokens, timesteps: as for `__call__`.

        Returns:
          (UnifiedOutput of the new tokens, (k, v) [N, B, L, Hkv, Dh] to cache).
        """
        x = self.embed(batch, latent_tokens, timesteps)
        hidden, kv = self.llm.extend(x, jnp.asarray(batch.position), batch.token_meta(),
                                     batch.num_und, past_k, past_v, past_meta)
        return self._heads(hidden, batch.num_und, logits), kv

    def embed(self, batch: PackedBatch, latent_tokens: jax.Array | None = None,
              timesteps: jax.Array | None = None, *, rng: jax.Array | None = None) -> jax.Array:
        """[B, L, D] decoder inputs of `batch` (arguments as for `__call__`)."""
        num_und = batch.num_und
        if latent_tokens is None and batch.length > num_und:
            latent_tokens = self.latent_tokens(batch, rng)
        if timesteps is None:
            timesteps = batch.vae_timestep
        parts = [self._embed_und(batch)]
        if batch.length > num_und:
            parts.append(self._embed_gen(batch, latent_tokens, jnp.asarray(timesteps)))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    def _heads(self, hidden: jax.Array, num_und: int, logits: bool) -> UnifiedOutput:
        return UnifiedOutput(
            logits=self.llm.logits(hidden[:, :num_und]) if logits else None,
            velocity=self.llm2vae(hidden[:, num_und:]),
            hidden=hidden)

    def _embed_und(self, batch: PackedBatch) -> jax.Array:
        """[B, num_und, D]: text embeddings, ViT tokens where modality == VIT, zeros on PAD.
        A batch with no ViT patch slots (`vit_patches` [B, 0, ...], e.g. a decoding step)
        skips the ViT."""
        und = slice(0, batch.num_und)
        modality = jnp.asarray(batch.modality)[:, und]
        x = self.llm.embed(jnp.asarray(batch.text_ids)[:, und])
        if self.vit is not None and batch.vit_patches.shape[1] > 0:
            patches = normalize_pixels(jnp.asarray(batch.vit_patches))
            feats = self.vit(patches, jnp.asarray(batch.vit_patch_rc),
                             jnp.asarray(batch.vit_grid_hw), jnp.asarray(batch.vit_image_id))
            feats = self.connector(feats)  # [B, P, D]
            index = jnp.clip(jnp.asarray(batch.payload_index)[:, und], 0, feats.shape[1] - 1)
            tokens = jnp.take_along_axis(feats, index[..., None], axis=1)
            pos = sincos_2d(jnp.asarray(batch.patch_pos)[:, und], x.shape[-1], self.vit_max_grid)
            tokens = tokens + pos.astype(self.dtype)
            x = jnp.where((modality == VIT)[..., None], tokens, x)
        return jnp.where((modality == PAD)[..., None], jnp.zeros((), x.dtype), x)

    def _embed_gen(self, batch: PackedBatch, latent_tokens: jax.Array,
                   timesteps: jax.Array) -> jax.Array:
        """[B, L_gen, D]: vae2llm(latent token) + time embedding + 2D position; zeros on PAD."""
        gen = slice(batch.num_und, batch.length)
        modality = jnp.asarray(batch.modality)[:, gen]
        num_images = timesteps.shape[1]
        total = latent_tokens.shape[1]
        if total % num_images:
            raise ValueError(f"unified: {total} latent tokens per row do not split over "
                             f"{num_images} VAE image slots")
        index = jnp.clip(jnp.asarray(batch.payload_index)[:, gen], 0, total - 1)
        tokens = jnp.take_along_axis(latent_tokens, index[..., None], axis=1)
        x = self.vae2llm(tokens)
        # One timestep embedding per image, then gathered: N MLP calls instead of L_gen.
        t_emb = self.time_embedder(timesteps)  # [B, N, D]
        x = x + jnp.take_along_axis(t_emb, (index // (total // num_images))[..., None], axis=1)
        pos = sincos_2d(jnp.asarray(batch.patch_pos)[:, gen], x.shape[-1], self.max_latent_size)
        x = x + pos.astype(self.dtype)
        return jnp.where((modality == VAE)[..., None], x, jnp.zeros((), x.dtype))


def trainable_filter(config: ml_collections.ConfigDict):
    """The `nnx.Optimizer(model, tx, wrt=...)` filter: every nnx.Param except the und expert
    when `freeze_und_expert` (the VAE's weights are FrozenParam, never trainable)."""
    return mot.trainable_filter(mot.DecoderConfig.from_config(config), prefix=("llm",))


def param_groups(config: ml_collections.ConfigDict) -> list[tuple[str, tuple[str, ...]]]:
    """Labelled path prefixes of the unified model for `param_count.count_by_group`."""
    groups = mot.param_groups(mot.DecoderConfig.from_config(config), prefix=("llm",))
    if config.model.vit is not None:
        groups += [("vit", ("vit",)), ("connector", ("connector",))]
    groups += [("time_embedder", ("time_embedder",)), ("vae2llm", ("vae2llm",)),
               ("llm2vae", ("llm2vae",))]
    return groups


def parameter_breakdown(config: ml_collections.ConfigDict) -> tuple[list[tuple[str, int]], int]:
    """Exact counts from abstract shapes (nothing allocated): per-group trainable-parameter rows
    (`param_count.format_breakdown` prints them) and the number of frozen VAE weights."""
    model = nnx.eval_shape(lambda: UnifiedModel(config, rngs=nnx.Rngs(config.seed)))
    rows = param_count.count_by_group(nnx.state(model, nnx.Param), param_groups(config))
    return rows, param_count.count(nnx.state(model, FrozenParam))
