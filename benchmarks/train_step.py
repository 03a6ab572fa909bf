r"""The unified train step ladder: the trainer's real update on packed BAGEL-like rows.

  PYTHONPATH=. python benchmarks/train_step.py --size=tiny,300m,1b,3b \
      --row_tokens=4096,8192,16384 --batch=1 --impl=xla,pallas_gpu,cudnn --remat=full --steps=5
  PYTHONPATH=. python benchmarks/train_step.py --compile_only --size=300m --layers=2,8,28 \
      --unscanned_layers=2,8 --row_tokens=4096

What is timed is `training.train.make_train_step`'s update, unchanged: the unified model (MoT
decoder, ViT + connector, VAE encode of the canvases when the size has a VAE, vae2llm /
llm2vae, timestep embedding), the chunked CE + rectified-flow loss, AdamW with global-norm
clipping and the EMA update (configs/base.py's BAGEL recipe: EMA 0.9999), state donated, on
one device (the first of `jax.devices()`). Compile s is `.lower(...).compile()` of it; step ms
is the median of --steps calls after one warm-up call.

Sizes (per expert, two experts; Qwen2.5 decoder shapes with BAGEL's QK-norm and an untied LM
head; hidden / layers / heads / KV heads / head dim / SwiGLU, decoder weights per expert):
  tiny  configs/tiny.py: 128 / 4 / 4 / 2 / 32 / 384, vocab 320; ViT 64 wide, 2 layers,
        patch 4 (a 32x32 position table: the rows' images are up to 32 patches a side); no
        VAE (pixel patches of 4x4, as configs/tiny.py); float32 compute.
  300m  Qwen2.5-0.5B: 896 / 24 / 14 / 2 / 64 / 4864 (0.36B per expert).
  1b    Qwen2.5-1.5B: 1536 / 28 / 12 / 2 / 128 / 8960 (1.31B per expert).
  3b    Qwen2.5-3B: 2048 / 36 / 16 / 2 / 128 / 11008 (2.77B per expert).
The last three use BAGEL's vocabulary (152,064), a SigLIP-B-like ViT (768 wide, 12 layers,
12 heads, MLP 3072: ViT-B/16's shapes with BAGEL's patch 14 and 70x70 position table), the
FLUX VAE (frozen, encoded in the step as BAGEL does), bf16 compute and fp32 weights.

Rows (benchmarks/train_rows.py): BAGEL-like documents of benchmarks/attention.py's mix
(text-to-image, edit, VQA, interleaved text with noisy + clean VAE and ViT copies of images,
plain text), CE targets on answers and document text, flow times t = sigmoid(randn), packed
first-fit into expert-major rows of L / 2 und and L / 2 gen tokens (L = row_tokens), L / 4
ViT patch slots and max(2, L / 1024) VAE slots, uint8 pixels, through `unijax.batch_builder`.

FLOPs: `unijax.models.flops.step_flops(config, batch)` over the mask's visible attention
pairs (ViT, connector, VAE encoder, decoder, heads): MFU counts its "model" FLOPs (forward +
backward, no remat recompute), HFU its "hardware" FLOPs (recompute included), both over the
device's peak dense bf16 rate (`flops.peak_flops`; NaN when unknown, e.g. CPU). Backends a
device cannot run are skipped with the reason (Pallas kernels only on their own platform: the
interpreter is not a speed benchmark). Rows are appended to benchmarks/RESULTS.md (or --out).

--compile_only lowers and compiles the same step from abstract arrays (ShapeDtypeStructs:
nothing is allocated) at each depth of --layers with `scan_layers=True` and of
--unscanned_layers with `scan_layers=False`, and reports lower / compile seconds and XLA's
memory analysis.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import gc
import os
import statistics
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from benchmarks import train_rows
from configs import base
from unijax import config as config_lib
from unijax.kernels import attention as attention_lib
from unijax.models import flops as flops_lib
from unijax.models import mot
from unijax.training import optim, sharding
from unijax.training import state as state_lib
from unijax.training import train as train_lib

QWEN_VOCAB = 152064
SIGLIP_B = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                patch_size=14, max_grid=70)
SIZES = {
    "tiny": dict(llm=dict(vocab_size=320, hidden_size=128, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=32, intermediate_size=384),
                 vit=dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                          patch_size=4, max_grid=32),
                 vae=False, dtype="float32"),
    "300m": dict(llm=dict(vocab_size=QWEN_VOCAB, hidden_size=896, num_layers=24, num_heads=14,
                          num_kv_heads=2, head_dim=64, intermediate_size=4864),
                 vit=SIGLIP_B, vae=True, dtype="bfloat16"),
    "1b": dict(llm=dict(vocab_size=QWEN_VOCAB, hidden_size=1536, num_layers=28, num_heads=12,
                        num_kv_heads=2, head_dim=128, intermediate_size=8960),
               vit=SIGLIP_B, vae=True, dtype="bfloat16"),
    "3b": dict(llm=dict(vocab_size=QWEN_VOCAB, hidden_size=2048, num_layers=36, num_heads=16,
                        num_kv_heads=2, head_dim=128, intermediate_size=11008),
               vit=SIGLIP_B, vae=True, dtype="bfloat16"),
}
LADDER_COLUMNS = ("device", "date", "size (trainable params)", "layers", "rows x L", "attention",
                  "remat", "compile s", "step ms", "tokens/s/device", "model TFLOP/s/device", "MFU",
                  "HFU", "row fill", "memory GiB (state / temp)")
COMPILE_COLUMNS = ("device", "date", "size", "layers", "scan", "rows x L", "attention", "remat",
                   "lower s", "compile s", "memory GiB (state / temp)")


def ladder_config(size: str, row_tokens: int, impl: str = "xla", remat: str = "full",
                  num_layers: int | None = None, scan_layers: bool = True,
                  overrides: dict | None = None) -> ml_collections.ConfigDict:
    """configs/base.py (BAGEL's recipe) with the shapes of `size` and rows of `row_tokens`
    (half und, half gen) on a one-device mesh; `overrides` {"section.name": value} last."""
    if size not in SIZES:
        raise ValueError(f"--size: unknown {size!r}; known: {sorted(SIZES)}")
    if row_tokens % 4:
        raise ValueError(f"--row_tokens={row_tokens} must be a multiple of 4")
    shapes = SIZES[size]
    c = base.get_base_config()
    c.model.dtype = shapes["dtype"]
    c.model.llm.update(shapes["llm"])
    c.model.llm.remat_policy, c.model.llm.scan_layers = remat, scan_layers
    if num_layers is not None:
        c.model.llm.num_layers = num_layers
    c.model.vit = base.siglip_so400m_vit()
    c.model.vit.update(shapes["vit"])
    if shapes["vae"]:
        c.model.vae = base.flux_vae()
    else:  # pixel space, as configs/tiny.py
        c.model.vae, c.model.latent_channels, c.model.latent_patch_size = None, 3, 4
    c.attention.impl = impl
    und = row_tokens // 2
    c.data.batch_size = 1
    c.data.und_capacity, c.data.gen_capacity = und, row_tokens - und
    c.data.max_vit_patches = row_tokens // 4
    c.data.max_vae_images = max(2, row_tokens // 1024)
    fits = min(c.data.gen_capacity, c.data.max_vit_patches)
    sides = [s for s in train_rows.IMAGE_SIDES if s * s <= fits]
    if not sides:
        raise ValueError(f"--row_tokens={row_tokens}: too short for one image of "
                         f"{train_rows.IMAGE_SIDES[0]}^2 tokens")
    c.data.vae_image_size = max(sides) * config_lib.latent_cell(c.model)
    c.data.vit_image_size = max(sides) * c.model.vit.patch_size
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    for key, value in (overrides or {}).items():
        *path, name = key.split(".")
        section = c
        for part in path:
            section = section.get(part) if isinstance(section, ml_collections.ConfigDict) else None
        if not isinstance(section, ml_collections.ConfigDict) or name not in section:
            raise ValueError(f"--set: the config has no field {key!r}")
        section[name] = value
    return c


def parse_overrides(text: str) -> dict:
    """"train.ema_memory=host,train.grad_clip=0.5" -> {"train.ema_memory": "host", ...}
    (values are Python literals where they parse as one, else strings)."""
    out = {}
    for item in (x for x in text.split(",") if x):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not section.name=value")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def platform_skip_reason(impl: str, platform: str) -> str | None:
    """Why the device cannot run `impl` at all (`resolve_auto` names its Pallas backend)."""
    native = attention_lib.resolve_auto(platform)
    if impl in ("pallas_tpu", "pallas_gpu") and impl != native:
        return (f"{impl} needs a {impl.split('_')[1].upper()} (this device is {platform}; the "
                "Pallas interpreter is not a speed benchmark)")
    if impl == "cudnn" and native != "pallas_gpu":
        return f"cudnn needs a GPU (this device is {platform})"
    return None


def config_problems(config: ml_collections.ConfigDict) -> str | None:
    """`unijax.config.validate`'s errors (e.g. Pallas tiles that do not divide the row)."""
    try:
        config_lib.validate(config, num_devices=1)
    except config_lib.ConfigError as e:
        return str(e).replace("\n", " ")
    return None


def _memory(compiled) -> tuple[float, float] | None:
    """(arguments, temporaries) of a compiled step in GiB, from XLA's memory analysis."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if stats is None:
        return None
    return stats.argument_size_in_bytes / 2**30, stats.temp_size_in_bytes / 2**30


def _setup(config, device):
    mesh = sharding.make_mesh(config.mesh, devices=[device])
    spec = state_lib.ModelSpec.build(config)
    tx = optim.make_optimizer(config, spec.abstract_params)
    return mesh, spec, tx


def _in_mesh(mesh) -> contextlib.ExitStack:
    """Tracing needs the mesh and the logical axis rules (as `train.train` sets them)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nnx.logical_axis_rules(sharding.LOGICAL_RULES))
    return stack


