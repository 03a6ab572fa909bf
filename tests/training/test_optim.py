"""Schedules at given steps, which parameters decay, train and at which rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from unijax import config as config_lib
from unijax.training import optim
from unijax.training import state as state_lib


def _train_config(**train):
    c = tiny.get_config()
    for k, v in train.items():
        c.train[k] = v
    return c


@pytest.mark.parametrize("kind,expected", [
    # warmup 10 to lr 1e-3, then the schedule until step 110 (min_lr 1e-4)
    ("constant", {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 1e-3, 110: 1e-3, 500: 1e-3}),
    ("cosine", {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 1e-4 + 0.5 * 9e-4, 110: 1e-4, 500: 1e-4}),
    ("linear", {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 5.5e-4, 110: 1e-4, 500: 1e-4}),
])
def test_learning_rate_schedule_values(kind, expected):
    schedule = optim.learning_rate_schedule(_train_config(
        lr=1e-3, warmup_steps=10, steps=110, schedule=kind, min_lr=1e-4))
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-5, abs=1e-9), (kind, step)


def test_no_warmup_starts_at_lr():
    schedule = optim.learning_rate_schedule(_train_config(lr=2e-4, warmup_steps=0))
    assert float(schedule(0)) == pytest.approx(2e-4)


def test_weight_decay_only_on_weight_matrices():
    spec = state_lib.ModelSpec.build(tiny.get_config())
    mask = optim.decay_mask(spec.abstract_params)
    flat = {optim.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["llm/layers/und/q_proj/kernel"] and flat["connector/fc1/kernel"]
    for name in ("llm/layers/und/q_proj/bias", "llm/layers/und/input_norm/scale",
                 "llm/embed_tokens/embedding", "llm/final_norm/gen/scale"):
        assert not flat[name], name


def test_weight_decay_shrinks_matrices_not_norms():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "norm": {"scale": jnp.ones(2)}}
    tx = optim.make_optimizer(_train_config(lr=0.1, warmup_steps=0, weight_decay=0.5,
                                            grad_clip=0.0), params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["dense"]["kernel"][0, 0]) == pytest.approx(-0.1 * 0.5)
    assert float(updates["dense"]["bias"][0]) == 0 and float(updates["norm"]["scale"][0]) == 0


def test_lr_multipliers_scale_the_update_first_match_wins():
    params = {"vit": {"kernel": jnp.ones(3)}, "llm": {"kernel": jnp.ones(3)},
              "head": {"kernel": jnp.ones(3)}}
    c = _train_config(lr=0.1, warmup_steps=0, grad_clip=0.0,
                      lr_multipliers=(("vit/.*", 0.1), ("(vit|head)/.*", 3.0)))
    tx = optim.make_optimizer(c, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is lr * sign(g).
    assert float(updates["llm"]["kernel"][0]) == pytest.approx(-0.1, rel=1e-4)
    assert float(updates["vit"]["kernel"][0]) == pytest.approx(-0.01, rel=1e-4)
    assert float(updates["head"]["kernel"][0]) == pytest.approx(-0.3, rel=1e-4)


def test_trainable_and_freeze_patterns_select_parameters():
    c = tiny.get_config()
    c.train.trainable = ("connector/.*", "vae2llm/.*", "llm2vae/.*", "time_embedder/.*")
    c.train.freeze = ("time_embedder/fc2/.*",)
    spec = state_lib.ModelSpec.build(c)
    names = spec.trainable_names()
    assert names and all(n.split("/")[0] in ("connector", "vae2llm", "llm2vae",
                                             "time_embedder") for n in names)
    assert "time_embedder/fc1/kernel" in names and "time_embedder/fc2/kernel" not in names
    frozen = {optim.path_name(p) for p, _ in
              jax.tree_util.tree_flatten_with_path(spec.abstract_frozen)[0]}
    assert "llm/layers/und/q_proj/kernel" in frozen and "time_embedder/fc2/kernel" in frozen


def test_freeze_und_expert_keeps_gen_expert_trainable():
    c = tiny.get_config()
    c.model.llm.freeze_und_expert = True
    names = state_lib.ModelSpec.build(c).trainable_names()
    assert any(n.startswith("llm/layers/gen/") for n in names)
    assert not any(n.startswith(("llm/layers/und/", "llm/embed_tokens", "llm/lm_head",
                                 "llm/final_norm/und")) for n in names)


@pytest.mark.parametrize("field,value,message", [
    ("freeze", ("vit/not_a_layer/.*",), "'vit/not_a_layer/.*' matches no parameter"),
    ("trainable", ("conector/.*",), "'conector/.*' matches no parameter"),
    ("lr_multipliers", (("vit/(", 0.1),), "is not a regex"),
    ("lr_multipliers", (("vit/.*", 0.0),), "must be positive"),
    ("freeze", (".*",), "no parameter is left to train"),
])
def test_bad_patterns_fail_before_anything_compiles(field, value, message):
    c = tiny.get_config()
    c.train[field] = value
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(
            ")", r"\)").replace("*", r"\*").replace(".", r"\.")):
        state_lib.ModelSpec.build(c)


def test_ema_update_formula():
    ema = {"w": jnp.array([1.0, 2.0])}
    params = {"w": jnp.array([3.0, 6.0])}
    out = optim.ema_update(ema, params, 0.9)
    np.testing.assert_allclose(np.asarray(out["w"]), [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 6],
                               rtol=1e-6)
