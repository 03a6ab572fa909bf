"""The Mixture-of-Transformer-Experts decoder: a Qwen2-style LLM with an und and a gen expert.

Every per-layer weight exists once per expert (BAGEL's `Qwen2MoTDecoderLayer`): input RMSNorm,
q/k/v/o projections (grouped-query attention; q/k/v biases when `qkv_bias`, none on o),
per-head QK RMSNorm (`qk_norm`, after the projection and before RoPE), post-attention RMSNorm
and a SwiGLU MLP; the final norm is per expert too. The token embedding and the LM head are
shared. One attention runs over all tokens of the row, with the mask computed from the
PackedBatch metadata by `unijax.kernels.attention`. Under a mesh and logical axis rules, the
Pallas and cuDNN backends run per (row, kv-head) shard through `shard_map`
(`layers.attention_shard`); the `xla` backend is partitioned by XLA.

Routing is static: rows are expert-major, tokens [0, num_und) belong to the und expert (text,
ViT tokens, image markers) and [num_und, L) to the gen expert (VAE latents). Each expert's
weights run on its own slice only, so no FLOP is spent on the other expert's tokens. With
`num_experts=1` one set of weights (named `und`) runs on the whole row: a dense
Transfusion-style model.

API (used by `unified.py`):

  cfg = DecoderConfig.from_config(config)           # config.model.llm + dtypes + attention
  model = MoTDecoder(cfg, rngs=nnx.Rngs(0))         # or MoTDecoder(config, rngs=...)
  x_und = model.embed(text_ids)                     # [B, L_und] int -> [B, L_und, D]
  hidden = model(x, positions, meta, num_und)       # x [B, L, D], positions [B, L] int,
                                                    # meta: TokenMeta [B, L] -> [B, L, D]
                                                    # (final per-expert norm applied)
  logits = model.logits(hidden[:, :num_und])        # [B, L_und, D] -> [B, L_und, V]
  hidden, (k, v) = model.extend(x, positions, meta, num_und, past_k, past_v, past_meta)
                                                    # new tokens against a KV cache
                                                    # (past_k/v [N, B, C, Hkv, Dh]); k, v
                                                    # [N, B, L, Hkv, Dh] of the new tokens
  opt = nnx.Optimizer(model, tx, wrt=trainable_filter(cfg))
  groups = param_groups(cfg)                        # labelled path prefixes for param counts

Parameter tree (N = num_layers; stacked layers carry a leading `layers` axis):

  embed_tokens.embedding                      [V, D]               (vocab, embed)
  layers.{und,gen}.input_norm.scale           [N, D]               (layers, norm)
  layers.{und,gen}.q_proj.kernel / .bias      [N, D, H, Dh] / [N, H, Dh]
  layers.{und,gen}.{k,v}_proj.kernel / .bias  [N, D, Hkv, Dh] / [N, Hkv, Dh]
  layers.{und,gen}.{q,k}_norm.scale           [N, Dh]              (only with qk_norm)
  layers.{und,gen}.o_proj.kernel              [N, H, Dh, D]
  layers.{und,gen}.post_attn_norm.scale       [N, D]
  layers.{und,gen}.mlp.{gate,up}_proj.kernel  [N, D, M];  mlp.down_proj.kernel [N, M, D]
  final_norm.{und,gen}.scale                  [D]
  lm_head.kernel                              [D, V]               (absent with tie_embeddings)

LoRA (`lora_rank > 0`): every projection named in `lora_targets` of every expert named in
`lora_experts` carries an `nnx.LoRA` adapter, `<proj>.lora.lora_a` [N, prod(in), r] and
`<proj>.lora.lora_b` [N, r, prod(out)] (`nnx.LoRAParam`s; e.g. q_proj: [N, D, r], [N, r, H*Dh]);
the projection adds `lora_alpha / r * (x A) B`, zero at init (B starts at zero). A LoRA run
trains only the adapters (`trainable_filter`); `unijax.models.lora.merge` folds them into the
kernels.

`freeze_und_expert` (BAGEL `freeze_und`, LlamaFusion): the und expert, its final norm, the
embedding and the LM head are left out of `trainable_filter`, and the und slice's hidden
states, keys and values are wrapped in `stop_gradient` in every layer, so und activations are
constants and the backward pass never runs through the und expert. `init_gen_from_und`
(BAGEL `copy_init_moe`) copies the und weights into the gen expert at construction.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unijax import config as config_lib
from unijax.batch import TokenMeta
from unijax.kernels.attention import BLOCK_NAMES, attention, resolve_auto
from unijax.models import layers
from unijax.models.layers import Dense, Embedding, RMSNorm, SwiGLU, apply_rope, rope_cos_sin

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keeps the outputs of the weight matmuls (no batch dims); recomputes attention scores,
    # norms and activations in the backward pass.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

EXPERTS = ("und", "gen")
# The projections of an expert layer that can carry a LoRA adapter.
LORA_TARGETS = config_lib.LORA_TARGETS


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static shape and behaviour of the decoder (`config.model.llm` plus dtypes/attention)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    qk_norm: bool = True
    qkv_bias: bool = True
    tie_embeddings: bool = False
    num_experts: int = 2
    freeze_und_expert: bool = False
    init_gen_from_und: bool = True
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    attention_chunk_size: int = 512
    # Pallas tiles (query x key tokens, forward then backward); 0 = the platform default.
    attention_blocks: tuple[int, int, int, int] = (0, 0, 0, 0)
    # Run the Pallas kernels in the Pallas interpreter (CPU tests and debugging).
    attention_interpret: bool = False
    # LoRA adapters (rank 0: none) on these projections of these experts.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_experts: tuple[str, ...] = ("gen",)
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.num_experts not in (1, 2):
            raise ValueError(f"num_experts must be 1 or 2, got {self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got "
                             f"{self.remat_policy!r}")
        if self.freeze_und_expert and self.num_experts == 1:
            raise ValueError("freeze_und_expert=True needs num_experts=2")
        if self.lora_rank:
            experts = EXPERTS[:self.num_experts]
            if not self.lora_experts or set(self.lora_experts) - set(experts):
                raise ValueError(f"lora_experts={self.lora_experts} must name experts of "
                                 f"{experts}")
            if not self.lora_targets or set(self.lora_targets) - set(LORA_TARGETS):
                raise ValueError(f"lora_targets={self.lora_targets} must name projections of "
                                 f"{LORA_TARGETS}")

    def lora_for(self, expert: str) -> dict[str, tuple[int, float]]:
        """{projection: (rank, alpha)} of the adapters this expert's layers carry."""
        if not self.lora_rank or expert not in self.lora_experts:
            return {}
        return {name: (self.lora_rank, self.lora_alpha) for name in self.lora_targets}

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> DecoderConfig:
        """Reads `config.model.llm`, `config.model.{dtype,param_dtype}`, `config.attention`."""
        llm = config.model.llm
        names = [f.name for f in dataclasses.fields(cls)]
        values = {name: llm[name] for name in names if name in llm}
        blocks = tuple(int(config.attention.get(name, 0)) for name in BLOCK_NAMES)
        return cls(**values, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                   attention_impl=config.attention.impl,
                   attention_chunk_size=config.attention.chunk_size, attention_blocks=blocks,
                   attention_interpret=bool(config.attention.get("interpret", False)))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


