"""The MoT decoder: routing, expert equivalence, gradient isolation, freezing, scan/remat,
sharded jit steps and FLOPs (fp32, tiny shapes, CPU)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from unijax import batch_builder as bb
from unijax.batch import TokenMeta
from unijax.convert import qwen2 as convert
from unijax.kernels import mask as mask_lib
from unijax.kernels.attention import attention
from unijax.models import flops, layers, mot
from unijax.models.layers import rope_cos_sin
from unijax.training import sharding

CFG = mot.DecoderConfig(
    vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, rope_theta=10_000.0, num_experts=2, init_gen_from_und=False,
    dtype="float32", attention_chunk_size=16)
SPECIAL = bb.SpecialTokens(im_start=120, im_end=121, vision_start=122, vision_end=123)
NUM_UND, NUM_GEN = 32, 16


def _batch():
    """Two rows mixing T2I, editing, VQA and interleaved documents (clean and noisy VAE)."""
    rng = np.random.default_rng(0)
    ids = lambda n: [int(i) for i in rng.integers(0, 120, n)]
    rows = [
        [[bb.text(ids(5)), bb.vae_image(2, 2, noisy=True, t=0.5)],
         [bb.vae_image(2, 2), bb.vit_image(2, 2), bb.text(ids(4)),
          bb.vae_image(2, 2, noisy=True, t=0.7)]],
        [[bb.vit_image(2, 3), bb.text(ids(6), loss=True)],
         [bb.text(ids(3)), bb.vae_image(2, 2, noisy=True, t=0.3), bb.vae_image(2, 2),
          bb.text(ids(3))]],
    ]
    return bb.build(rows, num_und=NUM_UND, num_gen=NUM_GEN, latent_grid=(2, 2),
                    max_vae_images=3, special=SPECIAL)


BATCH = _batch()
X = jax.random.normal(jax.random.key(1), (2, NUM_UND + NUM_GEN, CFG.hidden_size))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _forward(graphdef, state, x, positions, meta, num_und):
    return nnx.merge(graphdef, state)(x, positions, meta, num_und)


def _run(model, x=X, batch=BATCH, num_und=NUM_UND, meta=None):
    """The decoder's hidden states [B, L, D], jitted (op-by-op dispatch is slow on CPU)."""
    meta = batch.token_meta() if meta is None else meta
    return _forward(*nnx.split(model), x, jnp.asarray(batch.position), meta, num_und)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@functools.partial(jax.jit, static_argnums=0)
def _weighted_grads_jit(graphdef, params, weights, meta):
    r = jax.random.normal(jax.random.key(2), X.shape)

    def loss(p, w):
        model = nnx.merge(graphdef, p)
        # Und inputs come from the token embedding so that it is part of every loss too.
        x = jnp.concatenate([model.embed(jnp.asarray(BATCH.text_ids[:, :NUM_UND])),
                             X[:, NUM_UND:]], axis=1)
        hidden = model(x, jnp.asarray(BATCH.position), meta, NUM_UND)
        return jnp.sum(hidden * r * w[..., None])

    return jax.grad(loss)(params, weights)


def _weighted_grads(model, weights, meta=None):
    """For each [B, L] token-weight mask in `weights`, the flat {path: gradient} of
    sum_t w[b, t] <hidden[b, t], r[b, t]> (fixed random r) w.r.t. every Param. One compiled
    function per model config serves every test."""
    meta = BATCH.token_meta() if meta is None else meta
    graphdef, params = nnx.split(model, nnx.Param)
    return [_flat(nnx.to_pure_dict(_weighted_grads_jit(
        graphdef, params, jnp.asarray(w, jnp.float32), meta))) for w in weights]


def _is_gen(path):
    return "/gen/" in f"/{path}/"


# ---------------------------------------------------------------------------------------------
# Forward, routing and expert equivalence.
# ---------------------------------------------------------------------------------------------


