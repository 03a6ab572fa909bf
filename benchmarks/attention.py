r"""Packed-sequence attention: time of forward and forward+backward per backend and length.

  PYTHONPATH=. python benchmarks/attention.py                      # all lengths, all backends
  PYTHONPATH=. python benchmarks/attention.py --lengths=16384 --check
  PYTHONPATH=. python benchmarks/attention.py --tiles --batch=4   # tile classes only, any device

Rows are BAGEL-like packed batches (expert-major: text + ViT tokens and image markers in the
first half of the row, VAE latents in the second; several documents per row: text-to-image,
edits, VQA, interleaved text with noisy + clean VAE and ViT copies of images, plain text;
padding at the end), built directly with numpy. Each length is also run with one plain causal
document per row (`causal`, comparable with cuDNN's causal flash attention) and with packed
causal text documents filling the row (`documents`, the mask splash attention expresses with
segment ids).

Backends: unijax's `pallas_gpu` / `pallas_tpu`, `xla` (chunked reference) and `cudnn` (dense
mask); baselines: `dense_xla` (`jax.nn.dot_product_attention`, XLA, dense [B, 1, L, L] mask),
`cudnn_causal` (cuDNN flash with is_causal, causal rows), `splash` (jax's TPU splash
attention: causal rows, and documents rows through segment ids; the packed mask is not a static
splash mask; K/V heads repeated, splash has no grouped-query layout) and `tokamax` when
installed (is_causal on causal rows, its runtime dense mask otherwise). TFLOP/s count only
unmasked work (4 D flops per visible (query, key) pair and head forward, 2.5x that backward).
Rows are appended to benchmarks/RESULTS.md (or --out) with device, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from unijax.batch import TokenMeta
from unijax.kernels import attention as attention_lib
from unijax.kernels import block_sparsity, pallas_gpu, pallas_tpu
from unijax.kernels import mask as mask_lib

COLUMNS = ("device", "date", "L", "B,H,Hkv,D", "mask", "backend", "fwd ms", "fwd+bwd ms",
           "fwd TFLOP/s", "fwd+bwd TFLOP/s", "tiles skipped", "command")


# ------------------------------------------------------------------------------------------
# Packed BAGEL-like metadata (numpy; the segment builder is too slow at 32k).
# ------------------------------------------------------------------------------------------


def _document(rng) -> list[tuple]:
    """One document as segments: ("text", n) | ("vit", n) | ("vae", n, noisy)."""
    text = lambda lo, hi: ("text", int(rng.integers(lo, hi)))
    vit = lambda: ("vit", int(rng.choice([16, 24, 32])) ** 2)
    vae = lambda noisy: ("vae", int(rng.choice([16, 24, 32])) ** 2, noisy)
    kind = rng.choice(["t2i", "edit", "vqa", "interleaved", "text"], p=[.3, .2, .2, .2, .1])
    if kind == "t2i":
        return [text(16, 96), vae(True)]
    if kind == "edit":
        side = [vae(False), vit()]
        return [*side, text(8, 48), vae(True)]
    if kind == "vqa":
        return [vit(), text(8, 48), text(16, 256)]
    if kind == "interleaved":
        segs = [text(32, 256)]
        for _ in range(int(rng.integers(1, 3))):
            n = int(rng.choice([16, 24])) ** 2
            segs += [("vae", n, True), ("vae", n, False), ("vit", n), text(32, 256)]
        return segs
    return [text(256, 2048)]


def packed_meta(rng, num_rows: int, length: int) -> TokenMeta:
    """BAGEL-like expert-major rows: fields [num_rows, length] (numpy)."""
    und_cap = length // 2
    doc = np.zeros((num_rows, length), np.int32)
    order = np.zeros((num_rows, length), np.int32)
    split = np.full((num_rows, length), -1, np.int32)
    noisy = np.zeros((num_rows, length), bool)
    for r in range(num_rows):
        und, gen, t, s, d, misses = 0, und_cap, 0, 0, 0, 0
        while misses < 8:
            segs = _document(rng)
            need_und = sum(g[1] if g[0] == "text" else (g[1] + 2 if g[0] == "vit" else 2)
                           for g in segs)
            need_gen = sum(g[1] for g in segs if g[0] == "vae")
            if und + need_und > und_cap or gen + need_gen > length:
                misses += 1
                continue
            d += 1
            for g in segs:
                if g[0] == "text":
                    sl = slice(und, und + g[1])
                    doc[r, sl], order[r, sl] = d, np.arange(t, t + g[1])
                    und, t = und + g[1], t + g[1]
                    continue
                is_noisy = g[0] == "vae" and g[2]
                start = und
                doc[r, und], order[r, und] = d, t  # <vision_start>
                und, t = und + 1, t + 1
                if g[0] == "vit":
                    sl, und = slice(und, und + g[1]), und + g[1]
                else:
                    sl, gen = slice(gen, gen + g[1]), gen + g[1]
                doc[r, sl], order[r, sl], split[r, sl], noisy[r, sl] = (
                    d, np.arange(t, t + g[1]), s, is_noisy)
                t += g[1]
                doc[r, und], order[r, und] = d, t  # <vision_end>
                for idx in (start, und):
                    split[r, idx], noisy[r, idx] = s, is_noisy
                und, t, s = und + 1, t + 1, s + 1
    return TokenMeta(doc, order, split, noisy)


def causal_meta(num_rows: int, length: int) -> TokenMeta:
    """One causal text document per row."""
    shape = (num_rows, length)
    return TokenMeta(np.ones(shape, np.int32), np.broadcast_to(np.arange(length, dtype=np.int32),
                                                               shape).copy(),
                     np.full(shape, -1, np.int32), np.zeros(shape, bool))


def documents_meta(rng, num_rows: int, length: int) -> TokenMeta:
    """Causal text documents of 128..min(4096, length / 2) tokens filling each row (the last
    one cut to fit)."""
    doc = np.zeros((num_rows, length), np.int32)
    for r in range(num_rows):
        start, d = 0, 0
        while start < length:
            d += 1
            n = min(int(rng.integers(128, max(129, min(4096, length // 2) + 1))), length - start)
            doc[r, start:start + n] = d
            start += n
    order = np.broadcast_to(np.arange(length, dtype=np.int32), doc.shape).copy()
    return TokenMeta(doc, order, np.full(doc.shape, -1, np.int32), np.zeros(doc.shape, bool))


META_BUILDERS = {"packed": packed_meta,
                 "causal": lambda rng, num_rows, length: causal_meta(num_rows, length),
                 "documents": documents_meta}


def visible_pairs(meta: TokenMeta, chunk: int = 512) -> int:
    """Number of visible (query, key) pairs over all rows, evaluated chunk by chunk."""
    meta = jax.tree.map(jnp.asarray, meta)
    chunk = min(chunk, meta.doc_id.shape[1])
    if meta.doc_id.shape[1] % chunk:
        chunk = meta.doc_id.shape[1]

    @jax.jit
    def count(m):
        length = m.doc_id.shape[1]
        starts = jnp.arange(0, length, chunk)

        def one(start):
            q = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, 1), m)
            return jnp.sum(mask_lib.dense_mask(q, m), dtype=jnp.int32)  # < 2**31 per chunk
        return jax.lax.map(one, starts)

    return int(np.sum(np.asarray(count(meta), np.int64)))


# ------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------


def timed(fn, *args, min_seconds: float = 0.3, max_iters: int = 20) -> float:
    """Median wall time in ms of fn(*args) after a warm-up call (compilation)."""
    jax.block_until_ready(fn(*args))
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_seconds and len(times) < max_iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def with_backward(fn):
    """jit(q, k, v, d_out -> grads of <fn(q, k, v), d_out>)."""

    def loss(q, k, v, d_out):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * d_out)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def backends_for(meta: TokenMeta, mask_name: str, platform: str, args) -> dict:
    """name -> attention fn(q, k, v) for one metadata batch."""
    jmeta = jax.tree.map(jnp.asarray, meta)
    blocks = {name: getattr(args, name) for name in attention_lib.BLOCK_NAMES
              if getattr(args, name)}
    ours = lambda impl: (lambda q, k, v: attention_lib.attention(q, k, v, jmeta, impl=impl,
                                                                 **blocks))
    out = {}
    if platform == "gpu":
        out["pallas_gpu"] = ours("pallas_gpu")
    if platform == "tpu":
        out["pallas_tpu"] = ours("pallas_tpu")
    if "xla" in args.backends:
        out["xla"] = lambda q, k, v: attention_lib.attention(q, k, v, jmeta, impl="xla",
                                                             chunk_size=512)
    if platform == "gpu":
        out["cudnn"] = ours("cudnn")
    dense = mask_lib.dense_mask(jmeta)[:, None] if "dense_xla" in args.backends else None
    if dense is not None:
        out["dense_xla"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=dense, implementation="xla")
    if mask_name == "causal" and platform == "gpu":
        out["cudnn_causal"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    if mask_name in ("causal", "documents") and platform == "tpu":
        segments = jmeta.doc_id if mask_name == "documents" else None
        out["splash"] = functools.partial(splash, segment_ids=segments)
    try:
        import tokamax
    except ImportError:
        tokamax = None
    if tokamax is not None and mask_name == "causal":
        out["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True)
    elif tokamax is not None:
        allowed = mask_lib.dense_mask(jmeta)[:, None]
        out["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(q, k, v, mask=allowed)
    return {name: fn for name, fn in out.items() if name in args.backends or
            name in ("cudnn_causal", "splash", "tokamax")}


def splash(q, k, v, segment_ids=None, interpret: bool = False):
    """jax's TPU splash attention, causal within each segment: q [B, L, H, D], k/v
    [B, L, Hkv, D] (repeated to H heads), segment_ids [B, L] or None (one causal row)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, length, h, d = q.shape
    group = h // k.shape[2]
    mask = sm.MultiHeadMask([sm.CausalMask((length, length))] * h)
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    if segment_ids is None:
        out = jax.vmap(kernel)(heads_first(q * d**-0.5), heads_first(k), heads_first(v))
    else:
        one = lambda q, k, v, seg: kernel(q, k, v, segment_ids=sk.SegmentIds(q=seg, kv=seg))
        out = jax.vmap(one)(heads_first(q * d**-0.5), heads_first(k), heads_first(v),
                            segment_ids)
    return heads_first(out).astype(q.dtype)


