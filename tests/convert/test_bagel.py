"""The released BAGEL layout <-> unijax (`unijax.convert.bagel`) on tiny official-layout
directories: bit-exact round trip, what sampling and fine-tuning load, dtypes, and the one
error listing everything that does not fit."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from tests.convert import official_layout
from unijax import config as config_lib
from unijax.convert import bagel
from unijax.convert.released import InitError
from unijax.data.tokenizer import load_tokenizer
from unijax.inference import load as load_lib
from unijax.training import sharding

BF16 = np.dtype(ml_dtypes.bfloat16)
FILES = ("ema.safetensors", "ae.safetensors")


def _flat(model) -> dict:
    return {"/".join(map(str, p)): np.asarray(v) for p, v in
            traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


@pytest.fixture(scope="module")
def loaded(official):
    """`bagel.load` of the tiny directory: (config, {name: array})."""
    config, model = bagel.load(official)
    return config, _flat(model)


def test_round_trip_is_bit_exact(official, converted, tmp_path):
    dst, cli_output = converted
    assert "peak RSS:" in cli_output and "checkpoint: " in cli_output
    back = str(tmp_path / "back")
    report = bagel.to_official(dst, back)
    for file in FILES:
        a, b = load_file(os.path.join(official, file)), load_file(os.path.join(back, file))
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        for key in a:
            assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
            np.testing.assert_array_equal(_bits(a[key]), _bits(b[key]), err_msg=key)
    assert report["tensors"] == sum(len(load_file(os.path.join(back, f))) for f in FILES)
    for name in ("llm_config.json", "vit_config.json", "tokenizer.json"):
        with open(os.path.join(official, name)) as f, open(os.path.join(back, name)) as g:
            assert json.load(f) == json.load(g), name


def test_sampling_and_finetuning_load_the_converted_checkpoint(converted, loaded, cpu_devices):
    from tests.training.test_init import random_state
    from unijax.training import init as init_lib
    from unijax.training import optim

    dst, _ = converted
    want_config, want = loaded
    model, config, info = load_lib.load_model(dst)  # what `unijax.sample` and Chat read
    assert info["step"] == 0 and info["weights"] == "ema"
    got = _flat(model)
    assert set(got) == set(want)
    for name, value in want.items():
        expected = value if name.startswith("llm/") or not name.startswith("vae/") else (
            value.astype(BF16))  # the config's param dtype: sampling runs the VAE in bf16
        assert got[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(_bits(got[name]), _bits(expected), err_msg=name)
    assert config.model.to_dict() == want_config.model.to_dict()
    config_lib.validate(config, num_devices=len(cpu_devices))  # what the main job checks
    special = load_tokenizer(config.data.tokenizer).special
    assert config.data.tokenizer.startswith(dst) and special.vision_end == 4  # trained ids

    config.init.checkpoint = dst  # fine-tuning: `python -m unijax.main ... init.checkpoint`
    mesh = sharding.make_mesh(config.mesh)
    _, _, state = random_state(config, mesh)
    state, sources = init_lib.initialize(config, state, mesh)
    params = {optim.path_name(p): np.asarray(v) for p, v in
              jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
    assert len(params) == len([n for n in want if not n.startswith("vae/")])
    for name, value in params.items():
        np.testing.assert_array_equal(_bits(value), _bits(want[name]), err_msg=name)
    assert sources["llm/layers/gen"] == f"ema of {info['checkpoint']}"


def test_load_keeps_bf16_places_on_a_mesh_and_casts_on_request(official, loaded, tmp_path,
                                                               cpu_devices):
    config, flat = loaded
    ema = load_file(os.path.join(official, "ema.safetensors"))
    ae = load_file(os.path.join(official, "ae.safetensors"))
    assert config.model.param_dtype == "bfloat16"
    assert {v.dtype for n, v in flat.items() if not n.startswith("vae/")} == {BF16}
    assert {v.dtype for n, v in flat.items() if n.startswith("vae/")} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(_bits(flat["llm/embed_tokens/embedding"]),
                                  _bits(ema["language_model.model.embed_tokens.weight"]))
    q = ema["language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"]
    np.testing.assert_array_equal(_bits(flat["llm/layers/gen/q_proj/kernel"][1]),
                                  _bits(q.T.reshape(64, 4, 16)))
    np.testing.assert_array_equal(flat["vae/encoder/conv_in/kernel"],
                                  ae["encoder.conv_in.weight"].transpose(2, 3, 1, 0))

    mesh = sharding.make_mesh(config.mesh)  # fsdp over the 8 devices
    _, model = bagel.load(official, dtype="float32", mesh=mesh, rules=sharding.LOGICAL_RULES)
    embedding = model.llm.embed_tokens.embedding[...]
    assert not embedding.sharding.is_fully_replicated
    cast = _flat(model)
    assert {v.dtype for v in cast.values()} == {np.dtype(np.float32)}
    for name in ("llm/embed_tokens/embedding", "vit/layers/mlp/fc1/kernel"):
        np.testing.assert_array_equal(cast[name], flat[name].astype(np.float32))

    fp32 = official_layout.write_official(tmp_path / "fp32", dtype="float32", tokenizer=False)
    assert bagel.official_config(fp32).model.param_dtype == "float32"


def test_corrupted_checkpoint_lists_every_problem(official, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(official, broken)
    path = os.path.join(broken, "ema.safetensors")
    tensors = load_file(path)
    gone = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
    tensors[gone + "s"] = tensors.pop(gone)  # renamed
    fc1 = "vit_model.vision_model.encoder.layers.0.mlp.fc1.weight"
    tensors[fc1] = tensors[fc1][:63]  # wrong shape
    del tensors["connector.fc2.bias"]  # missing
    table = tensors["latent_pos_embed.pos_embed"]  # rows and columns swapped
    side = official_layout.TINY["latent_side"]
    tensors["latent_pos_embed.pos_embed"] = np.ascontiguousarray(
        table.reshape(side, side, -1).transpose(1, 0, 2).reshape(table.shape))
    save_file(tensors, path)
    with pytest.raises(InitError) as error:
        bagel.load(broken)
    message = str(error.value)
    assert "(5 problems)" in message, message
    for expected in (
            f"llm/layers/gen/mlp/up_proj/kernel <- ema.safetensors:{gone}: missing",
            f"ema.safetensors:{gone}s (128, 64): no unijax parameter takes it",
            f"vit/layers/mlp/fc1/kernel <- ema.safetensors:{fc1}: checkpoint shape (63, 32), "
            "the model needs (64, 32)",
            "connector/fc2/bias <- ema.safetensors:connector.fc2.bias: missing",
            "latent_pos_embed.pos_embed: the stored table differs from the 2D sin-cos table"):
        assert expected in message, (expected, message)
    assert "max |difference|" in message


def test_to_official_of_a_lora_run_writes_its_merged_weights(official, converted, tmp_path):
    """A LoRA run on the converted model (adapters-only checkpoint, base in init.checkpoint)
    exports as BAGEL's files: the gen expert's projections hold W + alpha / r A B, every other
    tensor is the released one bit for bit."""
    from tests.training.test_init import random_state
    from unijax.training import checkpoint

    dst, _ = converted
    config, _ = load_lib.load_config(dst)
    llm = config.model.llm
    llm.lora_rank, llm.lora_alpha, llm.lora_experts = 2, 4.0, ("gen",)
    config.init.checkpoint = dst
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    _, _, state = random_state(config, mesh)  # params and EMA: random A and B of each adapter
    run = str(tmp_path / "lora")
    ckpt = checkpoint.Checkpointer(run, every_steps=1, max_to_keep=1, save_frozen=False)
    ckpt.save(1, state, None, config, force=True)
    ckpt.wait()
    ckpt.close()

    out = str(tmp_path / "official")
    bagel.to_official(run, out)
    base, exported = load_file(os.path.join(official, FILES[0])), load_file(
        os.path.join(out, FILES[0]))
    assert set(exported) == set(base)
    changed = {k for k in base if not np.array_equal(_bits(base[k]), _bits(exported[k]))}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all("_moe_gen" in k and any(t in k for t in targets) for k in changed), \
        sorted(changed)
    assert all(exported[k].dtype == base[k].dtype for k in base)  # released dtypes kept
    vae_base, vae_out = (load_file(os.path.join(d, FILES[1])) for d in (official, out))
    for key in vae_base:  # fp32 on disk, fp32 after the merge (read in its saved dtype)
        np.testing.assert_array_equal(_bits(vae_base[key]), _bits(vae_out[key]), err_msg=key)

    merged, _, _ = load_lib.load_model(run, merge_lora=True, dtype=load_lib.SAVED)
    back = _flat(bagel.load(out)[1])
    for name, value in _flat(merged).items():  # W + alpha / r A B, in the base's bf16
        np.testing.assert_array_equal(_bits(back[name]), _bits(value), err_msg=name)
