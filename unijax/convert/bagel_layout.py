"""The released BAGEL checkpoint's files, names and layouts, and the unijax config they give.

A BAGEL-7B-MoT directory (ByteDance-Seed/BAGEL-7B-MoT; what `inferencer.py` / `app.py` load):
  ema.safetensors   every `Bagel` weight: `language_model.*` (Qwen2 MoT, `_moe_gen` twins of
                    every per-layer weight and of the final norm), `vit_model.vision_model.*`
                    (SigLIP, the patch embedding already a 2-D Linear), `connector.fc{1,2}`,
                    `time_embedder.mlp.{0,2}`, `vae2llm`, `llm2vae`, and the fixed 2D sin-cos
                    tables `vit_pos_embed.pos_embed` / `latent_pos_embed.pos_embed`
  ae.safetensors    the FLUX autoencoder under FLUX's own names (`encoder.down.0.block.0...`)
  llm_config.json   `Qwen2Config`;  vit_config.json  `SiglipVisionConfig`
  tokenizer files   Qwen2's (it already holds BAGEL's four special tokens)

What the JSON files do not say, BAGEL hard-codes where it builds the model (`app.py:38-60`,
the inference notebook; `modeling/autoencoder.py` `load_ae`). `RELEASE` holds those values;
where the checkpoint's shapes show them they are read from the shapes instead (so a model
trained with other `--max_latent_size` / patch settings converts too):
  qk_norm=True, tie_word_embeddings=False,      app.py (llm_config overrides); QK-norm is
  layer_module=Qwen2MoTDecoderLayer             taken from the q_norm tensors being present
  vit num_hidden_layers - 1                     app.py (`vit_select_layer=-2`: 26 of 27)
  vit_max_num_patch_per_side=70                 BagelConfig(...); rows of vit_pos_embed
  max_latent_size=64                            BagelConfig(...); rows of latent_pos_embed
  latent_patch_size=2                           BagelConfig(...); vae2llm's input width
  connector_act="gelu_pytorch_tanh"             BagelConfig(...); unijax's connector
  interpolate_pos=False, timestep_shift=1.0     BagelConfig defaults (bagel.py)
  FLUX AE: GroupNorm(32, eps 1e-6), scale 0.3611, shift 0.1159   load_ae; channels, levels
                                                and blocks from ae.safetensors' shapes

Every unijax parameter comes from official tensors by one of these layout changes (torch
Linear weights are [out, in], convs OIHW; unijax kernels are [in, out], convs HWIO):
  copy; transpose; heads_in [n*Dh, D] -> [D, n, Dh]; heads_bias [n*Dh] -> [n, Dh];
  heads_out [D, n*Dh] -> [n, Dh, D]; conv OIHW -> HWIO; conv1x1 [C, C, 1, 1] -> [C, C]^T.
Stacked parameters ([N, ...], scanned layers) are made of one official tensor per layer.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import shutil

import ml_collections
import numpy as np
from flax import nnx, traverse_util

from unijax.convert import qwen2, vision
from unijax.models import mot, unified
from unijax.models.embeddings import sincos_2d_table

EMA, AE = "ema", "ae"
FILES = {EMA: "ema.safetensors", AE: "ae.safetensors"}
LLM_JSON, VIT_JSON = "llm_config.json", "vit_config.json"
LLM_PREFIX, VIT_PREFIX = "language_model.", "vit_model.vision_model."
VIT_TABLE, LATENT_TABLE = "vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed"
RELEASE = dict(qk_norm=True, tie_word_embeddings=False, layer_module="Qwen2MoTDecoderLayer",
               vit_layers_dropped=1, vit_max_num_patch_per_side=70, max_latent_size=64,
               latent_patch_size=2, connector_act="gelu_pytorch_tanh", interpolate_pos=False,
               timestep_shift=1.0)
FLUX_AE = dict(norm_groups=32, norm_eps=1e-6, scaling_factor=0.3611, shift_factor=0.1159)
# unijax module -> BAGEL module, for the small Linear layers outside the LLM and the ViT.
_LINEARS = {"connector/fc1": "connector.fc1", "connector/fc2": "connector.fc2",
            "time_embedder/fc1": "time_embedder.mlp.0", "time_embedder/fc2": "time_embedder.mlp.2",
            "vae2llm": "vae2llm", "llm2vae": "llm2vae"}
_LEAF = {"kernel": "weight", "bias": "bias"}
OFFICIAL_META = "official.json"  # in a converted unijax directory: the JSONs and dtypes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one unijax parameter comes from: the official file, its tensors (one per layer
    when `stacked`, in layer order) and the layout change."""

    file: str
    keys: tuple[str, ...]
    kind: str
    stacked: bool = False

    def official_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each official tensor for a unijax parameter of `shape`."""
        s = tuple(shape[1:] if self.stacked else shape)
        return {"copy": lambda: s, "transpose": lambda: s[::-1],
                "heads_in": lambda: (s[1] * s[2], s[0]) if len(s) == 3 else None,
                "heads_bias": lambda: (math.prod(s),),
                "heads_out": lambda: (s[2], s[0] * s[1]) if len(s) == 3 else None,
                "conv": lambda: (s[3], s[2], s[0], s[1]) if len(s) == 4 else None,
                "conv1x1": lambda: (s[1], s[0], 1, 1) if len(s) == 2 else None}[self.kind]()

    def to_unijax(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """One official tensor -> its unijax layout of `shape` (one layer's, when stacked)."""
        kind = self.kind
        if kind in ("heads_in", "heads_out", "transpose"):
            return w.T.reshape(shape)
        if kind == "heads_bias":
            return w.reshape(shape)
        if kind == "conv":
            return w.transpose(2, 3, 1, 0)
        if kind == "conv1x1":
            return w.reshape(w.shape[0], w.shape[1]).T
        return w

    def to_official(self, w: np.ndarray) -> np.ndarray:
        """One unijax array (one layer's, when stacked) -> the official tensor."""
        kind = self.kind
        if kind == "conv":
            return w.transpose(3, 2, 0, 1)
        if kind == "conv1x1":
            return w.T[:, :, None, None]
        return qwen2._to_hf(w, kind)  # the LLM kinds: the Qwen2 converter's own inverse


# --- the config ---------------------------------------------------------------------------


def _count(names, pattern: str) -> int:
    return len({m.group(1) for n in names if (m := re.match(pattern, n))})


def _side(rows: int, what: str, problems: list[str]) -> int:
    side = math.isqrt(rows)
    if side * side != rows:
        problems.append(f"{what} has {rows} rows, not a square grid of positions")
    return side


def build_config(llm: dict, vit: dict, base: ml_collections.ConfigDict, *, ema=None, ae=None,
                 dtype: str | None = None) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The unijax config of a BAGEL checkpoint, and the problems found building it.

    Args:
      llm, vit: the contents of llm_config.json and vit_config.json.
      base: the config to fill (its data / train / sample sections are kept; the model
        section's shapes are replaced).
      ema, ae: the opened safetensors files (header shapes are read, no data), or None to use
        the release's values for what only the shapes show.
      dtype: the parameter dtype; default that of ema's embedding (bfloat16 for the release).
    """
    problems: list[str] = []
    c = copy.deepcopy(base)
    c.unlock()
    m = c.model
    heads = int(llm["num_attention_heads"])
    rope = llm.get("rope_parameters") or llm.get("rope_scaling") or {}
    lm = m.llm
    lm.vocab_size = int(llm["vocab_size"])
    lm.hidden_size = int(llm["hidden_size"])
    lm.num_layers = int(llm["num_hidden_layers"])
    lm.num_heads = heads
    lm.num_kv_heads = int(llm.get("num_key_value_heads") or heads)
    lm.head_dim = int(llm.get("head_dim") or lm.hidden_size // heads)
    lm.intermediate_size = int(llm["intermediate_size"])
    lm.rope_theta = float(llm.get("rope_theta", rope.get("rope_theta", 10_000.0)))
    lm.rms_norm_eps = float(llm.get("rms_norm_eps", 1e-6))
    lm.qkv_bias = True  # Qwen2's q/k/v projections always have biases
    lm.tie_embeddings = RELEASE["tie_word_embeddings"]
    lm.num_experts = 2  # Qwen2MoTDecoderLayer: every per-layer weight once per expert
    lm.init_gen_from_und = False  # the gen expert has its own weights (`_moe_gen`)
    lm.freeze_und_expert = False
    lm.qk_norm = RELEASE["qk_norm"] if ema is None else (
        f"{LLM_PREFIX}model.layers.0.self_attn.q_norm.weight" in ema)
    if llm.get("hidden_act", "silu") != "silu":
        problems.append(f"{LLM_JSON} hidden_act={llm['hidden_act']!r}: the MoT MLP is SwiGLU "
                        "(silu)")
    if llm.get("layer_module", RELEASE["layer_module"]) != RELEASE["layer_module"]:
        problems.append(f"{LLM_JSON} layer_module={llm['layer_module']!r}: only "
                        f"{RELEASE['layer_module']} (every weight per expert) is supported")
    if ema is not None and (key := f"{LLM_PREFIX}model.embed_tokens.weight") in ema:
        dtype = dtype or str(ema.dtype(key))

    v = m.vit
    patch = int(vit.get("patch_size", 14))
    v.hidden_size = int(vit["hidden_size"])
    v.num_layers = int(vit["num_hidden_layers"]) - RELEASE["vit_layers_dropped"]
    v.num_heads = int(vit["num_attention_heads"])
    v.intermediate_size = int(vit["intermediate_size"])
    v.patch_size = patch
    v.layer_norm_eps = float(vit.get("layer_norm_eps", 1e-6))
    v.position_mode = "interpolate" if RELEASE["interpolate_pos"] else "extrapolate"
    v.max_grid = RELEASE["vit_max_num_patch_per_side"]
    if ema is not None and VIT_TABLE in ema:
        v.max_grid = _side(ema.shape(VIT_TABLE)[0], VIT_TABLE, problems)
    if int(vit.get("image_size", v.max_grid * patch)) // patch != v.max_grid:
        problems.append(f"{VIT_JSON} image_size={vit['image_size']} / patch_size={patch} gives "
                        f"a SigLIP position table of side {vit['image_size'] // patch}, but "
                        f"BAGEL's vit_pos_embed side (vit_max_num_patch_per_side) is "
                        f"{v.max_grid}: unijax uses one side (config.model.vit.max_grid)")
    if vit.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        problems.append(f"{VIT_JSON} hidden_act={vit['hidden_act']!r}: the ViT MLP is "
                        "gelu_pytorch_tanh")

    m.max_latent_size = RELEASE["max_latent_size"]
    if ema is not None and LATENT_TABLE in ema:
        m.max_latent_size = _side(ema.shape(LATENT_TABLE)[0], LATENT_TABLE, problems)
    m.vae = _vae_config(m.vae, ae)
    m.latent_channels = int(m.vae.latent_channels)
    m.latent_patch_size = RELEASE["latent_patch_size"]
    if ema is not None and "vae2llm.weight" in ema:
        width = ema.shape("vae2llm.weight")[1]
        m.latent_patch_size = math.isqrt(width // m.latent_channels)
        if m.latent_patch_size ** 2 * m.latent_channels != width:
            problems.append(f"vae2llm.weight takes {width} features, not p*p*{m.latent_channels}"
                            " (latent patch p x p of the VAE's channels)")
    if dtype is not None:
        m.param_dtype = str(np.dtype(dtype))
    c.train.timestep_shift = RELEASE["timestep_shift"]
    # The largest images the position tables cover (the 7B: 980 px ViT, 1024 px VAE).
    vit_px = v.max_grid * patch
    vae_px = m.max_latent_size * m.latent_patch_size * 2 ** (len(m.vae.channel_mult) - 1)
    c.data.vit_image_size = min(int(c.data.vit_image_size), vit_px)
    c.data.vit_min_image_size = min(int(c.data.vit_min_image_size), vit_px)
    c.data.vae_image_size = min(int(c.data.vae_image_size), vae_px)
    c.data.vae_min_image_size = min(int(c.data.vae_min_image_size), vae_px)
    return c, problems


def _vae_config(vae: ml_collections.ConfigDict | None, ae) -> ml_collections.ConfigDict:
    """FLUX's autoencoder: `load_ae`'s fixed parameters, the shapes read from `ae` if given."""
    v = ml_collections.ConfigDict() if vae is None else copy.deepcopy(vae)
    v.update(FLUX_AE)
    v.sample_posterior = True  # BAGEL encodes by sampling the posterior
    if ae is None:
        v.update(in_channels=3, latent_channels=16, base_channels=128, channel_mult=(1, 2, 4, 4),
                 num_res_blocks=2)
        return v
    conv_in = ae.shape("encoder.conv_in.weight")
    levels = _count(ae, r"encoder\.down\.(\d+)\.")
    v.in_channels, v.base_channels = int(conv_in[1]), int(conv_in[0])
    v.latent_channels = int(ae.shape("encoder.conv_out.weight")[0]) // 2
    v.channel_mult = tuple(int(ae.shape(f"encoder.down.{i}.block.0.conv1.weight")[0])
                           // v.base_channels for i in range(levels))
    v.num_res_blocks = _count(ae, r"encoder\.down\.0\.block\.(\d+)\.")
    return v


# --- names --------------------------------------------------------------------------------


def _vit_kind(name: str) -> str:
    parts = name.split("/")
    module, leaf = (parts[-2] if len(parts) > 1 else ""), parts[-1]
    if module in ("q_proj", "k_proj", "v_proj"):
        return "heads_in" if leaf == "kernel" else "heads_bias"
    if module == "out_proj" and leaf == "kernel":
        return "heads_out"
    return "transpose" if leaf == "kernel" else "copy"


def plan(config: ml_collections.ConfigDict, shapes: dict[str, tuple[int, ...]]
         ) -> tuple[dict[str, Source], list[str]]:
    """Every unijax parameter ("/"-joined name -> shape, `shapes`) -> its official Source,
    and the names no rule maps (a model BAGEL has no counterpart for)."""
    out: dict[str, Source] = {}
    cfg = mot.DecoderConfig.from_config(config)
    for path, src in qwen2.decoder_hf_sources(cfg, prefix=LLM_PREFIX).items():
        out["llm/" + "/".join(path)] = Source(EMA, src.keys, src.kind, src.stacked)
    levels = len(config.model.vae.channel_mult) if config.model.vae is not None else 0
    vit_layers = config.model.vit.num_layers if config.model.vit is not None else 0
    for name, shape in shapes.items():
        group, rest = name.split("/", 1)
        if group == "vit":
            keys = vision.vit_hf_names(rest, num_layers=vit_layers, prefix=VIT_PREFIX)
            out[name] = Source(EMA, keys, _vit_kind(rest), rest.startswith("layers/"))
        elif group == "vae":
            key = vision.flux_ae_name(vision.vae_diffusers_name(rest), levels)
            kind = "copy" if not rest.endswith("kernel") else (
                "conv" if len(shape) == 4 else "conv1x1")
            out[name] = Source(AE, (key,), kind)
        elif (module := name.rsplit("/", 1)[0]) in _LINEARS:
            leaf = name.rsplit("/", 1)[1]
            out[name] = Source(EMA, (f"{_LINEARS[module]}.{_LEAF[leaf]}",),
                               "transpose" if leaf == "kernel" else "copy")
    unmapped = sorted(set(shapes) - set(out))
    return {n: s for n, s in out.items() if n in shapes}, unmapped


def table_sides(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The sin-cos tables BAGEL stores and the side of each (unijax computes them)."""
    out = {LATENT_TABLE: int(config.model.max_latent_size)}
    if config.model.vit is not None:
        out[VIT_TABLE] = int(config.model.vit.max_grid)
    return out


def sincos_table(dim: int, side: int, dtype) -> np.ndarray:
    """BAGEL's stored table: computed in float64, kept as float32 (`PositionEmbedding`), saved
    in `dtype`."""
    return sincos_2d_table(dim, side).astype(np.float32).astype(dtype)


def abstract_model(config: ml_collections.ConfigDict):
    """(graphdef, state, {name: path}, {name: ShapeDtypeStruct}, trainable paths) of the
    unified model, from shapes only ("/"-joined names, e.g. `llm/lm_head/kernel`)."""
    model = nnx.eval_shape(lambda: unified.UnifiedModel(config, rngs=nnx.Rngs(0)))
    trainable = set(traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(
        model, unified.trainable_filter(config)))))
    graphdef, state = nnx.split(model)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    paths = {"/".join(map(str, p)): p for p in flat}
    return graphdef, state, paths, {n: flat[p] for n, p in paths.items()}, trainable


