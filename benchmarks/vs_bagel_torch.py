"""The BAGEL half of `benchmarks/vs_bagel.py`: the official PyTorch model, imported at run time
from a user-provided checkout of ByteDance-Seed/Bagel, on the same packed row.

  bagel = BagelReference(src, vs_bagel.MODELS["issue"], threads=2, paths=["dense", "flex"])
  row = bagel.prepare(row)          # BAGEL's own noise and t, the packed dicts of each path
  losses, grads = bagel.loss_and_grads("dense")  # grads None: no backward on this path
  bagel.forward("dense"); bagel.forward_backward("dense")

Nothing of BAGEL is copied here. What its code needs to run on this CPU, fp32, under the
installed transformers is set up around it, each with the reason:
  * `flash_attn` (CUDA only) is imported at module level by qwen2_navit and siglip_navit: a
    placeholder module is registered first. The LLM's training path must not call it (its
    `flash_attn_varlen_func` raises). SigLIP's NaViT attention calls it in training too; there
    it is a plain CPU implementation of the same varlen API (one dense SDPA per image).
  * `transformers.modeling_attn_mask_utils` (gone in transformers 5) is imported by
    modeling_siglip for its text tower only: a placeholder whose function raises.
  * transformers 5 dropped the "default" entry of `ROPE_INIT_FUNCTIONS` that BAGEL's
    `Qwen2RotaryEmbedding` reads: it is given the standard inverse frequencies
    theta^(-2i/head_dim) (HF 4.x's `_compute_default_rope_parameters`).
  * The per-sample dense path casts q/k/v and the mask to bf16 for the CUDA memory-efficient
    SDPA kernel, and SigLIP casts q/k/v to bf16 for flash-attn. This comparison is of the fp32
    model, so in those two modules `torch.bfloat16` names float32, and the SDPA backend is
    left to torch (CPU has no memory-efficient kernel).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import math
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

from unijax import batch as batch_lib
from unijax.kernels import mask as mask_lib


def _placeholder(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    # A spec without a file or version: transformers' availability checks then read "absent".
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module


def _not_available(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"BAGEL's training path called {what}, which this CPU comparison "
                             "does not provide")
    return fail


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     causal=False, softmax_scale=None, **_):
    """flash-attn's `flash_attn_varlen_func` on CPU: q, k, v [T, H, Dh], sequences given by
    `cu_seqlens`; one dense SDPA per sequence. Returns [T, H, Dh] in q's dtype."""
    out = []
    bounds = zip(cu_seqlens_q.tolist()[:-1], cu_seqlens_q.tolist()[1:],
                 cu_seqlens_k.tolist()[:-1], cu_seqlens_k.tolist()[1:])
    for qs, qe, ks, ke in bounds:
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1),
                                           v[ks:ke].transpose(0, 1), is_causal=causal,
                                           scale=softmax_scale)
        out.append(o.transpose(0, 1))
    return torch.cat(out, dim=0)


class _Fp32Torch(types.ModuleType):
    """`torch` as seen from BAGEL's attention modules, with `bfloat16` meaning float32."""

    bfloat16 = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


