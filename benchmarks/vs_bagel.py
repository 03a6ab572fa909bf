r"""unijax's CPU train step against the official BAGEL step: same model, same packed row, same loss.

  python benchmarks/vs_bagel.py --bagel_src DIR [--lengths 2048,4096] [--documents 4] \
      [--repeats 5] [--threads 2] [--bagel_attention dense,flex] [--out benchmarks/RESULTS.md]

DIR is a checkout of ByteDance-Seed/Bagel (its PyTorch code is imported from there at run time;
`benchmarks/vs_bagel_torch.py` holds that half and needs torch + transformers). The model is the
issue's: a two-expert MoT of 4 `Qwen2MoTDecoderLayer`s (hidden 512, 8 query / 2 KV heads of 64,
SwiGLU 1536, vocab 4096, QK-norm, RoPE theta 1e6, untied LM head), a 2-layer SigLIP NaViT
(hidden 128) with BAGEL's connector, timestep embedder, vae2llm / llm2vae and the 2D sin-cos
tables; fp32 everywhere. BAGEL builds it with a fixed torch seed (norms, biases and llm2vae
moved off their constant inits so every weight matters); unijax loads the same tensors through
its converters (`convert.qwen2`, `convert.vision`).

One packed row of L tokens holds `--documents` documents cycling through VQA (ViT image +
question + answer with CE), text-to-image (prompt + noisy VAE image with flow MSE), edit (clean
VAE + ViT of the source, instruction, noisy VAE target) and plain text with CE. It is built
once as a unijax PackedBatch (`benchmarks/vs_bagel_row.py`) and expressed as BAGEL's packed
dict (sequence index = the PackedBatch `order`); clean latents are given on both sides (no VAE
call in the step), with the same noise and the same t: BAGEL's own draws (its forward draws
`randn_like` after a fixed `torch.manual_seed`). BAGEL's attention paths: `dense` (its
`nested_attention_masks`, one SDPA per document) and `flex` (FlexAttention; forward only where
torch has no FlexAttention backward, as on CPU).

Before timing, the losses must agree: CE (token mean) and MSE (feature mean, token mean) as
each side normalises them, relative difference <= 1e-4, and the gradients of the und q_proj of
layer 0 and of the gen MLP of the last layer to 1e-4 (relative Frobenius); otherwise the
script exits non-zero with both numbers. Then forward (loss only) and forward + backward
(loss and the gradients of every parameter) are timed interleaved, unijax / BAGEL in turn,
`--repeats` times after a warm-up (and compile); medians and the ratio unijax / BAGEL go to
RESULTS.md. The unijax step is the trainer's code (`losses.loss_sums` + `losses.combine` on
`UnifiedModel` under `jax.jit`), so changes to attention or the CE show up when rerun.

Without `--bagel_src` only the unijax half runs (rows with "-" for BAGEL): `--model=tiny` is the
smoke size the tests use.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs import base
from unijax import batch as batch_lib
from unijax.convert import qwen2, vision
from unijax.models import unified
from unijax.training import losses, optim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_bagel_row import (  # noqa: E402  (benchmarks/vs_bagel_row.py)
    LATENT_CHANNELS,
    LATENT_PATCH,
    MODELS,
    RMS_EPS,
    ROPE_THETA,
    VIT_PATCH,
    Row,
    build_row,
)

TOLERANCE = 1e-4  # relative, on CE, MSE, the loss and the compared gradients


def unijax_config(model: str = "issue", chunk_size: int = 512,
                  ce_chunk_size: int = 2048) -> ml_collections.ConfigDict:
    """The unijax config of `MODELS[model]` in fp32 (xla attention, layers scanned, no remat).

    The VAE is a tiny frozen stand-in: the row's latents are given, so it is never called; it
    is there because 16 latent channels need one (pixel space has 3).
    """
    s = MODELS[model]
    c = base.get_base_config()
    c.model.dtype = c.model.param_dtype = "float32"
    llm = c.model.llm
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "intermediate_size"):
        llm[key] = s[key]
    llm.rope_theta, llm.rms_norm_eps, llm.init_gen_from_und = ROPE_THETA, RMS_EPS, False
    vit = c.model.vit = base.siglip_so400m_vit()
    vit.hidden_size, vit.num_layers = s["vit_hidden"], s["vit_layers"]
    vit.num_heads = s["vit_heads"]
    vit.intermediate_size, vit.patch_size, vit.max_grid = s["vit_mlp"], VIT_PATCH, s["vit_grid"]
    vae = c.model.vae = base.flux_vae()
    vae.base_channels, vae.channel_mult, vae.norm_groups, vae.num_res_blocks = 8, (1, 1), 4, 1
    c.model.latent_channels, c.model.latent_patch_size = LATENT_CHANNELS, LATENT_PATCH
    c.model.max_latent_size = s["latent_grid"]
    c.attention.impl, c.attention.chunk_size = "xla", chunk_size
    c.train.ce_chunk_size = ce_chunk_size
    return c


# --- the unijax half --------------------------------------------------------------------------


def load_bagel_tensors(model: unified.UnifiedModel, config: ml_collections.ConfigDict,
                       tensors: dict[str, np.ndarray]) -> None:
    """BAGEL-named tensors (`Bagel.state_dict()` as numpy) into `model`, by the converters."""
    llm = qwen2.decoder_params_from_hf(tensors, model.llm_config, prefix="language_model.")
    qwen2.load_decoder_params(model.llm, llm)
    vit = vision.vit_from_hf(tensors, num_heads=config.model.vit.num_heads,
                             prefix="vit_model.vision_model.")
    vision.load_tree(model.vit, vit, what="vit")
    for name, tree in vision.bagel_connectors(tensors).items():
        vision.load_tree(getattr(model, name), tree, what=name)


def unijax_model(config: ml_collections.ConfigDict) -> unified.UnifiedModel:
    """A UnifiedModel of `config` holding N(0, 0.02) numpy draws (seed `config.seed`): built
    from abstract shapes, so no per-shape init program is compiled (minutes on a busy CPU)."""
    abstract = nnx.eval_shape(lambda: unified.UnifiedModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(config.seed)
    draw = lambda s: jnp.asarray((0.02 * rng.standard_normal(s.shape)).astype(s.dtype))
    return nnx.merge(graphdef, jax.tree.map(draw, state))


class UnijaxStep:
    """The trainer's loss on `UnifiedModel`, jitted: `forward()` -> (loss, ce, mse) and
    `forward_backward()` -> ((loss, (ce, mse)), grads of every trainable parameter)."""

    def __init__(self, config: ml_collections.ConfigDict, row: Row,
                 tensors: dict[str, np.ndarray] | None = None):
        self.config = config
        model = unijax_model(config)
        if tensors is not None:
            load_bagel_tensors(model, config, tensors)
        graphdef, params, frozen = nnx.split(model, optim.trainable_filter(config), ...)
        self.params = nnx.to_pure_dict(params)
        cfg = losses.LossConfig.from_config(config)
        # Everything is an argument, not a closed-over constant baked into the program.
        self.inputs = (nnx.to_pure_dict(frozen), jax.tree.map(jnp.asarray, row.batch),
                       *(jnp.asarray(a) for a in (row.x0, row.noise, row.image_times)))

        def loss_fn(params, frozen, batch, x0, noise, image_times):
            model = nnx.merge(graphdef, params, frozen)
            sums = losses.loss_sums(model, batch, x0, noise, image_times, cfg.ce_chunk_size,
                                    cfg.max_datasets)
            totals = losses.batch_totals(batch)
            ce = sums["ce_sum"] / jnp.maximum(totals["text_weight"], 1e-6)
            mse = sums["mse_sum"] / jnp.maximum(totals["flow_weight"], 1e-6)
            return losses.combine(sums, totals, cfg), (ce, mse)

        self._forward = jax.jit(loss_fn)
        self._forward_backward = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def forward(self):
        return jax.block_until_ready(self._forward(self.params, *self.inputs))

    def forward_backward(self):
        return jax.block_until_ready(self._forward_backward(self.params, *self.inputs))

    def llm_grads_hf(self, grads: dict) -> dict[str, np.ndarray]:
        """The decoder's gradients under BAGEL's names (`language_model.model.layers...`)."""
        cfg = unified.mot.DecoderConfig.from_config(self.config)
        return qwen2.decoder_params_to_hf(jax.device_get(grads["llm"]), cfg,
                                          prefix="language_model.")


def interleaved_medians(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Milliseconds per call of each fn: one warm-up call each, then `repeats` rounds calling
    them in turn; the median per fn (so load on a shared machine hits every side alike)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    for name, t in times.items():  # the spread, for judging the load (not in the row)
        print(f"  {name}: median {statistics.median(t):.0f} ms, min {min(t):.0f}, "
              f"max {max(t):.0f} over {len(t)}", flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# --- rows -------------------------------------------------------------------------------------

COLUMNS = ("date", "device", "unijax commit", "L", "documents", "BAGEL attention",
           "unijax attention", "fwd ms unijax", "fwd ms BAGEL", "fwd ratio",
           "fwd+bwd ms unijax", "fwd+bwd ms BAGEL", "fwd+bwd ratio", "loss rel. diff",
           "command")


def commit() -> str:
    """HEAD's short hash, "+dirty" when unijax/ differs from it (others' uncommitted work)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "unijax"],
                               cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def format_row(r: dict, command: str) -> str:
    """One RESULTS.md table row of a result dict (BAGEL entries None: "-")."""
    ms = lambda v: "-" if v is None else f"{v:.1f}"
    ratio = lambda a, b: "-" if b is None else f"{a / b:.2f}"
    diff = "-" if r["loss_diff"] is None else f"{r['loss_diff']:.1e}"
    cells = [r["date"], r["device"], r["commit"], str(r["length"]), r["documents"],
             r["bagel_attention"], r["unijax_attention"], ms(r["fwd_unijax"]),
             ms(r["fwd_bagel"]), ratio(r["fwd_unijax"], r["fwd_bagel"]), ms(r["step_unijax"]),
             ms(r["step_bagel"]), ratio(r["step_unijax"], r["step_bagel"]), diff,
             f"`{command}`"]
    return "| " + " | ".join(cells) + " |"


