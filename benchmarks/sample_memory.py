r"""Per-device memory of sampling a config's model, from abstract shapes: weights, KV caches and
the compiled prefill / denoising step / VAE decode (`unijax.inference.memory`).

  PYTHONPATH=. python benchmarks/sample_memory.py --config=configs/bagel_7b_mot.py \
      --mesh=,tensor=4 --quantize=none,int8 --mode=t2i,edit --image_size=1024 [--out=rows.jsonl]
  PYTHONPATH=. python benchmarks/sample_memory.py --config=configs/bagel_7b_mot.py \
      --mesh=fsdp=8,tensor=8 --no_compile       # weights and caches only (seconds)

One process with --devices fake CPU devices (set before jax starts). For each mesh x weight
mode x sampling mode it builds the model abstractly (nothing is allocated), places every
weight as `load.load_model` would on that mesh ("" = one device), and, unless --no_compile,
compiles the three programs sampling runs for the mesh and reads XLA's `memory_analysis()`.
Those phase figures are the **CPU** compiler's buffer assignment (an estimate of what a TPU or
GPU compile needs: it fuses differently); weights and caches are exact on any platform.
Prints a markdown table (GiB per device); --out writes one JSON object per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bagel_7b_mot.py")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    parser.add_argument("--mesh", default="", help="';'-separated meshes, each axis=size,... "
                        "('' = one device), e.g. ';tensor=4;fsdp=8'")
    parser.add_argument("--quantize", default="none,int8")
    parser.add_argument("--mode", default="t2i,edit")
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--capacity", type=int, default=0, help="KV slots per row (0: Chat's "
                        "default, config.sample.capacity or twice a training row)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, _ROOT)
    import jax
    import ml_collections

    from benchmarks.aot import load_config, parse_mesh
    from unijax.inference import memory
    from unijax.training import sharding

    config = load_config(args.config)
    rows = []
    print("| mesh | weights | mode | context tokens | capacity | weights GiB | caches GiB | "
          "prefill temp | step temp | decode temp | peak GiB | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mesh_text in args.mesh.split(";"):
        sizes = parse_mesh(mesh_text)
        count = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
        mesh = None
        if count > 1:
            mesh = sharding.make_mesh(ml_collections.ConfigDict(sizes),
                                      devices=jax.devices()[:count])
        for quantize in args.quantize.split(","):
            for mode in args.mode.split(","):
                start = time.perf_counter()
                report = memory.sampling_memory(
                    config, mesh=mesh, rules=sharding.LOGICAL_RULES if mesh else None,
                    dtype=args.dtype, quantize=None if quantize == "none" else quantize,
                    mode=mode, image_size=args.image_size, prompt_tokens=args.prompt_tokens,
                    batch_size=args.batch_size, capacity=args.capacity or None,
                    compile_phases=not args.no_compile)
                seconds = time.perf_counter() - start
                temps = {p.name: p.temp for p in report.phases}
                gib = lambda b: f"{b / memory.GiB:.2f}" if b is not None else ""
                label = " x ".join(f"{k} {v}" for k, v in sizes.items() if v > 1) or "1 device"
                print(f"| {label} | {quantize if quantize != 'none' else args.dtype} | {mode} | "
                      f"{report.context_tokens:,} | {report.capacity:,} | "
                      f"{gib(report.weights)} | {gib(report.caches)} | "
                      f"{gib(temps.get('prefill'))} | {gib(temps.get('denoise step'))} | "
                      f"{gib(temps.get('decode'))} | {gib(report.peak)} | {seconds:.0f} |",
                      flush=True)
                rows.append(dict(mesh=sizes, quantize=quantize, mode=mode,
                                 image_size=args.image_size, batch_size=args.batch_size,
                                 capacity=report.capacity, context_tokens=report.context_tokens,
                                 weights=report.weights, caches=report.caches,
                                 phases=[dataclasses.asdict(p) for p in report.phases],
                                 peak=report.peak,
                                 seconds=round(seconds, 1), jax=jax.__version__))
    if args.out:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
