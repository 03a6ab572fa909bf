"""Unified model: embeddings placement, heads, the end-to-end mask, latents and parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import bagel_7b_mot, base, tiny
from unijax import batch as batch_lib
from unijax import batch_builder as bb
from unijax import config as config_lib
from unijax.convert import vision as convert
from unijax.models import embeddings, param_count, unified
from unijax.models.vae import FrozenParam

GRID = (3, 3)  # latent-token canvas of the test batches


def _tiny_vae_config():
    """configs/tiny.py with a small FLUX-layout VAE (2x downsample) instead of pixel patches."""
    c = tiny.get_config()
    vae = c.model.vae = base.flux_vae()
    vae.base_channels, vae.channel_mult, vae.norm_groups, vae.num_res_blocks = 8, (1, 2), 4, 1
    c.model.latent_channels, c.model.latent_patch_size = 16, 2
    c.data.vae_image_size = 16
    return c


def _batch(config):
    """Two rows: T2I with a clean copy + ViT + more text, a VQA doc; an edit and a text doc."""
    cell = config_lib.latent_cell(config.model)
    rows = [
        [[bb.text("draw"), bb.vae_image(2, 3, noisy=True, t=0.7), bb.vae_image(2, 3),
          bb.vit_image(3, 2), bb.text("next", loss=True)],
         [bb.vit_image(2, 2), bb.text("q"), bb.text("ans", loss=True)]],
        [[bb.vit_image(2, 3), bb.text("edit"), bb.vae_image(3, 3, noisy=True, t=0.4)],
         [bb.text("hello", loss=True)]],
    ]
    vit = config.model.vit
    return bb.build(rows, num_und=48, num_gen=16, latent_grid=GRID, latent_cell=cell,
                    vit_patch_size=vit.patch_size if vit else 4,
                    vit_max_grid=vit.max_grid if vit else 16,
                    max_latent_size=config.model.max_latent_size, max_vit_patches=16,
                    max_vae_images=2)


_forward = nnx.jit(lambda m, batch, tokens: m(batch, tokens))
_CONFIGS = {"tiny_pixels": tiny.get_config, "tiny_vae": _tiny_vae_config}
_MODELS = {}


def _model(name):
    """One model per config for the module, with random weights drawn in numpy: eager random
    initialisation compiles one small program per parameter shape, too slow for a CPU test.
    (Real initialisation is covered by `test_text_only_model_without_vit`.)"""
    if name not in _MODELS:
        abstract = nnx.eval_shape(
            lambda: unified.UnifiedModel(_CONFIGS[name](), rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        rng = np.random.default_rng(0)

        def draw(path, leaf):
            kind = str(getattr(path[-1], "key", path[-1]))
            noise = rng.normal(size=leaf.shape).astype(leaf.dtype)
            return {"scale": 1 + 0.1 * noise, "bias": 0.1 * noise}.get(kind, 0.02 * noise)

        values = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
        nnx.replace_by_pure_dict(state, values)
        _MODELS[name] = nnx.merge(graphdef, state)
    return _MODELS[name]
_latents = nnx.jit(lambda m, batch: m.latent_tokens(batch))


def _noisy_span(batch, row, slot):
    """Mask [L] of the tokens of the noisy VAE image in `slot` of `row` (markers included)."""
    gh, gw = GRID
    pi, mod = batch.payload_index[row], batch.modality[row]
    in_slot = (mod == batch_lib.VAE) & (pi // (gh * gw) == slot)
    split = np.unique(batch.split_id[row][in_slot])
    assert len(split) == 1 and batch.noisy[row][in_slot].all()
    return batch.split_id[row] == split[0]


@pytest.mark.parametrize("name", ["tiny_pixels", "tiny_vae"])
def test_forward_shapes_and_end_to_end_mask(name):
    config = _CONFIGS[name]()
    config_lib.validate(config)
    model = _model(name)
    batch = _batch(config)
    batch_lib.validate(batch, latent_tokens_per_image=GRID[0] * GRID[1])
    tokens = np.asarray(_latents(model, batch))
    token_dim = config.model.latent_patch_size ** 2 * config.model.latent_channels
    assert tokens.shape == (2, 2 * GRID[0] * GRID[1], token_dim)

    out = _forward(model, batch, tokens)
    b, length, v = 2, batch.length, config.model.llm.vocab_size
    assert out.logits.shape == (b, batch.num_und, v)
    assert out.velocity.shape == (b, batch.num_gen, token_dim)
    assert out.hidden.shape == (b, length, config.model.llm.hidden_size)
    # The heads read the hidden states of their slices (values against BAGEL's forward:
    # test_golden.py).
    heads = nnx.jit(lambda m, h: (m.llm.logits(h[:, :batch.num_und]),
                                  m.llm2vae(h[:, batch.num_und:])))(model, out.hidden)
    np.testing.assert_allclose(out.logits, heads[0], atol=1e-5)
    np.testing.assert_allclose(out.velocity, heads[1], atol=1e-5)
    assert np.abs(np.asarray(out.velocity)).max() > 1e-3  # random llm2vae: not all zero

    # Changing the noisy image (row 0, slot 0) changes nothing outside its own span.
    noisy = tokens.copy()
    noisy[0, :GRID[0] * GRID[1]] += np.random.default_rng(0).normal(
        size=noisy[0, :GRID[0] * GRID[1]].shape)
    out2 = _forward(model, batch, noisy)
    span = _noisy_span(batch, row=0, slot=0)
    outside = ~span
    np.testing.assert_array_equal(out2.hidden[0][outside], out.hidden[0][outside])
    np.testing.assert_array_equal(out2.hidden[1], out.hidden[1])
    und_outside = outside[:batch.num_und]
    np.testing.assert_array_equal(out2.logits[0][und_outside], out.logits[0][und_outside])
    np.testing.assert_array_equal(out2.logits[1], out.logits[1])
    gen_outside = outside[batch.num_und:]
    np.testing.assert_array_equal(out2.velocity[0][gen_outside], out.velocity[0][gen_outside])
    assert not np.allclose(out2.velocity[0][~gen_outside], out.velocity[0][~gen_outside])

    # The clean copy (slot 1) is visible to what follows it: the check above can fail.
    clean = tokens.copy()
    clean[0, GRID[0] * GRID[1]:] += 1.0
    out3 = _forward(model, batch, clean)
    later_text = (batch.modality[0, :batch.num_und] == batch_lib.TEXT) & \
        (batch.doc_id[0, :batch.num_und] == 1) & (batch.text_weight[0, :batch.num_und] > 0)
    assert not np.allclose(out3.logits[0][later_text], out.logits[0][later_text])


def _uint8_and_float_batches(config):
    """`_batch` with random uint8 pixels (padding included) and its float twin: the same pixels
    normalised on the host, with the float contract's zero padding outside each image."""
    batch = _batch(config)
    rng = np.random.default_rng(1)
    vit_u8 = rng.integers(0, 256, batch.vit_patches.shape, dtype=np.uint8)
    vae_u8 = rng.integers(0, 256, batch.vae_images.shape, dtype=np.uint8)
    cell = config_lib.latent_cell(config.model)
    h, w = vae_u8.shape[2:4]
    extent = batch.vae_grid_hw * cell
    inside = (np.arange(h)[:, None] < extent[..., 0, None, None]) & \
        (np.arange(w)[None, :] < extent[..., 1, None, None])
    vae_f = np.where(inside[..., None], batch_lib.normalize_pixels(vae_u8), 0.0)
    u8 = batch.replace(vit_patches=vit_u8, vae_images=vae_u8)
    f32 = batch.replace(vit_patches=batch_lib.normalize_pixels(vit_u8),
                        vae_images=vae_f.astype(np.float32))
    return u8, f32


