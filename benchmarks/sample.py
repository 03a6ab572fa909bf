r"""Sampling speed over a cached context: seconds per denoising step and per generated text token.

  PYTHONPATH=. python benchmarks/sample.py --config=configs/tiny.py
  PYTHONPATH=. python benchmarks/sample.py --config=configs/tiny.py --tiny --out=/tmp/rows.jsonl

A random-weight model of the config (`UnifiedModel(config, rngs=nnx.Rngs(0))`: weights do not
change the time) and its `inference.cache.Engine`. For each context length (a prefilled text of
that many tokens, in a context of fixed capacity) it times, on the current device:

- a denoising step: one `image.sample` call of `Guidance(num_steps=K)` (K - 1 Euler steps at
  the config's latent grid), timed after a warm-up call, divided by K - 1; without guidance
  (the conditional pass only) and with text guidance on every step (the conditional and an
  empty text-unconditional context of the same capacity, one batched call);
- a generated text token: one greedy `text.generate` of --new_tokens tokens without stop tokens
  (so every row runs the whole loop: `<|im_start|>` + new_tokens forward steps), timed after a
  warm-up call, divided by --new_tokens.

Each number is the median of --repeats timed calls (`jax.block_until_ready`,
`time.perf_counter`); host work inside a call (laying out the image chunk, fetching the ids)
is included. A new token attends to every slot of the cache (empty slots are masked, not
skipped), so at a fixed capacity the time should not grow with the context; the rows at
--large_capacity show what it grows with instead. Prints a markdown table; --out writes one
JSON object per row (JSON lines).

`--tiny` shrinks everything for a smoke test (the test suite runs it): a 1-layer model of
width 64, capacities 64 and 128, contexts of 8 and 32 tokens, a 2x2 grid, 3 grid points,
4 new tokens, one timed call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from unijax.data import packing
from unijax.data.plan import TextItem
from unijax.data.tokenizer import load_tokenizer
from unijax.inference import image as image_lib
from unijax.inference import text as text_lib
from unijax.inference.cache import Context, Engine
from unijax.models.unified import UnifiedModel

COLUMNS = ("what", "capacity", "context tokens", "cache slots used", "ms", "per")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py` or `path/to/config.py:arg` -> its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("benchmarked_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"--config={spec!r}: no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The --tiny model: 1 layer of width 64, a 1-layer ViT (the token layout is unchanged)."""
    llm = config.model.llm
    llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads = 64, 1, 4, 2
    llm.head_dim, llm.intermediate_size = 16, 128
    if config.model.vit is not None:
        vit = config.model.vit
        vit.hidden_size, vit.num_layers, vit.intermediate_size = 32, 1, 64
    return config


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` (its result blocked on) over `repeats` calls after one
    warm-up call (compilation)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt_context(engine: Engine, capacity: int, tokens: int, batch: int,
                   vocab: int) -> Context:
    """A context of `batch` rows holding one text of `tokens` random ids (bytes: any id
    below 256 is an ordinary token)."""
    ids = np.random.default_rng(tokens).integers(0, min(vocab, 256), tokens).astype(np.int32)
    return Context.empty(engine, batch, capacity).append(engine, [[TextItem(ids, False)]] * batch)


def measure(engine: Engine, capacity: int, tokens: int, args, grid, vocab: int) -> list[dict]:
    """The rows of one (capacity, context length): two denoising steps and a text token."""
    ctx = prompt_context(engine, capacity, tokens, args.batch, vocab)
    empty = Context.empty(engine, args.batch, capacity)
    common = dict(capacity=capacity, context_tokens=tokens, cache_slots=ctx.length,
                  batch=args.batch, repeats=args.repeats)
    rows = []
    for what, scale in (("denoise step", 1.0), ("denoise step, text guidance", 4.0)):
        guidance = image_lib.Guidance(num_steps=args.steps, text_scale=scale, interval=(0, 1))
        run = lambda g=guidance: image_lib.sample(engine, ctx, grid, text_uncond=empty,
                                                  guidance=g, seed=0)
        seconds = median_seconds(run, args.repeats) / (args.steps - 1)
        rows.append(dict(what=what, grid=list(grid), steps=args.steps - 1, seconds=seconds,
                         **common))
    run = lambda: text_lib.generate(engine, ctx, max_new_tokens=args.new_tokens,
                                    stop_ids=())[1]
    seconds = median_seconds(run, args.repeats) / args.new_tokens
    rows.append(dict(what="text token (greedy)", new_tokens=args.new_tokens, seconds=seconds,
                     **common))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        per = (f"step ({r['steps']} steps, {r['grid'][0]}x{r['grid'][1]} latent grid)"
               if "steps" in r else f"token ({r['new_tokens']} new tokens)")
        lines.append(f"| {r['what']} | {r['capacity']} | {r['context_tokens']} | "
                     f"{r['cache_slots']} | {r['seconds'] * 1e3:.2f} | {per} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.py",
                        help="config file (path or path:arg)")
    parser.add_argument("--contexts", default="16,64,128,256,512",
                        help="context lengths (text tokens) at --capacity")
    parser.add_argument("--capacity", type=int, default=1024)
    parser.add_argument("--large_capacity", type=int, default=4096)
    parser.add_argument("--large_contexts", default="16,512",
                        help="context lengths also timed at --large_capacity")
    parser.add_argument("--steps", type=int, default=9, help="K grid points: K - 1 steps")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--grid", default="", help="latent grid HxW (default: the config's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="write the rows here as JSON lines")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke test")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps={args.steps} must be >= 2 (K - 1 timed steps)")
    config = load_config(args.config)
    if args.tiny:
        config = shrink(config)
        args.contexts, args.capacity, args.large_capacity, args.large_contexts = \
            "8,32", 64, 128, "8"
        args.steps, args.new_tokens, args.repeats, args.grid = 3, 4, 1, args.grid or "2x2"

    tokenizer = load_tokenizer(config.data.get("tokenizer", "byte"))
    model = UnifiedModel(config, rngs=nnx.Rngs(0))
    engine = Engine(model, config, tokenizer.special)
    grid = (tuple(int(x) for x in args.grid.split("x")) if args.grid else
            packing.PackSpec.from_config(config, tokenizer.special).latent_grid)
    vocab = config.model.llm.vocab_size
    device = jax.devices()[0]
    name = device.platform + ("" if device.device_kind == device.platform else
                              f" {device.device_kind}")
    print(f"device: {name}, {os.cpu_count()} CPU cores; "
          f"config {args.config}; batch {args.batch}; latent grid {grid}", flush=True)

    plan = [(args.capacity, int(n)) for n in args.contexts.split(",")]
    plan += [(args.large_capacity, int(n)) for n in args.large_contexts.split(",") if n]
    rows = []
    for capacity, tokens in plan:
        new = measure(engine, capacity, tokens, args, grid, vocab)
        for r in new:
            r.update(device=name, config=args.config)
            print(f"{r['what']}: capacity {capacity}, context {tokens} tokens: "
                  f"{r['seconds'] * 1e3:.2f} ms", flush=True)
        rows += new
    print(table(rows))
    for what in sorted({r["what"] for r in rows}):
        at = [r["seconds"] for r in rows if r["what"] == what and r["capacity"] == args.capacity]
        print(f"{what}: max / min over contexts at capacity {args.capacity}: "
              f"{max(at) / min(at):.2f}")
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