def test_forward_shapes_and_dtypes_bf16_compute_fp32_params():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    model = mot.MoTDecoder(cfg, rngs=nnx.Rngs(0))
    x_und = model.embed(jnp.asarray(BATCH.text_ids[:, :NUM_UND]))
    assert x_und.shape == (2, NUM_UND, 64) and x_und.dtype == jnp.bfloat16
    hidden = _run(model)
    assert hidden.shape == X.shape and hidden.dtype == jnp.bfloat16
    logits = model.logits(hidden[:, :NUM_UND])
    assert logits.shape == (2, NUM_UND, 128) and logits.dtype == jnp.bfloat16
    assert {v.dtype for v in jax.tree.leaves(_params(model))} == {jnp.dtype(jnp.float32)}
    # The same weights in float32: bfloat16 rounding (2^-8) leaves ~0.4% relative error; a
    # norm, softmax or RoPE angle computed in bfloat16 instead of float32 gives several %.
    reference = mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))
    want = _run(reference)
    live = BATCH.doc_id > 0
    assert _relative_error(hidden[live], want[live]) < 1.5e-2
    want_logits = reference.logits(want[:, :NUM_UND])
    assert _relative_error(logits[live[:, :NUM_UND]], want_logits[live[:, :NUM_UND]]) < 1.5e-2


def _relative_error(got, want) -> float:
    """||got - want|| / ||want|| over all elements, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _dense_reference(model, x, positions, meta, num_und):
    """Both experts on every token, then a per-token select: the wasteful way to route."""
    cfg = model.config
    is_und = (jnp.arange(x.shape[1]) < num_und)[None, :, None]
    pick = lambda a, b: jnp.where(is_und if a.ndim == 3 else is_und[..., None], a, b)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, jnp.float32)
    graphdef, state = nnx.split(model.layers)
    for i in range(cfg.num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda w, i=i: w[i], state))
        (qu, ku, vu), (qg, kg, vg) = layer.und.qkv(x, cos, sin), layer.gen.qkv(x, cos, sin)
        out = attention(pick(qu, qg), pick(ku, kg), pick(vu, vg), meta)
        x = pick(layer.und.finish(x, out), layer.gen.finish(x, out))
    return pick(model.final_norm.und(x), model.final_norm.gen(x))


def test_routed_forward_matches_masked_dense_reference():
    model = mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ref = jax.jit(lambda s: _dense_reference(nnx.merge(graphdef, s), X, jnp.asarray(
        BATCH.position), BATCH.token_meta(), NUM_UND))(state)
    np.testing.assert_allclose(_run(model), ref, atol=2e-5, rtol=0)


def test_experts_are_distinct_unless_gen_is_initialised_from_und():
    distinct = _flat(_params(mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))))
    copied = _flat(_params(mot.MoTDecoder(dataclasses.replace(CFG, init_gen_from_und=True),
                                          rngs=nnx.Rngs(0))))
    kernel = "layers/{}/q_proj/kernel"
    assert not np.array_equal(distinct[kernel.format("und")], distinct[kernel.format("gen")])
    for path, value in copied.items():
        if _is_gen(path):
            np.testing.assert_array_equal(value, copied[path.replace("gen", "und")])


@pytest.mark.parametrize("num_und", [0, 7, NUM_UND + NUM_GEN])
def test_two_experts_with_copied_weights_equal_one_expert_for_any_split(num_und):
    two = mot.MoTDecoder(dataclasses.replace(CFG, init_gen_from_und=True), rngs=nnx.Rngs(0))
    one = mot.MoTDecoder(dataclasses.replace(CFG, num_experts=1), rngs=nnx.Rngs(5))
    params = _params(two)
    del params["layers"]["gen"], params["final_norm"]["gen"]
    convert.load_decoder_params(one, params)
    np.testing.assert_allclose(_run(two, num_und=num_und), _run(one, num_und=num_und),
                               atol=2e-6, rtol=0)


def test_bad_inputs_name_the_problem():
    model = mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_und=49 outside"):
        _run(model, num_und=49)
    with pytest.raises(ValueError, match="positions"):
        model(X, jnp.asarray(BATCH.position)[:, :5], BATCH.token_meta(), NUM_UND)
    with pytest.raises(ValueError, match="freeze_und_expert=True needs num_experts=2"):
        dataclasses.replace(CFG, num_experts=1, freeze_und_expert=True)


def test_config_from_configdict(tiny_config):
    cfg = mot.DecoderConfig.from_config(tiny_config)
    llm = tiny_config.model.llm
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (
        llm.hidden_size, llm.num_layers, llm.vocab_size)
    assert (cfg.dtype, cfg.attention_chunk_size) == ("float32", tiny_config.attention.chunk_size)
    abstract = nnx.eval_shape(lambda: mot.MoTDecoder(tiny_config, rngs=nnx.Rngs(0)))
    assert abstract.config == cfg


# ---------------------------------------------------------------------------------------------
# Gradient isolation and freezing.
# ---------------------------------------------------------------------------------------------


def _sees_gen(batch):
    """[B, L]: does the token's attention row contain any gen-slice token?"""
    visible = np.asarray(mask_lib.dense_mask(batch.token_meta()))
    return visible[:, :, batch.num_und:].any(-1)


