"""A fresh run's weights from config.init: a HF Qwen2 directory, a unijax checkpoint, and the
errors and validation around them (torch-free; the parity tests are in test_init_parity.py)."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from tests.training import small_config
from unijax import config as config_lib
from unijax.convert import qwen2
from unijax.models import mot
from unijax.training import checkpoint as checkpoint_lib
from unijax.training import init as init_lib
from unijax.training import optim, sharding
from unijax.training import state as state_lib

HF_VOCAB = 300  # smaller than the small config's 320: the last 20 rows keep their fresh init


def _config(**init):
    """The small config on an 8-device mesh (2 x fsdp 4), with `config.init` fields set."""
    c = small_config.get_config()
    c.mesh.data, c.mesh.fsdp = 2, 4
    for key, value in init.items():
        c.init[key] = value
    return c


def random_state(config, mesh, seed=0, moments=0.0):
    """(spec, tx, state): a state shaped and sharded as `state_lib.init_state` makes it, with
    random weights drawn on the host (the init program takes ~20 s to compile on CPU), the
    EMA a copy of the params and optimizer moments (and counts) all `moments`."""
    spec = state_lib.ModelSpec.build(config)
    tx = optim.make_optimizer(config, spec.abstract_params)
    target, _ = state_lib.abstract_state(config, mesh, spec, tx)
    rng = np.random.default_rng(seed)
    put = lambda value, like: jax.device_put(np.asarray(value, like.dtype), like.sharding)
    draw = lambda t: jax.tree.map(lambda s: put(rng.normal(size=s.shape), s), t)
    fill = lambda t, v=0.0: jax.tree.map(lambda s: put(np.full(s.shape, v), s), t)
    params = draw(target.params)
    state = target.replace(step=fill(target.step), params=params, frozen=draw(target.frozen),
                           opt_state=fill(target.opt_state, moments), ema=_clone(params),
                           rng=fill(target.rng), nonfinite=fill(target.nonfinite))
    return spec, tx, state


@pytest.fixture(scope="module")
def fresh(cpu_devices):
    """(spec, tx, mesh, state) of the small config, cloned by the tests."""
    config = _config()
    mesh = sharding.make_mesh(config.mesh)
    spec, tx, state = random_state(config, mesh)
    return spec, tx, mesh, state


def _clone(state):
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), state)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _flat(tree) -> dict:
    return {optim.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _hf_config(experts: int = 1) -> mot.DecoderConfig:
    """The checkpoint's decoder: the small config's shapes, a smaller vocabulary, no QK-norm
    (Qwen2); two experts write BAGEL's `_moe_gen` twins."""
    return mot.DecoderConfig(vocab_size=HF_VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, intermediate_size=128, qk_norm=False,
                             num_experts=experts, init_gen_from_und=False)


def write_qwen2(directory, *, seed=0, drop=(), reshape=None, hf_overrides=None,
                experts=1) -> dict:
    """A HF Qwen2 save (config.json, two bf16 shards + index) of random weights; returns the
    unijax-layout params it holds (float32 values of the bf16 weights)."""
    cfg = _hf_config(experts)
    rng = np.random.default_rng(seed)
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: mot.MoTDecoder(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(ml_dtypes.bfloat16), shapes)
    tensors = {k: np.ascontiguousarray(v) for k, v in
               qwen2.decoder_params_to_hf(params, cfg).items() if k not in drop}
    for key, shape in (reshape or {}).items():
        tensors[key] = np.zeros(shape, ml_dtypes.bfloat16)
    os.makedirs(directory, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(directory, shard))
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    hf = {"model_type": "qwen2", "vocab_size": HF_VOCAB, "hidden_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 128, "rope_theta": 10_000.0, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": False, **(hf_overrides or {})}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    return jax.tree.map(lambda v: np.asarray(v, np.float32), params)