# ------------------------------------------------------------------------------------------
# Main.
# ------------------------------------------------------------------------------------------


def correctness(args, platform: str, emit) -> None:
    """Forward and gradients of the device backends against the xla reference (bf16)."""
    rng = np.random.default_rng(1)
    b, length, h, hkv, d = 2, 2048, 8, 2, 128
    meta = packed_meta(rng, b, length)
    jmeta = jax.tree.map(jnp.asarray, meta)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, length, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, length, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, length, hkv, d), jnp.bfloat16)
    d_out = jax.random.normal(keys[3], (b, length, h, d), jnp.float32)
    impls = {"gpu": ["pallas_gpu", "cudnn"], "tpu": ["pallas_tpu"]}.get(platform, [])

    def run(impl):
        fn = lambda q, k, v: attention_lib.attention(q, k, v, jmeta, impl=impl)
        return jax.jit(fn)(q, k, v), with_backward(fn)(q, k, v, d_out)

    ref_out, ref_grads = run("xla")
    for impl in impls:
        try:
            out, grads = run(impl)
            errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for a, b in zip((out, *grads), (ref_out, *ref_grads))]
            scale = [float(jnp.max(jnp.abs(b.astype(jnp.float32))))
                     for b in (ref_out, *ref_grads)]
            emit(f"check {impl} vs xla (bf16, L={length}): max abs err out/dq/dk/dv = "
                 + ", ".join(f"{e:.3g} (of {s:.3g})" for e, s in zip(errs, scale))
                 + f"; nan: {bool(any(jnp.isnan(x).any() for x in (out, *grads)))}")
        except Exception:  # noqa: BLE001 (report and go on with the other backends)
            emit(f"check {impl} FAILED:\n{traceback.format_exc()}")


