"""The train step: it learns, it is the same on any mesh and with micro-batches, it skips
non-finite steps, and frozen parameters stay put."""

import dataclasses

import jax
import numpy as np
import pytest

from tests.training import helpers


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), helpers.to_host(a),
                         helpers.to_host(b))
    return max(jax.tree.leaves(diffs))


def test_overfits_a_fixed_batch(config, batches):
    """50 steps on one batch: the total loss (CE + flow MSE) falls by 5x (7.65 -> 1.1 here)."""
    config.train.lr, config.train.warmup_steps = 6e-3, 5
    losses, state = helpers.run_steps(config, jax.devices()[:1], [batches[0]] * 50)
    assert losses[0] > 5.0  # untrained: CE ~ log(320) plus a flow MSE ~ 1.8
    assert losses[-5:].mean() < 0.2 * losses[0], losses[::10]
    assert int(state.step) == 50 and int(state.nonfinite[0]) == 0


@pytest.fixture(scope="module")
def one_device_run(worlds_dir, batches):
    c = helpers.small_config(worlds_dir, **{"mesh.data": 1})
    return helpers.run_steps(c, jax.devices()[:1], batches[:3])


def test_eight_devices_match_one(worlds_dir, batches, one_device_run):
    """Same batches on 8 fake devices, every axis used (data, FSDP and tensor parallel): same
    losses and parameters within fp32 roundoff. (data 2 x fsdp 4 runs in test_checkpoint.)"""
    mesh = dict(data=2, fsdp=2, tensor=2)
    c = helpers.small_config(worlds_dir, **{f"mesh.{k}": v for k, v in mesh.items()})
    losses, state = helpers.run_steps(c, jax.devices(), batches[:3])
    ref_losses, ref_state = one_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    assert _max_diff(state.params, ref_state.params) < 2e-6
    assert _max_diff(state.ema, ref_state.ema) < 2e-6
    spec = state.params["llm"]["layers"]["und"]["mlp"]["up_proj"]["kernel"].sharding.spec
    assert "fsdp" in str(spec) and "tensor" in str(spec)


def test_grad_accum_equals_full_batch(worlds_dir, batches, one_device_run):
    c = helpers.small_config(worlds_dir, **{"mesh.data": 1, "train.grad_accum": 2})
    losses, state = helpers.run_steps(c, jax.devices()[:1], batches[:3])
    ref_losses, ref_state = one_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    assert _max_diff(state.params, ref_state.params) < 2e-6


def test_nonfinite_step_leaves_state_unchanged(config, batches):
    """A NaN pixel makes the loss NaN: the step is counted and nothing else moves; the next
    finite step trains again and resets the run counter."""
    bad = dataclasses.replace(batches[1], vae_images=batches[1].vae_images.astype(np.float32))
    bad.vae_images[0, 0, 0, 0, 0] = np.nan
    assert float(bad.flow_weight[0].sum()) > 0  # the NaN image carries flow loss
    trainer = helpers.Trainer(config, jax.devices()[:1])
    _, state = trainer.run(trainer.init(), batches[:1])
    before_params, before_opt = helpers.to_host(state.params), helpers.to_host(state.opt_state)
    losses, state = trainer.run(state, [bad])
    assert np.isnan(losses[0])
    assert int(state.step) == 2 and state.nonfinite.tolist() == [1, 1]
    assert _max_diff(state.params, before_params) == 0
    assert _max_diff(state.opt_state, before_opt) == 0
    losses, state = trainer.run(state, [batches[2]])
    assert np.isfinite(losses[0]) and state.nonfinite.tolist() == [1, 0]
    assert _max_diff(state.params, before_params) > 0


def test_frozen_parameters_are_bitwise_unchanged_and_hold_no_optimizer_state(config, batches):
    config.train.freeze = ("vit/.*", "llm/layers/und/.*")
    trainer = helpers.Trainer(config, jax.devices()[:1])
    state = trainer.init()
    frozen0, params0 = helpers.to_host(state.frozen), helpers.to_host(state.params)
    _, state = trainer.run(state, batches[:2])
    assert "vit" in state.frozen and "und" in state.frozen["llm"]["layers"]
    assert _max_diff(state.frozen, frozen0) == 0
    assert "vit" not in state.params and "und" not in state.params["llm"]["layers"]
    for tree in (state.opt_state, state.ema):
        names = {"/".join(str(getattr(k, "key", k)) for k in p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
        assert not any("vit" in n or "layers/und" in n for n in names)
    assert _max_diff(state.params, params0) > 0  # the rest trained


def test_frozen_vae_encodes_inside_the_step(worlds_dir, batches):
    """With a (small) FLUX-layout VAE the step encodes the pixels itself, sampling the
    posterior from the step's keys: the VAE gets no update and the model trains."""
    from configs import base

    config = helpers.small_config(worlds_dir, **{"mesh.data": 1})
    vae = config.model.vae = base.flux_vae()
    vae.latent_channels, vae.base_channels, vae.channel_mult = 4, 8, (1, 2)
    vae.num_res_blocks, vae.norm_groups = 1, 4
    config.model.latent_channels, config.model.latent_patch_size = 4, 2
    trainer = helpers.Trainer(config, jax.devices()[:1])
    state = trainer.init()
    assert "vae" in state.frozen and "vae" not in state.params
    vae0 = helpers.to_host(state.frozen["vae"])
    params0 = helpers.to_host(state.params)
    losses, state = trainer.run(state, batches[:3])
    assert np.all(np.isfinite(losses)) and losses[0] > 1.0
    assert _max_diff(state.frozen["vae"], vae0) == 0
    # The first step runs at learning rate 0 (warmup), the second moves the zero-initialised
    # velocity head, the third reaches vae2llm through it.
    assert _max_diff(state.params["llm2vae"], params0["llm2vae"]) > 0
    assert _max_diff(state.params["vae2llm"], params0["vae2llm"]) > 0


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(worlds_dir, tmp_path):
    """An absurd learning rate sends the weights to inf: every later step is skipped, and the
    run stops after max_nonfinite_steps of them with a message saying so."""
    from unijax.training import metrics
    from unijax.training import train as train_lib

    config = helpers.small_config(worlds_dir, **{
        "train.lr": 1e30, "train.warmup_steps": 0, "train.grad_clip": 0.0,
        "train.max_nonfinite_steps": 3, "train.steps": 30, "train.eval_batches": 0})
    with pytest.raises(train_lib.TrainingError, match="3 steps in a row had a non-finite "
                                                      "loss or gradient"):
        train_lib.train(config, str(tmp_path))
    rows = [r for r in metrics.read_metrics(str(tmp_path)) if "train/loss" in r]
    assert rows[-1]["train/nonfinite_in_a_row"] == 3 and rows[-1]["step"] < 30
