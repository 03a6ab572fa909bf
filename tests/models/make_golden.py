"""Writes the golden outputs of the PyTorch references into tests/models/golden/*.npz.

  python -m tests.models.make_golden        # from the repository root, with the parity extras
                                            # (torch, transformers, diffusers) installed

References, all float32 on CPU, with the deterministic weights of `golden_weights`:
  decoder.npz  HF `Qwen2ForCausalLM` and `Qwen3ForCausalLM` (QK-norm, q/k/v biases) run per
               document of a packed text batch; and BAGEL's two-expert MoT decoder layer
               (`Qwen2MoTDecoderLayer`: per-expert norms, projections, QK-norm and MLP around
               one attention over the packed row, the mask of its metadata) written here from
               the modules of two HF Qwen3 models, on a row of text, ViT and VAE tokens.
  vit.npz      HF `SiglipVisionModel` on images of several grids: the plain forward at the
               table's grid, `interpolate_pos_encoding=True` (unijax "interpolate"), and
               BAGEL's NaViT position ids `row * max_grid + col` (unijax "extrapolate").
  vae.npz      diffusers `AutoencoderKL` in the FLUX layout: posterior moments and decode.
  unified.npz  BAGEL's forward over a PackedBatch (text embeddings; SigLIP + MLP connector +
               2D sin-cos positions for ViT tokens; VAE latents patchified 2x2, `vae2llm` +
               timestep embedding + 2D sin-cos positions for VAE tokens; the MoT decoder;
               LM head and `llm2vae`), built from the same HF / diffusers modules.
Each file holds the inputs, the outputs and the manifest of the weights (`golden_weights`).
Re-run it after changing a reference or a config of `golden_weights`, and commit the files.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb, eager_attention_forward

from tests.models import golden_weights as gw
from unijax import batch_builder as bb

torch.set_grad_enabled(False)
DECODER_SPECIAL = bb.SpecialTokens(im_start=60, im_end=61, vision_start=62, vision_end=63)
BATCH_FIELDS = ("text_ids", "position", "doc_id", "order", "split_id", "noisy", "modality")


def _rule(name: str, shape) -> tuple[float, float]:
    """(offset, scale) of a parameter: norms around 1, biases around 0, other weights with
    variance 1 / fan_in (embeddings larger), BAGEL's bias-free o_proj at exactly 0."""
    if ".o_proj" in name and name.endswith(".bias"):  # und and `_moe_gen` twins alike
        return 0.0, 0.0
    if len(shape) == 1:
        return (1.0, 0.5) if name.endswith("weight") else (0.0, 0.2)
    if "embed_tokens" in name:
        return 0.0, 1.0
    if "position_embedding" in name:
        return 0.0, 0.5
    return 0.0, math.sqrt(3.0 / math.prod(shape[1:]))


def fill(module: torch.nn.Module, prefix: str, rename=lambda key: key,
         skip=lambda key: False) -> dict:
    """Sets every parameter of `module` to its golden value; returns the manifest entries."""
    manifest = {}
    for key, p in module.named_parameters():
        if skip(key):
            continue
        name = prefix + rename(key)
        offset, scale = _rule(name, tuple(p.shape))
        p.copy_(torch.from_numpy(gw.weight(name, p.shape, offset, scale)))
        manifest[name] = [list(p.shape), offset, scale]
    return manifest


def save(name: str, manifest: dict, arrays: dict) -> None:
    gw.GOLDEN_DIR.mkdir(exist_ok=True)
    path = gw.GOLDEN_DIR / f"{name}.npz"
    np.savez_compressed(path, manifest=np.array(json.dumps(manifest, sort_keys=True)),
                        **{k: np.asarray(v) for k, v in arrays.items()})
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB, {len(manifest)} tensors)")


def batch_arrays(batch, prefix: str) -> dict:
    return {f"{prefix}{k}": np.asarray(getattr(batch, k)) for k in BATCH_FIELDS}


# ------------------------------------------------------------------------------------------
# Decoders.
# ------------------------------------------------------------------------------------------


def _decoder_config(family: str, vocab_size: int):
    c = gw.DECODER
    common = dict(vocab_size=vocab_size, hidden_size=c["hidden_size"],
                  intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
                  num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
                  rope_theta=c["rope_theta"], rms_norm_eps=c["rms_norm_eps"],
                  tie_word_embeddings=False)
    if family == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = Qwen3Config(**common, head_dim=c["head_dim"], attention_bias=True)
    config._attn_implementation = "eager"
    return config