def run_step(config, device, num_rows: int, steps: int) -> dict:
    """Compiles and times the train step of `config` on `device`; returns one row's numbers."""
    mesh, spec, tx = _setup(config, device)
    host = train_rows.packed_rows(np.random.default_rng(0), config, num_rows)
    with _in_mesh(mesh):
        state, shardings = state_lib.init_state(config, mesh, spec, tx)
        step = train_lib.make_train_step(config, spec, tx, shardings, mesh)
        batch = jax.device_put(host, sharding.batch_sharding(mesh))
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready((state, metrics))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = flops_lib.step_flops(config, host)  # visible attention pairs only
    peak = flops_lib.peak_flops(device)
    rate = lambda key: flops[key] / seconds / peak if peak else float("nan")
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract_params))
    tokens = num_rows * host.length
    return dict(params=params, compile_s=compile_s, step_ms=seconds * 1e3,
                tokens_per_s=tokens / seconds, tflops=flops["model"] / seconds / 1e12,
                mfu=rate("model"), hfu=rate("hardware"), fill=float(np.mean(host.doc_id > 0)),
                memory=_memory(compiled), loss=float(metrics["loss"]))


def compile_step(config, device, num_rows: int) -> dict:
    """Lowers and compiles the train step of `config` from ShapeDtypeStructs only."""
    mesh, spec, tx = _setup(config, device)
    host = train_rows.packed_rows(np.random.default_rng(0), config, num_rows)
    with _in_mesh(mesh):
        target, shardings = state_lib.abstract_state(config, mesh, spec, tx)
        step = train_lib.make_train_step(config, spec, tx, shardings, mesh)
        rows = sharding.batch_sharding(mesh)
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows),
                             host)
        start = time.perf_counter()
        lowered = step.lower(target, batch)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start - lower_s
    return dict(lower_s=lower_s, compile_s=compile_s, memory=_memory(compiled))