def sweep(args, emit) -> None:
    """Times pallas_gpu tile / launch settings on 8k causal and packed rows (GPU tuning)."""
    b, length, h, hkv, d = args.batch, 8192, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(keys[0], (b, length, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, length, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, length, hkv, d), jnp.bfloat16)
    d_out = jax.random.normal(keys[3], (b, length, h, d), jnp.float32)
    settings = [  # block_q, block_kv, block_q_bwd, block_kv_bwd, num_warps, num_stages
        (128, 64, 64, 64, 4, 2), (128, 64, 64, 64, 8, 2), (128, 64, 64, 64, 4, 3),
        (128, 128, 64, 128, 8, 2), (64, 64, 32, 64, 4, 3), (128, 32, 128, 32, 4, 3),
        (128, 64, 64, 128, 8, 3), (64, 128, 128, 64, 4, 2)]
    for mask_name, meta in (("causal", causal_meta(b, length)),
                            ("packed", packed_meta(np.random.default_rng(3), b, length))):
        jmeta = jax.tree.map(jnp.asarray, meta)
        for bq, bk, bqb, bkb, warps, stages in settings:
            kernel = functools.partial(pallas_gpu.attention, scale=d**-0.5, block_q=bq,
                                       block_kv=bk, block_q_bwd=bqb, block_kv_bwd=bkb,
                                       num_warps=warps, num_stages=stages)
            fn = lambda q, k, v, kernel=kernel, m=jmeta: kernel(q, k, v, m, m)
            try:
                fwd = timed(jax.jit(fn), q, k, v)
                both = timed(with_backward(fn), q, k, v, d_out)
                emit(f"sweep L={length} {mask_name} blocks fwd {bq}x{bk} bwd {bqb}x{bkb} "
                     f"warps {warps} stages {stages}: fwd {fwd:.2f} ms, fwd+bwd {both:.2f} ms")
            except Exception as e:  # noqa: BLE001
                emit(f"sweep {bq}x{bk}/{bqb}x{bkb}/{warps}/{stages} failed: "
                     f"{type(e).__name__}: {str(e)[:200]}")


