"""Vision-tower weights from external checkpoints into unijax modules.

  tree = vit_from_hf(siglip_state_dict, num_heads=16, prefix="vision_model.")
  load_tree(vit_module, tree, what="vit")
  load_tree(vae_module, vae_from_diffusers(autoencoder_kl_state_dict), what="vae")
  load_tree(vae_module, vae_from_flux_ae(ae_safetensors_state_dict), what="vae")
  vit_hf_names("layers/mlp/fc1/kernel", num_layers=2)   # the HF names a parameter is read from
  vae_diffusers_name("encoder/conv_in/kernel")           # "encoder.conv_in.weight"
  flux_ae_name(name, num_levels) / diffusers_to_flux_ae(sd, num_levels)   # and FLUX's names

State dicts are plain mappings name -> array (numpy, or anything `np.asarray` accepts, e.g. CPU
torch tensors via `.numpy()`). Trees are nested dicts shaped like
`nnx.state(module, ...).to_pure_dict()`; `load_tree` checks that the key sets and shapes match
exactly and names every difference.

Layouts: torch Linear weights are [out, in] (unijax: [in, out], attention projections split
into [in, heads, head_dim]); torch convs are [out, in, kh, kw] (unijax: HWIO). SigLIP's patch
conv [D, 3, p, p] becomes a Linear over (row-in-patch, col-in-patch, channel), as BAGEL does;
BAGEL checkpoints already hold that 2-D [D, p*p*3] weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from unijax.convert.placement import place
from unijax.models.vae import FrozenParam


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return tree


def load_tree(module: nnx.Module, tree: Mapping, *, what: str) -> None:
    """Copies a nested dict of arrays into `module`'s parameters (nnx.Param and FrozenParam).

    Values are cast to each parameter's dtype and placed with its sharding.

    Raises:
      ValueError: listing missing and unexpected names and every shape mismatch.
    """
    state = nnx.state(module, (nnx.Param, FrozenParam))
    expected = _flatten(nnx.to_pure_dict(state))
    given = _flatten(tree)
    problems = []
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    for name in sorted(set(expected) & set(given)):
        if tuple(np.shape(given[name])) != tuple(expected[name].shape):
            problems.append(f"{name}: shape {tuple(np.shape(given[name]))}, module has "
                            f"{tuple(expected[name].shape)}")
    if problems:
        raise ValueError(f"{what}: checkpoint does not fit the module: " + "; ".join(problems))
    placed = {name: place(given[name], ref) for name, ref in expected.items()}
    nnx.replace_by_pure_dict(state, _unflatten(placed))
    nnx.update(module, state)


# ------------------------------------------------------------------------------------------
# SigLIP (HF `SiglipVisionModel`, BAGEL `vit_model`).
# ------------------------------------------------------------------------------------------


_HF_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def vit_hf_names(name: str, *, num_layers: int, prefix: str = "vision_model.") -> tuple[str, ...]:
    """The HF SigLIP tensors a unijax ViT parameter ("/"-joined path inside the ViT, e.g.
    `layers/mlp/fc1/kernel`) is made of by `vit_from_hf`: one per layer for `layers/...`."""
    *parts, leaf = name.split("/")
    leaf = _HF_LEAF.get(leaf, leaf)
    if parts[:1] == ["layers"]:
        rest = ".".join([*parts[1:], leaf])
        return tuple(f"{prefix}encoder.layers.{i}.{rest}" for i in range(num_layers))
    if parts[:1] == ["patch_embedding"]:
        return (f"{prefix}embeddings.patch_embedding.{leaf}",)
    if not parts and leaf == "position_embedding":
        return (f"{prefix}embeddings.position_embedding.weight",)
    return (prefix + ".".join([*parts, leaf]),)


def _linear(sd, name: str) -> dict:
    return {"kernel": _np(sd[name + ".weight"]).T, "bias": _np(sd[name + ".bias"])}


def _norm(sd, name: str) -> dict:
    return {"scale": _np(sd[name + ".weight"]), "bias": _np(sd[name + ".bias"])}


def vit_from_hf(state_dict: Mapping, *, num_heads: int, num_layers: int | None = None,
                prefix: str | None = None) -> dict:
    """HF SigLIP vision weights -> the tree of `unijax.models.vit.VisionTransformer`.

    Args:
      state_dict: SigLIP vision weights with HF names (`[prefix]encoder.layers.{i}...`); the
        pooling head, if present, is ignored.
      num_heads: attention heads (to split q/k/v/out projections per head).
      num_layers: layers to take (default: all in the checkpoint; BAGEL uses the first 26 of
        SigLIP so400m's 27).
      prefix: the name prefix before `embeddings.` / `encoder.` / `post_layernorm.`: e.g.
        `vision_model.` (HF checkpoints) or `vit_model.vision_model.` (BAGEL's
        `ema.safetensors`); default: found from the patch embedding's name.
    """
    if prefix is None:
        anchor = "embeddings.patch_embedding.weight"
        found_prefix = [k[:-len(anchor)] for k in state_dict if k.endswith(anchor)]
        if len(found_prefix) != 1:
            raise ValueError(f"vit_from_hf: expected one '*{anchor}', found {found_prefix}")
        prefix = found_prefix[0]
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"vit_from_hf: no weight name starts with prefix {prefix!r}")
    found = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    n = len(found) if num_layers is None else num_layers
    if n > len(found):
        raise ValueError(f"vit_from_hf: num_layers={n} but the checkpoint has {len(found)}")
    patch = _np(sd["embeddings.patch_embedding.weight"])
    if patch.ndim == 4:  # conv [D, C, p, q] -> Linear over (p, q, C)
        patch = patch.transpose(0, 2, 3, 1).reshape(patch.shape[0], -1)
    dim = patch.shape[0]
    head_dim = dim // num_heads

    def layer(i: int) -> dict:
        pre = f"encoder.layers.{i}."
        attn = {}
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = _np(sd[pre + f"self_attn.{proj}.weight"])
            b = _np(sd[pre + f"self_attn.{proj}.bias"])
            attn[proj] = {"kernel": w.T.reshape(dim, num_heads, head_dim),
                          "bias": b.reshape(num_heads, head_dim)}
        w = _np(sd[pre + "self_attn.out_proj.weight"])
        attn["out_proj"] = {"kernel": w.T.reshape(num_heads, head_dim, dim),
                            "bias": _np(sd[pre + "self_attn.out_proj.bias"])}
        return {"layer_norm1": _norm(sd, pre + "layer_norm1"), "self_attn": attn,
                "layer_norm2": _norm(sd, pre + "layer_norm2"),
                "mlp": {"fc1": _linear(sd, pre + "mlp.fc1"), "fc2": _linear(sd, pre + "mlp.fc2")}}

    layers = [layer(i) for i in range(n)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return {
        "patch_embedding": {"kernel": patch.T,
                            "bias": _np(sd["embeddings.patch_embedding.bias"])},
        "position_embedding": _np(sd["embeddings.position_embedding.weight"]),
        "layers": stacked,
        "post_layernorm": _norm(sd, "post_layernorm"),
    }


# ------------------------------------------------------------------------------------------
# FLUX autoencoder (diffusers `AutoencoderKL` names, or the original `ae.safetensors` names).
# ------------------------------------------------------------------------------------------


def _conv(sd, name: str) -> dict:
    w = _np(sd[name + ".weight"])
    if w.ndim == 2:  # a 1x1 conv stored as Linear
        w = w[:, :, None, None]
    return {"kernel": w.transpose(2, 3, 1, 0), "bias": _np(sd[name + ".bias"])}


def _attn_linear(sd, name: str) -> dict:
    w = _np(sd[name + ".weight"])
    return {"kernel": w.reshape(w.shape[0], w.shape[1]).T, "bias": _np(sd[name + ".bias"])}


def _resnet(sd, name: str) -> dict:
    out = {"norm1": _norm(sd, name + ".norm1"), "conv1": _conv(sd, name + ".conv1"),
           "norm2": _norm(sd, name + ".norm2"), "conv2": _conv(sd, name + ".conv2")}
    if name + ".conv_shortcut.weight" in sd:
        out["conv_shortcut"] = _conv(sd, name + ".conv_shortcut")
    return out


def _count(sd, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def _mid(sd, name: str) -> dict:
    att = name + ".attentions.0."
    return {"resnets": {0: _resnet(sd, name + ".resnets.0"), 1: _resnet(sd, name + ".resnets.1")},
            "attention": {"group_norm": _norm(sd, att + "group_norm"),
                          **{p: _attn_linear(sd, att + p) for p in ("to_q", "to_k", "to_v")},
                          "to_out": _attn_linear(sd, att + "to_out.0")}}


def _levels(sd, side: str, kind: str, sampler: str) -> dict:
    out = {}
    for i in range(_count(sd, rf"{side}\.{kind}\.(\d+)\.")):
        pre = f"{side}.{kind}.{i}."
        resnets = {j: _resnet(sd, pre + f"resnets.{j}")
                   for j in range(_count(sd, re.escape(pre) + r"resnets\.(\d+)\."))}
        level = {"resnets": resnets}
        if pre + f"{sampler}.0.conv.weight" in sd:
            level["sampler"] = _conv(sd, pre + f"{sampler}.0.conv")
        out[i] = level
    return out


def vae_from_diffusers(state_dict: Mapping) -> dict:
    """diffusers `AutoencoderKL` weights (FLUX layout, no quant convs) -> the tree of
    `unijax.models.vae.AutoencoderKL`."""
    sd = dict(state_dict)
    quant = [k for k in sd if "quant_conv" in k]
    if quant:
        raise ValueError(f"vae_from_diffusers: the FLUX layout has no quant convs, got {quant}")
    tree = {}
    for side, kind, sampler in (("encoder", "down_blocks", "downsamplers"),
                                ("decoder", "up_blocks", "upsamplers")):
        tree[side] = {"conv_in": _conv(sd, f"{side}.conv_in"),
                      kind: _levels(sd, side, kind, sampler),
                      "mid_block": _mid(sd, f"{side}.mid_block"),
                      "norm_out": _norm(sd, f"{side}.conv_norm_out"),
                      "conv_out": _conv(sd, f"{side}.conv_out")}
    return tree


def flux_ae_to_diffusers_names(state_dict: Mapping) -> dict:
    """Renames the original FLUX `ae.safetensors` (LDM-style) keys to diffusers' names.

    `encoder.down.{i}.block.{j}` -> `encoder.down_blocks.{i}.resnets.{j}`, `nin_shortcut` ->
    `conv_shortcut`, `mid.block_{1,2}` -> `mid_block.resnets.{0,1}`, `mid.attn_1.{norm,q,k,v,
    proj_out}` -> `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`, `norm_out` ->
    `conv_norm_out`; decoder levels are reversed (`decoder.up.{i}` is `up_blocks.{n-1-i}`).
    """
    num_up = _count(state_dict, r"decoder\.up\.(\d+)\.")
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for key, value in state_dict.items():
        new = key
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.",
                     r"encoder.down_blocks.\1.downsamplers.0.", new)
        m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", new)
        if m:
            level = num_up - 1 - int(m.group(1))
            part = "resnets." if m.group(2) == "block" else "upsamplers.0."
            new = f"decoder.up_blocks.{level}.{part}{m.group(3)}"
        new = re.sub(r"\.mid\.block_(\d)\.",
                     lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", new)
        new = re.sub(r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
                     lambda m: f".mid_block.attentions.0.{attn[m.group(1)]}.", new)
        new = new.replace("nin_shortcut", "conv_shortcut")
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", new)
        out[new] = value
    return out


def vae_diffusers_name(name: str) -> str:
    """The diffusers `AutoencoderKL` tensor a unijax VAE parameter ("/"-joined path inside
    the VAE, e.g. `encoder/down_blocks/0/sampler/kernel`) is read from by `vae_from_diffusers`."""
    *parts, leaf = name.split("/")
    out = ".".join([*parts, _HF_LEAF.get(leaf, leaf)])
    out = re.sub(r"^encoder\.down_blocks\.(\d+)\.sampler\.",
                 r"encoder.down_blocks.\1.downsamplers.0.conv.", out)
    out = re.sub(r"^decoder\.up_blocks\.(\d+)\.sampler\.",
                 r"decoder.up_blocks.\1.upsamplers.0.conv.", out)
    out = out.replace(".mid_block.attention.", ".mid_block.attentions.0.")
    out = out.replace(".to_out.", ".to_out.0.")
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", out)


def flux_ae_name(diffusers_name: str, num_levels: int) -> str:
    """The original FLUX `ae.safetensors` name of a diffusers name (the inverse of
    `flux_ae_to_diffusers_names`; `num_levels` = len(channel_mult))."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.",
                 diffusers_name)
    new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
                 r"encoder.down.\1.downsample.", new)
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.|upsamplers\.0\.)(.*)$", new)
    if m:
        part = "block." if m.group(2) == "resnets." else "upsample."
        new = f"decoder.up.{num_levels - 1 - int(m.group(1))}.{part}{m.group(3)}"
    new = re.sub(r"\.mid_block\.resnets\.(\d)\.",
                 lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
    new = re.sub(r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
                 lambda m: f".mid.attn_1.{attn[m.group(1)]}.", new)
    new = new.replace("conv_shortcut", "nin_shortcut")
    return re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", new)


def diffusers_to_flux_ae(state_dict: Mapping, num_levels: int) -> dict:
    """diffusers `AutoencoderKL` weights -> the original FLUX `ae.safetensors` names and
    layouts (the mid-block attention projections are 1x1 convs [C, C, 1, 1] there)."""
    out = {}
    for key, value in state_dict.items():
        new = flux_ae_name(key, num_levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and "attn_1.norm" not in new:
            value = np.asarray(value)
            value = value.reshape(*value.shape[:2], 1, 1)
        out[new] = value
    return out


def vae_from_flux_ae(state_dict: Mapping) -> dict:
    """The original FLUX `ae.safetensors` (BAGEL's VAE file) -> unijax AutoencoderKL tree."""
    return vae_from_diffusers(flux_ae_to_diffusers_names(state_dict))


# ------------------------------------------------------------------------------------------
# BAGEL's connectors and heads (`ema.safetensors`, outside `language_model` / `vit_model`).
# ------------------------------------------------------------------------------------------


def bagel_connectors(state_dict: Mapping) -> dict:
    """BAGEL `connector`, `time_embedder`, `vae2llm`, `llm2vae` -> the trees of the same-named
    `unijax.models.unified.UnifiedModel` submodules.

    BAGEL's `vit_pos_embed` / `latent_pos_embed` are fixed sin-cos tables that unijax computes
    instead of storing (`models/embeddings.py`); they are not read here.
    """
    sd = dict(state_dict)
    return {
        "connector": {"fc1": _linear(sd, "connector.fc1"), "fc2": _linear(sd, "connector.fc2")},
        "time_embedder": {"fc1": _linear(sd, "time_embedder.mlp.0"),
                          "fc2": _linear(sd, "time_embedder.mlp.2")},
        "vae2llm": _linear(sd, "vae2llm"),
        "llm2vae": _linear(sd, "llm2vae"),
    }
