"""FLUX-style AutoencoderKL: parity with diffusers, checkpoint names, a real-photo round trip."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from unijax.convert import vision as convert
from unijax.models import vae as vae_lib


def _cfg(base_channels=32, mult=(1, 2), groups=8, res_blocks=2):
    cfg = base.flux_vae()
    cfg.base_channels, cfg.channel_mult, cfg.norm_groups = base_channels, mult, groups
    cfg.num_res_blocks = res_blocks
    return cfg


def _abstract(cfg, **kw):
    """The module with shapes only: weights come from a checkpoint or `_random`."""
    return nnx.eval_shape(lambda: vae_lib.AutoencoderKL(cfg, rngs=nnx.Rngs(0), **kw))


def _random(cfg, seed=0, **kw):
    """Random weights drawn in numpy (eager random init compiles a program per shape: slow)."""
    model = _abstract(cfg, **kw)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        kind, shape = str(getattr(path[-1], "key", path[-1])), leaf.shape
        if kind == "kernel":
            return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        return (1.0 if kind == "scale" else 0.0) + 0.1 * rng.normal(size=shape)

    state = nnx.state(model, vae_lib.FrozenParam)
    convert.load_tree(model, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)),
                      what="vae")
    return model


_encode_mean = nnx.jit(lambda m, x: m.encode(x))
_moments = nnx.jit(lambda m, x: m.encode_moments(x))
_decode = nnx.jit(lambda m, z: m.decode(z))


@pytest.fixture(scope="module")
def diffusers_and_unijax():
    """A small random diffusers AutoencoderKL in the FLUX layout and unijax loaded from it."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
        layers_per_block=2, latent_channels=16, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False).eval()
    with torch.no_grad():  # non-trivial norms and biases so every parameter is exercised
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    ours = _abstract(_cfg(), chunk_size=64)  # loading fills an abstract module
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    convert.load_tree(ours, convert.vae_from_diffusers(sd), what="vae")
    return torch, ref, ours, sd


@pytest.mark.parity
def test_encode_decode_match_diffusers(diffusers_and_unijax):
    torch, ref, ours, _ = diffusers_and_unijax
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        mean_ref = dist.mean.numpy().transpose(0, 2, 3, 1)
        logvar_ref = dist.logvar.numpy().transpose(0, 2, 3, 1)
    mean, logvar = _moments(ours, x)
    np.testing.assert_allclose(mean, mean_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logvar, logvar_ref, atol=1e-4, rtol=1e-4)
    scaled = _encode_mean(ours, x)
    np.testing.assert_allclose(scaled, 0.3611 * (mean_ref - 0.1159), atol=1e-4, rtol=1e-4)

    z = np.random.default_rng(1).normal(size=(2, 16, 12, 16)).astype(np.float32)
    with torch.no_grad():
        img_ref = ref.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
    img_ref = img_ref.numpy().transpose(0, 2, 3, 1)
    img = _decode(ours, 0.3611 * (z - 0.1159))  # decode() undoes the scaling first
    assert img.shape == (2, 32, 24, 3)
    np.testing.assert_allclose(img, img_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parity
def test_flux_ae_names_map_like_diffusers(diffusers_and_unijax):
    torch, ref, _, sd = diffusers_and_unijax
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = convert.diffusers_to_flux_ae(sd, num_levels=2)
    assert any(k.startswith("decoder.up.1.upsample") for k in ldm)
    # diffusers' own LDM converter maps the FLUX-layout names back: our inverse is right.
    back = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(np.asarray(back[k]), sd[k], err_msg=k)
    # ... and ours maps them to the same unijax tree as the diffusers names do.
    a = jax.tree.leaves(convert.vae_from_flux_ae(ldm))
    b = jax.tree.leaves(convert.vae_from_diffusers(sd))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_load_tree_names_the_mismatch():
    model = _abstract(_cfg())
    tree = nnx.to_pure_dict(nnx.state(model, vae_lib.FrozenParam))
    tree["encoder"]["conv_in"]["kernel"] = np.zeros((3, 3, 3, 7), np.float32)
    del tree["decoder"]["conv_out"]["bias"]
    with pytest.raises(ValueError, match=r"missing \['decoder.conv_out.bias'\].*"
                                         r"encoder.conv_in.kernel: shape \(3, 3, 3, 7\)"):
        convert.load_tree(model, tree, what="vae")


def _astronaut(size: int) -> np.ndarray:
    skimage = pytest.importorskip("skimage")
    from skimage.transform import resize

    img = resize(skimage.data.astronaut(), (size, size), anti_aliasing=True)
    return (img[None] * 2 - 1).astype(np.float32)  # [1, size, size, 3] in [-1, 1]


_encode_all = nnx.jit(lambda m, x, key: (m.encode(x), m.encode(x), m.encode(x, key),
                                          *m.encode_moments(x)))


def test_photo_round_trip_shapes_and_determinism():
    """Random weights cannot reconstruct; check shapes, finiteness, the FLUX scaling of the
    posterior mean, and that the mean path is deterministic while posterior sampling is not
    (and has the posterior's spread)."""
    model = _random(_cfg())
    x = _astronaut(32)
    z1, z2, s1, mean, logvar = _encode_all(model, x, jax.random.key(1))
    assert z1.shape == (1, 16, 16, 16) and z1.dtype == jnp.float32
    np.testing.assert_allclose(z1, 0.3611 * (np.asarray(mean) - 0.1159), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(z1, z2)
    img1, img2 = _decode(model, z1), _decode(model, z2)
    assert img1.shape == x.shape and np.all(np.isfinite(img1))
    np.testing.assert_array_equal(img1, img2)
    # decode() undoes the scaling: decoding the raw mean through the decoder alone agrees.
    raw = nnx.jit(lambda m, z: m.decoder(z))(model, mean)
    np.testing.assert_allclose(img1, raw, rtol=1e-4, atol=1e-4)
    # (sample - mean) / (scale * std) is standard normal.
    noise = (np.asarray(s1) - np.asarray(z1)) / (0.3611 * np.exp(0.5 * np.asarray(logvar)))
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_bf16_close_to_fp32():
    """bfloat16 compute, float32 latents out: ~1.2% relative error through the encoder and
    the decoder (rounding); GroupNorm statistics in bfloat16 would give several %."""
    f32, bf16 = _random(_cfg()), _random(_cfg(), dtype=jnp.bfloat16)
    x = _astronaut(32)
    z32, z16 = _encode_mean(f32, x), _encode_mean(bf16, x)
    assert z16.dtype == jnp.float32
    assert _relative_error(z16, z32) < 3e-2
    np.testing.assert_allclose(z16, z32, atol=3e-2 * float(np.abs(z32).max()))
    i32, i16 = _decode(f32, z32), _decode(bf16, z32)
    assert _relative_error(i16, i32) < 3e-2
    np.testing.assert_allclose(i16, i32, atol=3e-2 * float(np.abs(i32).max()))


@pytest.mark.slow
def test_tiny_vae_overfits_a_photo():
    """A tiny stand-alone VAE (trainable nnx.Param) learns to reconstruct one photo crop."""
    model = vae_lib.AutoencoderKL(_cfg(base_channels=16, groups=4, res_blocks=1),
                                  param_type=nnx.Param, rngs=nnx.Rngs(0))
    x = _astronaut(32)
    opt = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return jnp.mean((m.decode(m.encode(x)) - x) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(150)]
    assert losses[-1] < 0.2 * losses[0], losses[::10]