def hf_decoder(family: str, prefix: str, vocab_size: int = gw.DECODER["vocab_size"]):
    cls = Qwen2ForCausalLM if family == "qwen2" else Qwen3ForCausalLM
    model = cls(_decoder_config(family, vocab_size)).eval()
    return model, fill(model, prefix)


def bagel_gen_name(key: str) -> str:
    """HF Qwen key -> BAGEL's `_moe_gen` twin (`self_attn.q_proj_moe_gen.weight`, ...)."""
    for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "mlp",
                 "input_layernorm", "post_attention_layernorm"):
        if f".{part}." in key:
            return key.replace(f".{part}.", f".{part}_moe_gen.", 1)
    if key == "model.norm.weight":
        return "model.norm_moe_gen.weight"
    raise KeyError(key)


def hf_mot(prefix: str, vocab_size: int):
    """(und, gen) Qwen3 models holding BAGEL's two experts; gen's embedding and head unused."""
    und, manifest = hf_decoder("qwen3", prefix, vocab_size)
    gen = Qwen3ForCausalLM(_decoder_config("qwen3", vocab_size)).eval()
    shared = lambda key: key.startswith(("model.embed_tokens", "lm_head"))
    manifest |= fill(gen, prefix, rename=bagel_gen_name, skip=shared)
    return und, gen, manifest


def rule_mask(doc, order, split, noisy) -> torch.Tensor:
    """BAGEL's attention rule, bool [B, L, L] from [B, L] metadata."""
    q = lambda t: torch.as_tensor(np.asarray(t))[:, :, None]
    k = lambda t: torch.as_tensor(np.asarray(t))[:, None, :]
    same_doc = (q(doc) == k(doc)) & (q(doc) != 0)
    same_split = (q(split) == k(split)) & (q(split) >= 0)
    causal = k(order) <= q(order)
    return same_doc & (causal | same_split) & ~(k(noisy).bool() & ~same_split)


def mot_forward(und, gen, x, positions, mask, num_und):
    """BAGEL's MoT decoder: x [B, L, D], positions [B, L], mask bool [B, L, L] -> hidden after
    the per-expert final norms [B, L, D]. Tokens [0, num_und) use und's weights, the rest gen's."""
    x = torch.as_tensor(x)
    positions = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    cos, sin = und.model.rotary_emb(x, positions)
    bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, torch.finfo(x.dtype).min)
    bias = bias[:, None]  # [B, 1, L, L]
    length = x.shape[1]
    spans = [(e, a, b) for e, a, b in ((0, 0, num_und), (1, num_und, length)) if b > a]
    for layers in zip(und.model.layers, gen.model.layers):
        qs, ks, vs = [], [], []
        for e, a, b in spans:
            attn = layers[e].self_attn
            h = layers[e].input_layernorm(x[:, a:b])
            shape = (*h.shape[:-1], -1, attn.head_dim)
            qs.append(attn.q_norm(attn.q_proj(h).view(shape)))
            ks.append(attn.k_norm(attn.k_proj(h).view(shape)))
            vs.append(attn.v_proj(h).view(shape))
        q, k, v = (torch.cat(t, dim=1).transpose(1, 2) for t in (qs, ks, vs))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out, _ = eager_attention_forward(layers[0].self_attn, q, k, v, bias,
                                         scaling=layers[0].self_attn.scaling)
        out = out.reshape(*x.shape[:2], -1)
        new = []
        for e, a, b in spans:
            xe = x[:, a:b] + layers[e].self_attn.o_proj(out[:, a:b])
            new.append(xe + layers[e].mlp(layers[e].post_attention_layernorm(xe)))
        x = torch.cat(new, dim=1)
    norms = (und.model.norm, gen.model.norm)
    return torch.cat([norms[e](x[:, a:b]) for e, a, b in spans], dim=1)


def text_batch():
    rng = np.random.default_rng(0)
    ids = lambda n: [int(i) for i in rng.integers(0, 60, n)]
    rows = [
        [[bb.text(ids(7)), bb.text(ids(5), loss=True)], [bb.text(ids(11))]],
        [[bb.text(ids(4))], [bb.text(ids(9)), bb.text(ids(8))]],
    ]
    return bb.build(rows, num_und=gw.NUM_UND, num_gen=0, special=DECODER_SPECIAL)