def append_rows(path: str, rows: list[str]) -> None:
    """Appends rows under the table header (the header once, if the file lacks it)."""
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    text = open(path).read() if os.path.exists(path) else ""
    with open(path, "a") as f:
        if header.splitlines()[0] not in text:
            f.write("\n" + header)
        f.write("\n".join(rows) + "\n")


# --- main -------------------------------------------------------------------------------------


def run_length(args, length: int, bagel) -> list[dict]:
    """The result dicts of one row length: one per BAGEL attention path (one without BAGEL)."""
    config = unijax_config(args.model, args.chunk_size, args.ce_chunk_size)
    row = build_row(length, args.documents, MODELS[args.model], args.seed)
    batch_lib.validate(row.batch)
    common = dict(date=str(datetime.date.today()),
                  device=f"cpu ({os.cpu_count()} cores, torch threads {args.threads})",
                  commit=args.commit, length=length, documents="+".join(row.kinds),
                  unijax_attention=f"xla, chunk {args.chunk_size}")
    if bagel is None:
        step = UnijaxStep(config, row)
        t = interleaved_medians({"fwd": step.forward, "step": step.forward_backward},
                                args.repeats)
        return [dict(common, bagel_attention="-", fwd_unijax=t["fwd"], step_unijax=t["step"],
                     fwd_bagel=None, step_bagel=None, loss_diff=None)]
    row = bagel.prepare(row)
    step = UnijaxStep(config, row, bagel.numpy_state())
    (loss, (ce, mse)), grads = step.forward_backward()
    ours = dict(loss=float(loss), ce=float(ce), mse=float(mse))
    results = []
    for path in bagel.attention_paths:
        try:
            ref, ref_grads = bagel.loss_and_grads(path)
        except Exception as e:  # one failing path must not lose the other's row
            print(f"L={length}: BAGEL {path} path failed: {type(e).__name__}: {str(e)[:400]}",
                  flush=True)
            continue
        check_parity(ours, step.llm_grads_hf(grads), ref, ref_grads, path, length,
                     bagel.compared_grads())
        fns = {"fwd": step.forward, "fwd_bagel": lambda p=path: bagel.forward(p),
               "step": step.forward_backward}
        if ref_grads is not None:
            fns["step_bagel"] = lambda p=path: bagel.forward_backward(p)
        t = interleaved_medians(fns, args.repeats)
        results.append(dict(common, bagel_attention=bagel.describe(path), fwd_unijax=t["fwd"],
                            step_unijax=t["step"], fwd_bagel=t["fwd_bagel"],
                            step_bagel=t.get("step_bagel"),
                            loss_diff=relative_difference(ours["loss"], ref["loss"])))
        print(results[-1], flush=True)
    return results


