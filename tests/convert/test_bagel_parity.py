"""A tiny official-layout BAGEL checkpoint loaded by `unijax.convert.bagel.load` computes what
HF transformers computes from the same tensors: each LLM expert's logits (HF Qwen3 for the
release's QK-norm layout, HF Qwen2 for a checkpoint without it) and the SigLIP features."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import bagel_7b_mot
from tests.convert import official_layout
from unijax.convert import bagel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.models import test_mot_parity as mot_parity  # noqa: E402  (needs torch)
from tests.models import test_vit as vit_parity  # noqa: E402

pytestmark = pytest.mark.parity
D = official_layout.TINY


def _load(path):
    """The unijax model in float32 (weights and compute), as HF runs in these tests."""
    base = bagel_7b_mot.get_config()
    base.model.dtype = "float32"
    base.attention.chunk_size = 16
    return bagel.load(path, dtype="float32", base=base)[1]


def _torch_state(tensors: dict, expert: str) -> dict:
    """The HF Qwen2/Qwen3 state dict of one expert: the `_moe_gen` twins renamed for gen."""
    out = {}
    for key, value in tensors.items():
        if not key.startswith("language_model."):
            continue
        name = key[len("language_model."):]
        twin = "_moe_gen" in name
        if expert == "und" and twin or expert == "gen" and not twin and ".layers." in name:
            continue
        if expert == "gen" and name == "model.norm.weight":
            continue
        out[name.replace("_moe_gen", "")] = torch.from_numpy(np.asarray(value, np.float32))
    return out


def _hf_llm(family: str, state: dict):
    common = dict(vocab_size=D["vocab"], hidden_size=D["hidden"],
                  intermediate_size=D["inter"], num_hidden_layers=D["layers"],
                  num_attention_heads=D["heads"], num_key_value_heads=D["kv_heads"],
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:  # QK-norm before RoPE and q/k/v biases: BAGEL's layer (o_proj has no bias)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **common, head_dim=D["hidden"] // D["heads"], attention_bias=True))
        for i in range(D["layers"]):
            state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(D["hidden"])
    model.config._attn_implementation = "eager"
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def release(official):
    return load_file(os.path.join(official, "ema.safetensors")), _load(official)


@pytest.mark.parametrize("expert,num_und", [("und", mot_parity.NUM_UND), ("gen", 0)])
def test_each_expert_matches_hf_qwen3(release, expert, num_und):
    tensors, model = release
    hf = _hf_llm("qwen3", _torch_state(tensors, expert))
    mot_parity._compare_per_document(hf, model.llm, mot_parity._batch(), num_und)


def test_checkpoint_without_qk_norm_matches_hf_qwen2(tmp_path):
    path = official_layout.write_official(tmp_path / "no_qk_norm", qk_norm=False,
                                          tokenizer=False)
    tensors = load_file(os.path.join(path, "ema.safetensors"))
    hf = _hf_llm("qwen2", _torch_state(tensors, "und"))
    mot_parity._compare_per_document(hf, _load(path).llm, mot_parity._batch(),
                                     mot_parity.NUM_UND)


def test_vit_matches_hf_siglip(release):
    tensors, model = release
    p, side = D["patch"], D["vit_side"]
    assert p == vit_parity.PATCH  # the packing helper's patch size
    config = transformers.SiglipVisionConfig(
        hidden_size=D["vit_hidden"], intermediate_size=D["vit_inter"],
        num_hidden_layers=D["vit_layers"], num_attention_heads=D["vit_heads"],
        image_size=side * p, patch_size=p, layer_norm_eps=1e-6, vision_use_head=False,
        hidden_act="gelu_pytorch_tanh")
    hf = transformers.SiglipVisionModel(config).eval()
    state = {}
    # HF keys are `vision_model.*` or, in newer transformers, the tower's own names.
    prefixed = any(k.startswith("vision_model.") for k in hf.state_dict())
    strip = "vit_model." if prefixed else "vit_model.vision_model."
    for key, value in tensors.items():
        if key.startswith("vit_model."):
            value = np.asarray(value, np.float32)
            if key.endswith("patch_embedding.weight"):  # BAGEL's Linear back to SigLIP's conv
                value = value.reshape(-1, p, p, 3).transpose(0, 3, 1, 2)
            state[key[len(strip):]] = torch.from_numpy(np.ascontiguousarray(value))
    hf.load_state_dict(state, strict=True)
    image = np.random.default_rng(1).uniform(-1, 1, (side * p, side * p, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(image.transpose(2, 0, 1)[None])).last_hidden_state[0].numpy()
    payload, _ = vit_parity._pack([image], vit_parity.SLOTS)
    out = np.asarray(vit_parity._forward(model.vit, *payload))[0]
    np.testing.assert_allclose(out[:side * side], ref, atol=1e-5, rtol=1e-5)