def mixed_batch(num_gen: int = 16, **kw):
    """Text, ViT, noisy and clean VAE tokens in expert-major rows (an interleaved document
    with a generated image and its clean copy, an edit, a text document)."""
    rows = [
        [[bb.text([1, 2, 3]), bb.vae_image(2, 2, noisy=True, t=0.6), bb.vae_image(2, 2),
          bb.vit_image(2, 2), bb.text([4, 5, 6, 7], loss=True)],
         [bb.text([8, 9, 10, 11, 12])]],
        [[bb.vit_image(2, 1), bb.vae_image(2, 2), bb.text([13, 14, 15]),
          bb.vae_image(2, 2, noisy=True, t=0.3)],
         [bb.text([16, 17, 18, 19]), bb.text([20, 21], loss=True)]],
    ]
    return bb.build(rows, num_und=gw.NUM_UND, num_gen=num_gen, latent_grid=(2, 2), **kw)


def per_document(batch, run):
    """Runs `run(ids [1, n], positions [1, n]) -> [1, n, F]` on every document alone; returns
    [B, L, F] with zeros on padding."""
    out = None
    for r in range(batch.batch_size):
        for d in np.unique(batch.doc_id[r][batch.doc_id[r] > 0]):
            idx = np.nonzero(batch.doc_id[r] == d)[0]
            idx = idx[np.argsort(batch.order[r][idx])]
            y = run(torch.tensor(batch.text_ids[r][idx][None], dtype=torch.long),
                    torch.tensor(batch.position[r][idx][None], dtype=torch.long))[0].numpy()
            if out is None:
                out = np.zeros((*batch.doc_id.shape, y.shape[-1]), np.float32)
            out[r, idx] = y
    return out


def make_decoder() -> None:
    manifest, arrays = {}, {}
    text = text_batch()
    arrays |= batch_arrays(text, "text.")
    for family in ("qwen2", "qwen3"):
        model, entries = hf_decoder(family, f"{family}/")
        manifest |= entries
        arrays[f"{family}.logits"] = per_document(
            text, lambda i, p, m=model: m(input_ids=i, position_ids=p).logits)

    und, gen, entries = hf_mot("mot/", gw.DECODER["vocab_size"])
    manifest |= entries
    batch = mixed_batch(special=DECODER_SPECIAL)
    arrays |= batch_arrays(batch, "mot.")
    x = gw.uniform("mot/x", (batch.batch_size, batch.length, gw.DECODER["hidden_size"]))
    arrays["mot.x"] = x.astype(np.float32)
    mask = rule_mask(batch.doc_id, batch.order, batch.split_id, batch.noisy)
    arrays["mot.hidden"] = mot_forward(und, gen, arrays["mot.x"], batch.position, mask,
                                       batch.num_und).numpy()

    # The MoT reference is BAGEL's layer: a row of und tokens only is HF's Qwen3 forward with
    # und's weights, a row of gen tokens only the same with gen's, and with both experts
    # holding und's weights any und/gen split of the row gives und's.
    emb = und.model.embed_tokens(torch.as_tensor(text.text_ids, dtype=torch.long))
    live = text.doc_id > 0
    text_mask = rule_mask(text.doc_id, text.order, text.split_id, text.noisy)
    checks = [((und, und), 13, und), ((und, gen), gw.NUM_UND, und), ((und, gen), 0, gen)]
    for (first, second), num_und, hf in checks:
        want = per_document(text, lambda i, p, hf=hf: hf.model(
            inputs_embeds=und.model.embed_tokens(i), position_ids=p).last_hidden_state)
        got = mot_forward(first, second, emb, text.position, text_mask, num_und).numpy()
        np.testing.assert_allclose(got[live], want[live], atol=2e-5, rtol=1e-5)
    save("decoder", manifest, arrays)


# ------------------------------------------------------------------------------------------
# SigLIP.
# ------------------------------------------------------------------------------------------


def hf_siglip(prefix: str, c: dict):
    config = SiglipVisionConfig(
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
        image_size=c["max_grid"] * c["patch_size"], patch_size=c["patch_size"],
        layer_norm_eps=c["layer_norm_eps"], vision_use_head=False,
        hidden_act="gelu_pytorch_tanh")
    model = SiglipVisionModel(config).eval()
    # Checkpoint names (`vision_model.*`), whether or not this transformers nests the module.
    rename = (lambda key: key) if hasattr(model, "vision_model") else "vision_model.".__add__
    return model, fill(model, prefix, rename=rename)


