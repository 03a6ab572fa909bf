r"""MoT decoder training-step throughput and MFU (forward + backward of the decoder).

  PYTHONPATH=. python benchmarks/mot_step.py --model=qwen2.5-1.5b --length=8192 --batch=2 \
      --impl=xla,pallas_gpu

Builds a two-expert MoT decoder of the named shape (bf16 compute, fp32 weights, layers scanned,
full remat optional) over BAGEL-like packed rows (half und tokens: text, ViT and image markers;
half gen tokens: VAE latents; several documents per row), jits `value_and_grad` of a loss on
the hidden states and times it. MFU counts the analytic model FLOPs (6 x weight FLOPs per token
+ attention over the *visible* (query, key) pairs only, 3x forward) against the device's peak
dense bf16 rate (`unijax.models.flops.peak_flops`). The LM head and the optimizer update are
not included. Rows are appended to benchmarks/RESULTS.md (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unijax.models import flops as flops_lib
from unijax.models.mot import DecoderConfig, MoTDecoder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as attention_bench  # noqa: E402  (benchmarks/attention.py: packed layouts)

MODELS = {
    # Qwen2.5 shapes (per expert); vocab is irrelevant here (no LM head in the step).
    "qwen2.5-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         head_dim=64, intermediate_size=4864),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         head_dim=128, intermediate_size=8960),
    "qwen2.5-7b": dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       head_dim=128, intermediate_size=18944),
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                 intermediate_size=256),
}

def run(model: str, length: int, batch: int, impl: str, remat: str, steps: int):
    cfg = DecoderConfig(vocab_size=1024, **MODELS[model], num_experts=2, remat_policy=remat,
                        dtype="bfloat16", param_dtype="float32", attention_impl=impl,
                        init_gen_from_und=False)
    decoder = MoTDecoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(decoder)
    rng = np.random.default_rng(0)
    meta = attention_bench.packed_meta(rng, batch, length)
    num_und = length // 2
    positions = jnp.asarray(np.maximum(np.asarray(meta.order), 0), jnp.int32)
    x = jax.random.normal(jax.random.key(1), (batch, length, cfg.hidden_size), jnp.bfloat16)

    def loss_fn(state, x):
        hidden = nnx.merge(graphdef, state)(x, positions, meta, num_und)
        return jnp.mean(jnp.square(hidden.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = step(state, x)  # compile + warm up
    jax.block_until_ready(grads)
    start = time.perf_counter()
    for _ in range(steps):
        loss, grads = step(state, x)
    jax.block_until_ready(grads)
    seconds = (time.perf_counter() - start) / steps

    visible = attention_bench.visible_pairs(meta, chunk=min(1024, length))
    dense = flops_lib.decoder_forward_flops(cfg, num_und, length - num_und, batch_size=batch)
    density = visible / (batch * length * length)
    useful = flops_lib.decoder_forward_flops(cfg, num_und, length - num_und, batch_size=batch,
                                             attention_density=density)
    train_flops = 3 * useful["total"]
    peak = flops_lib.peak_flops(jax.devices()[0])
    mfu = train_flops / seconds / peak if peak else float("nan")
    params = sum(x.size for x in jax.tree.leaves(state))
    return dict(model=model, params=params, length=length, batch=batch, impl=impl, remat=remat,
                step_ms=seconds * 1e3, tokens_per_s=batch * length / seconds,
                tflops=train_flops / seconds / 1e12, mfu=mfu, density=density,
                dense_attention_share=dense["attention"] / dense["total"], loss=float(loss))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(MODELS))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--impl", default="xla")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    rows = []
    for impl in args.impl.split(","):
        try:
            r = run(args.model, args.length, args.batch, impl, args.remat, args.steps)
        except Exception as e:  # one failing backend must not lose the other rows
            print(f"{impl}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(r, flush=True)
        rows.append(
            f"| {device.device_kind} | {datetime.date.today()} | {r['model']} "
            f"({r['params'] / 1e9:.2f}B) | {r['batch']}x{r['length']} | {r['impl']} | "
            f"{r['remat']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['tflops']:.1f} | {r['mfu']:.1%} | {r['density']:.3f} |")
    if rows:
        command = "PYTHONPATH=. python benchmarks/mot_step.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
        header = ("\n## MoT decoder train step (forward + backward), `" + command + "`\n\n"
                  "| device | date | model | rows x L | attention | remat | step ms | tokens/s |"
                  " model TFLOP/s | MFU | mask density |\n|---|---|---|---|---|---|---|---|---|"
                  "---|---|\n")
        with open(args.out, "a") as f:
            f.write(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
