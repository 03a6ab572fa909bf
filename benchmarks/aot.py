r"""AOT compile of the real train step for a pod mesh, from abstract arrays: memory per device.

  PYTHONPATH=. python benchmarks/aot.py --config=configs/bagel_7b_mot.py --devices=64 \
      --mesh=fsdp=64 --mesh=fsdp=16,tensor=4 --remat=none,save_dots,full \
      --row_tokens=8192,16384,32768 [--topology=v5p:2x2x1] [--layers=N] \
      [--set=train.optimizer_state_dtype=bfloat16 ...] [--out=benchmarks/RESULTS.md]

Every case (mesh x remat policy x row length) runs in a fresh process started with
`--xla_force_host_platform_device_count=<devices>` (its own fake devices; the compile's memory
is returned between cases). The case builds the train state
*abstractly* (`state.abstract_state`: ShapeDtypeStructs carrying the train state's
NamedShardings, nothing is allocated) and an abstract PackedBatch of the config's static
shapes, then lowers and compiles the trainer's own `make_train_step` update (loss, gradients,
AdamW, EMA, the non-finite guard) and reads `compiled.memory_analysis()`.

Row budgets: `--row_tokens` replaces `und_capacity + gen_capacity`; und gets the config's
share (BAGEL-7B-MoT: 13,824 / 36,864 = 3/8) rounded to a multiple of 512 (the TPU kernels'
tiles), gen the rest; the ViT patch slots scale with und and the VAE image slots with gen in
the config's proportions (patches rounded to 512, slots rounded up). The global batch is
`--rows_per_shard` rows (default 1) per batch shard (`mesh.data x mesh.fsdp`).

Per device, in GiB: arguments (state + batch shard), outputs, aliased (outputs written into the
donated state), temporaries and generated code; total = arguments + outputs - aliased + temp +
code, and which of v5p (95 GiB), v6e (32 GiB) and H100 (80 GiB) it fits. These are *estimates
from the XLA CPU compile* (the CPU compiler's buffer assignment and fusion decisions, not a TPU
or GPU compiler's; e.g. CPU may keep bf16 dot operands in f32). `--topology=v5p:2x2x1` asks
`jax.experimental.topologies.get_topology_desc` for TPU devices instead (needs libtpu); when
the installed jax cannot, the row carries its exact error.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unijax import config as config_lib
from unijax.batch import PackedBatch
from unijax.data import pack_spec, packing
from unijax.training import optim, sharding, train
from unijax.training import state as state_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3
HBM_GIB = {"v5p": 95, "v6e": 32, "H100": 80}  # per chip, as sold
TILE = 512  # row budgets are multiples of the TPU kernels' tiles
RESULT_MARK = "AOT_RESULT "


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py` or `path/to/config.py:arg` -> its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("aot_config", path)
    if module_spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"--config={spec!r}: no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=16,tensor=4" -> {"data": 1, "fsdp": 16, "tensor": 4} (unnamed axes are 1)."""
    sizes = {axis: 1 for axis in config_lib.MESH_AXES}
    for part in filter(None, text.split(",")):
        axis, _, size = part.partition("=")
        if axis not in sizes or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh={text!r}: expected axis=size with axes "
                             f"{config_lib.MESH_AXES}, got {part!r}")
        sizes[axis] = int(size)
    return sizes


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """--set=a.b.c=value (a Python literal, else a string) on `config`, in place."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set={assignment!r}: expected key=value")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.split(".")
    node = functools.reduce(lambda n, name: n[name], parents, config)
    if leaf not in node:
        raise KeyError(f"--set={assignment!r}: config has no field {key!r}")
    node[leaf] = value


def row_budgets(data: ml_collections.ConfigDict, row_tokens: int) -> dict[str, int]:
    """The four per-row budgets for rows of `row_tokens` tokens, in the config's proportions
    (see the module docstring)."""
    capacity = data.und_capacity + data.gen_capacity
    if row_tokens % TILE or row_tokens < 2 * TILE:
        raise ValueError(f"--row_tokens={row_tokens} must be a multiple of {TILE}, >= {2 * TILE}")
    und = min(max(TILE, round(row_tokens * data.und_capacity / capacity / TILE) * TILE),
              row_tokens - TILE)
    gen = row_tokens - und
    patches = max(TILE, round(und * data.max_vit_patches / data.und_capacity / TILE) * TILE)
    images = max(1, math.ceil(data.max_vae_images * gen / max(data.gen_capacity, 1)))
    return {"und_capacity": und, "gen_capacity": gen, "max_vit_patches": patches,
            "max_vae_images": images}


@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: the config file, the mesh, the remat policy, the row length."""

    config: str
    mesh: dict
    remat: str
    row_tokens: int
    rows_per_shard: int = 1
    layers: int = 0  # 0: the config's
    overrides: tuple[str, ...] = ()
    topology: str = ""  # "": fake CPU devices