def siglip_navit(model, image_hwc: np.ndarray, c: dict) -> np.ndarray:
    """BAGEL's NaViT SigLIP on one image: patch conv, learned positions at ids
    `row * max_grid + col`, the encoder, post-LN. [h*p, w*p, 3] -> [h*w, D]."""
    vm = getattr(model, "vision_model", model)
    x = vm.embeddings.patch_embedding(torch.from_numpy(image_hwc.transpose(2, 0, 1))[None])
    h, w = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)
    rows, cols = np.divmod(np.arange(h * w), w)
    ids = torch.as_tensor(rows * c["max_grid"] + cols, dtype=torch.long)
    x = x + vm.embeddings.position_embedding(ids)[None]
    x = vm.encoder(inputs_embeds=x).last_hidden_state
    return vm.post_layernorm(x)[0].numpy()


def make_vit() -> None:
    c = gw.VIT
    model, manifest = hf_siglip("vit/", c)
    p, g = c["patch_size"], c["max_grid"]
    arrays = {}

    def image(case, h, w):
        pixels = gw.uniform(f"vit/image/{case}", (h * p, w * p, 3)).astype(np.float32)
        arrays[f"image.{case}"] = pixels
        return torch.from_numpy(pixels.transpose(2, 0, 1))[None]

    x = image("table", g, g)
    arrays["out.table"] = model(x).last_hidden_state[0].numpy()
    np.testing.assert_allclose(siglip_navit(model, arrays["image.table"], c),
                               arrays["out.table"], atol=1e-5)
    for h, w in ((3, 5), (2, 4), (1, 6)):
        case = f"extrapolate_{h}x{w}"
        image(case, h, w)
        arrays[f"out.{case}"] = siglip_navit(model, arrays[f"image.{case}"], c)
    for h, w in ((3, 5), (8, 4), (9, 10)):
        case = f"interpolate_{h}x{w}"
        x = image(case, h, w)
        arrays[f"out.{case}"] = model(x, interpolate_pos_encoding=True).last_hidden_state[0]
    save("vit", manifest, arrays)


# ------------------------------------------------------------------------------------------
# VAE.
# ------------------------------------------------------------------------------------------


def hf_vae(prefix: str):
    c = gw.VAE
    levels = len(c["block_out_channels"])
    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=c["block_out_channels"], layers_per_block=c["layers_per_block"],
        latent_channels=c["latent_channels"], norm_num_groups=c["norm_num_groups"],
        use_quant_conv=False, use_post_quant_conv=False).eval()
    return model, fill(model, prefix)


def make_vae() -> None:
    model, manifest = hf_vae("vae/")
    x = gw.uniform("vae/x", (1, 16, 12, 3)).astype(np.float32)
    z = 2 * gw.uniform("vae/z", (1, 8, 6, 16)).astype(np.float32)
    dist = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    image = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    save("vae", manifest, {"x": x, "z": z, "mean": nhwc(dist.mean),
                           "logvar": nhwc(dist.logvar), "image": nhwc(image)})


# ------------------------------------------------------------------------------------------
# Unified forward (BAGEL's `Bagel.forward` on a packed row).
# ------------------------------------------------------------------------------------------


