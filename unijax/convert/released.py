"""Released checkpoints -> the train state's weights: HF Qwen2 / Qwen2.5, HF SigLIP, FLUX VAE.

  load_llm(config, "/ckpt/Qwen2.5-7B-Instruct", weights)   # config.init.llm
  load_vit(config, "/ckpt/siglip-so400m-patch14-384", weights)
  load_vae(config, "/ckpt/FLUX.1-dev/ae.safetensors", weights)

`weights` (`Weights`, kept by `unijax.training.init`) holds the state's arrays by "/"-joined
parameter name; each loader checks everything it needs first (every tensor's presence and
header shape, the config.json fields that shapes cannot show, e.g. head counts) and raises one
`InitError` listing every problem with both names, then replaces the arrays one at a time,
each placed on the sharding of the array it replaces.

LLM: the und expert, the embedding, the final norm and the LM head come from the checkpoint
(`qwen2.decoder_hf_sources`); the gen expert is a copy of the und expert with
`config.model.llm.init_gen_from_und` (BAGEL's copy_init_moe), else reads the `_moe_gen` twins
when the checkpoint has them, else keeps its fresh init. A vocabulary smaller than the
config's (BAGEL adds special tokens) fills the first rows of the embedding and the LM head, the
other rows keep their fresh init. QK-norm scales a Qwen2 checkpoint lacks keep their fresh
init (ones), as in BAGEL. Tied checkpoints (`tie_word_embeddings`) give the LM head the
embedding. Each LLM parameter is read per device shard (`jax.make_array_from_callback` over the
memory-mapped file), so a host reads only the layers and slices its devices hold.
ViT and VAE (small) are converted whole on the host by `convert.vision`, then placed.
Hyperparameters that do not change shapes but do change the function (rope_theta, eps, the
VAE's latent scaling) are logged as warnings when they differ: the model runs the config's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Protocol

import jax
import ml_collections
import numpy as np
from absl import logging

from unijax import config as config_lib
from unijax.convert import qwen2, safetensors_io, vision
from unijax.models import mot


class InitError(ValueError):
    """An init source does not fit the model; the message lists every problem."""


class Weights(Protocol):
    """The train state's weights by "/"-joined name while sources replace them."""

    def __contains__(self, name: str) -> bool: ...

    def names(self, prefix: str) -> list[str]: ...

    def get(self, name: str) -> jax.Array: ...

    def set(self, name: str, value: jax.Array, source: str) -> None: ...


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def raise_problems(what: str, problems: list[str]) -> None:
    """Raises one InitError listing `problems` (if any) of the source `what`."""
    if problems:
        raise InitError(f"{what} does not fit the model ({len(problems)} problems):\n  - "
                        + "\n  - ".join(problems))