def case_config(case: Case, num_devices: int) -> ml_collections.ConfigDict:
    """The config of `case` on `num_devices` devices, validated."""
    config = load_config(case.config)
    for assignment in case.overrides:
        apply_override(config, assignment)
    config.model.llm.remat_policy = case.remat
    if case.layers:
        config.model.llm.num_layers = case.layers
    config.data.update(row_budgets(config.data, case.row_tokens))
    for axis, size in case.mesh.items():
        config.mesh[axis] = size
    sizes = config_lib.mesh_shape(config.mesh, num_devices)
    config.data.batch_size = case.rows_per_shard * sizes["data"] * sizes["fsdp"]
    config_lib.validate(config, num_devices)
    return config


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> PackedBatch:
    """A PackedBatch of ShapeDtypeStructs of the config's static shapes, rows on the batch
    axes (what `pipeline.global_batch` hands the step); nothing is allocated."""
    spec = pack_spec.PackSpec.from_config(config)
    one_row = packing.empty_arrays(1, spec)  # the pipeline's dtypes (uint8 pixels)
    rows, where = int(config.data.batch_size), sharding.batch_sharding(mesh)
    fields = {name: jax.ShapeDtypeStruct((rows, *a.shape[1:]), a.dtype, sharding=where)
              for name, a in one_row.items()}
    return PackedBatch(**fields, num_und=spec.num_und)


def per_device_bytes(tree, memory_kind: str | None = None) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (its shard of each
    leaf; the largest shard where they differ); only leaves in `memory_kind` when given."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if memory_kind is not None and getattr(leaf.sharding, "memory_kind", None) != memory_kind:
            continue
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def state_breakdown(target: state_lib.TrainState) -> dict[str, int]:
    """Per-device bytes of each part of the abstract train state."""
    return {"params": per_device_bytes(target.params),
            "frozen": per_device_bytes(target.frozen),
            "opt_state": per_device_bytes(target.opt_state),
            "ema": per_device_bytes(target.ema) if target.ema is not None else 0,
            "counters": per_device_bytes((target.step, target.rng, target.nonfinite)),
            "on_host": per_device_bytes(target, optim.HOST_MEMORY_KIND)}


def compile_case(config: ml_collections.ConfigDict, devices=None) -> dict:
    """Lowers and compiles `make_train_step` of `config` for its mesh over `devices` (default:
    this process's devices) from abstract arrays; returns the timings, the compiled memory
    analysis and the analytic per-device bytes of the state and the batch."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = sharding.make_mesh(config.mesh, devices)
    spec = state_lib.ModelSpec.build(config)
    tx = optim.make_optimizer(config, spec.abstract_params)
    target, shardings = state_lib.abstract_state(config, mesh, spec, tx)
    batch = abstract_batch(config, mesh)
    step = train.make_train_step(config, spec, tx, shardings, mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        start = time.perf_counter()
        lowered = step.lower(target, batch)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
    stats = compiled.memory_analysis()
    memory = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
              for name in ("argument", "output", "alias", "temp", "generated_code")}
    memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                       + memory["generated_code"])
    host = {k: int(getattr(stats, f"host_{k}_size_in_bytes", 0) or 0) for k in ("argument", "temp")}
    state = state_breakdown(target)
    # The CPU compile counts arrays placed in host memory (config.train.ema_memory="host") as
    # device arguments and outputs (donated: once net); on a TPU or GPU they stay off HBM.
    memory["device_total"] = memory["total"] - state["on_host"]
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(spec.abstract_params))
    return {"lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
            "memory": memory, "host_memory": host, "state": state,
            "batch_bytes": per_device_bytes(batch), "trainable_params": params,
            "device_kind": devices[0].device_kind, "platform": devices[0].platform,
            "num_devices": len(devices), "mesh": dict(mesh.shape),
            "batch_size": int(config.data.batch_size),
            "budgets": {k: int(config.data[k]) for k in
                        ("und_capacity", "gen_capacity", "max_vit_patches", "max_vae_images")},
            "attention": config.attention.impl, "remat": config.model.llm.remat_policy,
            "layers": int(config.model.llm.num_layers),
            "fits": fits(memory["device_total"])}


def fits(total_bytes: int) -> list[str]:
    """The chips whose HBM holds `total_bytes` per device (see HBM_GIB)."""
    return [chip for chip, gib in HBM_GIB.items() if total_bytes <= gib * GIB]


def topology_devices(name: str):
    """The devices of a named TPU topology ("v5p:2x2x1"); raises what jax raises."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices


def run_case(case: Case) -> dict:
    """The case in this process (its devices already set up): its result or its error."""
    try:
        devices = topology_devices(case.topology) if case.topology else jax.devices()
        config = case_config(case, len(devices))
        if case.topology:  # attention "auto" follows the target chip, not this host
            config.attention.impl = config.attention.impl.replace("auto", "pallas_tpu")
        result = compile_case(config, devices)
    except Exception as e:  # a row records the failure instead of losing the others
        result = {"error": f"{type(e).__name__}: {e}".strip()}
    # Linux reports the peak resident set in KiB: what the compile needed of this host's RAM.
    result["host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return result


def largest_buffers(dump_dir: str, count: int) -> list[str]:
    """The `count` largest allocations of the compiled step (XLA's memory-usage report in
    `dump_dir`): "size: shapes of the values sharing it", e.g. "2.89GiB: f32[8,5120,18944]"."""
    reports = [os.path.join(root, name) for root, _, names in os.walk(dump_dir)
               for name in names if name.endswith("memory-usage-report.txt")]
    lines, text = [], pathlib.Path(max(reports, key=os.path.getsize)).read_text() if reports else ""
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(";")]
        if len(cells) == 5 and re.fullmatch(r"[\d.]+[KMG]iB|\d+B", cells[1]):
            lines.append(f"{cells[1]}: {cells[4]}")
    return lines[:count]