@pytest.mark.parametrize("name", ["tiny_pixels", "tiny_vae"])
def test_uint8_pixels_give_the_outputs_of_host_normalised_floats(name):
    config = _CONFIGS[name]()
    model = _model(name)
    u8, f32 = _uint8_and_float_batches(config)
    batch_lib.validate(u8, latent_tokens_per_image=GRID[0] * GRID[1])
    batch_lib.validate(f32, latent_tokens_per_image=GRID[0] * GRID[1])
    tokens_u8, tokens_f32 = _latents(model, u8), _latents(model, f32)
    np.testing.assert_allclose(tokens_u8, tokens_f32, atol=1e-6)
    out_u8, out_f32 = _forward(model, u8, tokens_u8), _forward(model, f32, tokens_f32)
    for field in ("logits", "velocity", "hidden"):
        np.testing.assert_allclose(getattr(out_u8, field), getattr(out_f32, field), atol=1e-6,
                                   err_msg=field)
    # The pixels do reach the model: other pixels, other outputs.
    other = u8.replace(vit_patches=255 - u8.vit_patches, vae_images=255 - u8.vae_images)
    assert not np.allclose(_latents(model, other), tokens_u8)
    assert not np.allclose(_forward(model, other, tokens_u8).logits, out_u8.logits)