def test_und_loss_gives_gen_weights_exactly_zero_gradient_where_no_und_token_sees_gen():
    """Proves: a loss on und tokens whose attention rows hold no gen token (text before an
    image, a noisy image's surroundings) gives every gen-expert parameter an exactly zero
    gradient, while und parameters get a nonzero one. Und tokens that do see gen tokens (text
    after a clean VAE image) pass gradient into the gen expert through attention."""
    model = mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))
    und = np.arange(NUM_UND + NUM_GEN)[None] < NUM_UND
    sees_gen = _sees_gen(BATCH)
    isolated = und & ~sees_gen & (BATCH.doc_id > 0)
    assert isolated.sum() > 10 and (und & sees_gen).any()
    grads, mixed = _weighted_grads(model, [isolated, und & sees_gen])
    assert all(not np.any(g) for p, g in grads.items() if _is_gen(p))
    assert all(np.any(g) for p, g in grads.items() if "layers/und" in p)
    assert np.any(mixed["layers/gen/v_proj/kernel"])


def test_each_expert_gets_zero_gradient_from_the_other_slice_across_documents():
    """Proves, with und and gen tokens in different documents (so attention never mixes the
    slices): a loss on und tokens leaves every gen parameter at zero gradient and a loss on
    gen tokens leaves every und layer parameter and the und final norm at zero gradient."""
    model = mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))
    gen = np.arange(NUM_UND + NUM_GEN)[None] >= NUM_UND
    live = BATCH.doc_id > 0
    doc = np.where(gen & live, BATCH.doc_id + 10, BATCH.doc_id)
    meta = BATCH.token_meta().replace(doc_id=jnp.asarray(doc))
    und_loss, gen_loss = _weighted_grads(model, [~gen & live, gen & live], meta)
    for grads, other in ((und_loss, _is_gen), (gen_loss, lambda p: not _is_gen(p))):
        experts = {p: g for p, g in grads.items() if p.startswith(("layers", "final_norm"))}
        others = [g for p, g in experts.items() if other(p)]
        own = [g for p, g in experts.items() if not other(p) and p.startswith("layers")]
        assert others and all(not np.any(g) for g in others)
        assert own and all(np.any(g) for g in own)


def test_freeze_und_stops_every_gradient_into_the_und_expert():
    """Gen tokens attend to und tokens, yet with freeze_und_expert the und expert and the
    embedding get exactly zero gradient from a gen loss (BAGEL detaches und activations, keys
    and values), and an und loss reaches no layer weight at all (und outputs are constants)."""
    cfg = dataclasses.replace(CFG, freeze_und_expert=True)
    model = mot.MoTDecoder(cfg, rngs=nnx.Rngs(0))
    gen = np.arange(NUM_UND + NUM_GEN)[None] >= NUM_UND
    assert _sees_gen(BATCH).any()  # und context is visible to gen tokens
    live = BATCH.doc_id > 0
    gen_loss, und_loss = _weighted_grads(model, [gen & live, ~gen & live])
    for path, g in gen_loss.items():
        if path != "lm_head/kernel":  # unused by this loss
            assert np.any(g) == _is_gen(path), path
    assert not any(np.any(g) for g in und_loss.values())


