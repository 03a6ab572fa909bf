"""FLUX-style AutoencoderKL (the generation tower's frozen image codec), NHWC.

Encoder: conv_in, per level `num_res_blocks` ResNet blocks then a stride-2 downsample (all
levels but the last), a mid block (ResNet, single-head self-attention, ResNet), GroupNorm,
SiLU, conv_out to 2 x latent_channels moments (mean, log-variance). Decoder mirrors it with
`num_res_blocks + 1` ResNet blocks per level and nearest-neighbour 2x upsampling. No quant
convs (FLUX). With `channel_mult=(1, 2, 4, 4)` the image is downsampled 8x.

Scaled latents are what the unified model sees: `z = scaling_factor * (sample - shift_factor)`
on encode and the inverse before decoding (FLUX: 0.3611, 0.1159).

Weights are `FrozenParam` when built inside the unified model: not `nnx.Param`, so optimizers,
EMA and parameter counts filtering on `nnx.Param` skip the VAE; encoding also runs under
`stop_gradient`. A stand-alone VAE (e.g. to fine-tune it) may use `param_type=nnx.Param`.
Module names follow diffusers' `AutoencoderKL` so `unijax.convert.vision` maps checkpoints
one to one. GroupNorm statistics and the attention softmax run in float32 in any `dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from einops import rearrange
from flax import nnx

from unijax.batch import TokenMeta
from unijax.kernels.attention import attention


class FrozenParam(nnx.Variable):
    """A pretrained weight that is never trained (the VAE inside the unified model)."""


def _param(param_type: type[nnx.Variable], init, key, shape, axes, dtype) -> nnx.Variable:
    value = init(jax.random.key(0) if key is None else key, tuple(shape), dtype)
    # Eager sharding only under a mesh (as `layers.sharded_param`), so building also works on a
    # single device and under `nnx.eval_shape`.
    eager = bool(nnx.using_eager_sharding()) and not jax.sharding.get_abstract_mesh().empty
    return param_type(value, out_sharding=tuple(axes), eager_sharding=eager)


class Conv2d(nnx.Module):
    """2D convolution, kernel [k, k, in, out] (HWIO), NHWC activations."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1,
                 padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
                 param_type, dtype, param_dtype, rngs: nnx.Rngs):
        self.stride = stride
        pad = kernel // 2
        self.padding = ((pad, pad), (pad, pad)) if padding is None else padding
        self.dtype = dtype
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.kernel = _param(param_type, init, rngs.params(), (kernel, kernel, cin, cout),
                             (None, None, "conv_in", "conv_out"), param_dtype)
        self.bias = _param(param_type, nnx.initializers.zeros, None, (cout,), ("conv_out",),
                           param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, H, W, in] -> [N, H / stride, W / stride, out]."""
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, channels of a group), float32 statistics (torch semantics)."""

    def __init__(self, channels: int, groups: int, eps: float, *, param_type, dtype,
                 param_dtype):
        if channels % groups:
            raise ValueError(f"vae: {channels} channels are not divisible by norm_groups="
                             f"{groups}")
        self.groups, self.eps, self.dtype = groups, eps, dtype
        self.scale = _param(param_type, nnx.initializers.ones, None, (channels,), ("norm",),
                            param_dtype)
        self.bias = _param(param_type, nnx.initializers.zeros, None, (channels,), ("norm",),
                           param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, H, W, C] -> [N, H, W, C]."""
        x32 = rearrange(x.astype(jnp.float32), "n h w (g c) -> n h w g c", g=self.groups)
        mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
        y = rearrange((x32 - mean) * jax.lax.rsqrt(var + self.eps), "n h w g c -> n h w (g c)")
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Linear(nnx.Module):
    """x @ kernel + bias over the channel axis (the mid-block attention projections)."""

    def __init__(self, cin: int, cout: int, *, param_type, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.kernel = _param(param_type, init, rngs.params(), (cin, cout),
                             ("conv_in", "conv_out"), param_dtype)
        self.bias = _param(param_type, nnx.initializers.zeros, None, (cout,), ("conv_out",),
                           param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., cin] -> [..., cout]."""
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + \
            self.bias[...].astype(self.dtype)