def test_embeddings_are_placed_by_payload_index():
    config = tiny.get_config()
    model = _model("tiny_pixels")
    batch = _batch(config)
    tokens = np.asarray(_latents(model, batch))

    @nnx.jit
    def parts(m, bt, tk):
        feats = m.connector(m.vit(bt.vit_patches, bt.vit_patch_rc, bt.vit_grid_hw,
                                  bt.vit_image_id))
        t_emb = m.time_embedder(bt.vae_timestep)
        return (m._embed_und(bt), m._embed_gen(bt, tk, bt.vae_timestep), feats, t_emb,
                m.llm.embed(bt.text_ids), m.vae2llm(tk))

    und, gen, feats, t_emb, emb, projected = parts(model, batch, tokens)
    d, nu = config.model.llm.hidden_size, batch.num_und
    table_vit = embeddings.sincos_2d_table(d, config.model.vit.max_grid)
    table_lat = embeddings.sincos_2d_table(d, config.model.max_latent_size)
    for r in range(2):
        for i in range(batch.length):
            mod, pi, pp = (batch.modality[r, i], batch.payload_index[r, i],
                           batch.patch_pos[r, i])
            got = und[r, i] if i < nu else gen[r, i - nu]
            if mod == batch_lib.TEXT:
                want = emb[r, i]
            elif mod == batch_lib.VIT:
                want = feats[r, pi] + table_vit[pp]
            elif mod == batch_lib.VAE:
                want = projected[r, pi] + t_emb[r, pi // 9] + table_lat[pp]
            else:
                want = np.zeros(d)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"row {r} token {i}")


def test_text_only_model_without_vit():
    config = tiny.get_config()
    config.model.vit = None
    model = unified.UnifiedModel(config, rngs=nnx.Rngs(0))
    assert model.vit is None and model.connector is None
    rows = [[[bb.text("hello", loss=True)], [bb.text("draw"), bb.vae_image(2, 2, True, 0.5)]]]
    batch = bb.build(rows, num_und=24, num_gen=4, latent_grid=(2, 2), latent_cell=4,
                     max_latent_size=16, max_vae_images=1)
    out = _forward(model, batch, None)
    assert out.logits.shape == (1, 24, 320) and out.velocity.shape == (1, 4, 48)
    np.testing.assert_array_equal(out.velocity, 0)  # zero-initialised llm2vae, as BAGEL
    # Text that sees no image token gets the decoder's logits on its token embeddings alone.
    text = (batch.modality[:, :24] == batch_lib.TEXT) & (batch.split_id[:, :24] < 0)
    assert text.sum() >= 10

    @nnx.jit
    def decoder_only(m, ids, positions, meta):
        x = m.llm.embed(ids)
        x = jnp.concatenate([x, jnp.zeros((1, 4, x.shape[-1]), x.dtype)], axis=1)
        return m.llm.logits(m.llm(x, positions, meta, 24)[:, :24])

    want = decoder_only(model, jnp.asarray(batch.text_ids[:, :24]), jnp.asarray(batch.position),
                        batch.token_meta())
    np.testing.assert_allclose(np.asarray(out.logits)[text], np.asarray(want)[text], atol=1e-5)


@pytest.mark.slow
def test_trainable_parameters_exclude_the_vae_and_get_gradients():
    config = _tiny_vae_config()
    model = _model("tiny_vae")
    frozen = nnx.to_pure_dict(nnx.state(model, FrozenParam))
    assert set(frozen) == {"vae"}
    assert "vae" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))
    batch = _batch(config)
    tokens = _latents(model, batch)

    @nnx.jit
    def grads(model):
        def loss(m):
            out = m(batch, tokens)
            # Linear in the velocity: llm2vae starts at zero, so a square would give it none.
            return jnp.mean(out.logits ** 2) + jnp.mean(out.velocity)
        diff = nnx.DiffState(0, unified.trainable_filter(config))
        return nnx.grad(loss, argnums=diff)(model)

    g = nnx.to_pure_dict(grads(model))
    assert "vae" not in g
    for name in ("vit", "connector", "time_embedder", "vae2llm", "llm2vae", "llm"):
        norm = sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(g[name]))
        assert norm > 0, f"no gradient reaches {name}"


