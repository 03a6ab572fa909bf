"""`--config.dry_run=True`: exact parameter counts from abstract shapes, nothing allocated."""

import os
import subprocess
import sys

import pytest
from flax import nnx

from configs import bagel_7b_mot, tiny
from unijax.models import mot, param_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _expected_llm_params(*, vocab, hidden, layers, heads, kv_heads, head_dim, mlp, experts,
                         qkv_bias, qk_norm, tied):
    """The decoder's parameter count written out from the Qwen2 shapes."""
    q = hidden * heads * head_dim + (heads * head_dim if qkv_bias else 0)
    kv = 2 * (hidden * kv_heads * head_dim + (kv_heads * head_dim if qkv_bias else 0))
    o = heads * head_dim * hidden
    qk_norms = 2 * head_dim if qk_norm else 0
    per_layer = q + kv + o + qk_norms + 3 * hidden * mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if tied else 2)
    return experts * (layers * per_layer + hidden) + embeddings


# BAGEL-7B-MoT's LLM: Qwen2.5-7B shapes, two experts, q/k/v biases, QK-norm, untied LM head.
BAGEL_LLM = _expected_llm_params(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                                 head_dim=128, mlp=18944, experts=2, qkv_bias=True,
                                 qk_norm=True, tied=False)


def test_bagel_expected_count_is_the_published_size():
    assert BAGEL_LLM == 14_141_252_608  # "LLM 14.14 B"
    per_expert_layers = 28 * (3584 * 3584 + 3584 + 2 * (3584 * 512 + 512) + 3584 * 3584 + 256
                              + 3 * 3584 * 18944 + 2 * 3584)
    assert per_expert_layers == 6_525_625_344  # "6.53 B of them are *_moe_gen"


def test_dry_run_prints_the_exact_bagel_7b_mot_count(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unijax.main", "--config=configs/bagel_7b_mot.py",
         f"--workdir={tmp_path}", "--config.dry_run=True"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"parameters: {BAGEL_LLM:,}" in lines
    breakdown = {line.split("  ")[1].strip(): line for line in lines if line.startswith("  ")
                 and "(" in line and "%" in line}
    for label, count in (("embedding", 152064 * 3584), ("lm_head", 152064 * 3584),
                         ("und expert layers", 6_525_625_344),
                         ("gen expert layers", 6_525_625_344), ("final norms", 2 * 3584)):
        assert f"{count:,}" in breakdown[label], breakdown


@pytest.mark.parametrize("overrides", [
    {},
    {"num_experts": 1, "tie_embeddings": True, "qk_norm": False, "qkv_bias": False},
])
def test_counting_matches_hand_formula(overrides):
    config = tiny.get_config()
    config.model.llm.update(overrides)
    cfg = mot.DecoderConfig.from_config(config)
    state = param_count.abstract_params(lambda: mot.MoTDecoder(cfg, rngs=nnx.Rngs(0)))
    rows = param_count.count_by_group(state, mot.param_groups(cfg))
    assert "other" not in dict(rows)
    expected = _expected_llm_params(
        vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_layers,
        heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        mlp=cfg.intermediate_size, experts=cfg.num_experts, qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm, tied=cfg.tie_embeddings)
    assert sum(n for _, n in rows) == param_count.count(state) == expected


def test_unclaimed_parameters_are_reported_as_other():
    cfg = mot.DecoderConfig.from_config(bagel_7b_mot.get_config("runlocal"))
    state = param_count.abstract_params(lambda: mot.MoTDecoder(cfg, rngs=nnx.Rngs(0)))
    rows = dict(param_count.count_by_group(state, [("embedding", ("embed_tokens",))]))
    assert rows["other"] == param_count.count(state) - rows["embedding"] > 0
    text = param_count.format_breakdown(list(rows.items()))
    assert text.splitlines()[0] == f"parameters: {param_count.count(state):,}"