def import_bagel(src: str) -> types.SimpleNamespace:
    """BAGEL's modules from the checkout `src`, set up as the module docstring says."""
    if not os.path.isfile(os.path.join(src, "modeling", "bagel", "bagel.py")):
        raise FileNotFoundError(f"--bagel_src={src!r} has no modeling/bagel/bagel.py (expected "
                                "a checkout of ByteDance-Seed/Bagel)")
    sys.path.insert(0, os.path.abspath(src))
    _placeholder("flash_attn", flash_attn_varlen_func=_not_available("flash_attn_varlen_func"))
    import transformers  # noqa: F401  (its own import-time checks must see no flash_attn)

    if "transformers.modeling_attn_mask_utils" not in sys.modules:
        try:
            import transformers.modeling_attn_mask_utils  # noqa: F401
        except ImportError:
            _placeholder("transformers.modeling_attn_mask_utils",
                         _prepare_4d_attention_mask=_not_available("_prepare_4d_attention_mask"))
    from data import data_utils
    from modeling.autoencoder import AutoEncoderParams
    from modeling.bagel import bagel, qwen2_navit, siglip_navit
    from modeling.qwen2 import modeling_qwen2

    if "default" not in modeling_qwen2.ROPE_INIT_FUNCTIONS:
        def default_rope(config, device=None, **_):
            dim = config.hidden_size // config.num_attention_heads
            exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            return (1.0 / config.rope_theta ** exponent).to(device), 1.0

        modeling_qwen2.ROPE_INIT_FUNCTIONS = {**modeling_qwen2.ROPE_INIT_FUNCTIONS,
                                              "default": default_rope}
    fp32 = _Fp32Torch("torch")
    qwen2_navit.torch = siglip_navit.torch = fp32
    qwen2_navit.sdpa_kernel = lambda backends: contextlib.nullcontext()
    siglip_navit.flash_attn_varlen_func = varlen_attention
    return types.SimpleNamespace(bagel=bagel, qwen2_navit=qwen2_navit, siglip=siglip_navit,
                                 data_utils=data_utils, AutoEncoderParams=AutoEncoderParams)