def run_in_subprocess(case: Case, num_devices: int, timeout: float,
                      buffers: int = 0) -> dict:
    """Runs `case` in a fresh Python with `num_devices` fake CPU devices; adds its wall time
    and, with `buffers`, its largest allocations (`largest_buffers`)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={num_devices}").strip())
    dump_dir = tempfile.mkdtemp(prefix="aot-dump-") if buffers else ""
    if dump_dir:  # only the train step's module, after optimisations
        env["XLA_FLAGS"] += (f" --xla_dump_to={dump_dir} --xla_dump_hlo_module_re=.*update.*"
                             " --xla_dump_hlo_pass_re=NONE")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH", "")]))
    command = [sys.executable, os.path.abspath(__file__),
               "--case=" + json.dumps(dataclasses.asdict(case))]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    lines = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    tail = (err.strip().splitlines() or ["no output"])[-1]
    result = (json.loads(lines[-1][len(RESULT_MARK):]) if lines else
              {"error": f"exit code {child.returncode}: {tail}"})
    result["wall_s"] = time.perf_counter() - start
    if dump_dir:
        result["largest_buffers"] = largest_buffers(dump_dir, buffers)
        shutil.rmtree(dump_dir, ignore_errors=True)
    return result


COLUMNS = ("compiled for", "date", "mesh", "remat", "row tokens (und+gen) / ViT / VAE slots",
           "rows", "lower s", "compile s", "state GiB (params / frozen / Adam / EMA)",
           "argument GiB", "output GiB", "alias GiB", "temp GiB", "code GiB", "total GiB",
           "fits (estimate)", "host RSS GiB")


def format_row(case: Case, result: dict, where: str) -> str:
    """One markdown row of COLUMNS (a failed case: its error in the memory columns)."""
    date = str(datetime.date.today())
    rows = f"{case.row_tokens:,}"
    mesh = " x ".join(f"{a} {n}" for a, n in case.mesh.items() if n != 1) or "1"
    head = [where, date, mesh, case.remat]
    if "error" in result:
        cells = head + [rows, "", "", "", "", "error: " + result["error"][:400]] + [""] * 7
        return "| " + " | ".join(cells) + " |"
    b, m, s = result["budgets"], result["memory"], result["state"]
    gib = lambda x: f"{x / GIB:.2f}"
    budgets = (f"{b['und_capacity'] + b['gen_capacity']:,} ({b['und_capacity']:,}+"
               f"{b['gen_capacity']:,}) / {b['max_vit_patches']:,} / {b['max_vae_images']}")
    on_host = s.get("on_host", 0)
    state = " / ".join(gib(s[k]) for k in ("params", "frozen", "opt_state", "ema"))
    total = gib(m["total"])
    if on_host:  # what stays off the accelerator (see compile_case)
        state = f"{state} ({gib(on_host)} on host)"
        total = f"{total} ({gib(m['device_total'])} on device)"
    cells = head + [
        budgets, str(result["batch_size"]), f"{result['lower_s']:.1f}",
        f"{result['compile_s']:.1f}", state,
        *(gib(m[k]) for k in ("argument", "output", "alias", "temp", "generated_code")), total,
        ", ".join(result["fits"]) or "none",
        f"{result.get('host_rss_gib', float('nan')):.1f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bagel_7b_mot.py")
    parser.add_argument("--devices", type=int, default=64, help="fake CPU devices per case")
    parser.add_argument("--mesh", action="append", help="axis=size,...; repeat for more meshes")
    parser.add_argument("--remat", default="full", help="comma-separated remat policies")
    parser.add_argument("--row_tokens", default="16384", help="comma-separated row lengths")
    parser.add_argument("--rows_per_shard", type=int, default=1)
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the config's)")
    parser.add_argument("--topology", action="append", default=[],
                        help="also compile for this TPU topology, e.g. v5p:2x2x1")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="config override key=value, e.g. train.ema_decay=0")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument("--buffers", type=int, default=0,
                        help="list each case's N largest allocations (XLA dump)")
    parser.add_argument("--json", default="", help="append each case's result to this JSONL")
    parser.add_argument("--out", default="", help="append the table to this markdown file")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)  # the child's case
    args = parser.parse_args(argv)
    if args.case:
        fields = json.loads(args.case)
        case = Case(**{**fields, "overrides": tuple(fields["overrides"])})
        print(RESULT_MARK + json.dumps(run_case(case)), flush=True)
        return []

    cases = [Case(args.config, parse_mesh(mesh), remat, int(tokens), args.rows_per_shard,
                  args.layers, tuple(args.overrides), topology)
             for topology in [""] + args.topology
             for mesh in (args.mesh or ["fsdp=-1"])
             for remat in args.remat.split(",")
             for tokens in args.row_tokens.split(",")]
    command = "PYTHONPATH=. python benchmarks/aot.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    results, lines, dead = [], [], set()
    for case in cases:
        if case.topology in dead:  # one error row per topology is enough
            continue
        result = run_in_subprocess(case, args.devices, args.timeout, args.buffers)
        if case.topology and "error" in result:
            dead.add(case.topology)
        where = f"{case.topology} (TPU topology)" if case.topology else \
            f"{args.devices} fake CPU devices"
        results.append({"case": dataclasses.asdict(case), **result})
        lines.append(format_row(case, result, where))
        print(lines[-1], flush=True)
        for buffer in result.get("largest_buffers", []):
            print("    " + buffer[:300], flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    notes = (f"Config {args.config} ({', '.join(args.overrides) or 'no overrides'}); "
             f"{args.rows_per_shard} row(s) per batch shard; per-device memory from "
             "`compiled.memory_analysis()` of the XLA CPU compile (an estimate for TPU/GPU); "
             "total = argument + output - alias + temp + code; timings on a shared CPU (noisy).")
    if lines and args.out:
        with open(args.out, "a") as f:
            f.write(f"\n### AOT compile: `{command}`\n\n{notes}\n\n| " + " | ".join(COLUMNS)
                    + " |\n|" + "---|" * len(COLUMNS) + "\n" + "\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
