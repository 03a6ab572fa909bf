"""Analytic FLOPs of the MoT decoder and of one unified train step, and peak FLOP/s per device.

  out = step_flops(config, batch)       # one train step over a (numpy or jax) PackedBatch
  out["model"]                          # forward + backward: the MFU numerator
  out["hardware"]                       # model + what the step computes twice (recompute)
  out["forward"]["attention"], ...      # per component; "backward" and "recompute" likewise
  peak = peak_flops(jax.devices()[0])   # dense bf16 FLOP/s, None when unknown (CPU)

Counting rules of `step_flops`:
  * A multiply-add is 2 FLOPs. Only matrix products and convolutions are counted; norms, RoPE,
    softmax, activations, the mask and the optimizer update (a few FLOPs per element, a small
    share at real widths) are not (MaxText's convention).
  * Every module is counted at the static sizes the step runs it at, padding included: each
    decoder expert on its own slice of every row (und: `num_und` tokens, gen: the rest; one
    expert: the whole row), the ViT and its connector on every ViT patch slot (the padded
    patch budget), the VAE encoder on every VAE image slot at the full canvas, the timestep
    embedder once per VAE image slot, vae2llm and llm2vae on the gen slice.
  * The VAE encoder runs only when the step encodes pixels: `config.model.vae` is set and the
    batch has a gen slice (`UnifiedModel.latent_tokens`); it is frozen under stop_gradient, so
    it has no backward and no recompute.
  * Attention costs 4 * pairs * heads * head_dim per layer (scores and the weighted sum).
    `attention="visible"`: the (query, key) pairs the batch's mask lets through, counted exactly
    from the token metadata per document (`kernels.mask_pairs`, O(L) per row, no L x L array);
    `"dense"`: every pair, B * L^2, what the xla backend computes when one key chunk covers
    the row. ViT: the pairs inside each image (dense: B * P^2). The VAE mid-block attention:
    every pair of its H/8 x W/8 positions.
  * The LM head costs 2 * D * V per row it is applied to: `lm_head_rows` (the CE's rule: whole
    chunks of `ce_chunk_size` rows holding targets, see there) unless the `lm_head_tokens=`
    argument overrides it.
  * Backward, per matrix product: the weight gradient (as many FLOPs as its forward) when its
    weight trains, and the input gradient (as many again) when anything upstream of it trains.
    So 2x the forward for a trainable layer inside the network, 1x for a frozen layer the
    gradient passes through (BAGEL's stage 1: frozen LLM, trainable connectors), and nothing
    where no gradient flows: a frozen ViT (its input is data), the VAE, and with
    `freeze_und_expert` the und expert and the LM head (their activations are under
    stop_gradient). Attention: 2x its forward when a gradient flows through it.
    Which parameters train: `config.train.{trainable,freeze}` and `freeze_und_expert`, the rule
    of `training/optim.py` (`trainable=` takes that function; the default restates it).
  * Recompute (in `hardware` only): remat of the decoder and ViT layers
    (`config.model.llm.remat_policy`; only layers with a backward): "full" recomputes every
    product whose output the backward reads (all but the MLP's down projection, and the
    frozen und expert's q/k/v, which the attention backward reads), "save_dots" the attention
    forward, "none" nothing; flash-style attention backward recomputes the scores (+0.5x the
    attention forward); the CE's `jax.checkpoint` recomputes the LM head forward.
  * Totals: model = forward + backward (no recompute: the MFU numerator, MaxText's
    convention); hardware = model + recompute.

`decoder_forward_flops` is the decoder-only forward count of benchmarks/mot_step.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import ml_collections
import numpy as np

from unijax.kernels.mask_pairs import visible_pairs
from unijax.models.mot import DecoderConfig

# Peak dense bf16 FLOP/s per chip by `device.device_kind` (vendor data sheets; NVIDIA: SXM).
# TPU kinds are matched exactly ("TPU v5" is v5p, "TPU v4 lite" is not v4), GPU names by part.
PEAK_BF16 = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
             "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12,
             "H200": 989e12}

# TimestepEmbedder's sinusoidal feature width (its `frequency_dim` default).
TIMESTEP_FEATURES = 256


def peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (a jax Device), or None when unknown (e.g. CPU)."""
    kind = device.device_kind
    if kind in PEAK_BF16:
        return PEAK_BF16[kind]
    for name, value in PEAK_BF16.items():
        if not name.startswith("TPU") and name in kind:
            return value
    return None


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


# --- attention pairs ---------------------------------------------------------------------------