def check_parity(ours: dict, grads: dict, ref: dict, ref_grads: dict, path: str, length: int,
                 names: list[str]) -> None:
    """Exits non-zero, printing both numbers, when a loss or a compared gradient differs."""
    bad = []
    for key in ("ce", "mse", "loss"):
        diff = relative_difference(ours[key], ref[key])
        print(f"L={length} {path}: {key} unijax {ours[key]:.7f} BAGEL {ref[key]:.7f} "
              f"rel. diff {diff:.2e}", flush=True)
        if diff > TOLERANCE:
            bad.append(f"{key}: unijax {ours[key]!r} vs BAGEL {ref[key]!r} ({diff:.2e})")
    for name in names if ref_grads is not None else ():
        a, b = grads[name], ref_grads[name]
        diff = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        print(f"L={length} {path}: grad {name} rel. diff {diff:.2e}", flush=True)
        if diff > TOLERANCE:
            bad.append(f"grad {name}: |unijax - BAGEL| / |BAGEL| = {diff:.2e}")
    if bad:
        sys.exit(f"vs_bagel: unijax and BAGEL disagree at L={length} ({path}):\n  "
                 + "\n  ".join(bad))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bagel_src", default="", help="checkout of ByteDance-Seed/Bagel")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--bagel_attention", default="dense,flex",
                        help="BAGEL attention paths: dense (nested_attention_masks), flex")
    parser.add_argument("--model", default="issue", choices=sorted(MODELS))
    parser.add_argument("--chunk_size", type=int, default=512, help="config.attention.chunk_size")
    parser.add_argument("--ce_chunk_size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args(argv)
    args.commit = commit()  # now: the code this process imported, whatever lands meanwhile
    bagel = None
    if args.bagel_src:
        import vs_bagel_torch  # noqa: PLC0415  (torch only when BAGEL is compared)

        bagel = vs_bagel_torch.BagelReference(args.bagel_src, MODELS[args.model], args.threads,
                                              args.bagel_attention.split(","), args.seed)
    command = "python benchmarks/vs_bagel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        rows += [format_row(r, command) for r in run_length(args, length, bagel)]
    append_rows(args.out, rows)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