def _memory_cell(memory) -> str:
    return "-" if memory is None else f"{memory[0]:.2f} / {memory[1]:.2f}"


def _params_cell(size: str, params: int) -> str:
    return f"{size} ({params / 1e9:.2f}B)" if params >= 1e8 else f"{size} ({params / 1e6:.1f}M)"


def _cells(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def ladder_rows(args, cases, device, emit, notes) -> None:
    """One row per (size, layers, row tokens, backend, remat) the device can run."""
    platform = jax.default_backend()
    for impl in sorted({c[3] for c in cases if platform_skip_reason(c[3], platform)}):
        notes.append(f"skipped {impl}: {platform_skip_reason(impl, platform)}")
        print(notes[-1], flush=True)
    for size, layers, length, impl, remat in cases:
        if platform_skip_reason(impl, platform):
            continue
        config = ladder_config(size, length, impl, remat, layers, overrides=args.set)
        layers = config.model.llm.num_layers
        reason = config_problems(config)
        if reason is not None:
            notes.append(f"skipped {impl} at {size} x {length}: {reason}")
            print(notes[-1], flush=True)
            continue
        head = [size, layers, f"{args.batch}x{length}", impl, remat]
        try:
            r = run_step(config, device, args.batch, args.steps)
        except Exception as e:  # noqa: BLE001 (OOM or unsupported: say so, keep the others)
            failed = f"failed: {type(e).__name__}: {str(e)[:160]}"
            emit([*head, failed, *["-"] * (len(LADDER_COLUMNS) - len(head) - 3)])
            continue
        finally:
            gc.collect()
        print(r, flush=True)
        head[0] = _params_cell(size, r["params"])
        emit([*head, f"{r['compile_s']:.1f}", f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.0f}",
              f"{r['tflops']:.2f}", f"{r['mfu']:.1%}", f"{r['hfu']:.1%}", f"{r['fill']:.1%}",
              _memory_cell(r["memory"])])


