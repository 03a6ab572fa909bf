"""LoRA adapters of the MoT decoder: which weights they are, and folding them into the kernels.

  config.model.llm.lora_rank = 16                      # adapters on
  config.model.llm.lora_experts = ("gen",)             # e.g. only the gen expert ...
  config.model.llm.lora_targets = ("q_proj", "v_proj") # ... and only its q and v projections
  model = unified.UnifiedModel(config, rngs=...)       # adapters are nnx.LoRAParam, B = 0
  merged, merged_config = merge_model(model, config)   # plain kernels, lora_rank 0
  flat = merge_weights(flat, decoder_config)           # the same on {"a/b/kernel": array}

The adapters themselves are `flax.nnx.LoRA` modules inside `layers.Dense` (see `mot.py` for
the parameter tree). A projection with kernel W [N, *in, *out] (N stacked layers) and adapter
A [N, prod(in), r], B [N, r, prod(out)] computes x W + alpha / r * (x A) B, so merging sets

  W' = W + alpha / r * reshape(A @ B, W.shape)

(computed in float32, stored in W's dtype) and drops A and B: the merged model is an ordinary
model of the same config with `lora_rank = 0`, which exports to the official layout and
quantises like any other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, traverse_util

from unijax.models import mot, unified

A_SUFFIX, B_SUFFIX = "/lora/lora_a", "/lora/lora_b"


def is_adapter(name: str) -> bool:
    """Whether a "/"-joined parameter name is a LoRA adapter weight."""
    return name.endswith((A_SUFFIX, B_SUFFIX))


def merge_weights(flat: dict[str, jax.Array], cfg: mot.DecoderConfig) -> dict[str, jax.Array]:
    """`flat` ("/"-joined names -> arrays) with every adapter folded into its kernel and
    removed (see the module docstring); names without adapters are returned unchanged.

    Raises:
      KeyError: an adapter whose kernel or partner weight is missing from `flat`.
    """
    scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0
    out = {name: value for name, value in flat.items() if not is_adapter(name)}
    for name in [n for n in flat if n.endswith(A_SUFFIX)]:
        stem = name[:-len(A_SUFFIX)]
        a, b = flat[name], flat[stem + B_SUFFIX]
        kernel = out[stem + "/kernel"]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        out[stem + "/kernel"] = (kernel.astype(jnp.float32)
                                 + scale * delta.reshape(kernel.shape)).astype(kernel.dtype)
    return out


def merged_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose model has no adapters (`lora_rank = 0`)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.llm.lora_rank = 0
    return config


def merge_model(model: unified.UnifiedModel, config: ml_collections.ConfigDict,
                ) -> tuple[unified.UnifiedModel, ml_collections.ConfigDict]:
    """The model with its adapters folded into the kernels, and its config (`lora_rank = 0`).

    Each merged kernel keeps the base kernel's sharding; the adapters are not copied.
    """
    cfg = mot.DecoderConfig.from_config(config)
    paths = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    flat = {"/".join(map(str, path)): value for path, value in paths.items()}
    merged = merge_weights(flat, cfg)
    for name, value in merged.items():
        if value is not flat[name] and hasattr(flat[name], "sharding"):
            merged[name] = jax.device_put(value, flat[name].sharding)
    plain = merged_config(config)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: unified.UnifiedModel(plain, rngs=nnx.Rngs(0))))
    by_name = {"/".join(map(str, path)): path for path in paths}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(
        {by_name[name]: value for name, value in merged.items()}))
    return nnx.merge(graphdef, state), plain
