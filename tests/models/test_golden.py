"""The models against stored outputs of their PyTorch references, on every Python.

The parity tests (`test_mot_parity.py`, `test_vit.py`, `test_vae.py`) need torch and skip where
it is missing (the Python 3.12 CI pass); these run everywhere. `make_golden.py` ran HF
transformers (Qwen2, Qwen3, SigLIP), diffusers (AutoencoderKL) and BAGEL's MoT and unified
forward written from their modules on tiny configs with weights that `golden_weights` rebuilds
from names (norm scales and biases far from 1 and 0, so that the order of operations matters);
here the same weights go through the converters of `unijax.convert` into the unijax modules and
the outputs must match the stored ones. No expectation is computed with unijax's own layers.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from tests.models import golden_weights as gw
from unijax import batch as batch_lib
from unijax.batch import TokenMeta
from unijax.convert import qwen2 as convert_qwen2
from unijax.convert import vision as convert_vision
from unijax.models import mot, unified, vae, vit


def _strip(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _meta(arrays: dict, prefix: str) -> TokenMeta:
    return TokenMeta(*(jnp.asarray(arrays[prefix + name])
                       for name in ("doc_id", "order", "split_id", "noisy")))


def _assert_close(got, want, what: str, tol: float) -> None:
    """Max-abs error relative to the reference's largest value: float32 sums in another order
    stay near 1e-6; a wrong operation gives 1e-2 or more."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= tol, f"{what}: differs from the reference by {err:.3g} (relative, max-abs)"


# ------------------------------------------------------------------------------------------
# Decoder: HF Qwen2 / Qwen3 per document, BAGEL's two-expert MoT.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_golden():
    return gw.load("decoder")


def _decoder(weights: dict, prefix: str, **overrides) -> mot.MoTDecoder:
    cfg = mot.DecoderConfig(**{
        **gw.DECODER, "qk_norm": True, "qkv_bias": True, "tie_embeddings": False,
        "num_experts": 1, "init_gen_from_und": False, "dtype": "float32",
        "attention_chunk_size": 16, **overrides})
    model = nnx.eval_shape(lambda: mot.MoTDecoder(cfg, rngs=nnx.Rngs(0)))
    params = convert_qwen2.decoder_params_from_hf(weights, cfg, prefix=prefix)
    convert_qwen2.load_decoder_params(model, params)
    return model


@nnx.jit(static_argnums=4)
def _decode(model, x, positions, meta, num_und):
    return model(x, positions, meta, num_und)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_one_expert_decoder_matches_hf_qwen(decoder_golden, family):
    """Packed rows of two documents each; HF ran every document alone with its positions.
    qwen2: q/k/v biases, no QK-norm; qwen3: per-head QK RMSNorm before RoPE."""
    arrays, weights = decoder_golden
    model = _decoder(weights, f"{family}/", qk_norm=family == "qwen3")
    ids = jnp.asarray(arrays["text.text_ids"])
    hidden = _decode(model, model.embed(ids), jnp.asarray(arrays["text.position"]),
                     _meta(arrays, "text."), gw.NUM_UND)
    logits = np.asarray(model.logits(hidden))
    live = arrays["text.doc_id"] > 0
    assert live.sum() > 50
    _assert_close(logits[live], arrays[f"{family}.logits"][live], f"{family} logits", 2e-5)


def test_two_expert_mot_matches_bagel_layers(decoder_golden):
    """BAGEL's MoT (distinct und and gen weights, gen read from the `_moe_gen` keys) over a
    row of text, ViT tokens, a noisy image and its clean copy, and an edit."""
    arrays, weights = decoder_golden
    model = _decoder(weights, "mot/", num_experts=2)
    meta = _meta(arrays, "mot.")
    hidden = np.asarray(_decode(model, jnp.asarray(arrays["mot.x"]),
                                jnp.asarray(arrays["mot.position"]), meta, gw.NUM_UND))
    live = arrays["mot.doc_id"] > 0
    assert live[:, gw.NUM_UND:].sum() >= 16 and live[:, :gw.NUM_UND].sum() > 40
    _assert_close(hidden[live], arrays["mot.hidden"][live], "MoT hidden states", 2e-5)


# ------------------------------------------------------------------------------------------
# SigLIP NaViT.
# ------------------------------------------------------------------------------------------

_VIT_SLOTS = 176  # every image of a mode packed into one row


