"""SigLIP-style vision encoder with NaViT packing (the understanding tower).

Images of any size and aspect ratio arrive as one packed list of patches per row
(`PackedBatch.vit_*`): each patch knows its image (`vit_image_id`, 0 = padding slot), its
(row, col) in that image's patch grid and the grid size. Every patch gets a learned absolute
position from a `max_grid x max_grid` table, and attention is restricted to the patches of the
same image, so a packed row gives exactly what encoding each image alone would give.

Layers are pre-LN: x += attn(LN(x)); x += MLP(LN(x)) with MLP = fc2(gelu_tanh(fc1(.))); then
`post_layernorm`. There is no pooling head. The patch embedding is a Linear over patches
flattened in (row-in-patch, col-in-patch, channel) order, as BAGEL converts SigLIP's Conv2d.

Position modes (`config.position_mode`):
  extrapolate  id = row * max_grid + col (BAGEL's default); needs grids <= max_grid.
  interpolate  the table resized to the image's grid with PyTorch's bicubic kernel
               (`F.interpolate(mode="bicubic", align_corners=False)`, A = -0.75, clamped
               borders), i.e. HF `SiglipVisionEmbeddings.interpolate_pos_encoding`.
Both agree when the image grid equals the table grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unijax.batch import TokenMeta
from unijax.kernels.attention import attention, kernel_head_dim, resolve_auto
from unijax.models.layers import Dense, attention_shard, sharded_param


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with scale and bias (torch semantics: biased variance).

    Statistics in float32; output in `dtype`.
    """

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = sharded_param(nnx.initializers.ones, None, (dim,), ("norm",), param_dtype)
        self.bias = sharded_param(nnx.initializers.zeros, None, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> [..., dim]."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class GeluMLP(nnx.Module):
    """fc2(gelu_tanh(fc1(x))) with biases (SigLIP MLP; BAGEL's `MLPconnector`)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, *, in_axis: str, hidden_axis: str,
                 out_axis: str, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense((in_dim,), (hidden,), in_axes=(in_axis,), out_axes=(hidden_axis,),
                         **common)
        self.fc2 = Dense((hidden,), (out_dim,), in_axes=(hidden_axis,), out_axes=(out_axis,),
                         **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in_dim] -> [..., out_dim]."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class VitAttention(nnx.Module):
    """Multi-head self-attention with biases, through `kernels.attention` (mask from meta)."""

    def __init__(self, dim: int, num_heads: int, *, attention_impl: str, chunk_size: int,
                 interpret: bool = False, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        head_dim = dim // num_heads
        self.attention_impl = attention_impl
        self.chunk_size = chunk_size
        self.interpret = interpret
        common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv = dict(in_axes=("vit_embed",), out_axes=("vit_heads", "head_dim"), **common)
        self.q_proj = Dense((dim,), (num_heads, head_dim), **qkv)
        self.k_proj = Dense((dim,), (num_heads, head_dim), **qkv)
        self.v_proj = Dense((dim,), (num_heads, head_dim), **qkv)
        self.out_proj = Dense((num_heads, head_dim), (dim,), in_axes=("vit_heads", "head_dim"),
                              out_axes=("vit_embed",), **common)

    def __call__(self, x: jax.Array, meta: TokenMeta) -> jax.Array:
        """x [B, P, dim] -> [B, P, dim]; meta fields [B, P]."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        head_dim = q.shape[-1]
        impl = resolve_auto() if self.attention_impl == "auto" else self.attention_impl
        padded = kernel_head_dim(impl, head_dim)
        if padded != head_dim:
            # Zero features add nothing to q.k and give zero outputs, so padding SigLIP's head
            # dim 72 to the flash kernels' 128 is exact (the scale stays 1/sqrt(72)).
            widths = ((0, 0), (0, 0), (0, 0), (0, padded - head_dim))
            q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
        # The Pallas tiles are the backend's defaults (the config's tiles are the decoder's).
        out = attention(q, k, v, meta, impl=impl, scale=head_dim**-0.5,
                        chunk_size=self.chunk_size, interpret=self.interpret,
                        shard=attention_shard(impl, x.shape[0], q.shape[2], "vit_heads"))
        return self.out_proj(out[..., :head_dim])


class VitLayer(nnx.Module):
    """One pre-LN encoder layer (HF `SiglipEncoderLayer` names)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, attention_impl: str, chunk_size: int,
                 attention_interpret: bool = False, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(d, **norm)
        self.self_attn = VitAttention(d, cfg.num_heads, attention_impl=attention_impl,
                                      chunk_size=chunk_size, interpret=attention_interpret,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(d, **norm)
        self.mlp = GeluMLP(d, cfg.intermediate_size, d, in_axis="vit_embed",
                           hidden_axis="vit_mlp", out_axis="vit_embed", dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, meta: TokenMeta) -> jax.Array:
        """x [B, P, dim] -> [B, P, dim]."""
        x = x + self.self_attn(self.layer_norm1(x), meta)
        return x + self.mlp(self.layer_norm2(x))


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class VisionTransformer(nnx.Module):
    """NaViT-packed SigLIP encoder: PackedBatch ViT payload [B, P, ...] -> [B, P, hidden].

    Parameter names follow HF `SiglipVisionModel` (`embeddings.patch_embedding`,
    `embeddings.position_embedding`, `layers.*` stacked on a leading layer axis,
    `post_layernorm`) so `unijax.convert.vision` maps checkpoints one to one.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, attention_impl: str = "xla",
                 chunk_size: int = 512, attention_interpret: bool = False,
                 remat_policy: str = "none", dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"vit: hidden_size={cfg.hidden_size} is not divisible by "
                             f"num_heads={cfg.num_heads}")
        if cfg.position_mode not in ("extrapolate", "interpolate"):
            raise ValueError(f"vit: position_mode must be 'extrapolate' or 'interpolate', got "
                             f"{cfg.position_mode!r}")
        if remat_policy != "none" and remat_policy not in _REMAT:
            raise ValueError(f"vit: unknown remat_policy {remat_policy!r}")
        d, p = cfg.hidden_size, cfg.patch_size
        self.max_grid = cfg.max_grid
        self.position_mode = cfg.position_mode
        self.remat_policy = remat_policy
        self.dtype = dtype
        self.patch_embedding = Dense((p * p * 3,), (d,), in_axes=("patch",),
                                     out_axes=("vit_embed",), use_bias=True, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = sharded_param(
            nnx.initializers.normal(d**-0.5), rngs.params(), (cfg.max_grid**2, d),
            (None, "vit_embed"), param_dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return VitLayer(cfg, attention_impl=attention_impl, chunk_size=chunk_size,
                            attention_interpret=attention_interpret, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype,
                                        param_dtype=param_dtype)

    def position_embeddings(self, patch_rc: jax.Array, grid_hw: jax.Array) -> jax.Array:
        """Learned absolute positions of patches.

        Args:
          patch_rc: [B, P, 2] int (row, col) of each patch in its image's patch grid.
          grid_hw: [B, P, 2] int patch grid (h, w) of each patch's image.

        Returns:
          [B, P, hidden] in the parameter dtype.
        """
        table = self.position_embedding[...]
        g = self.max_grid
        if self.position_mode == "extrapolate":
            return jnp.take(table, patch_rc[..., 0] * g + patch_rc[..., 1], axis=0)
        return bicubic_positions(table, patch_rc, grid_hw, g)

    def __call__(self, patches: jax.Array, patch_rc: jax.Array, grid_hw: jax.Array,
                 image_id: jax.Array) -> jax.Array:
        """Encodes a packed list of patches.

        Args:
          patches: [B, P, p*p*3] pixels in [-1, 1], (row-in-patch, col-in-patch, channel).
          patch_rc: [B, P, 2] int (row, col) in the patch's image grid.
          grid_hw: [B, P, 2] int patch grid (h, w) of the patch's image.
          image_id: [B, P] int, 1.. per row; 0 marks a padding slot.

        Returns:
          [B, P, hidden] in `dtype`; padding slots are zero.
        """
        x = self.patch_embedding(patches)
        x = x + self.position_embeddings(patch_rc, grid_hw).astype(self.dtype)
        index = jnp.broadcast_to(jnp.arange(image_id.shape[1], dtype=jnp.int32), image_id.shape)
        # One document and one bidirectional span per image: patches see exactly their image.
        meta = TokenMeta(doc_id=image_id, order=index, split_id=image_id,
                         noisy=jnp.zeros_like(image_id, dtype=bool))

        def body(x, layer):
            return layer(x, meta)

        if self.remat_policy != "none":
            body = nnx.remat(body, policy=_REMAT[self.remat_policy])
        x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
        x = self.post_layernorm(x)
        return jnp.where((image_id > 0)[..., None], x, jnp.zeros((), x.dtype))


def bicubic_positions(table: jax.Array, patch_rc: jax.Array, grid_hw: jax.Array,
                      max_grid: int) -> jax.Array:
    """Rows of `table` resized to each patch's grid, as PyTorch's bicubic `F.interpolate`.

    Args:
      table: [max_grid * max_grid, D] position table (row-major grid).
      patch_rc: [..., 2] int (row, col) of the patch; grid_hw: [..., 2] int its image's grid.
      max_grid: the table's side.

    Returns:
      [..., D] in table's dtype: sum over 4 x 4 source taps of w_row * w_col * table[tap].
    """
    rows, wr = _bicubic_taps(patch_rc[..., 0], grid_hw[..., 0], max_grid)
    cols, wc = _bicubic_taps(patch_rc[..., 1], grid_hw[..., 1], max_grid)
    out = jnp.zeros((*patch_rc.shape[:-1], table.shape[-1]), jnp.float32)
    for i in range(4):
        for j in range(4):
            w = (wr[..., i] * wc[..., j])[..., None]
            out = out + w * jnp.take(table, rows[..., i] * max_grid + cols[..., j], axis=0)
    return out.astype(table.dtype)


def _bicubic_taps(index: jax.Array, out_size: jax.Array,
                  in_size: int) -> tuple[jax.Array, jax.Array]:
    """Source taps of PyTorch's bicubic resize (align_corners=False, A=-0.75) for one axis.

    Args:
      index: [...] int output index; out_size: [...] int output length (the image's grid side,
        a traced value so every image of a packed row may differ); in_size: table side.

    Returns:
      (taps [..., 4] int source indices clamped to [0, in_size), weights [..., 4] float32).
    """
    n_out = jnp.maximum(out_size, 1).astype(jnp.float32)
    scale = jnp.float32(in_size) / n_out
    src = scale * (index.astype(jnp.float32) + 0.5) - 0.5
    base = jnp.floor(src)
    t = src - base
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)
    taps = base.astype(jnp.int32)[..., None] + jnp.arange(-1, 3, dtype=jnp.int32)
    return jnp.clip(taps, 0, in_size - 1), weights
