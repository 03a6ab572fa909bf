"""HF Qwen2 / Qwen3 / BAGEL-MoT language-model weights <-> unijax `MoTDecoder` parameters.

HF keys (torch `Linear.weight` is [out, in]) and their unijax counterparts, per layer i:

  model.embed_tokens.weight [V, D]                     embed_tokens.embedding [V, D]
  model.layers.i.input_layernorm.weight [D]            layers.und.input_norm.scale [N, D]
  model.layers.i.self_attn.q_proj.weight [H*Dh, D]     layers.und.q_proj.kernel [N, D, H, Dh]
  model.layers.i.self_attn.q_proj.bias [H*Dh]          layers.und.q_proj.bias [N, H, Dh]
  model.layers.i.self_attn.{k,v}_proj.*                layers.und.{k,v}_proj.* (Hkv heads)
  model.layers.i.self_attn.{q,k}_norm.weight [Dh]      layers.und.{q,k}_norm.scale [N, Dh]
  model.layers.i.self_attn.o_proj.weight [D, H*Dh]     layers.und.o_proj.kernel [N, H, Dh, D]
  model.layers.i.post_attention_layernorm.weight       layers.und.post_attn_norm.scale
  model.layers.i.mlp.{gate,up}_proj.weight [M, D]      layers.und.mlp.{gate,up}_proj.kernel
                                                       [N, D, M]
  model.layers.i.mlp.down_proj.weight [D, M]           layers.und.mlp.down_proj.kernel [N, M, D]
  model.norm.weight                                    final_norm.und.scale
  lm_head.weight [V, D]                                lm_head.kernel [D, V]

The gen expert reads BAGEL's `_moe_gen` twins of the same keys (`self_attn.q_proj_moe_gen.*`,
`mlp_moe_gen.*`, `input_layernorm_moe_gen.weight`, `model.norm_moe_gen.weight`, ...). BAGEL
checkpoints nest everything under `language_model.` (pass `prefix="language_model."`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from flax import nnx

from unijax.convert.placement import place
from unijax.models.mot import DecoderConfig

GEN_SUFFIX = "_moe_gen"

# (path inside one expert's layer, HF key inside `model.layers.i.` with {g} = expert suffix,
#  layout kind). Kinds: "copy"; "heads_in": [n*Dh, D] -> [D, n, Dh]; "heads_bias": [n*Dh] ->
# [n, Dh]; "heads_out": [D, H*Dh] -> [H, Dh, D]; "transpose": [out, in] -> [in, out].
_LAYER_KEYS = (
    (("input_norm", "scale"), "input_layernorm{g}.weight", "copy"),
    (("q_proj", "kernel"), "self_attn.q_proj{g}.weight", "heads_in"),
    (("q_proj", "bias"), "self_attn.q_proj{g}.bias", "heads_bias"),
    (("k_proj", "kernel"), "self_attn.k_proj{g}.weight", "heads_in"),
    (("k_proj", "bias"), "self_attn.k_proj{g}.bias", "heads_bias"),
    (("v_proj", "kernel"), "self_attn.v_proj{g}.weight", "heads_in"),
    (("v_proj", "bias"), "self_attn.v_proj{g}.bias", "heads_bias"),
    (("q_norm", "scale"), "self_attn.q_norm{g}.weight", "copy"),
    (("k_norm", "scale"), "self_attn.k_norm{g}.weight", "copy"),
    (("o_proj", "kernel"), "self_attn.o_proj{g}.weight", "heads_out"),
    (("post_attn_norm", "scale"), "post_attention_layernorm{g}.weight", "copy"),
    (("mlp", "gate_proj", "kernel"), "mlp{g}.gate_proj.weight", "transpose"),
    (("mlp", "up_proj", "kernel"), "mlp{g}.up_proj.weight", "transpose"),
    (("mlp", "down_proj", "kernel"), "mlp{g}.down_proj.weight", "transpose"),
)


def _layer_keys(cfg: DecoderConfig):
    for path, key, kind in _LAYER_KEYS:
        if not cfg.qkv_bias and path[-1] == "bias":
            continue
        if not cfg.qk_norm and path[0] in ("q_norm", "k_norm"):
            continue
        yield path, key, kind


def _heads(cfg: DecoderConfig, path: tuple[str, ...]) -> int:
    return cfg.num_heads if path[0] in ("q_proj", "o_proj") else cfg.num_kv_heads


def _from_hf(w: np.ndarray, kind: str, heads: int, head_dim: int) -> np.ndarray:
    if kind == "heads_in":
        return w.T.reshape(w.shape[1], heads, head_dim)
    if kind == "heads_bias":
        return w.reshape(heads, head_dim)
    if kind == "heads_out":
        return w.T.reshape(heads, head_dim, w.shape[0])
    return w.T if kind == "transpose" else w


def _to_hf(w: np.ndarray, kind: str) -> np.ndarray:
    if kind == "heads_in":
        return w.reshape(w.shape[0], -1).T
    if kind == "heads_bias":
        return w.reshape(-1)
    if kind == "heads_out":
        return w.reshape(-1, w.shape[-1]).T
    return w.T if kind == "transpose" else w


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def decoder_params_from_hf(
    tensors: Mapping[str, np.ndarray],
    cfg: DecoderConfig,
    *,
    prefix: str = "",
    gen_from_und: bool = False,
) -> dict:
    """Converts HF-named tensors to the nested dict of `nnx.state(decoder, nnx.Param)`.

    Args:
      tensors: HF key -> array (torch tensors: pass `t.float().numpy()`).
      cfg: the decoder config the tensors are for.
      prefix: prepended to every HF key ("language_model." for BAGEL checkpoints).
      gen_from_und: with num_experts=2, fill the gen expert from the und weights instead of
        the `_moe_gen` keys (a plain Qwen2 checkpoint; BAGEL's `copy_init_moe`).

    Raises:
      KeyError: naming the missing HF key. ValueError: naming a key with the wrong shape.
    """

    def read(key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        full = prefix + key
        if full not in tensors:
            raise KeyError(f"HF weights: missing {full!r}")
        value = np.asarray(tensors[full])
        if shape is not None and value.shape != shape:
            raise ValueError(f"HF weights: {full!r} has shape {value.shape}, expected {shape}")
        return value

    out: dict = {}
    _set(out, ("embed_tokens", "embedding"),
         read("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)))
    experts = ["und"] + (["gen"] if cfg.num_experts == 2 else [])
    for expert in experts:
        suffix = GEN_SUFFIX if expert == "gen" and not gen_from_und else ""
        for path, key, kind in _layer_keys(cfg):
            layers = [_from_hf(read(f"model.layers.{i}.{key.format(g=suffix)}"), kind,
                               _heads(cfg, path), cfg.head_dim)
                      for i in range(cfg.num_layers)]
            _set(out, ("layers", expert, *path), np.stack(layers))
        _set(out, ("final_norm", expert, "scale"),
             read(f"model.norm{suffix}.weight", (cfg.hidden_size,)))
    if not cfg.tie_embeddings:
        _set(out, ("lm_head", "kernel"),
             read("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)).T)
    return out


def decoder_params_to_hf(params: Mapping, cfg: DecoderConfig, *, prefix: str = "") -> dict:
    """The inverse of `decoder_params_from_hf`: unijax nested params -> HF key -> array."""
    out = {prefix + "model.embed_tokens.weight": np.asarray(
        _get(params, ("embed_tokens", "embedding")))}
    experts = ["und"] + (["gen"] if cfg.num_experts == 2 else [])
    for expert in experts:
        suffix = GEN_SUFFIX if expert == "gen" else ""
        for path, key, kind in _layer_keys(cfg):
            stacked = np.asarray(_get(params, ("layers", expert, *path)))
            for i in range(cfg.num_layers):
                out[f"{prefix}model.layers.{i}.{key.format(g=suffix)}"] = _to_hf(stacked[i], kind)
        out[f"{prefix}model.norm{suffix}.weight"] = np.asarray(
            _get(params, ("final_norm", expert, "scale")))
    if not cfg.tie_embeddings:
        out[prefix + "lm_head.weight"] = np.asarray(_get(params, ("lm_head", "kernel"))).T
    return out


def load_decoder_params(model: nnx.Module, params: Mapping) -> None:
    """Writes converted params into a MoTDecoder in place (each Param keeps dtype/sharding).

    Raises:
      ValueError: naming a parameter whose shape differs, or one the params do not provide.
    """
    state = nnx.state(model, nnx.Param)
    target = nnx.to_pure_dict(state)

    def fill(dst: dict, src: Mapping, where: str) -> dict:
        filled = {}
        for key, value in dst.items():
            if key not in src:
                raise ValueError(f"load_decoder_params: no value for {where}{key}")
            if isinstance(value, dict):
                filled[key] = fill(value, src[key], f"{where}{key}.")
                continue
            new = np.asarray(src[key])
            if new.shape != value.shape:
                raise ValueError(f"load_decoder_params: {where}{key} has shape {new.shape}, "
                                 f"the model expects {value.shape}")
            # Keep the sharding the parameter was created with (e.g. under a mesh).
            filled[key] = place(new, value)
        return filled

    nnx.replace_by_pure_dict(state, fill(target, params, ""))
    nnx.update(model, state)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where one decoder parameter comes from: its HF keys (one per layer for stacked layer
    weights, in layer order) and the layout change (`_LAYER_KEYS` kinds)."""

    keys: tuple[str, ...]
    kind: str
    heads: int = 0
    head_dim: int = 0
    stacked: bool = False

    def convert(self, w: np.ndarray) -> np.ndarray:
        """One HF tensor -> its unijax layout (a view where numpy allows: nothing is read)."""
        return _from_hf(w, self.kind, self.heads, self.head_dim)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF shape of one key for a unijax parameter of `shape` (stacked: [N, ...])."""
        shape = tuple(shape[1:] if self.stacked else shape)
        if self.kind == "heads_in":  # [D, n, Dh] <- [n*Dh, D]
            return (shape[1] * shape[2], shape[0])
        if self.kind == "heads_bias":
            return (shape[0] * shape[1],)
        if self.kind == "heads_out":  # [H, Dh, D] <- [D, H*Dh]
            return (shape[2], shape[0] * shape[1])
        return shape[::-1] if self.kind == "transpose" else shape


def decoder_hf_sources(cfg: DecoderConfig, *, prefix: str = "",
                       gen_from_und: bool = False) -> dict[tuple[str, ...], HFTensor]:
    """Every `MoTDecoder` parameter path -> the HF tensors it is made of (what
    `decoder_params_from_hf` reads, so a loader can read, check and place one parameter at a
    time). Arguments as for `decoder_params_from_hf`."""
    out = {("embed_tokens", "embedding"): HFTensor((prefix + "model.embed_tokens.weight",),
                                                  "copy")}
    experts = ["und"] + (["gen"] if cfg.num_experts == 2 else [])
    for expert in experts:
        suffix = GEN_SUFFIX if expert == "gen" and not gen_from_und else ""
        for path, key, kind in _layer_keys(cfg):
            keys = tuple(f"{prefix}model.layers.{i}.{key.format(g=suffix)}"
                         for i in range(cfg.num_layers))
            out[("layers", expert, *path)] = HFTensor(keys, kind, _heads(cfg, path),
                                                      cfg.head_dim, stacked=True)
        out[("final_norm", expert, "scale")] = HFTensor((f"{prefix}model.norm{suffix}.weight",),
                                                        "copy")
    if not cfg.tie_embeddings:
        out[("lm_head", "kernel")] = HFTensor((prefix + "lm_head.weight",), "transpose")
    return out