def tile_table(args, emit) -> None:
    """Tile classes of each layout under each backend's default tiles (computed, not timed):
    the share of tiles a Pallas kernel visits bounds its work relative to dense attention."""
    tiles = {"GPU fwd": pallas_gpu.DEFAULT_BLOCKS[:2], "GPU bwd": pallas_gpu.DEFAULT_BLOCKS[2:],
             "TPU fwd": pallas_tpu.DEFAULT_BLOCKS[:2], "TPU bwd": pallas_tpu.DEFAULT_BLOCKS[2:]}
    columns = ["L", "rows", "mask", "visible pairs"] + [
        f"{name} {bq}x{bk}: visited (partial)" for name, (bq, bk) in tiles.items()]
    emit("| " + " | ".join(columns) + " |")
    emit("|" + "---|" * len(columns))
    rng = np.random.default_rng(0)
    for length in (int(x) for x in args.lengths.split(",")):
        for mask_name in args.masks.split(","):
            meta = META_BUILDERS[mask_name](rng, args.batch, length)
            density = visible_pairs(meta) / (args.batch * length * length)
            jmeta = jax.tree.map(jnp.asarray, meta)
            cells = []
            for bq, bk in tiles.values():
                cls = np.asarray(block_sparsity.classify(jmeta, jmeta, bq, bk))
                visited = np.mean(cls != block_sparsity.EMPTY)
                partial = np.mean(cls == block_sparsity.PARTIAL)
                cells.append(f"{visited:.1%} ({partial:.1%})")
            emit("| " + " | ".join([str(length), str(args.batch), mask_name,
                                    f"{density:.1%}", *cells]) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--masks", default="packed,causal,documents")
    parser.add_argument("--backends", default="pallas_gpu,pallas_tpu,xla,cudnn,dense_xla")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=128)
    for name in attention_lib.BLOCK_NAMES:
        parser.add_argument(f"--{name}", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare with xla first")
    parser.add_argument("--sweep", action="store_true", help="time pallas_gpu settings first")
    parser.add_argument("--tiles", action="store_true",
                        help="only the tile classes of each layout (no timing; any device)")
    parser.add_argument("--budget_s", type=float, default=500.0,
                        help="stop measuring after this many seconds (rows so far are kept)")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.backends = args.backends.split(",")
    unknown = sorted(set(args.masks.split(",")) - set(META_BUILDERS))
    if unknown:
        parser.error(f"--masks: unknown {unknown}; known: {sorted(META_BUILDERS)}")
    started = time.time()
    platform = jax.default_backend()
    device = jax.devices()[0].device_kind
    today = datetime.date.today().isoformat()
    command = "PYTHONPATH=. python benchmarks/attention.py " + " ".join(
        sys.argv[1:] if argv is None else argv)

    def emit(line: str) -> None:
        print(line, flush=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")

    if args.tiles:
        emit(f"\n### attention tile classes (computed on {device}, not timed; {today}; "
             f"`{command}`)\n")
        tile_table(args, emit)
        return
    emit(f"\n### attention ({device}, {today}, jax {jax.__version__})\n")
    if args.check:
        correctness(args, platform, emit)
        emit("")
    if args.sweep and platform == "gpu":
        sweep(args, emit)
        emit("")
    emit("| " + " | ".join(COLUMNS) + " |")
    emit("|" + "---|" * len(COLUMNS))
    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    # Tile classes are reported for the platform's Pallas backend (GPU tiles on CPU).
    default_blocks = (pallas_tpu if platform == "tpu" else pallas_gpu).DEFAULT_BLOCKS
    for length in (int(x) for x in args.lengths.split(",")):
        keys = jax.random.split(jax.random.key(length), 4)
        q = jax.random.normal(keys[0], (b, length, h, d), jnp.bfloat16)
        k = jax.random.normal(keys[1], (b, length, hkv, d), jnp.bfloat16)
        v = jax.random.normal(keys[2], (b, length, hkv, d), jnp.bfloat16)
        d_out = jax.random.normal(keys[3], (b, length, h, d), jnp.float32)
        for mask_name in args.masks.split(","):
            meta = META_BUILDERS[mask_name](rng, b, length)
            pairs = visible_pairs(meta)
            fwd_flops = 4.0 * d * h * pairs
            bq = args.block_q or default_blocks[0]
            bk = args.block_kv or default_blocks[1]
            skipped = float(block_sparsity.skipped_fraction(
                block_sparsity.classify(jax.tree.map(jnp.asarray, meta),
                                        jax.tree.map(jnp.asarray, meta), bq, bk)))
            density = pairs / (b * length * length)
            for name, fn in backends_for(meta, mask_name, platform, args).items():
                if time.time() - started > args.budget_s:
                    emit(f"<!-- budget of {args.budget_s:.0f} s spent: stopped before "
                         f"{name} L={length} {mask_name} -->")
                    return
                cells = {"fwd": "-", "bwd": "-"}
                for phase in ("fwd", "bwd"):
                    try:
                        if phase == "fwd":
                            ms = timed(jax.jit(fn), q, k, v)
                        else:
                            ms = timed(with_backward(fn), q, k, v, d_out)
                        cells[phase] = ms
                    except Exception as e:  # noqa: BLE001 (OOM or unsupported: say so)
                        cells[phase] = f"failed: {type(e).__name__}: {str(e)[:80]}"
                        print(traceback.format_exc(), file=sys.stderr)

                def ms_cell(x):
                    return f"{x:.2f}" if isinstance(x, float) else x.replace("|", "/")

                def tflops(x, flops):
                    return f"{flops / (x * 1e-3) / 1e12:.1f}" if isinstance(x, float) else "-"

                tiles = f"{skipped:.1%}" if name.startswith("pallas") else "0%"
                emit("| " + " | ".join([
                    device, today, str(length), f"{b},{h},{hkv},{d}",
                    f"{mask_name} ({density:.1%} visible)", name, ms_cell(cells["fwd"]),
                    ms_cell(cells["bwd"]), tflops(cells["fwd"], fwd_flops),
                    tflops(cells["bwd"], 3.5 * fwd_flops), tiles, f"`{command}`"]) + " |")


if __name__ == "__main__":
    main()