def sincos_2d_table(dim: int, side: int) -> np.ndarray:
    """MAE's `get_2d_sincos_pos_embed` (BAGEL's `PositionEmbedding`): [side * side, dim]."""
    grid_h = np.arange(side, dtype=np.float32)
    grid_w = np.arange(side, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, side, side)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """BAGEL's `TimestepEmbedder.timestep_embedding` (t in [0, 1], not scaled)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def make_unified() -> None:
    c = gw.UNIFIED
    d, patch = c["llm"]["hidden_size"], c["latent_patch_size"]
    channels = c["vae"]["latent_channels"]
    token_dim = patch * patch * channels
    vocab = c["llm"]["vocab_size"]
    und, gen, manifest = hf_mot("unified/language_model.", vocab)
    siglip, entries = hf_siglip("unified/vit_model.", c["vit"])
    manifest |= entries
    vae, entries = hf_vae("unified/vae/")
    manifest |= entries
    heads = torch.nn.ModuleDict({
        "connector": torch.nn.ModuleDict({"fc1": torch.nn.Linear(c["vit"]["hidden_size"], d),
                                          "fc2": torch.nn.Linear(d, d)}),
        "time_embedder": torch.nn.ModuleDict({"mlp": torch.nn.Sequential(
            torch.nn.Linear(256, d), torch.nn.SiLU(), torch.nn.Linear(d, d))}),
        "vae2llm": torch.nn.Linear(token_dim, d),
        "llm2vae": torch.nn.Linear(d, token_dim),
    })
    manifest |= fill(heads, "unified/")

    down = 2 ** (len(c["vae"]["block_out_channels"]) - 1)
    cell = down * patch
    vit = c["vit"]
    batch = mixed_batch(num_gen=16, latent_cell=cell, vit_patch_size=vit["patch_size"],
                        vit_max_grid=vit["max_grid"], max_latent_size=c["max_latent_size"],
                        max_vit_patches=12, max_vae_images=2, seed=3)
    arrays = {f"batch.{k}": np.asarray(v) for k, v in vars(batch).items() if k != "num_und"}
    gh, gw_ = c["latent_grid"]

    # Latent tokens: each slot's canvas encoded by the VAE (posterior mean), scaled, patchified
    # in BAGEL's order (c, h, p, w, q -> h, w, p, q, c).
    images = torch.from_numpy(batch.vae_images.reshape(-1, *batch.vae_images.shape[2:]))
    mean = vae.encode(images.permute(0, 3, 1, 2)).latent_dist.mean
    z = c["vae"]["scaling_factor"] * (mean - c["vae"]["shift_factor"])
    z = z.reshape(z.shape[0], channels, gh, patch, gw_, patch)
    x0 = torch.einsum("nchpwq->nhwpqc", z).reshape(batch.batch_size, -1, token_dim)
    arrays["x0"] = x0.numpy()
    # Noisy slots hold x_t = (1 - t) x0 + t noise, as the trainer passes them.
    t = torch.from_numpy(batch.vae_timestep)
    noise = torch.from_numpy(gw.uniform("unified/noise", x0.shape).astype(np.float32))
    t_tok = t.repeat_interleave(gh * gw_, dim=1)[..., None]
    x_t = (1 - t_tok) * x0 + t_tok * noise
    arrays["x_t"] = x_t.numpy()

    # Input embeddings per token.
    emb = und.model.embed_tokens(torch.as_tensor(batch.text_ids, dtype=torch.long))
    vit_table = torch.from_numpy(sincos_2d_table(d, vit["max_grid"])).float()
    lat_table = torch.from_numpy(sincos_2d_table(d, c["max_latent_size"])).float()
    t_emb = heads["time_embedder"]["mlp"](timestep_embedding(t))  # [B, N, D]
    x = torch.zeros_like(emb)
    p = vit["patch_size"]
    for r in range(batch.batch_size):
        feats = torch.zeros(batch.vit_patches.shape[1], d)
        for image_id in np.unique(batch.vit_image_id[r][batch.vit_image_id[r] > 0]):
            slots = np.nonzero(batch.vit_image_id[r] == image_id)[0]
            h, w = batch.vit_grid_hw[r, slots[0]]
            pixels = batch.vit_patches[r, slots].reshape(h, w, p, p, 3)
            pixels = pixels.transpose(0, 2, 1, 3, 4).reshape(h * p, w * p, 3)
            out = torch.from_numpy(siglip_navit(siglip, np.ascontiguousarray(pixels), vit))
            conn = heads["connector"]
            feats[slots] = conn["fc2"](torch.nn.functional.gelu(conn["fc1"](out),
                                                                approximate="tanh"))
        for i in range(batch.length):
            m, pi, pp = batch.modality[r, i], batch.payload_index[r, i], batch.patch_pos[r, i]
            if m == 1:  # text
                x[r, i] = emb[r, i]
            elif m == 2:  # ViT
                x[r, i] = feats[pi] + vit_table[pp]
            elif m == 3:  # VAE
                x[r, i] = (heads["vae2llm"](x_t[r, pi]) + t_emb[r, pi // (gh * gw_)]
                           + lat_table[pp])
    mask = rule_mask(batch.doc_id, batch.order, batch.split_id, batch.noisy)
    hidden = mot_forward(und, gen, x, batch.position, mask, batch.num_und)
    arrays["logits"] = und.lm_head(hidden[:, :batch.num_und]).numpy()
    arrays["velocity"] = heads["llm2vae"](hidden[:, batch.num_und:]).numpy()
    save("unified", manifest, arrays)


if __name__ == "__main__":
    make_decoder()
    make_vit()
    make_vae()
    make_unified()