def test_latent_tokens_encode_vae_images():
    config = _tiny_vae_config()
    model = _model("tiny_vae")
    batch = _batch(config)
    tokens = np.asarray(_latents(model, batch))
    np.testing.assert_array_equal(tokens, _latents(model, batch))  # mean: deterministic

    @nnx.jit
    def encode_and_decode(m, images, tokens):
        z = m.vae.encode(images.reshape(-1, *images.shape[2:]))  # every slot's canvas
        return z.reshape(*images.shape[:2], *z.shape[1:]), m.decode_latent_tokens(tokens, GRID)

    z, images = encode_and_decode(model, batch.vae_images, tokens)
    # Slot k of row r holds tokens [k * gh * gw, (k + 1) * gh * gw), row-major over its grid.
    np.testing.assert_allclose(unified.unpatchify(tokens, GRID, 2), z, atol=1e-5)
    assert images.shape == batch.vae_images.shape
    # Decoding the tokens is decoding each slot's latent canvas.
    want = nnx.jit(lambda m, z: m.vae.decode(z))(model, z.reshape(-1, *z.shape[2:]))
    np.testing.assert_allclose(images, np.asarray(want).reshape(images.shape), atol=1e-5)


def test_patchify_matches_bagel_order():
    rng = np.random.default_rng(0)
    c, h, w, p = 5, 2, 3, 2
    latent_chw = rng.normal(size=(c, h * p, w * p))
    # BAGEL: [c, h, p, w, p] -> "chpwq->hwpqc" -> [h*w, p*p*c].
    ref = np.einsum("chpwq->hwpqc", latent_chw.reshape(c, h, p, w, p)).reshape(h * w, -1)
    ours = unified.patchify(jnp.asarray(latent_chw.transpose(1, 2, 0))[None, None], p)[0]
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    back = unified.unpatchify(ours[None], (h, w), p)[0, 0]
    np.testing.assert_allclose(back, latent_chw.transpose(1, 2, 0), atol=1e-6)