def _read_config_json(path: str, field: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise InitError(f"config.init.{field}={path!r} has no config.json")
    with open(file) as f:
        return json.load(f)


def _compare(hf: dict, pairs, where: str, problems: list[str], *, warn: bool = False) -> None:
    """Adds (or, with `warn`, logs) every (hf key, config field, value) that disagrees."""
    for key, field, value in pairs:
        if key in hf and hf[key] is not None and hf[key] != value:
            message = f"{where} config.json {key}={hf[key]!r} but {field}={value!r}"
            if warn:
                logging.warning("init: %s (the model computes with the config's value)", message)
            else:
                problems.append(message)


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
    return tuple(s.indices(d) for s, d in zip(index, shape))


def _place_blocks(block: Callable[[tuple[slice, ...]], np.ndarray], ref: jax.Array) -> jax.Array:
    """An array like `ref` (shape, dtype, sharding) whose device shards are `block(index)`:
    each distinct shard is computed once, on the host that holds it."""
    cache: dict[tuple, np.ndarray] = {}

    def shard(index):
        key = _index_key(index, ref.shape)
        if key not in cache:
            cache[key] = np.asarray(block(index)).astype(ref.dtype)
        return cache[key]

    return jax.make_array_from_callback(ref.shape, ref.sharding, shard)


# --- HF Qwen2 ---------------------------------------------------------------------------------

_VOCAB_AXIS = {("embed_tokens", "embedding"): 0, ("lm_head", "kernel"): 1}  # unijax layout


def load_llm(config: ml_collections.ConfigDict, path: str, weights: Weights) -> None:
    """The HF Qwen2 directory `path` (`config.init.llm`) into `weights`: the und expert, the
    embedding, the final norm and the LM head; the gen expert as the module docstring says.

    Raises:
      InitError: listing every missing or mis-shaped tensor and disagreeing config.json field.
    """
    cfg = mot.DecoderConfig.from_config(config)
    where = f"config.init.llm={path!r}"
    hf = _read_config_json(path, "llm")
    tensors = safetensors_io.open_safetensors(path)
    problems: list[str] = []
    if hf.get("model_type") not in config_lib.INIT_LLM_TYPES:
        problems.append(f"{where} config.json model_type={hf.get('model_type')!r} is not one of "
                        f"{config_lib.INIT_LLM_TYPES}")
    heads = int(hf.get("num_attention_heads", cfg.num_heads))
    _compare({**hf, "head_dim": hf.get("head_dim", hf.get("hidden_size", 0) // max(heads, 1))},
             [("hidden_size", "config.model.llm.hidden_size", cfg.hidden_size),
              ("num_hidden_layers", "config.model.llm.num_layers", cfg.num_layers),
              ("num_attention_heads", "config.model.llm.num_heads", cfg.num_heads),
              ("num_key_value_heads", "config.model.llm.num_kv_heads", cfg.num_kv_heads),
              ("head_dim", "config.model.llm.head_dim", cfg.head_dim),
              ("intermediate_size", "config.model.llm.intermediate_size",
               cfg.intermediate_size)], where, problems)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4
    _compare({"rope_theta": rope.get("rope_theta"), "rope_type": rope.get("rope_type"), **hf},
             [("rope_theta", "config.model.llm.rope_theta", cfg.rope_theta),
              ("rope_type", "unijax's RoPE", "default"),
              ("rms_norm_eps", "config.model.llm.rms_norm_eps", cfg.rms_norm_eps),
              ("hidden_act", "the SwiGLU MLP's activation", "silu")], where, problems, warn=True)
    copy_gen = cfg.num_experts == 2 and cfg.init_gen_from_und
    plan = qwen2.decoder_hf_sources(cfg)  # the gen expert from the `_moe_gen` twins
    has = lambda src: any(k in tensors for k in src.keys)
    has_gen = any(has(s) for p, s in plan.items() if "gen" in p[:2])
    has_qk_norm = any(has(s) for p, s in plan.items() if p[-2] in ("q_norm", "k_norm"))
    if cfg.qk_norm and not has_qk_norm:
        logging.info("init: %s has no QK-norm weights: they keep their fresh init", where)
    entries = {}
    for unijax_path, src in plan.items():
        if "gen" in unijax_path[:2] and (copy_gen or not has_gen):
            continue  # copied from und below, or fresh
        if unijax_path[-2] in ("q_norm", "k_norm") and not has_qk_norm:
            continue
        if unijax_path == ("lm_head", "kernel") and not has(src) and hf.get(
                "tie_word_embeddings"):
            src = qwen2.HFTensor(plan[("embed_tokens", "embedding")].keys, "transpose")
        entries["llm/" + "/".join(unijax_path)] = (unijax_path, src)

    for name, (unijax_path, src) in entries.items():
        if name not in weights:
            problems.append(f"{name} <- {src.keys[0]}: the model has no such parameter")
            continue
        want = src.hf_shape(weights.get(name).shape)
        for key in src.keys:
            if key not in tensors:
                problems.append(f"{name} <- {key}: missing from the checkpoint")
                continue
            got = tuple(tensors.shape(key))
            vocab = unijax_path in _VOCAB_AXIS and got[1:] == want[1:]
            if got != want and not (vocab and got[0] <= want[0]):
                problems.append(f"{name} <- {key}: checkpoint shape {got}, the model needs "
                                f"{want}" + (" (the checkpoint's vocabulary is larger than "
                                             f"config.model.llm.vocab_size={cfg.vocab_size})"
                                             if vocab else ""))
    raise_problems(where, problems)

    source = f"HF {hf.get('model_type', 'qwen2')} {path}"
    for name, (unijax_path, src) in entries.items():
        ref = weights.get(name)
        rows = tensors.shape(src.keys[0])[0] if unijax_path in _VOCAB_AXIS else None
        block = _stacked_block(src, tensors) if src.stacked else _single_block(src, tensors)
        if rows is not None and rows < ref.shape[_VOCAB_AXIS[unijax_path]]:
            block = _rows_then_fresh(block, rows, _VOCAB_AXIS[unijax_path], ref)
        weights.set(name, _place_blocks(block, ref), source)
    if copy_gen:
        for name in weights.names("llm/layers/gen/") + weights.names("llm/final_norm/gen/"):
            und = weights.get(name.replace("/gen/", "/und/", 1))
            weights.set(name, jax.device_put(und, weights.get(name).sharding, may_alias=False),
                        f"{source} (gen expert = und)")


def _single_block(src: qwen2.HFTensor, tensors):
    return lambda index: src.convert(tensors[src.keys[0]])[index]


def _stacked_block(src: qwen2.HFTensor, tensors):
    def block(index):
        return np.stack([src.convert(tensors[key])[index[1:]] for key in src.keys[index[0]]])
    return block


def _rows_then_fresh(block, rows: int, axis: int, fresh: jax.Array):
    """The checkpoint's first `rows` entries along `axis`, then `fresh`'s values (its shards
    on this host)."""
    shards = {_index_key(s.index, fresh.shape): s.data for s in fresh.addressable_shards}

    def mixed(index):
        start, stop, _ = index[axis].indices(fresh.shape[axis])
        parts = []
        if start < rows:
            parts.append(block(index[:axis] + (slice(start, min(stop, rows)),) + index[axis + 1:]))
        if stop > rows:
            own = np.asarray(shards[_index_key(index, fresh.shape)])
            parts.append(np.take(own, np.arange(max(start, rows) - start, stop - start), axis))
        return np.concatenate(parts, axis)

    return mixed


# --- HF SigLIP and the FLUX VAE ---------------------------------------------------------------


def _from_tree(weights: Weights, module: str, tree: dict, names: dict[str, tuple[str, ...]],
               shapes: Callable[[str], tuple], where: str, source: str) -> None:
    """Places a converted tree (numpy) into the `module/...` parameters, after checking that
    every one has a value of its shape (`names`: unijax name -> checkpoint names)."""
    flat = {f"{module}/{_path_name(p)}": leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    problems = []
    for name, keys in names.items():
        want, got = tuple(weights.get(name).shape), tuple(np.shape(flat.get(name, ())))
        if got != want:
            problems.append(f"{name} <- {keys[0]}: checkpoint shape {shapes(keys[0])} gives "
                            f"{got}, the model needs {want}")
    raise_problems(where, problems)
    for name in names:
        value = flat[name]
        weights.set(name, _place_blocks(lambda index, v=value: v[index], weights.get(name)),
                    source)


def load_vit(config: ml_collections.ConfigDict, path: str, weights: Weights) -> None:
    """The HF SigLIP directory `path` (`config.init.vit`) into the `vit/...` weights.

    Raises:
      InitError: as `load_llm`.
    """
    vit = config.model.vit
    where = f"config.init.vit={path!r}"
    hf = _read_config_json(path, "vit")
    problems: list[str] = []
    if hf.get("model_type") not in config_lib.INIT_VIT_TYPES:
        problems.append(f"{where} config.json model_type={hf.get('model_type')!r} is not one of "
                        f"{config_lib.INIT_VIT_TYPES}")
    hf = hf.get("vision_config", hf) if hf.get("model_type") == "siglip" else hf
    tensors = safetensors_io.open_safetensors(path)
    patch = int(hf.get("patch_size", vit.patch_size))
    _compare({**hf, "grid": hf.get("image_size", vit.max_grid * patch) // patch},
             [("hidden_size", "config.model.vit.hidden_size", vit.hidden_size),
              ("num_attention_heads", "config.model.vit.num_heads", vit.num_heads),
              ("intermediate_size", "config.model.vit.intermediate_size",
               vit.intermediate_size),
              ("patch_size", "config.model.vit.patch_size", vit.patch_size),
              ("grid", "config.model.vit.max_grid", vit.max_grid)], where, problems)
    _compare(hf, [("layer_norm_eps", "config.model.vit.layer_norm_eps", vit.layer_norm_eps),
                  ("hidden_act", "the ViT MLP's activation", "gelu_pytorch_tanh")],
             where, problems, warn=True)
    if int(hf.get("num_hidden_layers", vit.num_layers)) < vit.num_layers:
        problems.append(f"{where} config.json num_hidden_layers={hf['num_hidden_layers']} but "
                        f"config.model.vit.num_layers={vit.num_layers}")
    anchor = "embeddings.patch_embedding.weight"
    prefixes = [k[:-len(anchor)] for k in tensors if k.endswith(anchor)]
    prefix = prefixes[0] if len(prefixes) == 1 else "vision_model."
    names = {n: vision.vit_hf_names(n[len("vit/"):], num_layers=vit.num_layers, prefix=prefix)
             for n in weights.names("vit/")}
    problems += [f"{n} <- {k}: missing from the checkpoint"
                 for n, keys in names.items() for k in keys if k not in tensors]
    raise_problems(where, problems)
    tree = vision.vit_from_hf(tensors, num_heads=vit.num_heads, num_layers=vit.num_layers,
                              prefix=prefix)
    _from_tree(weights, "vit", tree, names, tensors.shape, where, f"HF SigLIP {path}")


def load_vae(config: ml_collections.ConfigDict, path: str, weights: Weights) -> None:
    """FLUX's `ae.safetensors` or a diffusers AutoencoderKL directory (`config.init.vae`) into
    the `vae/...` weights.

    Raises:
      InitError: as `load_llm`.
    """
    vae = config.model.vae
    where = f"config.init.vae={path!r}"
    levels = len(vae.channel_mult)
    problems: list[str] = []
    if os.path.isfile(path):  # FLUX's own names
        tensors = safetensors_io.open_safetensors(path)
        named = vision.flux_ae_to_diffusers_names(tensors)
        checkpoint_name = lambda n: vision.flux_ae_name(n, levels)
        source = f"FLUX autoencoder {path}"
    else:
        hf = _read_config_json(path, "vae")
        _compare(hf, [("_class_name", "the unified model's VAE", "AutoencoderKL"),
                      ("block_out_channels", "config.model.vae.base_channels x channel_mult",
                       [vae.base_channels * m for m in vae.channel_mult]),
                      ("layers_per_block", "config.model.vae.num_res_blocks", vae.num_res_blocks),
                      ("latent_channels", "config.model.vae.latent_channels", vae.latent_channels),
                      ("norm_num_groups", "config.model.vae.norm_groups", vae.norm_groups),
                      ("in_channels", "config.model.vae.in_channels", vae.in_channels),
                      ("use_quant_conv", "the FLUX layout (no quant convs)", False),
                      ("use_post_quant_conv", "the FLUX layout (no quant convs)", False)],
                 where, problems)
        _compare(hf, [("scaling_factor", "config.model.vae.scaling_factor", vae.scaling_factor),
                      ("shift_factor", "config.model.vae.shift_factor", vae.shift_factor)],
                 where, problems, warn=True)
        tensors = named = safetensors_io.open_safetensors(path)
        checkpoint_name = lambda n: n
        source = f"diffusers AutoencoderKL {path}"
    names = {n: (checkpoint_name(vision.vae_diffusers_name(n[len("vae/"):])),)
             for n in weights.names("vae/")}
    problems += [f"{n} <- {keys[0]}: missing from the checkpoint" for n, keys in names.items()
                 if vision.vae_diffusers_name(n[len("vae/"):]) not in named]
    raise_problems(where, problems)
    _from_tree(weights, "vae", vision.vae_from_diffusers(named), names, tensors.shape, where,
               source)
