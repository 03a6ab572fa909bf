"""LoRA adapters in the MoT decoder: placement, zero start, the merge, what trains."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.models.test_mot import BATCH, CFG, NUM_UND, _run
from unijax.models import lora, mot, unified

LORA = dataclasses.replace(CFG, lora_rank=4, lora_alpha=8.0, lora_experts=("gen",),
                           lora_targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))


def _flat(model, kind=nnx.Param):
    paths = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, kind)))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in paths}


def _randomise_adapters(model, seed=0):
    """Non-zero A and B everywhere, so the adapters change the output."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        treedef, [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def test_adapters_sit_on_the_chosen_projections_of_the_chosen_expert():
    model = mot.MoTDecoder(LORA, rngs=nnx.Rngs(0))
    adapters = _flat(model, nnx.LoRAParam)
    expected = {f"layers/gen/{proj}/lora/lora_{ab}"
                for proj in ("q_proj", "v_proj", "o_proj", "mlp/up_proj", "mlp/down_proj")
                for ab in "ab"}
    assert set(adapters) == expected
    d, h, dh, m, n = LORA.hidden_size, LORA.num_heads, LORA.head_dim, LORA.intermediate_size, \
        LORA.num_layers
    assert adapters["layers/gen/q_proj/lora/lora_a"].shape == (n, d, 4)
    assert adapters["layers/gen/q_proj/lora/lora_b"].shape == (n, 4, h * dh)
    assert adapters["layers/gen/o_proj/lora/lora_a"].shape == (n, h * dh, 4)
    assert adapters["layers/gen/mlp/down_proj/lora/lora_a"].shape == (n, m, 4)
    # The base tree is the plain model's: same names, same shapes.
    plain = _flat(mot.MoTDecoder(CFG, rngs=nnx.Rngs(0)))
    base = {k: v.shape for k, v in _flat(model).items() if not lora.is_adapter(k)}
    assert base == {k: v.shape for k, v in plain.items()}


def test_zero_initialised_adapters_leave_the_model_equal_to_its_base():
    base = mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))
    adapted = mot.MoTDecoder(LORA, rngs=nnx.Rngs(0))
    # Same base weights (the adapters draw from their own keys after the kernels').
    nnx.update(adapted, nnx.state(base))
    assert all(np.all(np.asarray(v) == 0) for k, v in _flat(adapted, nnx.LoRAParam).items()
               if k.endswith("lora_b"))
    np.testing.assert_array_equal(np.asarray(_run(adapted)), np.asarray(_run(base)))


def test_merged_weights_give_the_unmerged_outputs():
    adapted = mot.MoTDecoder(LORA, rngs=nnx.Rngs(0))
    _randomise_adapters(adapted)
    want = np.asarray(_run(adapted))
    base_out = np.asarray(_run(mot.MoTDecoder(CFG, rngs=nnx.Rngs(0))))
    assert np.abs(want - base_out).max() > 1e-2  # the adapters do change the output

    merged_flat = lora.merge_weights(_flat(adapted), LORA)
    assert not any(lora.is_adapter(k) for k in merged_flat)
    plain = mot.MoTDecoder(CFG, rngs=nnx.Rngs(1))
    state = nnx.state(plain, nnx.Param)
    paths = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in paths[0]]
    nnx.update(plain, jax.tree.unflatten(jax.tree.structure(state),
                                         [merged_flat[n] for n in names]))
    np.testing.assert_allclose(np.asarray(_run(plain)), want, rtol=1e-5, atol=1e-5)


def test_only_the_adapters_train_and_the_filter_leaves_no_base_weight():
    model = mot.MoTDecoder(LORA, rngs=nnx.Rngs(0))
    trainable = _flat(model, mot.trainable_filter(LORA))
    assert trainable and all(lora.is_adapter(k) for k in trainable)

    x = jnp.asarray(np.ones((2, 48, 64), np.float32))

    def loss(m):
        return jnp.mean(m(x, jnp.asarray(BATCH.position), BATCH.token_meta(), NUM_UND) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, mot.trainable_filter(LORA))))(model)
    flat = _flat_state(grads)
    assert flat and all(lora.is_adapter(k) for k in flat)
    # B starts at zero, so A's gradient is zero at step 0 and B's is not.
    assert any(np.abs(v).max() > 0 for k, v in flat.items() if k.endswith("lora_b"))


def _flat_state(state):
    paths = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in paths}


def test_copying_und_into_gen_keeps_the_gen_adapters():
    cfg = dataclasses.replace(LORA, init_gen_from_und=True, lora_experts=("und", "gen"))
    model = mot.MoTDecoder(cfg, rngs=nnx.Rngs(0))
    flat = _flat(model)
    np.testing.assert_array_equal(flat["layers/gen/q_proj/kernel"],
                                  flat["layers/und/q_proj/kernel"])
    assert not np.array_equal(flat["layers/gen/q_proj/lora/lora_a"],
                              flat["layers/und/q_proj/lora/lora_a"])


def test_bad_lora_fields_are_named():
    with pytest.raises(ValueError, match="lora_experts"):
        dataclasses.replace(CFG, lora_rank=2, lora_experts=("vae",))
    with pytest.raises(ValueError, match="lora_targets"):
        dataclasses.replace(CFG, lora_rank=2, lora_targets=("qkv",))


def test_merge_model_of_the_unified_model(tiny_config):
    config = tiny_config
    config.model.llm.lora_rank = 2
    model = unified.UnifiedModel(config, rngs=nnx.Rngs(0))
    _randomise_adapters(model, seed=3)
    merged, plain_config = lora.merge_model(model, config)
    assert plain_config.model.llm.lora_rank == 0 and config.model.llm.lora_rank == 2
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    adapted = _flat(model)
    for name, value in _flat(merged).items():
        if name.startswith("llm/layers/gen/") and name.endswith("q_proj/kernel"):
            assert not np.array_equal(np.asarray(value), np.asarray(adapted[name]))
        elif not name.startswith("llm/layers/gen/"):
            np.testing.assert_array_equal(np.asarray(value), np.asarray(adapted[name]))
