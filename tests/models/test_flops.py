"""Analytic train-step FLOPs: the mask's visible pairs are exact, the count of the whole step
matches XLA's cost analysis of the compiled train step, and the peak table reads device kinds.

XLA's cost analysis counts a while-loop body once, so the compared configs have one trip in
every loop: layers unrolled (`scan_layers=False`, a 1-layer ViT), one key chunk of attention
per row and one CE chunk per und slice. That attention evaluates every (query, key) pair, so
the comparison uses `attention="dense"`; the visible count is checked against the dense mask.
"""

import dataclasses
import types

import jax
import numpy as np
import pytest
from flax import nnx

from configs import bagel_7b_mot, base, tiny
from unijax import batch_builder as bb
from unijax import config as config_lib
from unijax.kernels import mask as mask_lib
from unijax.kernels import mask_pairs
from unijax.models import flops, mot
from unijax.training import optim, sharding
from unijax.training import state as state_lib
from unijax.training import train as train_lib

# Cheaper CPU code generation; the HLO passes, and so the counted FLOPs, are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _config(vit=True, vae=False, **llm):
    """configs/tiny.py at a width where matrix products dominate (>= 256), every loop one trip."""
    c = tiny.get_config()
    c.model.llm.update(hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2,
                       head_dim=64, intermediate_size=768, scan_layers=False, **llm)
    c.attention.chunk_size = c.train.ce_chunk_size = 1024
    c.train.ema_decay, c.data.max_datasets, c.mesh.data = 0.0, 2, 1
    if vit:
        c.model.vit.update(hidden_size=128, num_layers=1, num_heads=2, intermediate_size=512)
    else:
        c.model.vit = None
    if vae:
        v = c.model.vae = base.flux_vae()
        v.base_channels, v.channel_mult, v.norm_groups, v.num_res_blocks = 8, (1, 2), 4, 1
        c.model.latent_channels, c.model.latent_patch_size = 16, 2
    return c


def _batch(config, gen=True, vit=True, shuffle=False):
    """Two rows: a document with text, a noisy VAE image and its clean copy, a ViT image and
    more text, then a text document; a long text document. 256 und + 64 gen tokens."""
    first = [bb.text("a caption of some length", loss=True)]
    first += [bb.vae_image(3, 3, noisy=True, t=0.5), bb.vae_image(3, 3)] if gen else []
    first += [bb.vit_image(4, 4)] if vit else []
    first += [bb.text("more text after the images", loss=True)]
    rows = [[first, [bb.text("hello there", loss=True)]], [[bb.text("x" * 100, loss=True)]]]
    vit_cfg = config.model.vit
    batch = bb.build(rows, num_und=256, num_gen=64 if gen else 0, latent_grid=(3, 3),
                     latent_cell=config_lib.latent_cell(config.model),
                     vit_patch_size=vit_cfg.patch_size if vit_cfg else 4, vit_max_grid=16,
                     max_latent_size=config.model.max_latent_size,
                     max_vit_patches=64 if vit else 0, max_vae_images=2)
    if shuffle:  # the physical layout of a row is free: the mask reads only the metadata
        perm = np.random.default_rng(0).permutation(batch.length)
        batch = dataclasses.replace(batch, **{f: getattr(batch, f)[:, perm] for f in (
            "doc_id", "order", "split_id", "noisy")})
    return batch


def _compiled_flops(config, batch) -> float:
    """XLA's FLOPs of the trainer's compiled step (`train.make_train_step`) on one device."""
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    spec = state_lib.ModelSpec.build(config)
    tx = optim.make_optimizer(config, spec.abstract_params)
    target, shardings = state_lib.abstract_state(config, mesh, spec, tx)
    step = train_lib.make_train_step(config, spec, tx, shardings, mesh)
    with train_lib._MeshContext(mesh):
        compiled = step.lower(target, batch).compile(compiler_options=FAST_COMPILE)
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]


def _count(config, batch, **kw):
    return flops.step_flops(config, batch, attention="dense",
                            trainable=optim.is_trainable_fn(config), **kw)