def test_freeze_und_optimizer_step_leaves_und_bit_identical():
    cfg = dataclasses.replace(CFG, freeze_und_expert=True)
    model = mot.MoTDecoder(cfg, rngs=nnx.Rngs(0))
    wrt = mot.trainable_filter(cfg)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
    state_paths = {p for p in _flat(nnx.to_pure_dict(nnx.state(opt, nnx.OptState)))}
    counters = ("count", "step")
    assert state_paths and all("/gen/" in p for p in state_paths if not p.endswith(counters))
    before = _flat(_params(model))

    def loss(m):
        hidden = m(X, jnp.asarray(BATCH.position), BATCH.token_meta(), NUM_UND)
        return jnp.sum(hidden**2) + jnp.sum(m.logits(hidden[:, :NUM_UND]) ** 2)

    @nnx.jit
    def step(model, opt):
        opt.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model))

    step(model, opt)
    after = _flat(_params(model))
    for path, value in after.items():
        assert np.array_equal(value, before[path]) != _is_gen(path), path
    trainable = _flat(nnx.to_pure_dict(nnx.state(model, wrt)))
    assert trainable and all(_is_gen(p) for p in trainable)
    assert set(_flat(nnx.to_pure_dict(nnx.state(model, mot.trainable_filter(CFG))))) == set(
        before)


# ---------------------------------------------------------------------------------------------
# Scan, remat, jit over split state, sharding.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache
def _loss_and_grads(cfg):
    """(hidden states, loss, flat grads) of sum(tanh(hidden)) for the model of `cfg`."""
    model = mot.MoTDecoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state):
        def loss(state):
            hidden = _run(nnx.merge(graphdef, state))
            return jnp.sum(jnp.tanh(hidden)), hidden
        return jax.value_and_grad(loss, has_aux=True)(state)

    (value, hidden), grads = f(state)
    return np.asarray(hidden), float(value), _flat(nnx.to_pure_dict(grads))


def test_scan_and_unrolled_layers_agree():
    model = mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))
    unrolled = mot.MoTDecoder(dataclasses.replace(CFG, scan_layers=False), rngs=nnx.Rngs(0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_params(model)),
                                                    jax.tree.leaves(_params(unrolled))))
    h1, v1, g1 = _loss_and_grads(CFG)
    h2, v2, g2 = _loss_and_grads(dataclasses.replace(CFG, scan_layers=False))
    np.testing.assert_allclose(h1, h2, atol=2e-6, rtol=0)
    assert v1 == pytest.approx(v2, rel=1e-6)
    for path in g1:
        np.testing.assert_allclose(g1[path], g2[path], atol=1e-5, rtol=1e-4, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_give_the_same_gradients(policy):
    _, v0, g0 = _loss_and_grads(CFG)
    _, v1, g1 = _loss_and_grads(dataclasses.replace(CFG, remat_policy=policy))
    assert v0 == pytest.approx(v1, rel=1e-6)
    for path in g0:
        np.testing.assert_allclose(g1[path], g0[path], atol=1e-6, rtol=1e-5, err_msg=path)


def test_every_parameter_axis_has_a_sharding_rule():
    abstract = nnx.eval_shape(lambda: mot.MoTDecoder(CFG, rngs=nnx.Rngs(0)))
    specs = jax.tree.leaves(nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract))),
                            is_leaf=lambda x: isinstance(x, jax.P))
    names = {name for spec in specs for name in spec if name is not None}
    assert names and names <= {name for name, _ in sharding.LOGICAL_RULES}
    for spec in specs:
        sharding.logical_to_mesh_spec(tuple(spec))


