"""memory.py: per-device sampling memory from abstract shapes equals what the real arrays hold,
and BAGEL-7B-MoT's figures (README, "Inference memory")."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import bagel_7b_mot
from tests.inference import helpers
from unijax.inference import load, memory, quantize
from unijax.inference.cache import Context, Engine
from unijax.training import sharding

RULES = sharding.LOGICAL_RULES


def _mesh(**sizes):
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    count = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    return sharding.make_mesh(ml_collections.ConfigDict(sizes), devices=jax.devices()[:count])


def _device_bytes(tree, device) -> int:
    """Bytes of every array shard of `tree` that lives on `device`."""
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == device)


@pytest.fixture(scope="module")
def sharded(trained):
    """The trained checkpoint read in bf16 onto a 2 x 2 mesh, and its config."""
    mesh = _mesh(fsdp=2, tensor=2)
    model, config, _ = load.load_model(trained[0], mesh=mesh, rules=RULES, dtype="bfloat16")
    return mesh, model, config


def test_weight_bytes_are_the_loaded_shards_bf16_and_int8(sharded):
    from flax import nnx

    mesh, model, config = sharded
    device = mesh.devices.flat[0]
    assert memory.weight_bytes(config, mesh, RULES, dtype="bfloat16") == \
        _device_bytes(nnx.state(model), device)
    whole = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    assert memory.weight_bytes(config, dtype="bfloat16") == whole
    assert memory.weight_bytes(config, mesh, RULES, dtype="bfloat16") < whole

    q = quantize.quantize_weights(nnx.clone(model))  # int8 kernels keep their placement
    assert memory.weight_bytes(config, mesh, RULES, dtype="bfloat16", quantize="int8") == \
        _device_bytes(nnx.state(q), device)


@pytest.mark.parametrize("rows", [1, 2])
def test_cache_bytes_are_an_empty_contexts_shards(sharded, rows):
    mesh, model, config = sharded
    engine = Engine(model, config, helpers.TOKENIZER.special, mesh=mesh, rules=RULES)
    ctx = Context.empty(engine, batch_size=rows, capacity=48)
    for device in mesh.devices.flat:
        assert _device_bytes(ctx.cache, device) == memory.cache_bytes(
            config, mesh, RULES, batch_size=rows, capacity=48)


@pytest.mark.parametrize("mode", memory.MODES)
def test_report_compiles_each_phase_and_adds_up(mode):
    config = helpers.config()
    config.sample.t2i.text_scale = 4.0  # guided (BAGEL's), whatever the tiny config samples
    mesh = _mesh(fsdp=2, tensor=2)
    one = memory.sampling_memory(config, mode=mode, image_size=32, prompt_tokens=8,
                                 capacity=256)
    split = memory.sampling_memory(config, mesh=mesh, rules=RULES, mode=mode, image_size=32,
                                   prompt_tokens=8, capacity=256, batch_size=2)
    for report in (one, split):
        assert [p.name for p in report.phases] == ["prefill", "denoise step", "decode"]
        assert all(p.temp >= 0 and p.argument > 0 for p in report.phases)
        assert report.peak == report.weights + report.caches + max(
            p.working for p in report.phases)
        copies = 2 if mode == "t2i" else 3  # text guidance; text and image guidance
        on, rules = (mesh, RULES) if report.mesh else (None, None)
        context = memory.cache_bytes(config, on, rules, batch_size=report.batch_size,
                                     capacity=256)
        assert report.caches == (3 + copies) * context
        step = report.phases[1]
        stacked = memory.cache_bytes(config, on, rules, batch_size=copies * report.batch_size,
                                     capacity=256)
        assert step.argument >= stacked  # the stacked contexts are the step's input
    assert split.weights < one.weights
    assert (one.context_tokens > 64) == (mode == "edit")  # the source image is in the context


def test_bad_settings_are_named():
    config = helpers.config()
    with pytest.raises(ValueError, match="mode must be one of"):
        memory.sampling_memory(config, mode="video", compile_phases=False)
    with pytest.raises(ValueError, match=r"config.sample.capacity"):
        memory.sampling_memory(config, mode="edit", image_size=32, capacity=32,
                               compile_phases=False)
    with pytest.raises(ValueError, match="rules"):
        memory.sampling_memory(config, mesh=_mesh(fsdp=2), compile_phases=False)


def test_bagel_7b_weights_and_caches_per_device():
    """The README's figures, from the 7B's abstract shapes (no compile)."""
    config = bagel_7b_mot.get_config()
    gib = lambda b: round(b / memory.GiB, 2)
    t4 = jax.sharding.AbstractMesh((1, 1, 4), sharding.MESH_AXES)
    assert gib(memory.weight_bytes(config, dtype=jnp.bfloat16)) == 27.46
    assert gib(memory.weight_bytes(config, dtype=jnp.bfloat16, quantize="int8")) == 14.80
    assert gib(memory.weight_bytes(config, t4, RULES, dtype=jnp.bfloat16)) == 7.11
    assert gib(memory.weight_bytes(config, t4, RULES, dtype=jnp.bfloat16,
                                   quantize="int8")) == 3.95
    one = memory.cache_bytes(config, batch_size=1, capacity=config.sample.capacity)
    assert one == 28 * 16384 * 4 * 128 * 2 * 2 + 16384 * 13  # bf16 k, v; 3 int32 + bool meta
    assert memory.cache_bytes(config, t4, RULES, batch_size=1,
                              capacity=config.sample.capacity) < one / 3  # 4 KV heads / 4