def build_bagel(m: types.SimpleNamespace, shape: dict, seed: int):
    """A random fp32 `Bagel` of `shape` (vs_bagel.MODELS), torch seed `seed`, in training mode.

    Norm scales and biases are moved off 1 and 0 and llm2vae off its zero init, so that every
    weight (and the flow loss's gradient path) matters.
    """
    torch.manual_seed(seed)
    llm = m.qwen2_navit.Qwen2Config(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True, tie_word_embeddings=False,
        layer_module="Qwen2MoTDecoderLayer", max_position_embeddings=32768,
        pad_token_id=None)  # transformers 5 no longer defaults it; BAGEL reads it
    if shape["hidden_size"] // shape["num_heads"] != shape["head_dim"]:
        raise ValueError(f"BAGEL's head_dim is hidden_size / num_heads, not {shape['head_dim']}")
    vit = m.siglip.SiglipVisionConfig(
        hidden_size=shape["vit_hidden"], intermediate_size=shape["vit_mlp"],
        num_hidden_layers=shape["vit_layers"], num_attention_heads=shape["vit_heads"],
        image_size=14 * shape["vit_grid"], patch_size=14, layer_norm_eps=1e-6, rope=False)
    vae = m.AutoEncoderParams(resolution=256, in_channels=3, downsample=8, ch=128, out_ch=3,
                              ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=16,
                              scale_factor=0.3611, shift_factor=0.1159)
    config = m.bagel.BagelConfig(
        visual_gen=True, visual_und=True, llm_config=llm, vit_config=vit, vae_config=vae,
        latent_patch_size=2, max_latent_size=shape["latent_grid"],
        vit_max_num_patch_per_side=shape["vit_grid"], connector_act="gelu_pytorch_tanh",
        interpolate_pos=False, timestep_shift=1.0)
    model = m.bagel.Bagel(m.qwen2_navit.Qwen2ForCausalLM(llm), m.siglip.SiglipVisionModel(vit),
                          config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name:
                continue
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias") or name.startswith("llm2vae"):
                p.add_(0.02 * torch.randn_like(p))
    return model.float().train()


class BagelReference:
    """The BAGEL model and the packed inputs of one row, per attention path."""

    PATHS = ("dense", "flex")

    def __init__(self, src: str, shape: dict, threads: int, paths: list[str], seed: int = 0):
        unknown = sorted(set(paths) - set(self.PATHS))
        if unknown:
            raise ValueError(f"--bagel_attention: unknown paths {unknown}, known {self.PATHS}")
        torch.set_num_threads(threads)
        self.m = import_bagel(src)
        self.model = build_bagel(self.m, shape, seed)
        self.attention_paths, self.seed = list(paths), seed
        self.num_layers = shape["num_layers"]
        self.inputs: dict[str, dict] = {}
        self.no_backward: dict[str, str] = {}

    def numpy_state(self) -> dict[str, np.ndarray]:
        """The checkpoint: every tensor of `state_dict()`, BAGEL's names, as numpy."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def compared_grads(self) -> list[str]:
        last = f"language_model.model.layers.{self.num_layers - 1}."
        return ["language_model.model.layers.0.self_attn.q_proj.weight",
                *(f"{last}mlp_moe_gen.{p}_proj.weight" for p in ("gate", "up", "down"))]

    def describe(self, path: str) -> str:
        """The path as a RESULTS.md cell."""
        text = {"dense": "dense: nested_attention_masks, SDPA per sample",
                "flex": "flex: flex_attention block mask, torch.compile"}[path]
        return text + (" (forward only: no CPU backward)" if path in self.no_backward else "")

    def prepare(self, row):
        """BAGEL's draws for `row` (its forward's `randn_like` after `manual_seed(seed)`, and t =
        sigmoid(logit t) as it computes it), and the packed dict of every path; returns the row
        with those draws."""
        b = row.batch
        noisy = row.image_times[0] > 0
        t = torch.from_numpy(row.image_times[0].astype(np.float64))
        logits = torch.where(torch.from_numpy(noisy), torch.log(t / (1 - t)),
                             torch.tensor(-math.inf, dtype=torch.float64)).float()
        num_vae = int((b.modality == batch_lib.VAE).sum())
        torch.manual_seed(self.seed)
        noise = torch.randn(num_vae, row.x0.shape[-1])
        row = row.with_draws(noise.numpy(), torch.sigmoid(logits).numpy())
        for path in self.attention_paths:
            self.inputs[path] = self._packed_inputs(row, logits.numpy(), path)
        return row

    def _packed_inputs(self, row, image_logits: np.ndarray, path: str) -> dict:
        """BAGEL's packed training dict of the row (sequence index = PackedBatch `order`)."""
        b = row.batch
        if (b.doc_id[0] == 0).any():
            raise ValueError("the BAGEL dict is built for rows without padding")
        perm = np.argsort(b.order[0])  # slot of each sequence position
        seq = {f: np.asarray(getattr(b, f))[0][perm] for f in batch_lib.TOKEN_FIELDS}
        mod = seq["modality"]
        where = lambda m: torch.from_numpy(np.nonzero(m)[0])
        long = lambda x: torch.from_numpy(np.asarray(x, np.int64))
        text, vit, vae = (mod == batch_lib.TEXT), (mod == batch_lib.VIT), (mod == batch_lib.VAE)
        ce, mse = seq["text_weight"] > 0, seq["flow_weight"] > 0
        vit_slots = seq["payload_index"][vit]
        vit_image = b.vit_image_id[0][vit_slots]
        starts = np.r_[True, vit_image[1:] != vit_image[:-1]]
        gh, gw = row.latent_grid
        image = seq["payload_index"][vae] // (gh * gw)
        out = dict(
            sequence_length=len(mod), packed_text_ids=long(seq["text_ids"][text]),
            packed_text_indexes=where(text), packed_position_ids=long(seq["position"]),
            ce_loss_indexes=where(ce), packed_label_ids=long(seq["text_targets"][ce]),
            packed_vit_tokens=torch.from_numpy(b.vit_patches[0][vit_slots].astype(np.float32)),
            packed_vit_token_indexes=where(vit),
            packed_vit_position_ids=long(seq["patch_pos"][vit]),
            vit_token_seqlens=torch.from_numpy(np.diff(np.r_[np.nonzero(starts)[0], vit.sum()])),
            padded_latent=torch.from_numpy(row.padded_latent().copy()),
            patchified_vae_latent_shapes=[tuple(map(int, hw)) for hw in b.vae_grid_hw[0]],
            packed_latent_position_ids=long(seq["patch_pos"][vae]),
            packed_vae_token_indexes=where(vae),
            packed_timesteps=torch.from_numpy(image_logits[image].astype(np.float32)),
            mse_loss_indexes=where(mse))
        # Samples (documents) and their splits: runs of one bidirectional span, or of text.
        doc, split = seq["doc_id"], seq["split_id"]
        out["sample_lens"] = [int(n) for n in np.bincount(doc)[1:] if n]
        cut = np.nonzero(np.r_[True, (doc[1:] != doc[:-1]) | (split[1:] != split[:-1])])[0]
        lens = np.diff(np.r_[cut, len(doc)])
        modes = ["causal" if split[i] < 0 else "noise" if seq["noisy"][i] else "full"
                 for i in cut]
        per_doc = [[(int(n), mode) for n, mode, i in zip(lens, modes, cut) if doc[i] == d]
                   for d in np.unique(doc)]
        nested = [self.m.data_utils.prepare_attention_mask_per_sample(
            [n for n, _ in splits], [mode for _, mode in splits]) for splits in per_doc]
        self._check_mask(b, perm, nested)
        if path == "dense":
            out["nested_attention_masks"] = nested
        else:
            out["split_lens"], out["attn_modes"] = [int(n) for n in lens], modes
        return out

    @staticmethod
    def _check_mask(b, perm, nested) -> None:
        """BAGEL's per-sample masks must be unijax's mask rule on the same tokens."""
        ours = np.asarray(mask_lib.dense_mask(b.token_meta()))[0][np.ix_(perm, perm)]
        theirs = torch.block_diag(*[(m == 0).float() for m in nested]).bool().numpy()
        if not np.array_equal(ours, theirs):
            bad = np.argwhere(ours != theirs)[0]
            raise AssertionError(f"BAGEL's attention mask differs from unijax's at (q, k) = "
                                 f"{tuple(bad)} of the sequence")

    def _loss(self, path: str):
        torch.manual_seed(self.seed)  # the forward's `randn_like` then draws `prepare`'s noise
        inputs = self.inputs[path]
        out = self.model(**inputs)
        # BAGEL's normalisation (train/pretrain_unified_navit.py), one rank.
        ce = out["ce"].sum() / len(inputs["ce_loss_indexes"])
        mse = out["mse"].mean(dim=-1).sum() / len(inputs["mse_loss_indexes"])
        return ce + mse, ce, mse

    def forward(self, path: str) -> float:
        """The loss only (no autograd graph)."""
        with torch.no_grad():
            return float(self._loss(path)[0])

    def forward_backward(self, path: str) -> float:
        """The loss and the gradients of every parameter (`loss.backward()`)."""
        self.model.zero_grad(set_to_none=True)
        loss = self._loss(path)[0]
        loss.backward()
        return float(loss.detach())

    def loss_and_grads(self, path: str) -> tuple[dict, dict[str, np.ndarray] | None]:
        """({"loss", "ce", "mse"}, the `compared_grads` as numpy) of the prepared row; grads
        None when the path has no backward here (FlexAttention has none on CPU): the losses
        then come from a forward alone and `self.no_backward[path]` says why."""
        self.model.zero_grad(set_to_none=True)
        try:
            loss, ce, mse = self._loss(path)
            loss.backward()
        except NotImplementedError as e:
            self.no_backward[path] = str(e).split(".")[0]
            with torch.no_grad():
                loss, ce, mse = self._loss(path)
            return dict(loss=float(loss), ce=float(ce), mse=float(mse)), None
        params = dict(self.model.named_parameters())
        grads = {n: params[n].grad.detach().numpy().copy() for n in self.compared_grads()}
        values = dict(loss=loss, ce=ce, mse=mse)
        return {k: float(v.detach()) for k, v in values.items()}, grads
