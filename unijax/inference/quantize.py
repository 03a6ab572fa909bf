"""Weight-only int8 sampling: the decoder's projection kernels held as qwix `QArray`s.

  model = quantize_weights(model)            # every MoT projection and the LM head -> int8
  chat = Chat(model, config)                 # samples as before, with half the weight bytes

Each kernel W of the MoT layers (q/k/v/o, gate/up/down of both experts) and of the LM head is
replaced by `qwix.quantize(W, int8, channelwise_axes=...)`: symmetric absmax quantisation with
one scale per output channel (and per stacked layer), i.e. the scale's contracted axes have
size 1, stored in the model's compute dtype. `layers.Dense` multiplies a `QArray` kernel through
`qwix.dot_general`, which dequantises it (values x scale) next to the matmul; activations,
the KV cache, norms, biases, the embedding table, the ViT, the connectors and the VAE stay in
their dtype. Weight bytes of the decoder's projections go from 2 (bf16) to 1 + 2 / fan_in per
element. A kernel keeps its device placement: its int8 values are sharded as the kernel was,
its scales the same way on the output axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from unijax.models import layers

QTYPES = {"int8": jnp.int8}


def quantized_paths(model: nnx.Module) -> list[tuple]:
    """The module paths whose kernels `quantize_weights` replaces: the Dense modules under
    `llm/layers` and `llm/lm_head`."""
    return [path for path, _ in _quantized_modules(model)]


def _quantized_modules(model: nnx.Module) -> list[tuple[tuple, layers.Dense]]:
    out = []
    for path, module in nnx.iter_modules(model):
        keys = tuple(str(k) for k in path)
        if isinstance(module, layers.Dense) and keys[:1] == ("llm",) and \
                keys[1:2] in (("layers",), ("lm_head",)):
            out.append((path, module))
    return out


def quantize_weights(model: nnx.Module, qtype: str = "int8") -> nnx.Module:
    """`model` (a UnifiedModel or MoTDecoder under `llm`) with its decoder kernels quantised in
    place (see the module docstring); returns it.

    Raises:
      ValueError: an unknown `qtype`, or a model with nothing to quantise.
    """
    if qtype not in QTYPES:
        raise ValueError(f"quantize_weights: qtype must be one of {sorted(QTYPES)}, got "
                         f"{qtype!r}")
    found = _quantized_modules(model)
    if not found:
        raise ValueError("quantize_weights: no decoder projection found (expected Dense "
                         "modules under llm/layers and llm/lm_head)")
    for path, dense in found:
        kernel = dense.kernel[...]
        if isinstance(kernel, qwix.QArray):
            continue  # already quantised
        lead = 1 if str(path[1]) == "layers" else 0  # stacked layers carry a leading axis
        contracted = set(range(lead, lead + dense.num_in))
        channelwise = tuple(i for i in range(kernel.ndim) if i not in contracted)
        dense.kernel = nnx.Param(_quantize(kernel, QTYPES[qtype], channelwise, dense.dtype))
    return model


def _quantize(kernel: jax.Array, qtype, channelwise: tuple[int, ...], scale_dtype):
    fn = lambda w: qwix.quantize(w, qtype, channelwise_axes=channelwise,
                                 scale_dtype=scale_dtype)
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return jax.jit(fn)(kernel)
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    scale_spec = PartitionSpec(*(s if i in channelwise else None for i, s in enumerate(spec)))
    abstract = jax.eval_shape(fn, kernel)
    out = jax.tree.map(lambda _: NamedSharding(sharding.mesh, PartitionSpec(*spec)), abstract)
    out = out.replace(scale=NamedSharding(sharding.mesh, scale_spec))
    return jax.jit(fn, out_shardings=out)(kernel)


def kernel_bytes(model: nnx.Module) -> int:
    """Bytes of the kernels `quantize_weights` replaces (int8 values and scales, once
    quantised)."""
    return int(sum(x.size * x.dtype.itemsize for _, dense in _quantized_modules(model)
                   for x in jax.tree.leaves(dense.kernel[...])))