def vit_pairs(vit_image_id) -> np.ndarray:
    """[B] int64: sum over the ViT images of each row of (its patches)^2 (NaViT packing)."""
    ids = np.asarray(vit_image_id, np.int64)
    b, width = ids.shape[0], int(ids.max(initial=0)) + 1
    keys = (np.arange(b, dtype=np.int64)[:, None] * width + ids)[ids > 0]
    counts = np.bincount(keys, minlength=b * width).reshape(b, width)
    return np.sum(counts * counts, axis=1)


# --- which parameters train -------------------------------------------------------------------


def config_trainable_fn(config: ml_collections.ConfigDict) -> Callable[[str], bool]:
    """name -> whether the parameter trains: `training/optim.py`'s rule (`trainable` regexes,
    then `freeze`, then `freeze_und_expert`), restated because models/ does not import
    training/ (tests check the two agree)."""
    def patterns(field):
        value = config.train.get(field, ()) or ()
        return [re.compile(p) for p in ((value,) if isinstance(value, str) else value)]

    trainable, freeze = patterns("trainable"), patterns("freeze")
    und_frozen = ("llm/embed_tokens/", "llm/layers/und/", "llm/final_norm/und/", "llm/lm_head/")
    freeze_und = bool(config.model.llm.get("freeze_und_expert", False))

    def is_trainable(name: str) -> bool:
        if freeze_und and name.startswith(und_frozen):
            return False
        if trainable and not any(r.fullmatch(name) for r in trainable):
            return False
        return not any(r.fullmatch(name) for r in freeze)

    return is_trainable


# --- the train step ---------------------------------------------------------------------------


def lm_head_rows(config: ml_collections.ConfigDict, batch) -> int:
    """Rows the CE applies the LM head to in one step (`training/losses.py`): each row's CE
    targets (text_weight > 0 in the und slice) are moved to its front and the und slice is
    cut into chunks of `config.train.ce_chunk_size` rows; a chunk runs, for every row of the
    (micro-)batch, when some row has a target in it. So per micro-batch (rows j, j + k, ...
    with k = `config.train.grad_accum`): rows x chunk x ceil(most targets in a row / chunk)."""
    num_und = int(batch.num_und)
    if num_und == 0:
        return 0
    chunk = max(1, min(int(config.train.get("ce_chunk_size", 2048)), num_und))
    targets = np.count_nonzero(np.asarray(batch.text_weight)[:, :num_und] > 0, axis=1)
    accum = max(1, int(config.train.get("grad_accum", 1)))
    rows = 0
    for j in range(accum):
        micro = targets[j::accum]
        rows += len(micro) * chunk * math.ceil(int(micro.max(initial=0)) / chunk)
    return rows


def vae_encoder_flops(vae: ml_collections.ConfigDict, height: int, width: int) -> float:
    """Forward FLOPs of `vae.py`'s Encoder on one [height, width, 3] image."""
    conv = lambda h, w, k, cin, cout: 2.0 * h * w * k * k * cin * cout
    widths = [vae.base_channels * m for m in vae.channel_mult]
    h, w = height, width
    total = conv(h, w, 3, vae.in_channels, widths[0])
    cin = widths[0]
    for level, width_ in enumerate(widths):
        for i in range(vae.num_res_blocks):
            a = cin if i == 0 else width_
            total += conv(h, w, 3, a, width_) + conv(h, w, 3, width_, width_)
            total += conv(h, w, 1, a, width_) if a != width_ else 0.0
        if level < len(widths) - 1:
            h, w = h // 2, w // 2  # stride-2 conv with (0, 1) padding
            total += conv(h, w, 3, width_, width_)
        cin = width_
    c, hw = widths[-1], h * w
    total += 2 * 2 * conv(h, w, 3, c, c)  # the mid block's two ResNet blocks
    total += 4 * 2.0 * hw * c * c + 4.0 * hw * hw * c  # its attention: q, k, v, out; scores
    return total + conv(h, w, 3, c, 2 * vae.latent_channels)


class _Tally:
    """Forward FLOPs per component, their backward, and the recompute per cause."""

    def __init__(self):
        self.forward: dict[str, float] = {}
        self.backward: dict[str, float] = {}
        self.recompute = {"remat": 0.0, "flash_attention": 0.0, "ce_checkpoint": 0.0}

    def add(self, name: str, flops: float, backward: float = 0.0, **recompute: float) -> None:
        """`flops` forward FLOPs of `name`, `backward` times them in the backward pass and
        `recompute[cause]` times them recomputed."""
        self.forward[name] = self.forward.get(name, 0.0) + float(flops)
        self.backward[name] = self.backward.get(name, 0.0) + float(flops) * backward
        for cause, factor in recompute.items():
            self.recompute[cause] += float(flops) * factor