class ExpertLayer(nnx.Module):
    """The weights of one expert in one layer, applied to that expert's slice of the row."""

    def __init__(self, cfg: DecoderConfig, expert: str, *, rngs: nnx.Rngs):
        d, h, hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        norm = dict(eps=cfg.rms_norm_eps, **dt)
        lora = cfg.lora_for(expert)

        def dense(name):
            return dict(rngs=rngs, **dt, **layers.lora_kwargs(lora, name))

        self.input_norm = RMSNorm(d, **norm)
        self.q_proj = Dense((d,), (h, hd), in_axes=("embed",), out_axes=("heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **dense("q_proj"))
        self.k_proj = Dense((d,), (hkv, hd), in_axes=("embed",),
                            out_axes=("kv_heads", "head_dim"), use_bias=cfg.qkv_bias,
                            **dense("k_proj"))
        self.v_proj = Dense((d,), (hkv, hd), in_axes=("embed",),
                            out_axes=("kv_heads", "head_dim"), use_bias=cfg.qkv_bias,
                            **dense("v_proj"))
        self.q_norm = RMSNorm(hd, **norm) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, **norm) if cfg.qk_norm else None
        self.o_proj = Dense((h, hd), (d,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                            use_bias=False, **dense("o_proj"))
        self.post_attn_norm = RMSNorm(d, **norm)
        self.mlp = SwiGLU(d, cfg.intermediate_size, rngs=rngs, lora=lora, **dt)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [B, S, D] -> q [B, S, H, Dh], k, v [B, S, Hkv, Dh] (QK-norm, then RoPE)."""
        h = self.input_norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: jax.Array, attn: jax.Array) -> jax.Array:
        """Residual stream x [B, S, D] and attention output [B, S, H, Dh] -> [B, S, D]."""
        x = x + self.o_proj(attn)
        return x + self.mlp(self.post_attn_norm(x))


def expert_slices(num_experts: int, num_und: int, length: int) -> list[tuple[str, int, int]]:
    """The non-empty (expert, start, stop) slices of an expert-major row of `length` tokens."""
    if not 0 <= num_und <= length:
        raise ValueError(f"num_und={num_und} outside [0, {length}]")
    if num_experts == 1:
        return [("und", 0, length)]
    spans = [("und", 0, num_und), ("gen", num_und, length)]
    return [(name, a, b) for name, a, b in spans if b > a]


class MoTLayer(nnx.Module):
    """One decoder layer: per-expert projections and MLPs around one shared attention."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.und = ExpertLayer(cfg, "und", rngs=rngs)
        self.gen = ExpertLayer(cfg, "gen", rngs=rngs) if cfg.num_experts == 2 else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, meta: TokenMeta,
                 num_und: int) -> jax.Array:
        """x [B, L, D], cos/sin [B, L, Dh] -> [B, L, D]."""
        return self.extend(x, cos, sin, meta, num_und)[0]

    def extend(self, x: jax.Array, cos: jax.Array, sin: jax.Array, meta: TokenMeta,
               num_und: int, past: tuple | None = None):
        """The layer over new tokens x [B, L, D] that also attend to `past` tokens.

        Args:
          past: None, or (k [B, C, Hkv, Dh], v, TokenMeta [B, C]) of tokens already in a KV
            cache (after QK-norm and RoPE); the mask rule decides, from both metadata, which
            of them each new token sees (empty cache slots have doc_id 0: never visible).

        Returns:
          ([B, L, D], (k, v) [B, L, Hkv, Dh] of the new tokens, what a cache stores).
        """
        cfg = self.cfg
        slices = expert_slices(cfg.num_experts, num_und, x.shape[1])
        frozen = {"und": cfg.freeze_und_expert, "gen": False}
        inputs, qs, ks, vs = [], [], [], []
        for name, a, b in slices:
            xe = x[:, a:b]
            if frozen[name]:
                xe = jax.lax.stop_gradient(xe)
            q, k, v = getattr(self, name).qkv(xe, cos[:, a:b], sin[:, a:b])
            if frozen[name]:
                # Gen queries attend to und keys/values: stop there so no gradient reaches the
                # frozen und weights.
                k, v = jax.lax.stop_gradient(k), jax.lax.stop_gradient(v)
            inputs.append(xe)
            qs.append(q)
            ks.append(k)
            vs.append(v)
        cat = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        q, k, v = cat(qs), cat(ks), cat(vs)
        impl = resolve_auto() if cfg.attention_impl == "auto" else cfg.attention_impl
        if past is None:
            keys, values, kv_meta = k, v, None
            block_q, block_kv, block_q_bwd, block_kv_bwd = cfg.attention_blocks
        else:
            past_k, past_v, past_meta = past
            keys = jnp.concatenate([past_k.astype(k.dtype), k], axis=1)
            values = jnp.concatenate([past_v.astype(v.dtype), v], axis=1)
            kv_meta = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), past_meta,
                                   meta)
            # A few new tokens against a cache: the Pallas tiles do not fit such a query
            # block, so cached steps run the xla backend (cudnn keeps its dense mask).
            impl = "xla" if impl.startswith("pallas") else impl
            block_q = block_kv = block_q_bwd = block_kv_bwd = 0
        shard = layers.attention_shard(impl, x.shape[0], cfg.num_kv_heads, "kv_heads")
        out = attention(q, keys, values, meta, kv_meta, impl=impl,
                        chunk_size=cfg.attention_chunk_size, block_q=block_q,
                        block_kv=block_kv, block_q_bwd=block_q_bwd, block_kv_bwd=block_kv_bwd,
                        interpret=cfg.attention_interpret, shard=shard)
        outputs = []
        for (name, a, b), xe in zip(slices, inputs):
            y = getattr(self, name).finish(xe, out[:, a:b])
            outputs.append(jax.lax.stop_gradient(y) if frozen[name] else y)
        return cat(outputs), (k, v)


