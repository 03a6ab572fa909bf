"""The flow sampler: BAGEL's schedule, the guidance combination against a numpy transcription
of BAGEL's code, and `sample` against Euler steps computed by hand with `Engine.extend` on a
small random model (float32, pixel-space latents)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange

from configs import base
from tests.inference import helpers
from unijax.inference.cache import Context
from unijax.inference.image import Guidance, combine, decode, image_item, sample, timesteps

GRID = (4, 4)
TOKENS = GRID[0] * GRID[1]
CAPACITY = 64


@pytest.fixture(scope="module")
def setup():
    """The engine and three 2-row contexts: conditional (a ViT image and a prompt),
    text-unconditional (the image only) and image-unconditional (the prompt only)."""
    engine = helpers.engine()
    prompts = [[helpers.text("a red circle")], [helpers.text("two small blue squares")]]
    images = [[helpers.vit_image(seed=1)], [helpers.vit_image(seed=2)]]
    empty = Context.empty(engine, 2, CAPACITY)
    contexts = dict(cond=empty.append(engine, [i + p for i, p in zip(images, prompts)]),
                    text_uncond=empty.append(engine, images),
                    image_uncond=empty.append(engine, prompts))
    noise = jax.random.normal(jax.random.key(0), (2, TOKENS, engine.token_dim))
    return engine, contexts, noise


def _velocity(engine, ctx, x, t) -> jax.Array:
    """v(x, t) of the image at GRID after `ctx`, by one `extend` (the test_cache way)."""
    chunk, _ = engine.chunk(ctx, [[image_item(GRID, engine.latent_cell)]] * ctx.batch_size,
                            latent_grid=GRID)
    out, _ = engine.extend(ctx.cache, chunk, x, jnp.full((ctx.batch_size, 1), t), logits=False)
    return out.velocity[:, :TOKENS].astype(jnp.float32)


def _euler_by_hand(engine, contexts, noise, guidance: Guidance) -> jax.Array:
    """`sample` written out: guided velocities where `guidance.active(t)`, else v_c."""
    x = noise
    ts = timesteps(guidance.num_steps, guidance.shift)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = v_c = _velocity(engine, contexts["cond"], x, t)
        if guidance.active(t):
            v_ut = _velocity(engine, contexts["text_uncond"], x, t)
            v_ui = _velocity(engine, contexts["image_uncond"], x, t)
            v = combine(v_c, v_ut if guidance.uses_text else v_c,
                        v_ui if guidance.uses_image else v_c, guidance)
        x = x - v * (t - t_next)
    return x


# --- schedule --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps,shift", [(2, 1.0), (5, 1.0), (10, 3.0), (50, 3.0),
                                             (7, 0.5)])
def test_timesteps_are_the_shifted_linspace(num_steps, shift):
    ts = timesteps(num_steps, shift)
    t = np.linspace(1, 0, num_steps)
    assert ts.shape == (num_steps,) and ts[0] == 1.0 and ts[-1] == 0.0
    np.testing.assert_allclose(ts, shift * t / (1 + (shift - 1) * t), rtol=1e-12)
    assert np.all(np.diff(ts) < 0)
    if shift > 1:  # a shift > 1 spends more steps at high noise
        assert np.all(ts[1:-1] > t[1:-1])


# --- sample against hand-computed Euler steps ------------------------------------------------


def test_one_step_without_guidance_is_one_euler_step(setup):
    engine, contexts, noise = setup
    guidance = Guidance(num_steps=2, text_scale=1.0)
    got = sample(engine, contexts["cond"], GRID, guidance=guidance, noise=noise)
    want = noise - _velocity(engine, contexts["cond"], noise, 1.0) * 1.0
    assert got.shape == (2, TOKENS, engine.token_dim) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(got - noise)).max() > 1e-2  # the step moved x


def test_seeded_noise_is_drawn_per_row(setup):
    engine, contexts, _ = setup
    guidance = Guidance(num_steps=3, text_scale=1.0)
    key = jax.random.key(5)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, r), (TOKENS, engine.token_dim))
                       for r in range(2)])
    got = sample(engine, contexts["cond"], GRID, guidance=guidance, seed=5)
    want = sample(engine, contexts["cond"], GRID, guidance=guidance, noise=noise)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_guided_steps_equal_the_combination_by_hand(setup):
    """shift 1, N = 4: t' = 1, 2/3 inside the interval (0.4, 1] (three passes stacked, in
    the order cond, text-uncond, image-uncond), t' = 1/3 outside (the conditional pass)."""
    engine, contexts, noise = setup
    guidance = Guidance(num_steps=4, shift=1.0, text_scale=4.0, image_scale=2.0,
                        interval=(0.4, 1.0), renorm="text_channel")
    assert [guidance.active(t) for t in timesteps(4, 1.0)[:-1]] == [True, True, False]
    got = sample(engine, contexts["cond"], GRID, text_uncond=contexts["text_uncond"],
                 image_uncond=contexts["image_uncond"], guidance=guidance, noise=noise)
    want = _euler_by_hand(engine, contexts, noise, guidance)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    unguided = _euler_by_hand(engine, contexts, noise, Guidance(num_steps=4, shift=1.0,
                                                                text_scale=1.0))
    assert np.abs(np.asarray(got - unguided)).max() > 1e-2