def test_jit_step_over_split_state_is_sharded_and_donated(cpu_devices):
    """nnx.split -> jax.jit(step, donate_argnums) -> nnx.merge on a (data, fsdp, tensor) mesh."""
    # Two rows: the batch axis spans data x fsdp = 2 devices; weights use fsdp and tensor.
    mesh = jax.make_mesh((1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=cpu_devices[:4])
    reference = mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))
    ref_loss = float(jnp.mean(_run(reference) ** 2))
    tx = optax.adam(1e-2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        model = mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        q_kernel = params["layers"]["und"]["q_proj"]["kernel"][...]
        assert q_kernel.sharding.spec == jax.P(None, "fsdp", "tensor")
        shardings = jax.tree.map(lambda a: a.sharding, params)
        opt_state = tx.init(params)
        x = jax.device_put(X, sharding.named_sharding(mesh, ("batch", "length", None)))

        def step(params, opt_state, x, positions, meta):
            def loss_fn(p):
                return jnp.mean(nnx.merge(graphdef, p)(x, positions, meta, NUM_UND) ** 2)
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        jstep = jax.jit(step, donate_argnums=(0, 1), out_shardings=(shardings, None, None))
        losses = []
        for _ in range(3):
            old = q_kernel
            params, opt_state, loss = jstep(params, opt_state, x, jnp.asarray(BATCH.position),
                                            BATCH.token_meta())
            losses.append(float(loss))
            q_kernel = params["layers"]["und"]["q_proj"]["kernel"][...]
            assert old.is_deleted()  # donated
            assert q_kernel.sharding.spec == jax.P(None, "fsdp", "tensor")
        trained = nnx.merge(graphdef, params)
        assert isinstance(trained, mot.MoTDecoder)
    assert losses[0] == pytest.approx(ref_loss, rel=1e-5)
    assert losses[2] < losses[0]


# ---------------------------------------------------------------------------------------------
# FLOPs: routing spends each token's FLOPs on one expert only.
# ---------------------------------------------------------------------------------------------


def _compiled_flops(cfg, num_und, num_gen, batch_size=2):
    """XLA's FLOP count of the jitted forward, from abstract shapes only."""
    abstract = nnx.eval_shape(lambda: mot.MoTDecoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    length = num_und + num_gen
    tok = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    meta = TokenMeta(doc_id=tok, order=tok, split_id=tok,
                         noisy=jax.ShapeDtypeStruct((batch_size, length), jnp.bool_))
    x = jax.ShapeDtypeStruct((batch_size, length, cfg.hidden_size), jnp.float32)
    forward = lambda s, x, p, m: nnx.merge(graphdef, s)(x, p, m, num_und)
    cost = jax.jit(forward).lower(state, x, tok, meta).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return cost["flops"]


@pytest.mark.parametrize("num_experts,num_und,num_gen", [(2, 96, 32), (2, 32, 96), (1, 64, 64)])
def test_forward_flops_match_analytic_count(num_experts, num_und, num_gen):
    """The analytic count treats attention as dense L x L (the xla backend evaluates every
    masked score); layers are unrolled and one key chunk covers the row, so XLA's cost
    analysis sees every op once (it counts a while-loop body a single time)."""
    cfg = dataclasses.replace(
        CFG, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=768,
        num_experts=num_experts, scan_layers=False, attention_chunk_size=256)
    measured = _compiled_flops(cfg, num_und, num_gen)
    analytic = flops.decoder_forward_flops(cfg, num_und, num_gen, batch_size=2)
    assert measured == pytest.approx(analytic["total"], rel=0.10)
    # Running both experts on every token would cost the weight FLOPs twice.
    both_experts_everywhere = analytic["total"] + analytic["qkvo"] + analytic["mlp"]
    assert measured < 0.8 * both_experts_everywhere


def test_analytic_flops_of_bagel_7b_mot():
    cfg = mot.DecoderConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                            num_kv_heads=4, head_dim=128, intermediate_size=18944)
    out = flops.decoder_forward_flops(cfg, 20480, 16384, logits_tokens=20480)
    per_token_weights = 2 * 28 * (3584 * (28 + 8) * 128 + 28 * 128 * 3584 + 3 * 3584 * 18944)
    assert out["qkvo"] + out["mlp"] == per_token_weights * 36864
    assert out["attention"] == 4 * 28 * 36864**2 * 28 * 128
    assert out["lm_head"] == 2 * 20480 * 3584 * 152064
    assert out["total"] == sum(v for k, v in out.items() if k != "total")


def test_attention_tiles_reach_the_kernel_from_the_config():
    from configs import tiny

    config = tiny.get_config()
    config.attention.block_q, config.attention.block_kv_bwd = 64, 32
    cfg = mot.DecoderConfig.from_config(config)
    assert cfg.attention_blocks == (64, 0, 0, 32)
    assert cfg.attention_impl == "xla" and cfg.attention_chunk_size == 128


# ---------------------------------------------------------------------------------------------
# Pallas backends inside the model, on a mesh: shard_map per (row, kv-head) shard.
# ---------------------------------------------------------------------------------------------


def test_attention_shard_follows_the_mesh_and_the_rules(cpu_devices):
    mesh = jax.make_mesh((1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=cpu_devices[:4])
    assert layers.attention_shard("pallas_tpu", 2, 2) is None  # no mesh
    with jax.set_mesh(mesh):
        assert layers.attention_shard("pallas_tpu", 2, 2) is None  # no rules
        with nnx.logical_axis_rules(sharding.LOGICAL_RULES):
            assert layers.attention_shard("xla", 2, 2) is None  # XLA partitions it itself
            assert layers.attention_shard("pallas_tpu", 2, 2, "kv_heads") == ("fsdp", "tensor")
            assert layers.attention_shard("cudnn", 2, 3, "kv_heads") == ("fsdp", None)
            assert layers.attention_shard("pallas_gpu", 1, 4, "kv_heads") == (None, "tensor")
            assert layers.attention_shard("pallas_gpu", 1, 3, "kv_heads") is None


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_decoder_on_a_mesh_matches_xla(impl, cpu_devices):
    """The decoder with a Pallas backend (interpreted) under a (1, 2, 2) mesh: the kernels run
    under shard_map, and hidden states and gradients equal the unsharded xla decoder's."""
    base = dataclasses.replace(CFG, head_dim=32)
    pallas = dataclasses.replace(base, attention_impl=impl, attention_interpret=True,
                                 attention_blocks=(16, 16, 16, 16))
    mesh = jax.make_mesh((1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=cpu_devices[:4])
    positions, meta = jnp.asarray(BATCH.position), BATCH.token_meta()

    def loss_and_grads(cfg, x):
        graphdef, params = nnx.split(mot.MoTDecoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)

        def loss(p):
            hidden = nnx.merge(graphdef, p)(x, positions, meta, NUM_UND)
            return jnp.sum(hidden * jnp.cos(hidden)), hidden

        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        return fn, params

    ref_fn, ref_params = loss_and_grads(base, X)
    (ref_loss, ref_hidden), ref_grads = ref_fn(ref_params)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        x = jax.device_put(X, sharding.named_sharding(mesh, ("batch", "length", None)))
        fn, params = loss_and_grads(pallas, x)
        jaxpr = str(jax.make_jaxpr(fn)(params))
        (value, hidden), grads = fn(params)
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    np.testing.assert_allclose(hidden, ref_hidden, atol=2e-5, rtol=1e-5)
    assert float(value) == pytest.approx(float(ref_loss), rel=1e-5)
    for path, g in _flat(ref_grads).items():
        np.testing.assert_allclose(_flat(grads)[path], g, atol=2e-5, rtol=1e-4, err_msg=path)


def test_load_into_an_abstract_model_built_under_a_mesh(cpu_devices):
    """convert.load_decoder_params fills a model built by nnx.eval_shape under jax.set_mesh:
    its shardings name the abstract mesh and are placed on the concrete one."""
    from unijax.convert.placement import place

    mesh = jax.make_mesh((1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=cpu_devices[:4])
    source = _params(mot.MoTDecoder(CFG, rngs=nnx.Rngs(3)))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        model = nnx.eval_shape(lambda: mot.MoTDecoder(CFG, rngs=nnx.Rngs(0)))
        convert.load_decoder_params(model, source)
    q_kernel = model.layers.und.q_proj.kernel[...]
    expected = jax.sharding.NamedSharding(mesh, jax.P(None, "fsdp", "tensor"))
    assert q_kernel.sharding.is_equivalent_to(expected, q_kernel.ndim)
    for path, value in _flat(source).items():
        np.testing.assert_array_equal(_flat(_params(model))[path], value, err_msg=path)
    abstract = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh.abstract_mesh, jax.P()))
    with pytest.raises(ValueError, match="concrete mesh"):
        place(np.zeros(4), abstract)
