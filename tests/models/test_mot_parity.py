"""Numerical parity of the MoT decoder with HF transformers' Qwen2 / Qwen3 (fp32, tiny shapes).

Each row of the PackedBatch packs two text documents; HF runs every document on its own with
that document's position ids, and the logits of its tokens must match the packed unijax run.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unijax import batch_builder as bb
from unijax.convert import qwen2 as convert
from unijax.models import mot

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

SPECIAL = bb.SpecialTokens(im_start=120, im_end=121, vision_start=122, vision_end=123)
NUM_UND = 40


def _hf_model(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.Qwen3Config(**common, head_dim=16, attention_bias=True)
        model = transformers.Qwen3ForCausalLM(config)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Move norms off 1 and biases off 0 so that every weight matters.
            p.add_(0.05 * torch.randn_like(p))
            if "o_proj.bias" in name:
                p.zero_()  # BAGEL's o_proj has no bias
    return model.eval()


def _unijax_config(family: str, num_experts: int = 1) -> mot.DecoderConfig:
    return mot.DecoderConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, rope_theta=10_000.0, rms_norm_eps=1e-6,
        qk_norm=family == "qwen3", qkv_bias=True, tie_embeddings=False,
        num_experts=num_experts, init_gen_from_und=True, dtype="float32",
        attention_chunk_size=16)


def _batch():
    rng = np.random.default_rng(0)
    ids = lambda n: [int(i) for i in rng.integers(0, 120, n)]
    rows = [
        [[bb.text(ids(7)), bb.text(ids(5), loss=True)], [bb.text(ids(11))]],
        [[bb.text(ids(4))], [bb.text(ids(9)), bb.text(ids(8))]],
    ]
    return bb.build(rows, num_und=NUM_UND, num_gen=0, special=SPECIAL)


def _unijax_model(hf_model, cfg: mot.DecoderConfig) -> mot.MoTDecoder:
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    model = mot.MoTDecoder(cfg, rngs=nnx.Rngs(1))
    params = convert.decoder_params_from_hf(tensors, cfg, gen_from_und=cfg.num_experts == 2)
    convert.load_decoder_params(model, params)
    return model


def _compare_per_document(hf_model, model, batch, num_und):
    x = model.embed(jnp.asarray(batch.text_ids))
    hidden = model(x, jnp.asarray(batch.position), batch.token_meta(), num_und)
    logits = np.asarray(model.logits(hidden))
    compared = 0
    for row in range(batch.batch_size):
        for doc in np.unique(batch.doc_id[row][batch.doc_id[row] > 0]):
            idx = np.nonzero(batch.doc_id[row] == doc)[0]
            idx = idx[np.argsort(batch.order[row][idx])]
            with torch.no_grad():
                ref = hf_model(
                    input_ids=torch.tensor(batch.text_ids[row][idx][None], dtype=torch.long),
                    position_ids=torch.tensor(batch.position[row][idx][None], dtype=torch.long),
                ).logits[0].numpy()
            np.testing.assert_allclose(logits[row, idx], ref, atol=1e-5, rtol=0)
            compared += len(idx)
    assert compared == int((batch.doc_id > 0).sum())


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_one_expert_matches_hf_per_document(family):
    """num_experts=1: qk_norm=False is HF Qwen2; qk_norm=True is HF Qwen3 with q/k/v biases."""
    hf_model = _hf_model(family)
    cfg = _unijax_config(family)
    _compare_per_document(hf_model, _unijax_model(hf_model, cfg), _batch(), NUM_UND)


@pytest.mark.parametrize("num_und", [0, 13, NUM_UND])
def test_two_experts_from_one_checkpoint_match_hf_for_any_split(num_und):
    """Gen weights copied from und: any und/gen split of the row gives HF's logits."""
    hf_model = _hf_model("qwen3")
    cfg = _unijax_config("qwen3", num_experts=2)
    _compare_per_document(hf_model, _unijax_model(hf_model, cfg), _batch(), num_und)


def test_bagel_moe_gen_keys_load_into_the_gen_expert():
    """BAGEL layout: `_moe_gen` twins under `language_model.` fill the gen expert."""
    hf_model = _hf_model("qwen3")
    cfg = _unijax_config("qwen3", num_experts=2)
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    bagel = {}
    for key, value in tensors.items():
        bagel["language_model." + key] = value
        if key.startswith("model.layers.") or key == "model.norm.weight":
            for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "mlp",
                         "input_layernorm", "post_attention_layernorm", "norm"):
                twin = key.replace(f".{part}.", f".{part}{convert.GEN_SUFFIX}.", 1)
                if twin != key:
                    bagel["language_model." + twin] = value * 2.0
                    break
    params = convert.decoder_params_from_hf(bagel, cfg, prefix="language_model.")
    np.testing.assert_array_equal(params["layers"]["gen"]["mlp"]["down_proj"]["kernel"],
                                  2.0 * params["layers"]["und"]["mlp"]["down_proj"]["kernel"])
    np.testing.assert_array_equal(params["final_norm"]["gen"]["scale"],
                                  2.0 * params["final_norm"]["und"]["scale"])
    back = convert.decoder_params_to_hf(params, cfg, prefix="language_model.")
    assert set(back) == {k for k in bagel if "o_proj.bias" not in k and "o_proj_moe_gen.bias"
                         not in k}
    for key, value in back.items():
        np.testing.assert_array_equal(value, bagel[key], err_msg=key)