def test_guidance_is_off_outside_its_interval(setup):
    engine, contexts, noise = setup
    run = lambda **kw: np.asarray(sample(engine, contexts["cond"], GRID,
                                         text_uncond=contexts["text_uncond"], noise=noise,
                                         guidance=Guidance(num_steps=3, **kw)))
    plain = run(text_scale=1.0)
    np.testing.assert_array_equal(run(text_scale=4.0, interval=(0.0, 0.0)), plain)
    assert np.abs(run(text_scale=4.0, interval=(0.0, 1.0)) - plain).max() > 1e-2


@pytest.mark.parametrize("mode", ["t2i", "edit"])
def test_sample_runs_with_an_empty_text_context(setup, mode):
    """Plain text-to-image: the text-unconditional context is an empty one of the same
    capacity (nothing visible); the config's guidance settings, 3 grid points."""
    engine, contexts, noise = setup
    guidance = Guidance.from_config(helpers.config(), mode, num_steps=3)
    empty = Context.empty(engine, 2, CAPACITY)
    guided = dict(text_uncond=empty, image_uncond=contexts["image_uncond"])
    got = sample(engine, contexts["cond"], GRID, guidance=guidance, noise=noise, **guided)
    want = _euler_by_hand(engine, dict(contexts, **guided), noise, guidance)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    assert np.isfinite(np.asarray(got)).all()


def test_sample_names_a_missing_or_mismatched_context(setup):
    engine, contexts, noise = setup
    with pytest.raises(ValueError, match="needs the text_uncond context"):
        sample(engine, contexts["cond"], GRID, guidance=Guidance(num_steps=2))
    with pytest.raises(ValueError, match="needs the image_uncond context"):
        sample(engine, contexts["cond"], GRID, text_uncond=contexts["text_uncond"],
               guidance=Guidance(num_steps=2, image_scale=2.0))
    one_row = Context.empty(engine, 1, CAPACITY)
    with pytest.raises(ValueError, match="text_uncond has 1 rows, cond has 2"):
        sample(engine, contexts["cond"], GRID, text_uncond=one_row,
               guidance=Guidance(num_steps=2))


# --- combine ---------------------------------------------------------------------------------


def _bagel_combine(v_c, v_ut, v_ui, s_text, s_img, renorm, renorm_min=0.0):
    """BAGEL's `_forward_flow` combination (bagel.py), in numpy, for one image of [T, F]."""
    v_t_text_ = v_ut + s_text * (v_c - v_ut)
    if renorm == "text_channel":
        norm_v_t = np.linalg.norm(v_c, axis=-1, keepdims=True)
        norm_v_t_text_ = np.linalg.norm(v_t_text_, axis=-1, keepdims=True)
        scale = np.clip(norm_v_t / (norm_v_t_text_ + 1e-8), renorm_min, 1.0)
        v_t_text = v_t_text_ * scale
        return v_ui + s_img * (v_t_text - v_ui) if s_img > 1.0 else v_t_text
    v_t_ = v_ui + s_img * (v_t_text_ - v_ui) if s_img > 1.0 else v_t_text_
    if renorm == "global":
        norm_v_t, norm_v_t_ = np.linalg.norm(v_c), np.linalg.norm(v_t_)
    else:
        norm_v_t = np.linalg.norm(v_c, axis=-1, keepdims=True)
        norm_v_t_ = np.linalg.norm(v_t_, axis=-1, keepdims=True)
    return v_t_ * np.clip(norm_v_t / (norm_v_t_ + 1e-8), renorm_min, 1.0)