def test_llm_from_hf_qwen2_directory(fresh, tmp_path):
    spec, _, mesh, state = fresh
    hf_dir = str(tmp_path / "qwen2")
    loaded = _flat(write_qwen2(hf_dir))
    before = _flat(_host(state.params))
    state, sources = init_lib.initialize(_config(llm=hf_dir), _clone(state), mesh)
    after, ema = _flat(_host(state.params)), _flat(_host(state.ema))

    for name, value in loaded.items():  # the und expert and the LM ends hold the checkpoint
        if name.startswith("layers/"):
            np.testing.assert_array_equal(after["llm/" + name], value, err_msg=name)
    rows = slice(0, HF_VOCAB)
    emb, head = "llm/embed_tokens/embedding", "llm/lm_head/kernel"
    np.testing.assert_array_equal(after[emb][rows], loaded["embed_tokens/embedding"])
    np.testing.assert_array_equal(after[emb][HF_VOCAB:], before[emb][HF_VOCAB:])
    np.testing.assert_array_equal(after[head][:, rows], loaded["lm_head/kernel"])
    np.testing.assert_array_equal(after[head][:, HF_VOCAB:], before[head][:, HF_VOCAB:])
    np.testing.assert_array_equal(after["llm/final_norm/und/scale"], loaded["final_norm/und/scale"])
    # Qwen2 has no QK-norm: those scales keep their fresh init (ones in BAGEL).
    for name in ("llm/layers/und/q_norm/scale", "llm/layers/und/k_norm/scale"):
        np.testing.assert_array_equal(after[name], before[name])
    # The gen expert is a copy of the und expert (init_gen_from_und).
    gen = [n for n in after if "/gen/" in n]
    assert len(gen) == 15
    for name in gen:
        np.testing.assert_array_equal(after[name], after[name.replace("/gen/", "/und/")])
    # What no source names keeps its fresh init; the EMA restarts from the new weights.
    for name in [n for n in after if n.startswith(("vit/", "connector/", "vae2llm/"))]:
        np.testing.assert_array_equal(after[name], before[name])
    for name, value in after.items():
        np.testing.assert_array_equal(ema[name], value)
    assert int(state.step) == 0
    # Placed on the fresh state's shardings, every array in its own buffer (the step donates).
    fresh_shardings = jax.tree.map(lambda x: x.sharding, fresh[3])
    assert jax.tree.map(lambda x: x.sharding, state) == fresh_shardings
    pointers = [(s.device, s.data.unsafe_buffer_pointer()) for x in jax.tree.leaves(state)
                for s in x.addressable_shards]
    assert len(set(pointers)) == len(pointers)

    assert sources["llm/layers/und"] == f"HF qwen2 {hf_dir} + fresh"  # + the QK-norm scales
    assert sources["llm/layers/gen"] == f"HF qwen2 {hf_dir} (gen expert = und)"
    assert sources["llm/embed_tokens"] == sources["llm/lm_head"] == f"HF qwen2 {hf_dir}"
    assert sources["vit"] == sources["connector"] == "fresh"


def test_tied_checkpoint_and_a_fresh_gen_expert(fresh, tmp_path):
    """A tied checkpoint (Qwen2.5-0.5B..3B) gives the LM head its embedding; without
    init_gen_from_und a plain Qwen2 checkpoint leaves the gen expert at its fresh init."""
    _, _, mesh, state = fresh
    hf_dir = str(tmp_path / "tied")
    loaded = _flat(write_qwen2(hf_dir, drop=("lm_head.weight",),
                               hf_overrides={"tie_word_embeddings": True}))
    config = _config(llm=hf_dir)
    config.model.llm.init_gen_from_und = False
    before = _flat(_host(state.params))
    state, sources = init_lib.initialize(config, _clone(state), mesh)
    after = _flat(_host(state.params))
    np.testing.assert_array_equal(after["llm/lm_head/kernel"][:, :HF_VOCAB],
                                  loaded["embed_tokens/embedding"].T)
    for name in [n for n in after if "/gen/" in n]:
        np.testing.assert_array_equal(after[name], before[name])
    assert sources["llm/layers/gen"] == sources["llm/final_norm/gen"] == "fresh"


def test_moe_gen_twins_fill_the_gen_expert(fresh, tmp_path):
    """Without init_gen_from_und, a checkpoint with BAGEL's `_moe_gen` keys fills gen."""
    _, _, mesh, state = fresh
    hf_dir = str(tmp_path / "mot")
    loaded = _flat(write_qwen2(hf_dir, experts=2))
    config = _config(llm=hf_dir)
    config.model.llm.init_gen_from_und = False
    state, sources = init_lib.initialize(config, _clone(state), mesh)
    after = _flat(_host(state.params))
    for name in [n for n in loaded if "/gen/" in n]:
        np.testing.assert_array_equal(after["llm/" + name], loaded[name], err_msg=name)
        assert not np.array_equal(loaded[name], loaded[name.replace("/gen/", "/und/")])
    assert sources["llm/final_norm/gen"] == f"HF qwen2 {hf_dir}"