def copy_tokenizer(src: str, dst: str) -> str | None:
    """Copies the tokenizer files of `src` into `dst`; returns what `config.data.tokenizer`
    should name (tokenizer.json loads with `tokenizers` alone, a folder needs transformers),
    or None when `src` has none."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if not names:
        return None
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
    return os.path.join(dst, "tokenizer.json") if "tokenizer.json" in names else dst


# --- checks -------------------------------------------------------------------------------


def problems(config, sources: dict[str, Source], shapes: dict[str, tuple[int, ...]],
             files: dict, *, check_tables: bool = True) -> list[str]:
    """Every missing, mis-shaped and unmapped official tensor, and every stored sin-cos table
    that differs from the computed one (with the largest difference), both names given."""
    out, used = [], {file: set() for file in files}
    for name, src in sources.items():
        tensors = files.get(src.file)
        want = src.official_shape(shapes[name])
        for key in src.keys:
            if tensors is None or key not in tensors:
                out.append(f"{name} <- {FILES[src.file]}:{key}: missing from the checkpoint")
                continue
            used[src.file].add(key)
            got = tuple(tensors.shape(key))
            if got != want:
                out.append(f"{name} <- {FILES[src.file]}:{key}: checkpoint shape {got}, the "
                           f"model needs {want}")
    ema = files.get(EMA)
    dim = int(config.model.llm.hidden_size)
    for key, side in table_sides(config).items():
        if ema is None or key not in ema:
            out.append(f"(computed sin-cos table) <- {FILES[EMA]}:{key}: missing from the "
                       "checkpoint")
            continue
        used[EMA].add(key)
        if tuple(ema.shape(key)) != (side * side, dim):
            out.append(f"(computed sin-cos table) <- {FILES[EMA]}:{key}: checkpoint shape "
                       f"{tuple(ema.shape(key))}, the model needs {(side * side, dim)}")
        elif check_tables:
            stored = ema.read(key)
            expected = sincos_table(dim, side, stored.dtype)
            diff = float(np.max(np.abs(stored.astype(np.float32) - expected.astype(np.float32))))
            allowed = float(np.finfo(stored.dtype).eps)  # one unit in the last place at |x| <= 1
            if not diff <= allowed:
                out.append(f"(computed sin-cos table, side {side}) <- {FILES[EMA]}:{key}: the "
                           f"stored table differs from the 2D sin-cos table unijax computes: "
                           f"max |difference| {diff:.4g} > {allowed:.4g}")
    for file, tensors in files.items():
        for key in sorted(set(tensors) - used[file]):
            out.append(f"{FILES[file]}:{key} {tuple(tensors.shape(key))}: no unijax parameter "
                       "takes it")
    return out