class ExpertNorms(nnx.Module):
    """The final RMSNorm of each expert."""

    def __init__(self, cfg: DecoderConfig):
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.und = RMSNorm(cfg.hidden_size, **norm)
        self.gen = RMSNorm(cfg.hidden_size, **norm) if cfg.num_experts == 2 else None


class MoTDecoder(nnx.Module):
    """The decoder: embedding, N stacked MoT layers, per-expert final norms, LM head."""

    def __init__(self, config: DecoderConfig | ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        cfg = config if isinstance(config, DecoderConfig) else DecoderConfig.from_config(config)
        self.config = cfg
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **dt)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_layers(layer_rngs):
            return MoTLayer(cfg, rngs=layer_rngs)

        self.layers = stacked_layers(rngs)
        self.final_norm = ExpertNorms(cfg)
        self.lm_head = None if cfg.tie_embeddings else Dense(
            (cfg.hidden_size,), (cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",),
            use_bias=False, rngs=rngs, **dt)
        if cfg.num_experts == 2 and cfg.init_gen_from_und:
            self.copy_und_to_gen()

    def copy_und_to_gen(self) -> None:
        """Sets every gen-expert weight (layers and final norm) to its und counterpart (LoRA
        adapters are not copied: each expert's keep their own init)."""
        if self.config.num_experts != 2:
            raise ValueError("copy_und_to_gen needs num_experts=2")
        nnx.update(self.layers.gen, nnx.state(self.layers.und, nnx.Not(nnx.LoRAParam)))
        nnx.update(self.final_norm.gen, nnx.state(self.final_norm.und))

    def embed(self, text_ids: jax.Array) -> jax.Array:
        """text_ids [B, S] int -> token embeddings [B, S, D] in the compute dtype."""
        return self.embed_tokens(text_ids)

    def __call__(self, x: jax.Array, positions: jax.Array, meta: TokenMeta,
                 num_und: int) -> jax.Array:
        """Runs the decoder over expert-major packed rows.

        Args:
          x: [B, L, D] input embeddings; [0, num_und) und tokens, [num_und, L) gen tokens.
          positions: [B, L] int RoPE positions (PackedBatch `position`).
          meta: TokenMeta with [B, L] fields (the attention mask's metadata).
          num_und: static size of the und slice (ignored by the routing when num_experts=1).

        Returns:
          [B, L, D] hidden states after the per-expert final norm, in the compute dtype.
        """
        cfg = self.config
        b, length, d = x.shape
        if d != cfg.hidden_size or positions.shape != (b, length) or \
                meta.doc_id.shape != (b, length):
            raise ValueError(f"MoTDecoder: x {x.shape}, positions {positions.shape}, meta "
                             f"{meta.doc_id.shape} are not [B, L, {cfg.hidden_size}], [B, L], "
                             "[B, L]")
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.compute_dtype)
        x = self._apply_layers(x.astype(cfg.compute_dtype), cos, sin, meta, num_und)
        return self._final_norm(x, num_und)

    def extend(self, x: jax.Array, positions: jax.Array, meta: TokenMeta, num_und: int,
               past_k: jax.Array, past_v: jax.Array, past_meta: TokenMeta):
        """The decoder over new tokens that also attend to the tokens of a KV cache.

        Args:
          x, positions, meta, num_und: the new tokens, as for `__call__` (expert-major).
          past_k, past_v: [N, B, C, Hkv, Dh] keys and values of the cached tokens, per layer
            (after QK-norm and RoPE).
          past_meta: TokenMeta [B, C] of the cached tokens (doc_id 0 on empty slots).

        Returns:
          (hidden [B, L, D] after the final norm, (k, v) [N, B, L, Hkv, Dh] of the new tokens).
        """
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.compute_dtype)
        x = x.astype(cfg.compute_dtype)

        def layer_fn(layer, x, k_l, v_l):
            return layer.extend(x, cos, sin, meta, num_und, (k_l, v_l, past_meta))

        if cfg.scan_layers:
            scan = nnx.scan(layer_fn, in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
            x, (k, v) = scan(self.layers, x, past_k, past_v)
        else:
            graphdef, state = nnx.split(self.layers)
            new_k, new_v = [], []
            for i in range(cfg.num_layers):
                layer = nnx.merge(graphdef, jax.tree.map(lambda w, i=i: w[i], state))
                x, (k_i, v_i) = layer_fn(layer, x, past_k[i], past_v[i])
                new_k.append(k_i)
                new_v.append(v_i)
            k, v = jnp.stack(new_k), jnp.stack(new_v)
        return self._final_norm(x, num_und), (k, v)

    def _final_norm(self, x: jax.Array, num_und: int) -> jax.Array:
        cfg = self.config
        slices = expert_slices(cfg.num_experts, num_und, x.shape[1])
        outputs = []
        for name, a, b_ in slices:
            y = getattr(self.final_norm, name)(x[:, a:b_])
            frozen = name == "und" and cfg.freeze_und_expert
            outputs.append(jax.lax.stop_gradient(y) if frozen else y)
        return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, S, D] (und tokens, after the final norm) -> logits [B, S, V]."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def _apply_layers(self, x, cos, sin, meta, num_und):
        cfg = self.config

        def layer_fn(layer, x, cos, sin, meta):
            return layer(x, cos, sin, meta, num_und)

        policy = REMAT_POLICIES[cfg.remat_policy]
        if policy is not None:
            layer_fn = nnx.remat(layer_fn, policy=policy)
        if cfg.scan_layers:
            scan = nnx.scan(layer_fn, in_axes=(0, nnx.Carry, None, None, None),
                            out_axes=nnx.Carry)
            return scan(self.layers, x, cos, sin, meta)
        graphdef, state = nnx.split(self.layers)
        for i in range(cfg.num_layers):
            layer = nnx.merge(graphdef, jax.tree.map(lambda w, i=i: w[i], state))
            x = layer_fn(layer, x, cos, sin, meta)
        return x