def _velocities(seed=0, shape=(4, 20, 12)):
    """Rows where the clamps bind everywhere, nowhere and in between: 0 random; 1 a small
    v_c; 2 v_ut near v_c; 3 v_ut = 13/12 v_c, v_ui = v_c (v_t' = 0.75 v_c, and v' = 0.5 v_c
    at s_img = 2: guidance shrinks the norm, no renorm)."""
    rng = np.random.default_rng(seed)
    v_c, v_ut, v_ui = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    v_c[1] *= 0.1
    v_ut[2] = v_c[2] + 0.05 * v_ut[2]
    v_ut[3], v_ui[3] = 13 / 12 * v_c[3], v_c[3]
    return v_c, v_ut, v_ui


def _norms(x, per_token):
    return np.linalg.norm(x, axis=-1) if per_token else np.linalg.norm(x, axis=(-2, -1))


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("s_img", [1.0, 2.0])
@pytest.mark.parametrize("renorm_min", [0.0, 0.5])
def test_combine_is_bagels_formula(renorm, s_img, renorm_min):
    v_c, v_ut, v_ui = _velocities()
    g = Guidance(text_scale=4.0, image_scale=s_img, renorm=renorm, renorm_min=renorm_min)
    got = np.asarray(combine(jnp.asarray(v_c), jnp.asarray(v_ut), jnp.asarray(v_ui), g))
    for r in range(len(v_c)):  # BAGEL's global norm is over one image: one row at a time
        want = _bagel_combine(v_c[r], v_ut[r], v_ui[r], 4.0, s_img, renorm, renorm_min)
        np.testing.assert_allclose(got[r], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("scales", [(4.0, 1.0), (4.0, 2.0), (7.5, 1.5), (1.0, 1.0)])
def test_combine_is_a_no_op_when_the_passes_agree(renorm, scales):
    v_c = _velocities()[0]
    g = Guidance(text_scale=scales[0], image_scale=scales[1], renorm=renorm)
    got = combine(jnp.asarray(v_c), jnp.asarray(v_c), jnp.asarray(v_c), g)
    np.testing.assert_allclose(np.asarray(got), v_c, rtol=1e-6, atol=1e-7)


def _guided(v_c, v_ut, v_ui, s_img, renorm):
    """The velocity the renorm bounds, before it: v_t' (text_channel) or v'."""
    v_text = v_ut + 4.0 * (v_c - v_ut)
    if renorm == "text_channel" or s_img == 1:
        return v_text
    return v_ui + s_img * (v_text - v_ui)


@pytest.mark.parametrize("s_img", [1.0, 2.0])
def test_global_renorm_bounds_each_rows_norm(s_img):
    """|v| <= |v_c| over each row's tokens and channels; = |v_c| where the guided norm
    exceeds it; v' unchanged where it does not (renorm_min 0)."""
    v_c, v_ut, v_ui = _velocities(seed=1)
    g = Guidance(text_scale=4.0, image_scale=s_img, renorm="global")
    got = np.asarray(combine(jnp.asarray(v_c), jnp.asarray(v_ut), jnp.asarray(v_ui), g))
    raw = _guided(v_c, v_ut, v_ui, s_img, "global")
    bound, norm = _norms(v_c, False), _norms(got, False)
    assert np.all(norm <= bound * (1 + 1e-5))
    over = _norms(raw, False) > bound
    assert over.any() and (~over).any()
    np.testing.assert_allclose(norm[over], bound[over], rtol=1e-5)
    np.testing.assert_allclose(got[~over], raw[~over], rtol=1e-5)


@pytest.mark.parametrize("renorm", ["channel", "text_channel"])
@pytest.mark.parametrize("s_img", [1.0, 2.0])
def test_channel_renorms_bound_each_tokens_norm(renorm, s_img):
    """channel: |v| <= |v_c| per token; text_channel: |v_t''| <= |v_c| per token, where
    v = v_ui + s_img (v_t'' - v_ui) (the image guidance is not renormed); equality where the
    guided norm exceeds |v_c|, no change where it does not."""
    v_c, v_ut, v_ui = _velocities(seed=2)
    g = Guidance(text_scale=4.0, image_scale=s_img, renorm=renorm)
    got = np.asarray(combine(jnp.asarray(v_c), jnp.asarray(v_ut), jnp.asarray(v_ui), g))
    image_guided = renorm == "text_channel" and s_img > 1
    bounded = v_ui + (got - v_ui) / s_img if image_guided else got
    raw = _guided(v_c, v_ut, v_ui, s_img, renorm)
    bound, norm = _norms(v_c, True), _norms(bounded, True)
    assert np.all(norm <= bound * (1 + 1e-5) + 1e-6)
    over = _norms(raw, True) > bound
    assert over.any() and (~over).any()
    np.testing.assert_allclose(norm[over], bound[over], rtol=1e-4)
    np.testing.assert_allclose(bounded[~over], raw[~over], rtol=1e-4, atol=1e-6)
    if image_guided:  # the image guidance after the renorm may exceed |v_c|
        assert np.any(_norms(got, True) > bound * 1.01)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_renorm_min_clamps_the_factor_from_below(renorm):
    """v_ut = v_c + 10 d makes the guided velocity ~30x |v_c|: the factor would be ~1/30,
    renorm_min=0.5 keeps half the unrenormed guided velocity."""
    rng = np.random.default_rng(3)
    v_c = rng.standard_normal((2, 8, 6)).astype(np.float32)
    v_ut = v_c + 10.0 * rng.standard_normal(v_c.shape).astype(np.float32)
    g = Guidance(text_scale=4.0, image_scale=1.0, renorm=renorm, renorm_min=0.5)
    got = combine(jnp.asarray(v_c), jnp.asarray(v_ut), jnp.asarray(v_c), g)
    np.testing.assert_allclose(np.asarray(got), 0.5 * (v_ut + 4.0 * (v_c - v_ut)), rtol=1e-5)


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=1), "num_steps=1 must be >= 2"),
    (dict(shift=0.0), "shift=0.0 must be > 0"),
    (dict(renorm="local"), "renorm='local' must be one of"),
    (dict(interval=(0.6, 0.4)), r"interval=\(0.6, 0.4\) must be"),
    (dict(interval=(0.0, 1.5)), "0 <= lo <= hi <= 1"),
    (dict(interval=(0.0,)), "must be \\(lo, hi\\)"),
])
def test_guidance_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Guidance(**kwargs)