@pytest.fixture(scope="module")
def vit_golden():
    return gw.load("vit")


def _vit_config(c: dict, mode: str):
    cfg = base.siglip_so400m_vit()
    cfg.hidden_size, cfg.num_layers = c["hidden_size"], c["num_layers"]
    cfg.num_heads, cfg.intermediate_size = c["num_heads"], c["intermediate_size"]
    cfg.patch_size, cfg.max_grid, cfg.layer_norm_eps = (c["patch_size"], c["max_grid"],
                                                         c["layer_norm_eps"])
    cfg.position_mode = mode
    return cfg


def _vit(weights: dict, c: dict, mode: str, prefix: str | None = None, **kw):
    model = nnx.eval_shape(lambda: vit.VisionTransformer(_vit_config(c, mode), chunk_size=32,
                                                         rngs=nnx.Rngs(0), **kw))
    tree = convert_vision.vit_from_hf(weights, num_heads=c["num_heads"], prefix=prefix)
    convert_vision.load_tree(model, tree, what="vit")
    return model


def _pack(images: list[np.ndarray], patch: int, slots: int):
    """One NaViT row [1, slots, ...] holding `images` ([h*p, w*p, 3]) back to back, patches in
    (row-in-patch, col-in-patch, channel) order; returns the payload and each image's span."""
    patches = np.zeros((1, slots, patch * patch * 3), np.float32)
    rc = np.zeros((1, slots, 2), np.int32)
    hw = np.zeros((1, slots, 2), np.int32)
    ids = np.zeros((1, slots), np.int32)
    start, spans = 0, []
    for i, image in enumerate(images, start=1):
        h, w = image.shape[0] // patch, image.shape[1] // patch
        n = h * w
        x = image.reshape(h, patch, w, patch, 3).transpose(0, 2, 1, 3, 4)
        patches[0, start:start + n] = x.reshape(n, -1)
        rc[0, start:start + n] = np.stack(np.divmod(np.arange(n), w), axis=-1)
        hw[0, start:start + n] = (h, w)
        ids[0, start:start + n] = i
        spans.append(slice(start, start + n))
        start += n
    return (patches, rc, hw, ids), spans


_vit_forward = nnx.jit(lambda model, *payload: model(*payload))


@pytest.mark.parametrize("mode", ["extrapolate", "interpolate"])
def test_vit_matches_hf_siglip(vit_golden, mode):
    """extrapolate: BAGEL's position ids `row * max_grid + col` (HF's plain forward at the
    table's grid); interpolate: HF `interpolate_pos_encoding=True`, grids below, above and on
    the table's; all images of a mode packed in one row."""
    arrays, weights = vit_golden
    cases = ["table"] + sorted(k[len("image."):] for k in arrays
                               if k.startswith(f"image.{mode}_"))
    images = [arrays[f"image.{case}"] for case in cases]
    payload, spans = _pack(images, gw.VIT["patch_size"], _VIT_SLOTS)
    out = np.asarray(_vit_forward(_vit(weights, gw.VIT, mode), *payload))[0]
    assert len(cases) == 4
    for case, span in zip(cases, spans):
        _assert_close(out[span], arrays[f"out.{case}"], f"{mode} {case}", 2e-5)
    np.testing.assert_array_equal(out[spans[-1].stop:], 0)  # padding slots


# ------------------------------------------------------------------------------------------
# FLUX-layout VAE.
# ------------------------------------------------------------------------------------------


