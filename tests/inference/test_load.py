"""load.py: a model from a training workdir, bit for bit the checkpoint's weights, on any mesh."""

import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util

from tests.inference import trained as trained_lib
from tests.training import helpers
from unijax import config as config_lib
from unijax.inference import load
from unijax.training import checkpoint, optim, sharding
from unijax.training import state as state_lib

STEPS = trained_lib.STEPS  # the `trained` fixture (tests/conftest.py)


@pytest.fixture(scope="session")
def saved(trained):
    """The checkpoint's newest train state, restored by the trainer's own code on one device."""
    workdir, config = trained
    config = config.copy_and_resolve_references()
    config.mesh.data = 1
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    spec = state_lib.ModelSpec.build(config)
    tx = optim.make_optimizer(config, spec.abstract_params)
    target, _ = state_lib.abstract_state(config, mesh, spec, tx)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1,
                                   max_to_keep=STEPS)
    state = ckpt.restore(STEPS, target)
    ckpt.close()
    return spec, state


def _named(tree) -> dict:
    """A nested dict's leaves by "/"-joined path."""
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in _named(jax.device_get(tree)).items()}


def _weights(model) -> dict:
    return _flat(nnx.to_pure_dict(nnx.state(model)))


def _assert_equal(model, *trees) -> None:
    expected = {}
    for tree in trees:
        expected.update(_flat(tree))
    got = _weights(model)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _forward(model, batch):
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))(state, batch)
    return jax.device_get((out.logits, out.velocity))


def test_ema_and_params_are_the_checkpoints_bit_for_bit(trained, saved):
    workdir, _ = trained
    _, state = saved
    assert state.frozen and any(  # the test is only meaningful when the EMA has moved
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.ema)),
                                                 jax.tree.leaves(jax.device_get(state.params))))
    model, _, info = load.load_model(workdir)
    assert info["step"] == STEPS and info["weights"] == "ema"
    assert info["checkpoint"] == os.path.join(workdir, "checkpoints", str(STEPS))
    _assert_equal(model, state.ema, state.frozen)
    model, _, info = load.load_model(workdir, weights="params", step=STEPS - 1)
    assert info["step"] == STEPS - 1 and info["weights"] == "params"
    model, _, _ = load.load_model(workdir, weights="params")
    _assert_equal(model, state.params, state.frozen)
    kernel = model.llm.layers.und.mlp.up_proj.kernel[...]
    assert isinstance(kernel.sharding, jax.sharding.SingleDeviceSharding)


def test_forward_equals_the_trained_models(trained, saved):
    workdir, config = trained
    spec, state = saved
    batch = helpers.host_batches(config, 1)[0]
    model, _, _ = load.load_model(workdir, weights="params")
    reference = _forward(spec.model(state.params, state.frozen), batch)
    for got, want in zip(_forward(model, batch), reference):
        np.testing.assert_array_equal(got, want)


def test_only_the_requested_weights_are_read(trained, saved, monkeypatch):
    # The trainer's checkpoints are OCDBT: every array of the state lives in one key-value
    # store, so the optimizer state has no directory of its own to delete or corrupt. Instead
    # every array Orbax deserializes is recorded.
    workdir, _ = trained
    _, state = saved
    read = []
    deserialize = ocp.type_handlers.ArrayHandler.deserialize

    async def recording(self, infos, args=None):
        read.extend(info.name for info in infos)
        return await deserialize(self, infos, args)

    monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", recording)
    _, _, info = load.load_model(workdir)
    assert info["restored"] == ("ema", "frozen")
    expected = [f"{item}.{name.replace('/', '.')}" for item, tree in
                (("ema", state.ema), ("frozen", state.frozen)) for name in _flat(tree)]
    assert sorted(read) == sorted(expected)  # no opt_state, no params, no step or rng


def test_sharded_on_a_2x2_mesh_as_the_trainer_places_it(trained, saved):
    workdir, config = trained
    spec, state = saved
    mesh_config = ml_collections.ConfigDict({"data": 1, "fsdp": 2, "tensor": 2})
    mesh = sharding.make_mesh(mesh_config, devices=jax.devices()[:4])
    model, _, _ = load.load_model(workdir, mesh=mesh, rules=sharding.LOGICAL_RULES)
    kernel = model.llm.layers.und.mlp.up_proj.kernel[...]  # [layers, embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.sharding.mesh.shape == mesh.shape
    trainer = {**_named(sharding.tree_shardings(mesh, spec.param_specs, spec.abstract_params)),
               **_named(sharding.tree_shardings(mesh, spec.frozen_specs, spec.abstract_frozen))}
    placed = _named(nnx.to_pure_dict(nnx.state(model)))
    assert sorted(placed) == sorted(trainer)
    for name, value in placed.items():
        assert value.sharding.spec == trainer[name].spec, name
    _assert_equal(model, state.ema, state.frozen)


def test_dtype_casts_the_floating_weights_when_reading(trained, saved):
    workdir, _ = trained
    _, state = saved
    model, _, info = load.load_model(workdir, dtype="bfloat16")
    assert info["dtype"] == "bfloat16"
    got = _weights(model)
    for name, value in {**_flat(state.ema), **_flat(state.frozen)}.items():
        np.testing.assert_array_equal(got[name], value.astype(jax.numpy.bfloat16), err_msg=name)


def test_without_an_ema_it_falls_back_to_the_params(trained, saved, tmp_path):
    _, config = trained
    _, state = saved
    config = config.copy_and_resolve_references()
    config.train.ema_decay = 0.0  # what the trainer saves then: a state whose ema is None
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, max_to_keep=1)
    ckpt.save(0, state.replace(ema=None), None, config, force=True)
    ckpt.close()
    model, _, info = load.load_model(str(tmp_path / "ckpt"))  # a checkpoint directory
    assert info["weights"] == "params" and info["step"] == 0
    _assert_equal(model, state.params, state.frozen)


def test_load_config_round_trips_the_config(trained):
    workdir, config = trained
    loaded, step = load.load_config(workdir)
    assert step == STEPS
    assert loaded.model.llm.hidden_size == 64 and loaded.data.und_capacity == 256
    assert loaded.train.freeze == ("vit/.*",) and loaded.train.trainable == ()
    assert loaded.train.eval_timesteps == tuple(config.train.eval_timesteps)
    assert loaded.model.vae is None
    assert loaded.to_dict() == config.to_dict()
    config_lib.validate(loaded, num_devices=jax.device_count())
    again, _ = load.load_config(os.path.join(workdir, "checkpoints"), step=1)
    assert again.to_dict() == config.to_dict()


def test_missing_checkpoints_and_steps_are_named(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*train first: python -m "
                                                "unijax.main"):
        load.load_model(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*checkpoints"):
        load.load_config(str(tmp_path))
    workdir, _ = trained
    steps = list(range(1, STEPS + 1))
    with pytest.raises(FileNotFoundError, match=rf"step 99 .*available steps: \{steps}"):
        load.load_model(workdir, step=99)


def test_bad_arguments_and_mismatched_weights_are_named(trained):
    workdir, _ = trained
    with pytest.raises(ValueError, match="weights must be one of"):
        load.load_model(workdir, weights="adam")
    mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="LOGICAL_RULES"):
        load.load_model(workdir, mesh=mesh)
    with pytest.raises(ValueError, match=r"not in the model \(\d+\): ema/connector/"):
        load.load_model(workdir, overrides={"model.vit": None})
    with pytest.raises(ValueError, match="of another shape .*up_proj/kernel: saved"):
        load.load_model(workdir, overrides={"model.llm.intermediate_size": 96})