def step_flops(config: ml_collections.ConfigDict, batch, *, attention: str = "visible",
               lm_head_tokens: int | None = None,
               trainable: Callable[[str], bool] | None = None) -> dict:
    """FLOPs of one train step of the unified model over `batch` (rules: module docstring).

    Args:
      config: the run's config (model, attention, `train.ce_chunk_size`, what trains).
      batch: the step's PackedBatch (numpy or jax; only shapes and token metadata are read).
      attention: "visible" (the mask's pairs) or "dense" (every pair).
      lm_head_tokens: rows the LM head runs on in the step (default `lm_head_rows`).
      trainable: parameter path -> trains (default `config_trainable_fn(config)`; the trainer
        passes `training.optim.is_trainable_fn(config)`).

    Returns:
      {"forward", "backward": {component: FLOPs}, "recompute": {"remat", "flash_attention",
       "ce_checkpoint": FLOPs}, "model": forward + backward, "hardware": model + recompute,
       "lm_head_tokens": rows, "attention_pairs": decoder (query, key) pairs of one layer,
       "vit_pairs": likewise for the ViT}.
    """
    if attention not in ("visible", "dense"):
        raise ValueError(f"step_flops: attention must be 'visible' or 'dense', got {attention!r}")
    trains = config_trainable_fn(config) if trainable is None else trainable
    names = _names(config)
    any_trains = lambda *prefixes: any(trains(n) for n in names if n.startswith(prefixes))
    model, tally = config.model, _Tally()
    b, length = np.shape(batch.doc_id)
    num_gen = length - int(batch.num_und)
    d = int(model.llm.hidden_size)
    policy = model.llm.get("remat_policy", "none")

    vit_pair_count = _vit(tally, config, batch, attention, trains, any_trains, policy)
    if num_gen > 0:  # the gen slice's inputs: VAE latents, timestep embedding, vae2llm
        n_images = int(np.shape(batch.vae_timestep)[1])
        if model.vae is not None:
            _, _, h, w, _ = np.shape(batch.vae_images)
            tally.add("vae_encoder", b * n_images * vae_encoder_flops(model.vae, h, w))
        fc1 = trains("time_embedder/fc1/kernel")
        tally.add("time_embedder", 2 * b * n_images * TIMESTEP_FEATURES * d, fc1)
        tally.add("time_embedder", 2 * b * n_images * d * d,
                  trains("time_embedder/fc2/kernel") + fc1)
        tally.add("vae2llm", 2 * b * num_gen * _token_features(model) * d,
                  trains("vae2llm/kernel"))
    decoder_up = any_trains("llm/embed_tokens/", "llm/layers/", "vit/", "connector/",
                            "time_embedder/", "vae2llm/")
    pairs = _decoder(tally, config, batch, attention, trains, decoder_up)
    rows = lm_head_rows(config, batch) if lm_head_tokens is None else int(lm_head_tokens)
    cfg = DecoderConfig.from_config(config)
    head = "llm/embed_tokens/embedding" if cfg.tie_embeddings else "llm/lm_head/kernel"
    head_grad = trains(head) + (decoder_up and not cfg.freeze_und_expert)
    tally.add("lm_head", 2 * rows * d * cfg.vocab_size, head_grad,
              ce_checkpoint=float(head_grad > 0))
    if num_gen > 0:
        tally.add("llm2vae", 2 * b * num_gen * d * _token_features(model),
                  trains("llm2vae/kernel") + (decoder_up or any_trains("llm/final_norm/gen/")))

    model_flops = sum(tally.forward.values()) + sum(tally.backward.values())
    return {"forward": tally.forward, "backward": tally.backward, "recompute": tally.recompute,
            "model": model_flops, "hardware": model_flops + sum(tally.recompute.values()),
            "lm_head_tokens": rows, "attention_pairs": pairs, "vit_pairs": vit_pair_count}


