"""Tiny random BAGEL-7B-MoT checkpoint directories in the official layout (nothing downloaded).

  path = write_official(tmp_path / "bagel")                  # bf16 ema, fp32 FLUX ae, JSONs,
  path = write_official(dir, dtype="float32", qk_norm=False)  # a tokenizer.json
  names = ema_shapes(TINY)                                    # official name -> torch shape

Names, shapes and files follow BAGEL's `Bagel` state dict as `app.py` builds it (MoT layers
with `_moe_gen` twins, SigLIP with the 2-D Linear patch embedding and one layer fewer than
vit_config.json says, the fixed sin-cos tables in float32 then cast) and FLUX's `ae.safetensors`
(its own names). Written independently of `unijax.convert`'s name tables, which the tests
check against it.
"""

from __future__ import annotations

import json
import os
import zlib

import ml_dtypes
import numpy as np

from unijax.convert import safetensors_io

TINY = dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vit_hidden=32,
            vit_layers=2, vit_heads=2, vit_inter=64, patch=4, vit_side=6, latent_side=8,
            latent_patch=2, z=16, ae_ch=32, ae_mult=(1, 2), ae_blocks=1)
# BAGEL-7B-MoT's dims (its llm_config.json / vit_config.json, SigLIP less its last layer,
# FLUX's autoencoder): 1223 tensors, 14.61 B values in ema.safetensors.
RELEASED = {**TINY, "vocab": 152064, "hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4,
            "inter": 18944, "vit_hidden": 1152, "vit_layers": 26, "vit_heads": 16,
            "vit_inter": 4304, "patch": 14, "vit_side": 70, "latent_side": 64,
            "ae_ch": 128, "ae_mult": (1, 2, 4, 4), "ae_blocks": 2, "z": 16}
# A 1.8 GiB checkpoint (30 MoT layers of width 1024, MLP 4096, a 32k vocabulary): the
# streaming tests' and benchmarks/convert_memory.py's.
BIG = {**TINY, "vocab": 32768, "hidden": 1024, "layers": 30, "heads": 8, "kv_heads": 2,
       "inter": 4096}
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def ema_shapes(d: dict, *, qk_norm: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of BAGEL's `ema.safetensors` for dims `d`, in torch layouts."""
    D, hd = d["hidden"], d["hidden"] // d["heads"]
    q, kv, m = d["heads"] * hd, d["kv_heads"] * hd, d["inter"]
    out = {"language_model.model.embed_tokens.weight": (d["vocab"], D),
           "language_model.lm_head.weight": (d["vocab"], D)}
    for g in ("", "_moe_gen"):
        out[f"language_model.model.norm{g}.weight"] = (D,)
        for i in range(d["layers"]):
            pre = f"language_model.model.layers.{i}."
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                out[f"{pre}self_attn.{proj}{g}.weight"] = (rows, D)
                out[f"{pre}self_attn.{proj}{g}.bias"] = (rows,)
            out[f"{pre}self_attn.o_proj{g}.weight"] = (D, q)  # no bias
            if qk_norm:
                out[f"{pre}self_attn.q_norm{g}.weight"] = (hd,)
                out[f"{pre}self_attn.k_norm{g}.weight"] = (hd,)
            out[f"{pre}mlp{g}.gate_proj.weight"] = (m, D)
            out[f"{pre}mlp{g}.up_proj.weight"] = (m, D)
            out[f"{pre}mlp{g}.down_proj.weight"] = (D, m)
            out[f"{pre}input_layernorm{g}.weight"] = (D,)
            out[f"{pre}post_attention_layernorm{g}.weight"] = (D,)
    V, p = d["vit_hidden"], d["patch"]
    vit = "vit_model.vision_model."
    out[vit + "embeddings.patch_embedding.weight"] = (V, p * p * 3)
    out[vit + "embeddings.patch_embedding.bias"] = (V,)
    out[vit + "embeddings.position_embedding.weight"] = (d["vit_side"] ** 2, V)
    for i in range(d["vit_layers"]):
        pre = f"{vit}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{pre}self_attn.{proj}.weight"] = (V, V)
            out[f"{pre}self_attn.{proj}.bias"] = (V,)
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{pre}{norm}.weight"] = out[f"{pre}{norm}.bias"] = (V,)
        out[f"{pre}mlp.fc1.weight"] = (d["vit_inter"], V)
        out[f"{pre}mlp.fc1.bias"] = (d["vit_inter"],)
        out[f"{pre}mlp.fc2.weight"], out[f"{pre}mlp.fc2.bias"] = (V, d["vit_inter"]), (V,)
    out[vit + "post_layernorm.weight"] = out[vit + "post_layernorm.bias"] = (V,)
    latent = d["latent_patch"] ** 2 * d["z"]
    out.update({"connector.fc1.weight": (D, V), "connector.fc1.bias": (D,),
                "connector.fc2.weight": (D, D), "connector.fc2.bias": (D,),
                "time_embedder.mlp.0.weight": (D, 256), "time_embedder.mlp.0.bias": (D,),
                "time_embedder.mlp.2.weight": (D, D), "time_embedder.mlp.2.bias": (D,),
                "vae2llm.weight": (D, latent), "vae2llm.bias": (D,),
                "llm2vae.weight": (latent, D), "llm2vae.bias": (latent,),
                "vit_pos_embed.pos_embed": (d["vit_side"] ** 2, D),
                "latent_pos_embed.pos_embed": (d["latent_side"] ** 2, D)})
    return out