def _vae_config(c: dict):
    cfg = base.flux_vae()
    cfg.base_channels = c["block_out_channels"][0]
    cfg.channel_mult = tuple(ch // c["block_out_channels"][0] for ch in c["block_out_channels"])
    cfg.num_res_blocks, cfg.norm_groups = c["layers_per_block"], c["norm_num_groups"]
    cfg.latent_channels = c["latent_channels"]
    cfg.scaling_factor, cfg.shift_factor = c["scaling_factor"], c["shift_factor"]
    return cfg


def test_vae_matches_diffusers_autoencoder_kl():
    """Posterior moments of an image and the decode of a latent (decode() undoes the FLUX
    scaling `z = s (x - shift)` first)."""
    arrays, weights = gw.load("vae")
    model = nnx.eval_shape(lambda: vae.AutoencoderKL(_vae_config(gw.VAE), chunk_size=64,
                                                     rngs=nnx.Rngs(0)))
    convert_vision.load_tree(model, convert_vision.vae_from_diffusers(_strip(weights, "vae/")),
                             what="vae")
    mean, logvar = nnx.jit(lambda m, x: m.encode_moments(x))(model, arrays["x"])
    _assert_close(mean, arrays["mean"], "posterior mean", 2e-5)
    _assert_close(logvar, arrays["logvar"], "posterior log-variance", 2e-5)
    z = gw.VAE["scaling_factor"] * (arrays["z"] - gw.VAE["shift_factor"])
    image = nnx.jit(lambda m, z: m.decode(z))(model, z)
    _assert_close(image, arrays["image"], "decoded image", 2e-5)


# ------------------------------------------------------------------------------------------
# The unified forward.
# ------------------------------------------------------------------------------------------


def _unified_config():
    c = gw.UNIFIED
    config = base.get_base_config()
    config.model.dtype = "float32"
    llm = config.model.llm
    for key, value in c["llm"].items():
        llm[key] = value
    llm.num_experts, llm.init_gen_from_und = 2, False
    config.model.vit = _vit_config(c["vit"], "extrapolate")
    config.model.vae = _vae_config(c["vae"])
    config.model.vae.sample_posterior = False
    config.model.latent_channels = c["vae"]["latent_channels"]
    config.model.latent_patch_size = c["latent_patch_size"]
    config.model.max_latent_size = c["max_latent_size"]
    config.attention.chunk_size = 16
    return config


def test_unified_forward_matches_bagel():
    """Latent tokens of the VAE canvases, then logits and velocities of a packed batch (ViT
    and VAE tokens with their connectors, timestep and 2D position embeddings, the MoT) given
    the noised tokens x_t the trainer would pass."""
    arrays, weights = gw.load("unified")
    config = _unified_config()
    model = nnx.eval_shape(lambda: unified.UnifiedModel(config, rngs=nnx.Rngs(0)))
    params = convert_qwen2.decoder_params_from_hf(
        weights, model.llm_config, prefix="unified/language_model.")
    convert_qwen2.load_decoder_params(model.llm, params)
    convert_vision.load_tree(model.vit, convert_vision.vit_from_hf(
        weights, num_heads=gw.UNIFIED["vit"]["num_heads"]), what="vit")
    convert_vision.load_tree(model.vae, convert_vision.vae_from_diffusers(
        _strip(weights, "unified/vae/")), what="vae")
    for name, tree in convert_vision.bagel_connectors(_strip(weights, "unified/")).items():
        convert_vision.load_tree(getattr(model, name), tree, what=name)

    fields = {k[len("batch."):]: v for k, v in arrays.items() if k.startswith("batch.")}
    batch = batch_lib.PackedBatch(**fields, num_und=gw.NUM_UND)
    batch_lib.validate(batch)
    x0 = nnx.jit(lambda m, b: m.latent_tokens(b))(model, batch)
    _assert_close(x0, arrays["x0"], "latent tokens", 2e-5)
    out = nnx.jit(lambda m, b, x: m(b, x))(model, batch, jnp.asarray(arrays["x_t"]))
    live = batch.doc_id > 0
    und, gen = live[:, :batch.num_und], live[:, batch.num_und:]
    assert gen.sum() >= 16 and (batch.modality == batch_lib.VIT).sum() >= 6
    _assert_close(np.asarray(out.logits)[und], arrays["logits"][und], "logits", 2e-5)
    _assert_close(np.asarray(out.velocity)[gen], arrays["velocity"][gen], "velocity", 2e-5)


def test_golden_weights_are_fixed_numbers():
    """The weight generator is integer arithmetic: the same values on every machine and numpy,
    24-bit (exact in float32), different per name; the fixtures stay small; the norm scales
    of the references are far from their init value."""
    u = gw.uniform("probe", (3,))
    np.testing.assert_array_equal(u, [0.37043488025665283, 0.26884937286376953,
                                      -0.6896719932556152])
    np.testing.assert_array_equal(u * 2**23 % 1, 0)
    assert not np.array_equal(u, gw.uniform("probe2", (3,)))
    total = sum(f.stat().st_size for f in gw.GOLDEN_DIR.glob("*.npz"))
    assert total < 400_000, f"golden fixtures hold {total} bytes"
    _, weights = gw.load("decoder")
    scales = weights["qwen3/model.layers.0.self_attn.q_norm.weight"]
    assert scales.std() > 0.2 and abs(scales.mean() - 1) < 0.15
