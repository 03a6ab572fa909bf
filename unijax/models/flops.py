"""Analytic forward FLOPs of the MoT decoder (for MFU and for checking that routing wastes none).

A multiply-add is 2 FLOPs; only matrix products are counted (norms, RoPE, softmax and
activations are a few FLOPs per element, a small fraction at real widths). Because each
expert runs only on its own slice of the row, the weight FLOPs depend on L = num_und + num_gen
and not on the number of experts.

Attention scores and the weighted sum cost 2 * 2 * Lq * Lk * H * Dh per layer; the fraction
of the L x L score matrix a kernel actually computes is `attention_density` (1.0 for the dense
`xla` reference, which evaluates every masked entry; a block-sparse kernel computes fewer).

Training FLOPs are about 3x the forward (backward = 2x forward), minus the weight-gradient
half of the backward for frozen parameters.
"""

from __future__ import annotations

from unijax.models.mot import DecoderConfig


def decoder_forward_flops(
    cfg: DecoderConfig,
    num_und: int,
    num_gen: int,
    *,
    batch_size: int = 1,
    logits_tokens: int = 0,
    attention_density: float = 1.0,
) -> dict[str, float]:
    """Forward FLOPs of `batch_size` rows of num_und + num_gen tokens through the decoder.

    Args:
      cfg: the decoder config.
      num_und, num_gen: tokens per row in the und and gen slices.
      batch_size: rows.
      logits_tokens: tokens per row the LM head is applied to (0: hidden states only).
      attention_density: computed fraction of the L x L attention scores (1.0 = dense).

    Returns:
      {"qkvo": ..., "mlp": ..., "attention": ..., "lm_head": ..., "total": ...} in FLOPs.
    """
    d, h, hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    length = num_und + num_gen
    tokens = batch_size * length
    layers = cfg.num_layers
    qkvo = 2 * tokens * layers * (d * (h + 2 * hkv) * hd + h * hd * d)
    mlp = 2 * tokens * layers * 3 * d * cfg.intermediate_size
    attention = 4 * batch_size * layers * length * length * h * hd * attention_density
    lm_head = 2 * batch_size * logits_tokens * d * cfg.vocab_size
    out = {"qkvo": float(qkvo), "mlp": float(mlp), "attention": float(attention),
           "lm_head": float(lm_head)}
    out["total"] = sum(out.values())
    return out