def ae_shapes(d: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of FLUX's `ae.safetensors` (its own names) for dims `d`."""
    out: dict[str, tuple[int, ...]] = {}
    ch, mult, blocks, z = d["ae_ch"], d["ae_mult"], d["ae_blocks"], d["z"]

    def conv(name, cout, cin, k=3):
        out[name + ".weight"], out[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[name + ".weight"] = out[name + ".bias"] = (c,)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cout, cin)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def mid(side, c):
        resnet(f"{side}.mid.block_1", c, c)
        norm(f"{side}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{side}.mid.attn_1.{proj}", c, c, 1)
        resnet(f"{side}.mid.block_2", c, c)

    conv("encoder.conv_in", ch, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin)
    mid("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", 2 * z, cin)
    conv("decoder.conv_in", cin, z)
    mid("decoder", cin)
    for i in reversed(range(len(mult))):
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", 3, cin)
    return out


def bagel_sincos(dim: int, side: int) -> np.ndarray:
    """BAGEL's `PositionEmbedding` table (MAE's 2D sin-cos: the first half encodes the column
    because of the swapped meshgrid), float64 math kept as float32."""
    cols, rows = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))

    def one_axis(pos, width):
        omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(cols, dim // 2), one_axis(rows, dim // 2)], 1).astype(
        np.float32)


def random_value(name: str, shape, dtype, seed: int) -> np.ndarray:
    """Deterministic per name: norm weights near 1, everything else small (so every weight
    changes the outputs)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noise = rng.standard_normal(shape, dtype=np.float32)
    norm = ("norm" in name or name.endswith(("layer_norm1.weight", "layer_norm2.weight")))
    value = 1.0 + 0.1 * noise if norm and name.endswith(".weight") else 0.05 * noise
    return value.astype(dtype)


def fast_value(name: str, shape, dtype, seed: int) -> np.ndarray:
    """Random finite bf16 bit patterns (|x| < 2), much cheaper than normal draws (for
    checkpoints of gigabytes); other dtypes as `random_value`."""
    if np.dtype(dtype) != np.dtype(ml_dtypes.bfloat16):
        return random_value(name, shape, dtype, seed)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.integers(0, 2**14, size=shape, dtype=np.uint16).view(ml_dtypes.bfloat16)


def weight_mib(directory) -> float:
    """MiB of a written directory's weight files (ema.safetensors + ae.safetensors)."""
    return sum(os.path.getsize(os.path.join(directory, f))
               for f in ("ema.safetensors", "ae.safetensors")) / 2**20


def _tokenizer_json(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red circle", "a blue square above a green circle"] * 20, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.save(path)


def write_official(directory, dims: dict | None = None, *, dtype: str = "bfloat16",
                   qk_norm: bool = True, seed: int = 0, tokenizer: bool = True,
                   value=random_value) -> str:
    """Writes a BAGEL checkpoint directory and returns its path.

    Args:
      dims: overrides of TINY.
      dtype: of ema.safetensors ("bfloat16" as released, or "float32"); ae.safetensors is
        float32, as FLUX's.
      qk_norm: whether the LLM has QK-norm weights (the release does).
      value: (name, shape, dtype, seed) -> array; the sin-cos tables are always BAGEL's.
    """
    d = {**TINY, **(dims or {})}
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    tables = {"vit_pos_embed.pos_embed": d["vit_side"], "latent_pos_embed.pos_embed":
              d["latent_side"]}
    for file, shapes, dt in (("ema.safetensors", ema_shapes(d, qk_norm=qk_norm), np_dtype),
                             ("ae.safetensors", ae_shapes(d), np.dtype(np.float32))):
        specs = [(name, dt, shape) for name, shape in shapes.items()]

        def arrays(specs=specs):
            for name, dtype_, shape in specs:
                if name in tables:
                    yield bagel_sincos(d["hidden"], tables[name]).astype(dtype_)
                else:
                    yield value(name, shape, dtype_, seed)

        safetensors_io.write_safetensors(os.path.join(directory, file), specs, arrays(),
                                         metadata={"format": "pt"})
    llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
           "hidden_size": d["hidden"], "intermediate_size": d["inter"],
           "num_attention_heads": d["heads"], "num_hidden_layers": d["layers"],
           "num_key_value_heads": d["kv_heads"], "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "vocab_size": d["vocab"], "tie_word_embeddings": False,
           "max_position_embeddings": 32768, "torch_dtype": dtype, "use_sliding_window": False}
    vit = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
           "hidden_size": d["vit_hidden"], "intermediate_size": d["vit_inter"],
           "num_attention_heads": d["vit_heads"], "num_hidden_layers": d["vit_layers"] + 1,
           "patch_size": d["patch"], "image_size": d["vit_side"] * d["patch"],
           "layer_norm_eps": 1e-6, "num_channels": 3, "attention_dropout": 0.0}
    for name, content in (("llm_config.json", llm), ("vit_config.json", vit)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)
    if tokenizer:
        _tokenizer_json(os.path.join(directory, "tokenizer.json"))
    return directory