@pytest.mark.parametrize("vit,gen", [(False, False), (True, False)], ids=["text", "text_vit"])
def test_understanding_steps_match_xla(vit, gen):
    config = _config(vit=vit)
    batch = _batch(config, gen=gen, vit=vit)
    count = _count(config, batch)
    assert _compiled_flops(config, batch) == pytest.approx(count["hardware"], rel=0.10)
    assert ("vit" in count["forward"]) == vit and "vae_encoder" not in count["forward"]
    assert count["forward"]["lm_head"] == 2 * 2 * 256 * 256 * config.model.llm.vocab_size
    # Backward = 2x forward when everything trains, the ViT's first product excepted.
    if not vit:
        assert count["model"] == pytest.approx(3 * sum(count["forward"].values()))


def test_vae_latent_step_matches_xla_and_the_encoder_has_no_backward():
    config = _config(vae=True)
    batch = _batch(config)
    count = _count(config, batch)
    assert count["forward"]["vae_encoder"] > 0 and count["backward"]["vae_encoder"] == 0
    assert _compiled_flops(config, batch) == pytest.approx(count["hardware"], rel=0.10)


def test_frozen_und_expert_has_no_backward_and_matches_xla():
    config = _config(vit=False, freeze_und_expert=True)
    batch = _batch(config, vit=False)
    count = _count(config, batch)
    for part in ("und_qkvo", "und_mlp", "lm_head"):
        assert count["forward"][part] > 0 and count["backward"][part] == 0
    assert count["recompute"]["ce_checkpoint"] == 0
    measured = _compiled_flops(config, batch)
    assert measured == pytest.approx(count["hardware"], rel=0.10)
    config.model.llm.freeze_und_expert = False
    assert measured < 0.8 * _count(config, batch)["hardware"]  # the und backward is gone


def test_full_remat_hardware_count_includes_the_recompute():
    config = _config(vit=False, remat_policy="full")
    batch = _batch(config, vit=False)
    count = _count(config, batch)
    remat = count["recompute"]["remat"]
    assert remat > 0.1 * count["model"]
    measured = _compiled_flops(config, batch)
    assert measured == pytest.approx(count["hardware"], rel=0.10)
    assert measured != pytest.approx(count["hardware"] - remat, rel=0.10)
    config.model.llm.remat_policy = "none"
    assert _count(config, batch)["model"] == count["model"]  # model FLOPs ignore remat


@pytest.mark.parametrize("shuffle", [False, True])
def test_visible_pairs_equal_the_dense_mask(shuffle):
    config = _config(vae=True)
    batch = _batch(config, shuffle=shuffle)
    dense = np.asarray(mask_lib.dense_mask(batch.token_meta())).sum(axis=(1, 2))
    got = mask_pairs.visible_pairs(batch.doc_id, batch.order, batch.split_id, batch.noisy)
    np.testing.assert_array_equal(got, dense)
    count = flops.step_flops(config, batch)
    assert count["attention_pairs"] == dense.sum() < batch.batch_size * batch.length**2
    assert count["vit_pairs"] == 16 * 16  # one ViT image of 4 x 4 patches


def test_visible_pairs_when_documents_interleave_in_causal_order():
    """Off the PackedBatch contract (documents not contiguous in causal order) the count takes
    the sorting path and stays exact."""
    rng = np.random.default_rng(1)
    doc = rng.integers(0, 3, (3, 40)).astype(np.int32)
    order = np.stack([rng.permutation(40) for _ in range(3)]).astype(np.int32)
    split = np.where(rng.random((3, 40)) < 0.5, rng.integers(0, 4, (3, 40)), -1)
    split = np.where(doc > 0, split * 3 + doc, -1).astype(np.int32)  # a span in one document
    noisy = (split >= 0) & (split % 2 == 0)  # whole spans are noisy or clean
    meta = mask_lib.TokenMeta(doc, order, split, noisy)
    dense = np.asarray(mask_lib.dense_mask(meta)).sum(axis=(1, 2))
    np.testing.assert_array_equal(mask_pairs.visible_pairs(doc, order, split, noisy), dense)


