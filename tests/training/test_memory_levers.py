"""Memory levers of config.train: Adam's moments in bf16 and the EMA in pinned host memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from tests.training import helpers
from unijax import config as config_lib
from unijax.data import pipeline
from unijax.training import checkpoint, optim
from unijax.training import state as state_lib


def _optimizer(state_dtype: str, params):
    c = tiny.get_config()
    c.train.lr, c.train.warmup_steps, c.train.grad_clip = 1e-2, 0, 0.0
    c.train.weight_decay, c.train.eps = 0.1, 1e-8
    c.train.optimizer_state_dtype = state_dtype
    return optim.make_optimizer(c, params)


def _moments(opt_state):
    """Every ScaleByAdamState (mu, nu) in an optax state tree."""
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "nu"))
            if hasattr(s, "nu")]


def test_bf16_moments_halve_the_state_and_follow_the_float32_optimizer():
    params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
    tx32, tx16 = _optimizer("float32", params), _optimizer("bfloat16", params)
    s32, s16 = tx32.init(params), tx16.init(params)
    # Same structure as optax.adamw's state (checkpoints differ only in dtype).
    assert jax.tree.structure(s32) == jax.tree.structure(s16)
    (m32,), (m16,) = _moments(s32), _moments(s16)
    assert {x.dtype for x in jax.tree.leaves((m16.mu, m16.nu))} == {jnp.dtype(jnp.bfloat16)}
    assert m16.count.dtype == jnp.int32
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    assert nbytes((m16.mu, m16.nu)) * 2 == nbytes((m32.mu, m32.nu))

    rng = np.random.default_rng(0)
    p32 = p16 = params
    for _ in range(20):
        # A steady pull plus noise: Adam then moves every weight by about lr per step.
        grads = jax.tree.map(
            lambda x: jnp.asarray(1 + rng.normal(size=x.shape), jnp.float32), params)
        u32, s32 = tx32.update(grads, s32, p32)
        u16, s16 = tx16.update(grads, s16, p16)
        assert jax.tree.leaves(u16)[0].dtype == jnp.float32  # updates stay float32
        p32, p16 = optax.apply_updates(p32, u32), optax.apply_updates(p16, u16)
    (m16,) = _moments(s16)
    assert {x.dtype for x in jax.tree.leaves((m16.mu, m16.nu))} == {jnp.dtype(jnp.bfloat16)}
    assert int(m16.count) == 20
    # 20 steps of lr 1e-2: the parameters moved ~0.2; bf16 moments stay within 1% of that.
    moved = np.abs(np.asarray(p32["dense"]["kernel"]) - 1).mean()
    assert moved > 0.1
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.01 * moved


@pytest.mark.parametrize("field,value,message", [
    ("optimizer_state_dtype", "float16", "config.train.optimizer_state_dtype must be one of"),
    ("ema_memory", "disk", "config.train.ema_memory must be one of"),
])
def test_bad_lever_values_are_config_errors(field, value, message):
    c = tiny.get_config()
    c.train[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


def test_bf16_moments_with_b2_near_one_are_rejected():
    c = tiny.get_config()
    c.train.optimizer_state_dtype, c.train.b2 = "bfloat16", 0.999
    with pytest.raises(config_lib.ConfigError, match=r"config.train.b2=0.999 is too close"):
        config_lib.validate(c)
    c.train.b2 = 0.95  # BAGEL's
    config_lib.validate(c)


@pytest.mark.slow  # two compiles of the small model on 2 devices + a checkpoint
def test_host_ema_and_bf16_moments_through_the_train_step_and_a_checkpoint(
        worlds_dir, batches, cpu_devices, tmp_path):
    """2 devices (fsdp 2: the leaves are sharded or replicated as on a pod): the EMA stays in
    pinned host memory across steps and a checkpoint restore, its update is decay * ema +
    (1 - decay) * params (none on a non-finite step), the moments stay bf16, and
    `ema_weights` hands evaluation a device copy."""
    config = helpers.small_config(worlds_dir, **{
        "mesh.data": 1, "mesh.fsdp": 2, "train.ema_memory": "host",
        "train.optimizer_state_dtype": "bfloat16", "train.ema_decay": 0.5})
    config_lib.validate(config, 2)
    trainer = helpers.Trainer(config, cpu_devices[:2])
    kinds = lambda tree: {x.sharding.memory_kind for x in jax.tree.leaves(tree)}
    state = trainer.init()
    assert kinds(state.ema) == {optim.HOST_MEMORY_KIND}
    assert kinds(state.params) == {"device"}
    before = helpers.to_host(state.ema)
    losses, state = trainer.run(state, batches[:1])
    assert np.isfinite(losses).all()
    assert kinds(state.ema) == {optim.HOST_MEMORY_KIND}
    for e0, p, e1 in zip(jax.tree.leaves(before), jax.tree.leaves(helpers.to_host(state.params)),
                         jax.tree.leaves(helpers.to_host(state.ema))):
        np.testing.assert_allclose(e1, 0.5 * e0 + 0.5 * p, rtol=1e-6, atol=1e-7)
    (moments,) = _moments(state.opt_state)
    assert {x.dtype for x in jax.tree.leaves((moments.mu, moments.nu))} == {
        jnp.dtype(jnp.bfloat16)}
    on_device = state_lib.ema_weights(state, trainer.shardings)
    assert kinds(on_device) == {"device"}
    # A non-finite step (NaN loss weights: same dtypes, no recompile) leaves the EMA as it was.
    bad = dataclasses.replace(batches[1], text_weight=np.full_like(batches[1].text_weight,
                                                                   np.nan))
    kept = helpers.to_host(state.ema)
    losses, state = trainer.run(state, [bad])
    assert np.isnan(losses[0]) and state.nonfinite.tolist() == [1, 1]
    assert kinds(state.ema) == {optim.HOST_MEMORY_KIND}
    for a, b in zip(jax.tree.leaves(helpers.to_host(state.ema)), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(a, b)

    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, max_to_keep=1)
    ckpt.save(1, state, None, config)
    ckpt.wait()
    target, _ = state_lib.abstract_state(config, trainer.mesh, trainer.spec, trainer.tx)
    restored = ckpt.restore(1, target)
    assert kinds(restored.ema) == {optim.HOST_MEMORY_KIND}
    for a, b in zip(jax.tree.leaves(helpers.to_host(restored)),
                    jax.tree.leaves(helpers.to_host(state))):
        np.testing.assert_array_equal(a, b)
    with jax.set_mesh(trainer.mesh):  # the restored state trains on
        stepped, _ = trainer.step(restored, pipeline.global_batch(batches[1], trainer.mesh))
    assert kinds(stepped.ema) == {optim.HOST_MEMORY_KIND}
    ckpt.close()