class ResnetBlock(nnx.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), 1x1 `conv_shortcut` when widths differ."""

    def __init__(self, cin: int, cout: int, cfg: ml_collections.ConfigDict, **kw):
        rngs = kw.pop("rngs")
        norm = dict(param_type=kw["param_type"], dtype=kw["dtype"],
                    param_dtype=kw["param_dtype"])
        self.norm1 = GroupNorm(cin, cfg.norm_groups, cfg.norm_eps, **norm)
        self.conv1 = Conv2d(cin, cout, 3, rngs=rngs, **kw)
        self.norm2 = GroupNorm(cout, cfg.norm_groups, cfg.norm_eps, **norm)
        self.conv2 = Conv2d(cout, cout, 3, rngs=rngs, **kw)
        self.conv_shortcut = Conv2d(cin, cout, 1, rngs=rngs, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, H, W, cin] -> [N, H, W, cout]."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all H * W positions, with a residual."""

    def __init__(self, channels: int, cfg: ml_collections.ConfigDict, *, chunk_size: int,
                 **kw):
        rngs = kw.pop("rngs")
        self.chunk_size = chunk_size
        self.group_norm = GroupNorm(channels, cfg.norm_groups, cfg.norm_eps, **kw)
        self.to_q = Linear(channels, channels, rngs=rngs, **kw)
        self.to_k = Linear(channels, channels, rngs=rngs, **kw)
        self.to_v = Linear(channels, channels, rngs=rngs, **kw)
        self.to_out = Linear(channels, channels, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, H, W, C] -> [N, H, W, C]."""
        n, h, w, _ = x.shape
        t = rearrange(self.group_norm(x), "n h w c -> n (h w) c")
        q, k, v = (rearrange(f(t), "n l c -> n l 1 c") for f in (self.to_q, self.to_k,
                                                               self.to_v))
        # Every position sees every other: one document, one bidirectional span. The chunked
        # kernel keeps memory O(HW * chunk) at 1024 px (128 x 128 = 16384 positions).
        ones = jnp.ones((n, h * w), jnp.int32)
        meta = TokenMeta(doc_id=ones, order=jnp.cumsum(ones, axis=1), split_id=ones,
                         noisy=jnp.zeros((n, h * w), bool))
        out = attention(q, k, v, meta, impl="xla", chunk_size=self.chunk_size)
        out = self.to_out(rearrange(out, "n l 1 c -> n l c"))
        return x + rearrange(out, "n (h w) c -> n h w c", h=h)


class MidBlock(nnx.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, cfg, *, chunk_size: int, **kw):
        self.resnets = nnx.List([ResnetBlock(channels, channels, cfg, **kw) for _ in range(2)])
        self.attention = AttentionBlock(channels, cfg, chunk_size=chunk_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attention(self.resnets[0](x)))


class LevelBlock(nnx.Module):
    """ResNet blocks at one resolution, then an optional 2x down- or upsampling conv."""

    def __init__(self, cin: int, cout: int, num_resnets: int, cfg, *, resample: str | None,
                 **kw):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, **kw)
                                 for i in range(num_resnets)])
        self.resample = resample
        if resample == "down":
            # Asymmetric (0, 1) padding before the stride-2 conv, as FLUX / diffusers.
            self.sampler = Conv2d(cout, cout, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
        elif resample == "up":
            self.sampler = Conv2d(cout, cout, 3, **kw)
        else:
            self.sampler = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, H, W, cin] -> [N, H', W', cout] with H' = H/2, H or 2H."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return x if self.sampler is None else self.sampler(x)


class Encoder(nnx.Module):
    """Images [N, H, W, in_channels] -> moments [N, H/8, W/8, 2 * latent_channels]."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, chunk_size: int, **kw):
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = Conv2d(cfg.in_channels, widths[0], 3, **kw)
        self.down_blocks = nnx.List()
        cin = widths[0]
        for level, width in enumerate(widths):
            last = level == len(widths) - 1
            self.down_blocks.append(LevelBlock(cin, width, cfg.num_res_blocks, cfg,
                                               resample=None if last else "down", **kw))
            cin = width
        self.mid_block = MidBlock(widths[-1], cfg, chunk_size=chunk_size, **kw)
        norm = {k: kw[k] for k in ("param_type", "dtype", "param_dtype")}
        self.norm_out = GroupNorm(widths[-1], cfg.norm_groups, cfg.norm_eps, **norm)
        self.conv_out = Conv2d(widths[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """Latents [N, h, w, latent_channels] -> images [N, 8h, 8w, in_channels]."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, chunk_size: int, **kw):
        widths = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]
        self.conv_in = Conv2d(cfg.latent_channels, widths[0], 3, **kw)
        self.mid_block = MidBlock(widths[0], cfg, chunk_size=chunk_size, **kw)
        self.up_blocks = nnx.List()
        cin = widths[0]
        for level, width in enumerate(widths):
            last = level == len(widths) - 1
            self.up_blocks.append(LevelBlock(cin, width, cfg.num_res_blocks + 1, cfg,
                                             resample=None if last else "up", **kw))
            cin = width
        norm = {k: kw[k] for k in ("param_type", "dtype", "param_dtype")}
        self.norm_out = GroupNorm(widths[-1], cfg.norm_groups, cfg.norm_eps, **norm)
        self.conv_out = Conv2d(widths[-1], cfg.in_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The FLUX autoencoder: `encode` pixels to scaled latents and `decode` them back.

    Pixels are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels at 1 /
    2^(len(channel_mult) - 1) of the resolution.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32,
                 param_type: type[nnx.Variable] = FrozenParam, chunk_size: int = 1024,
                 rngs: nnx.Rngs):
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor)
        self.downsample = 2 ** (len(cfg.channel_mult) - 1)
        self.dtype = dtype
        kw = dict(param_type=param_type, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(cfg, chunk_size=chunk_size, **kw)
        self.decoder = Decoder(cfg, chunk_size=chunk_size, **kw)

    def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [N, H, W, 3] in [-1, 1] -> (mean, logvar), each [N, H/8, W/8, C], float32.

        Unscaled posterior moments; logvar is clipped to [-30, 20] as diffusers does.
        """
        moments = self.encoder(images.astype(self.dtype)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images: jax.Array, rng: jax.Array | None = None,
               noise: jax.Array | None = None) -> jax.Array:
        """images [N, H, W, 3] in [-1, 1] -> scaled latents [N, H/8, W/8, C], float32.

        With `rng` (or given standard normal `noise` [N, H/8, W/8, C]) the posterior is sampled
        (BAGEL trains on samples), otherwise its mean is used. Returns
        `scaling_factor * (latent - shift_factor)`.
        """
        mean, logvar = self.encode_moments(images)
        latent = mean
        if noise is None and rng is not None:
            noise = jax.random.normal(rng, mean.shape)
        if noise is not None:
            latent = mean + jnp.exp(0.5 * logvar) * noise.astype(jnp.float32)
        return self.scaling_factor * (latent - self.shift_factor)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents [N, h, w, C] -> images [N, 8h, 8w, 3] (about [-1, 1]), float32."""
        z = latents.astype(jnp.float32) / self.scaling_factor + self.shift_factor
        return self.decoder(z.astype(self.dtype)).astype(jnp.float32)