def test_lm_head_rows_are_the_ce_chunks_holding_targets_and_can_be_overridden():
    config = _config(vit=False)
    batch = _batch(config, vit=False)
    targets = (batch.text_weight[:, :batch.num_und] > 0).sum(axis=1)
    assert targets.tolist() == [64, 101]
    config.train.ce_chunk_size = 96  # targets first: chunks 0 and 1 of 96 run, chunk 2 not
    assert flops.lm_head_rows(config, batch) == 2 * 2 * 96
    config.train.grad_accum = 2  # micro-batches of one row: 1 and 2 chunks
    assert flops.lm_head_rows(config, batch) == 96 + 2 * 96
    config.train.grad_accum = 1
    default = flops.step_flops(config, batch)
    half = flops.step_flops(config, batch, lm_head_tokens=default["lm_head_tokens"] // 2)
    assert half["forward"]["lm_head"] == default["forward"]["lm_head"] / 2
    assert half["model"] < default["model"]
    with pytest.raises(ValueError, match="attention must be"):
        flops.step_flops(config, batch, attention="tiles")


def test_default_trainable_rule_is_the_optimizers():
    c = tiny.get_config()
    c.model.vae = base.flux_vae()
    c.model.latent_channels = 16
    names = state_lib.ModelSpec.build(c).names
    assert set(flops._names(c)) <= set(names)  # every counted weight exists by that name
    for freeze, trainable, freeze_und in [((), (), False), (("vit/.*",), (), True),
                                          ((), ("connector/.*", "llm2vae/.*"), False)]:
        c.train.freeze, c.train.trainable = freeze, trainable
        c.model.llm.freeze_und_expert = freeze_und
        ours, optimizers = flops.config_trainable_fn(c), optim.is_trainable_fn(c)
        assert [ours(n) for n in names] == [optimizers(n) for n in names]


def test_bagel_7b_text_row_is_six_flops_per_weight_and_token():
    """The MaxText identity on BAGEL-7B-MoT shapes: one text document filling the und slice
    costs 6 x (und expert weights) per token, plus 3x attention over its causal pairs and 3x
    the LM head on every CE row; weights counted from the model's own abstract shapes."""
    config = bagel_7b_mot.get_config()
    config.model.vit = None
    tokens = config.data.und_capacity
    batch = bb.build([[[bb.text([1] * (tokens - 2), loss=True)]]], num_und=tokens, num_gen=0,
                     max_vit_patches=0, max_vae_images=0)
    count = flops.step_flops(config, batch)
    cfg = mot.DecoderConfig.from_config(config)
    decoder = nnx.eval_shape(lambda: mot.MoTDecoder(cfg, rngs=nnx.Rngs(0)))
    und = nnx.to_pure_dict(nnx.state(decoder.layers.und, nnx.Param))
    weights = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(und)[0]
                  if "kernel" in str(path[-1]))
    pairs = tokens * (tokens + 1) // 2
    assert count["attention_pairs"] == pairs
    attention = 4 * pairs * cfg.num_heads * cfg.head_dim * cfg.num_layers
    assert count["lm_head_tokens"] == 7 * 2048  # 13,824 rows in whole CE chunks of 2,048
    lm_head = 2 * 7 * 2048 * cfg.hidden_size * cfg.vocab_size
    assert count["model"] == pytest.approx(6 * weights * tokens + 3 * attention + 3 * lm_head,
                                           rel=1e-9)
    assert count["recompute"]["remat"] > 0  # the config's full remat


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v4 lite", None), ("TPU v5 lite", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", None)])
def test_peak_flops_by_device_kind(kind, peak):
    assert flops.peak_flops(types.SimpleNamespace(device_kind=kind)) == peak


def test_cpu_has_no_peak():
    assert flops.peak_flops(jax.devices()[0]) is None