def _path_filter(prefixes: list[tuple]):
    def matches(path, value) -> bool:
        keys = tuple(str(k) for k in path)
        return isinstance(value, nnx.Param) and any(keys[:len(p)] == p for p in prefixes)
    return matches


def frozen_filter(cfg: DecoderConfig, prefix: tuple[str, ...] = ()):
    """Matches the parameters `freeze_und_expert` keeps fixed (nothing when it is off).

    Args:
      cfg: the decoder config.
      prefix: the decoder's path inside an enclosing model (e.g. ("llm",)).
    """
    if not cfg.freeze_und_expert:
        return nnx.Nothing
    frozen = [("embed_tokens",), ("layers", "und"), ("final_norm", "und"), ("lm_head",)]
    return _path_filter([(*prefix, *p) for p in frozen])


def trainable_filter(cfg: DecoderConfig, prefix: tuple[str, ...] = ()):
    """The `nnx.Optimizer(model, tx, wrt=...)` filter: every Param not frozen by the config;
    with LoRA only the adapters."""
    if cfg.lora_rank:
        return nnx.LoRAParam
    return nnx.All(nnx.Param, nnx.Not(frozen_filter(cfg, prefix)))


def param_groups(cfg: DecoderConfig, prefix: tuple[str, ...] = ()) -> list[tuple[str, tuple]]:
    """Labelled path prefixes of the decoder's modules, for `param_count.count_by_group`."""
    groups = [("embedding", ("embed_tokens",)), ("und expert layers", ("layers", "und"))]
    if cfg.num_experts == 2:
        groups.append(("gen expert layers", ("layers", "gen")))
    groups.append(("final norms", ("final_norm",)))
    if not cfg.tie_embeddings:
        groups.append(("lm_head", ("lm_head",)))
    return [(label, (*prefix, *path)) for label, path in groups]