def compile_rows(args, cases, device, emit) -> None:
    """One row per (size, layers, scan, row tokens): AOT lower and compile seconds."""
    for size, layers, scan, length, impl, remat in cases:
        config = ladder_config(size, length, impl, remat, layers, scan, args.set)
        try:
            r = compile_step(config, device, args.batch)
            cells = [f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}", _memory_cell(r["memory"])]
        except Exception as e:  # noqa: BLE001 (keep the other depths' rows)
            cells = [f"failed: {type(e).__name__}: {str(e)[:120]}", "-", "-"]
        finally:
            gc.collect()
        emit([size, layers, "yes" if scan else "no", f"{args.batch}x{length}", impl, remat,
              *cells])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help=f"comma-separated of {sorted(SIZES)}")
    parser.add_argument("--row_tokens", default="4096", help="comma-separated row lengths")
    parser.add_argument("--batch", type=int, default=1, help="rows per step")
    parser.add_argument("--impl", default="xla", help="comma-separated attention backends")
    parser.add_argument("--remat", default="full", help=f"comma-separated of "
                        f"{sorted(mot.REMAT_POLICIES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    parser.add_argument("--layers", default="",
                        help="decoder depths instead of each size's own (--compile_only: the "
                        "scanned depths, default 2,8,28)")
    parser.add_argument("--compile_only", action="store_true",
                        help="AOT compile times vs depth from abstract arrays (no run)")
    parser.add_argument("--unscanned_layers", default="2,8",
                        help="--compile_only: depths with scan_layers=False ('' = none)")
    parser.add_argument("--set", default="", type=parse_overrides,
                        help="config overrides, e.g. train.optimizer_state_dtype=bfloat16,"
                        "train.ema_memory=host (the memory levers that fit 3b on one H200)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error(f"--steps={args.steps} and --batch={args.batch} must be >= 1")
    split = lambda s: [x for x in s.split(",") if x]
    sizes, impls, remats = split(args.size), split(args.impl), split(args.remat)
    lengths, depths = [int(x) for x in split(args.row_tokens)], [int(x) for x in split(args.layers)]
    for name, values, known in (("size", sizes, SIZES), ("remat", remats, mot.REMAT_POLICIES),
                                ("impl", impls, config_lib.ATTENTION_IMPLS)):
        if set(values) - set(known):
            parser.error(f"--{name}: unknown {sorted(set(values) - set(known))}; known: "
                         f"{sorted(known)}")
    device = jax.devices()[0]
    impls = [attention_lib.resolve_auto() if i == "auto" else i for i in impls]
    today = datetime.date.today().isoformat()
    command = "PYTHONPATH=. python benchmarks/train_step.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    lines, notes = [], []

    def emit(cells) -> None:
        lines.append(_cells([device.device_kind, today, *cells]))
        print(lines[-1], flush=True)

    if args.compile_only:
        scans = [(n, True) for n in depths or (2, 8, 28)]
        scans += [(int(n), False) for n in split(args.unscanned_layers)]
        compile_rows(args, [(s, n, scan, length, impls[0], remats[0]) for s in sizes
                            for length in lengths for n, scan in scans], device, emit)
        title, columns = "Compile time vs depth", COMPILE_COLUMNS
    else:
        ladder_rows(args, [(s, n, length, i, r) for s in sizes for n in depths or [None]
                           for length in lengths for i in impls for r in remats],
                    device, emit, notes)
        title, columns = "Train step ladder", LADDER_COLUMNS
    with open(args.out, "a") as f:
        f.write(f"\n### {title} ({device.device_kind}, {today}, jax {jax.__version__}), "
                f"`{command}`\n\n")
        if lines:
            f.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
            f.write("\n".join(lines) + "\n")
        f.write("".join(f"\n{note}\n" for note in notes))


if __name__ == "__main__":
    # Compile seconds must be those of a fresh compile, not of a persistent cache hit.
    jax.config.update("jax_enable_compilation_cache", False)
    main()