def test_guidance_from_config_reads_config_sample():
    """configs/base.py: 50 points, shift 3; t2i 4.0 / 1.0 / (0.4, 1] / global, edit 4.0 /
    2.0 / (0, 1] / text_channel."""
    config = base.get_base_config()
    t2i = Guidance.from_config(config, "t2i")
    assert t2i == Guidance(num_steps=50, shift=3.0, text_scale=4.0, image_scale=1.0,
                           interval=(0.4, 1.0), renorm="global", renorm_min=0.0)
    assert Guidance.from_config(config) == t2i
    edit = Guidance.from_config(config, "edit")
    assert edit == Guidance(num_steps=50, shift=3.0, text_scale=4.0, image_scale=2.0,
                            interval=(0.0, 1.0), renorm="text_channel", renorm_min=0.0)
    assert Guidance.from_config(config, "edit", num_steps=10, shift=None).num_steps == 10
    # A config without a sample section (an older checkpoint's) gets the same, BAGEL's.
    del config.sample
    assert Guidance.from_config(config, "t2i") == t2i
    assert Guidance.from_config(config, "edit") == edit
    with pytest.raises(ValueError, match=r"Guidance: .*mode.*'video'"):
        Guidance.from_config(config, "video")


# --- decode ----------------------------------------------------------------------------------


def test_decode_without_a_vae_unpatchifies_and_rounds(setup):
    engine = setup[0]
    assert engine.latent_cell == engine.patch == 4  # pixel-space latents: 4x4 RGB patches
    tokens = 1.2 * jax.random.normal(jax.random.key(4), (2, TOKENS, engine.token_dim))
    got = decode(engine, tokens, GRID)
    assert got.dtype == np.uint8 and got.shape == (2, GRID[0] * 4, GRID[1] * 4, 3)
    pixels = rearrange(np.asarray(tokens), "b (h w) (p q c) -> b (h p) (w q) c", h=GRID[0],
                       w=GRID[1], p=4, q=4)
    np.testing.assert_array_equal(got, np.clip(np.round((pixels + 1) * 127.5), 0, 255))
    assert got.min() == 0 and got.max() == 255  # both clips were exercised