def _vit(tally, config, batch, attention, trains, any_trains, policy) -> int:
    """The ViT on every patch slot and the connector; returns the ViT's pairs per layer."""
    v = config.model.vit
    patches = int(np.shape(batch.vit_patches)[1]) if v is not None else 0
    if not patches:
        return 0
    b, d, dv = np.shape(batch.vit_patches)[0], int(config.model.llm.hidden_size), v.hidden_size
    tokens, up = b * patches, any_trains("vit/")
    pairs = (int(vit_pairs(batch.vit_image_id).sum()) if attention == "visible"
             else b * patches * patches)
    tally.add("vit", 2 * tokens * v.patch_size**2 * 3 * dv, trains("vit/patch_embedding/kernel"))
    full = float(policy == "full" and up)
    for name, width in (("self_attn/q_proj", dv), ("self_attn/k_proj", dv),
                        ("self_attn/v_proj", dv), ("self_attn/out_proj", dv),
                        ("mlp/fc1", v.intermediate_size), ("mlp/fc2", v.intermediate_size)):
        tally.add("vit", v.num_layers * 2 * tokens * dv * width,
                  trains(f"vit/layers/{name}/kernel") + up,
                  remat=0.0 if name == "mlp/fc2" else full)  # its output is not read back
    tally.add("vit_attention", v.num_layers * 4 * pairs * dv, 2 * up,
              remat=float(policy != "none" and up), flash_attention=0.5 * up)
    fc1 = trains("connector/fc1/kernel")
    tally.add("connector", 2 * tokens * dv * d, fc1 + up)
    tally.add("connector", 2 * tokens * d * d, trains("connector/fc2/kernel") + (up or fc1))
    return pairs


def _decoder(tally, config, batch, attention, trains, upstream: bool) -> int:
    """Each expert on its slice and one attention over the row, every layer; `upstream`:
    something before the layers' inputs trains (so does any layer). Returns the pairs."""
    cfg = DecoderConfig.from_config(config)
    b, length = np.shape(batch.doc_id)
    num_und = int(batch.num_und)
    pairs = (int(visible_pairs(batch.doc_id, batch.order, batch.split_id, batch.noisy).sum())
             if attention == "visible" else b * length * length)
    d, h, hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    slices = ([("und", num_und), ("gen", length - num_und)] if cfg.num_experts == 2
              else [("und", length)])
    full = float(cfg.remat_policy == "full" and upstream)
    for expert, tokens in slices:
        stopped = expert == "und" and cfg.freeze_und_expert  # under stop_gradient: no backward
        ops = (("q_proj", h * hd), ("k_proj", hkv * hd), ("v_proj", hkv * hd),
               ("o_proj", h * hd), ("mlp/gate_proj", cfg.intermediate_size),
               ("mlp/up_proj", cfg.intermediate_size), ("mlp/down_proj", cfg.intermediate_size))
        for name, width in ops:
            grad = 0 if stopped else trains(f"llm/layers/{expert}/{name}/kernel") + upstream
            # Full remat recomputes what the backward reads: q, k, v even of a frozen expert
            # (the attention backward), never the down projection's output.
            again = full if name in ("q_proj", "k_proj", "v_proj") else (
                0.0 if stopped or name == "mlp/down_proj" else full)
            part = "mlp" if name.startswith("mlp/") else "qkvo"
            tally.add(f"{expert}_{part}", cfg.num_layers * 2 * b * tokens * d * width, grad,
                      remat=again)
    tally.add("attention", cfg.num_layers * 4 * pairs * h * hd, 2 * upstream,
              remat=float(cfg.remat_policy != "none" and upstream), flash_attention=0.5 * upstream)
    return pairs


def _token_features(model: ml_collections.ConfigDict) -> int:
    """Features of one latent token: p * p * latent channels."""
    return int(model.latent_patch_size) ** 2 * int(model.latent_channels)


def _names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The matrix-product weights (and the tables feeding them) of the unified model, by path."""
    names = ["llm/embed_tokens/embedding", "llm/lm_head/kernel", "llm/final_norm/gen/scale",
             "vae2llm/kernel", "llm2vae/kernel", "time_embedder/fc1/kernel",
             "time_embedder/fc2/kernel"]
    for expert in ("und", "gen")[:int(config.model.llm.get("num_experts", 2))]:
        names += [f"llm/layers/{expert}/{n}/kernel" for n in (
            "q_proj", "k_proj", "v_proj", "o_proj", "mlp/gate_proj", "mlp/up_proj",
            "mlp/down_proj")]
    if config.model.vit is not None:
        names += ["vit/patch_embedding/kernel", "vit/position_embedding",
                  "connector/fc1/kernel", "connector/fc2/kernel"]
        names += [f"vit/layers/{n}/kernel" for n in (
            "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/out_proj",
            "mlp/fc1", "mlp/fc2")]
    return tuple(names)