def test_every_missing_and_misshaped_tensor_is_listed(fresh, tmp_path):
    spec, tx, mesh, _ = fresh
    hf_dir = str(tmp_path / "broken")
    write_qwen2(hf_dir, drop=("model.layers.1.self_attn.q_proj.bias", "model.norm.weight"),
                reshape={"model.layers.0.mlp.up_proj.weight": (100, 64),
                         "model.embed_tokens.weight": (400, 64)},
                hf_overrides={"num_key_value_heads": 4})
    config = _config(llm=hf_dir)
    abstract, _ = state_lib.abstract_state(config, mesh, spec, tx)  # checked before any read
    with pytest.raises(init_lib.InitError) as error:
        init_lib.initialize(config, abstract, mesh)
    message = str(error.value)
    assert "(5 problems)" in message
    for expected in (
            "llm/layers/und/q_proj/bias <- model.layers.1.self_attn.q_proj.bias: missing",
            "llm/final_norm/und/scale <- model.norm.weight: missing",
            "llm/layers/und/mlp/up_proj/kernel <- model.layers.0.mlp.up_proj.weight: "
            "checkpoint shape (100, 64), the model needs (128, 64)",
            "llm/embed_tokens/embedding <- model.embed_tokens.weight: checkpoint shape "
            "(400, 64), the model needs (320, 64) (the checkpoint's vocabulary is larger",
            "num_key_value_heads=4 but config.model.llm.num_kv_heads=2"):
        assert expected in message, message


def test_start_from_a_checkpoints_ema_or_params(fresh, tmp_path):
    spec, tx, mesh, state = fresh
    # Another run, saved from one device (a checkpoint restores onto any mesh), whose EMA
    # differs from its params.
    other = _config()
    other.mesh.data, other.mesh.fsdp = 1, 1
    one_device = sharding.make_mesh(other.mesh, devices=jax.devices()[:1])
    saved = random_state(other, one_device, seed=1, moments=1.0)[2]
    ema = random_state(other, one_device, seed=2)[2].params
    saved = saved.replace(step=saved.step + 7, ema=ema)
    workdir = tmp_path / "run"
    ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), every_steps=1,
                                       max_to_keep=2, async_save=False)
    ckpt.save(7, saved, None, other, force=True)
    ckpt.close()
    saved = _host(saved)

    for weights, expected in (("ema", saved.ema), ("params", saved.params)):
        config = _config(checkpoint=str(workdir), checkpoint_weights=weights,
                         checkpoint_step=7 if weights == "params" else -1)
        new, sources = init_lib.initialize(config, _clone(state), mesh)
        host = _host(new)
        params, new_ema = _flat(host.params), _flat(host.ema)
        for name, value in _flat(expected).items():
            np.testing.assert_array_equal(params[name], value, err_msg=name)
            np.testing.assert_array_equal(new_ema[name], value, err_msg=name)
        # The optimizer starts fresh (not the saved run's moments) at step 0.
        assert int(new.step) == 0 and int(saved.step) == 7
        for a, b in zip(jax.tree.leaves(host.opt_state), jax.tree.leaves(_host(state.opt_state))):
            np.testing.assert_array_equal(a, b)
        assert sources["llm/layers/und"] == f"{weights} of {workdir / 'checkpoints' / '7'}"

    # A checkpoint of another model fails before its weights are read, naming each array.
    wider = _config(checkpoint=str(workdir))
    wider.model.llm.intermediate_size = 256
    spec = state_lib.ModelSpec.build(wider)
    target, _ = state_lib.abstract_state(wider, mesh, spec, optim.make_optimizer(
        wider, spec.abstract_params))
    with pytest.raises(init_lib.InitError, match=r"\(6 problems\)(.|\n)*llm/layers/und/mlp/"
                       r"up_proj/kernel: checkpoint shape \(2, 64, 128\), the model needs "
                       r"\(2, 64, 256\)"):
        init_lib.initialize(wider, target, mesh)


def test_validation_names_the_init_field(tmp_path):
    hf_dir = str(tmp_path / "llama")
    write_qwen2(hf_dir, hf_overrides={"model_type": "llama"})
    vae = tmp_path / "ae.bin"
    vae.write_bytes(b"")
    config = _config(llm=hf_dir, vit=str(tmp_path / "nowhere"), vae=str(vae),
                     checkpoint=str(tmp_path / "no_run"), checkpoint_weights="last",
                     checkpoint_step=-2)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    message = str(error.value)
    for expected in (
            f"config.init.llm={hf_dir!r}: config.json model_type='llama' is not a known kind",
            f"config.init.vit={str(tmp_path / 'nowhere')!r}: no such directory",
            f"config.init.vae={str(vae)!r} but config.model.vae is None",
            f"config.init.checkpoint={str(tmp_path / 'no_run')!r}: no such directory",
            "config.init.checkpoint_weights must be one of ('ema', 'params'), got 'last'",
            "config.init.checkpoint_step must be >= -1"):
        assert expected in message, message
    good = str(tmp_path / "qwen2")
    write_qwen2(good)
    config_lib.validate(_config(llm=good))  # a good source passes