def test_sincos_table_layout_and_timestep_features():
    d, side = 16, 5
    # MAE / DiT reference (as BAGEL's PositionEmbedding): meshgrid(grid_w, grid_h) naming.
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), axis=0).reshape(2, -1)
    ref = np.concatenate([one_d(d // 2, grid[0]), one_d(d // 2, grid[1])], axis=1)
    np.testing.assert_allclose(embeddings.sincos_2d_table(d, side), ref, atol=1e-12)
    ids = jnp.arange(side * side)
    np.testing.assert_allclose(embeddings.sincos_2d(ids, d, side), ref, atol=1e-6)
    # BAGEL's largest ids (max_latent_size 64, width 3584) stay close to the float64 table.
    big = embeddings.sincos_2d(jnp.arange(4000, 4096), 3584, 64)
    np.testing.assert_allclose(big, embeddings.sincos_2d_table(3584, 64)[4000:], atol=2e-5)

    t = jnp.asarray([0.0, 0.25, 1.0])
    feats = np.asarray(embeddings.timestep_features(t, 8))
    f = np.exp(-np.log(10000) * np.arange(4) / 4)
    ref_t = np.concatenate([np.cos(np.outer(t, f)), np.sin(np.outer(t, f))], axis=1)
    np.testing.assert_allclose(feats, ref_t, atol=1e-6)


# BAGEL-7B-MoT by hand from the checkpoint shapes (reference/bagel.md section 6), D = 3584:
_LLM = 14_141_252_608  # 2 x 28 expert layers of 233,058,048 + embed + lm_head + 2 final norms
_VIT = (588 * 1152 + 1152) + 4900 * 1152 + 26 * (  # patch Linear, position table, 26 layers:
    2 * 2304 + 4 * (1152 * 1152 + 1152)  # two LayerNorms, q/k/v/out with biases
    + (1152 * 4304 + 4304) + (4304 * 1152 + 1152)) + 2304  # fc1, fc2; post_layernorm
_CONNECTOR = (1152 * 3584 + 3584) + (3584 * 3584 + 3584)
_TIME = (256 * 3584 + 3584) + (3584 * 3584 + 3584)
_HEADS = (64 * 3584 + 3584) + (3584 * 64 + 64)  # vae2llm, llm2vae
BAGEL_7B_MOT_PARAMS = _LLM + _VIT + _CONNECTOR + _TIME + _HEADS  # no sin-cos tables, no VAE


def test_bagel_7b_mot_parameter_count():
    assert _VIT == 402_552_736 and _CONNECTOR == 16_980_992 and _TIME == 13_769_728
    assert BAGEL_7B_MOT_PARAMS == 14_575_018_464
    config = bagel_7b_mot.get_config()
    groups, frozen = unified.parameter_breakdown(config)
    rows = dict(groups)
    assert "other" not in rows
    assert sum(rows.values()) == BAGEL_7B_MOT_PARAMS
    assert rows["vit"] == _VIT and rows["connector"] == _CONNECTOR
    assert rows["time_embedder"] == _TIME
    assert frozen > 80_000_000  # the FLUX VAE, counted apart (exact size: the parity test)
    # BAGEL's 14.61 B counts its two fixed sin-cos tables (4900 + 4096 rows of 3584).
    assert BAGEL_7B_MOT_PARAMS + (4900 + 4096) * 3584 == 14_607_260_128


@pytest.mark.parity
def test_flux_vae_size_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
    expected = sum(p.numel() for p in ref.parameters())
    config = bagel_7b_mot.get_config()
    abstract = nnx.eval_shape(lambda: unified.AutoencoderKL(config.model.vae, rngs=nnx.Rngs(0)))
    assert param_count.count(nnx.state(abstract, FrozenParam)) == expected
    assert round(expected / 1e6, 1) == 83.8


def test_bagel_connector_names_load_and_apply():
    config = tiny.get_config()
    model = nnx.clone(_model("tiny_pixels"))
    rng = np.random.default_rng(0)
    d, dv, tok = 128, config.model.vit.hidden_size, 48
    shapes = {"connector.fc1": (d, dv), "connector.fc2": (d, d), "time_embedder.mlp.0": (d, 256),
              "time_embedder.mlp.2": (d, d), "vae2llm": (d, tok), "llm2vae": (tok, d)}
    sd = {}
    for name, (out, inp) in shapes.items():  # torch Linear layout: weight [out, in]
        sd[name + ".weight"] = rng.normal(size=(out, inp)).astype(np.float32)
        sd[name + ".bias"] = rng.normal(size=(out,)).astype(np.float32)
    for name, tree in convert.bagel_connectors(sd).items():
        convert.load_tree(getattr(model, name), tree, what=name)
    x = rng.normal(size=(3, tok)).astype(np.float32)
    np.testing.assert_allclose(model.vae2llm(x), x @ sd["vae2llm.weight"].T + sd["vae2llm.bias"],
                               atol=1e-4)
    t = np.float32([0.0, 0.5])
    h = embeddings.timestep_features(jnp.asarray(t)) @ sd["time_embedder.mlp.0.weight"].T
    h = jax.nn.silu(h + sd["time_embedder.mlp.0.bias"])
    want = h @ sd["time_embedder.mlp.2.weight"].T + sd["time_embedder.mlp.2.bias"]
    np.testing.assert_allclose(model.time_embedder(jnp.asarray(t)), want, atol=1e-4)


def test_every_parameter_axis_has_a_sharding_rule():
    from unijax.training import sharding

    names = set()
    for name in ("tiny_pixels", "tiny_vae"):
        state = nnx.state(_model(name), nnx.Any(nnx.Param, FrozenParam))
        specs = nnx.get_partition_spec(state)
        for spec in jax.tree.leaves(
                specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
            sharding.logical_to_mesh_spec(tuple(spec))  # KeyError names an unknown axis
            names.update(a for a in spec if a is not None)
    assert {"vit_embed", "vit_heads", "vit_mlp", "patch", "conv_in", "conv_out", "embed",
            "mlp", "layers"} <= names


def test_dry_run_prints_the_unified_bagel_7b_mot_count(capsys):
    from unijax import main

    assert main.dry_run(bagel_7b_mot.get_config()) == 0
    lines = capsys.readouterr().out.splitlines()
    unified_part = lines[lines.index(next(x for x in lines if x.startswith("unified model"))):]
    assert f"parameters: {BAGEL_7B_MOT_PARAMS:,}" == unified_part[1]
    assert any(x.split() == ["vit", f"{_VIT:,}", "(", "2.76%)"] for x in unified_part)
    assert unified_part[-1].endswith(": 83,819,683")  # the FLUX VAE, frozen
