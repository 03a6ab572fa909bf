"""The command-line flags every pod launcher shares, and rendering, printing or running commands.

Flags name the `LaunchSpec` fields (`--tpu=v5p-1024 --workdir=gs://...`); config overrides follow
`--` exactly as the main job takes them (`-- --config.train.lr=3e-4`). Nothing runs unless
`--submit` is given: by default the exact commands are printed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from absl import flags

from launch import spec as spec_lib


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the launch-spec flags. Only the launcher scripts call it (at import, as absl
    wants): `--config` and `--workdir` would clash with the main job's flags in one process."""
    s = flag_values
    flags.DEFINE_string("name", None, "Workload / TPU name (lowercase, digits, '-').",
                        flag_values=s)
    flags.DEFINE_string("config", None, "Config file, e.g. configs/bagel_7b_mot.py[:arg].",
                        flag_values=s)
    flags.DEFINE_string("workdir", None, "gs://... or an absolute path every host sees.",
                        flag_values=s)
    flags.DEFINE_string("tpu", "", "TPU type: v5e-256, v5p-1024, v6e-64, v4-32, ...",
                        flag_values=s)
    flags.DEFINE_string("topology", "", "TPU topology (default: the most even one).",
                        flag_values=s)
    flags.DEFINE_integer("num_slices", 1, "TPU slices joined over the DCN.", flag_values=s)
    flags.DEFINE_string("gpu", "", f"GPU kind ({', '.join(spec_lib.GPU_KINDS)}).",
                        flag_values=s)
    flags.DEFINE_integer("gpus_per_host", 8, "GPUs per host.", flag_values=s)
    flags.DEFINE_integer("num_hosts", 1, "GPU hosts.", flag_values=s)
    flags.DEFINE_multi_string("env", [], "KEY=VALUE environment variable (repeatable).",
                              flag_values=s)
    flags.DEFINE_string("image", "", "Docker image with this checkout and its dependencies.",
                        flag_values=s)
    flags.DEFINE_string("venv", "", "Virtualenv to activate on every TPU VM.", flag_values=s)
    flags.DEFINE_string("code_dir", "", "The checkout's directory on every host.",
                        flag_values=s)
    flags.DEFINE_string("project", "", "Google Cloud project.", flag_values=s)
    flags.DEFINE_string("zone", "", "Google Cloud zone.", flag_values=s)
    flags.DEFINE_string("cluster", "", "GKE cluster (xpk).", flag_values=s)
    flags.DEFINE_integer("max_restarts", 0, "Restarts of a failed workload (xpk).",
                         flag_values=s)
    flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: one run per point of the grid.",
                              flag_values=s)
    flags.DEFINE_bool("check_config", True, "Parse and validate the config for the hardware "
                      "before rendering.", flag_values=s)
    flags.DEFINE_bool("submit", False, "Run the commands (default: print them).",
                      flag_values=s)


def specs_from_flags(argv: Sequence[str],
                     flag_values: flags.FlagValues = flags.FLAGS) -> list[spec_lib.LaunchSpec]:
    """The launch specs the flags describe: one, or one per `--sweep` point. `argv` is what
    absl leaves after `--` (config overrides), its first entry the program. Each config is
    checked for the hardware unless --nocheck_config."""
    f = flag_values
    for name in ("name", "config", "workdir"):
        if not f[name].value:
            raise spec_lib.LaunchError(f"--{name} is required")
    env = {}
    for item in f.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise spec_lib.LaunchError(f"--env={item!r} must be KEY=VALUE")
        env[key] = value
    base = spec_lib.LaunchSpec(
        name=f.name, config=f.config, workdir=f.workdir, tpu=f.tpu, topology=f.topology,
        num_slices=f.num_slices, gpu=f.gpu, gpus_per_host=f.gpus_per_host,
        num_hosts=f.num_hosts, overrides=spec_lib.parse_overrides(argv[1:]), env=env,
        image=f.image, venv=f.venv, code_dir=f.code_dir, project=f.project, zone=f.zone,
        cluster=f.cluster, max_restarts=f.max_restarts)
    specs = spec_lib.sweep_specs(base, spec_lib.parse_sweep(f.sweep))
    if f.check_config:
        for spec in specs:
            spec_lib.check_config(spec)
    return specs


def render_pod(specs: Sequence[spec_lib.LaunchSpec], backend: str, *, create: bool = False,
               xpk_dry_run: bool = False) -> list[str]:
    """The bash lines that launch every spec on `backend`: "xpk" (a GKE workload each) or
    "tpu_vm" (ssh to the TPU VMs; `create`: first the commands that create them)."""
    from launch import tpu_vm, xpk

    lines = []
    for spec in specs:
        if backend == "xpk":
            lines.append(spec_lib.shell_join(xpk.workload_create_argv(spec, dry_run=xpk_dry_run)))
        elif backend == "tpu_vm":
            lines += (tpu_vm.create_commands(spec) if create else []) + tpu_vm.run_commands(spec)
        else:
            raise spec_lib.LaunchError(f"backend={backend!r} must be 'xpk' or 'tpu_vm'")
    return lines


def print_or_run(lines: Sequence[str], submit: bool) -> int:
    """Prints the bash lines; with `submit`, runs them as one bash script. Returns the exit
    code."""
    script = "\n".join(lines)
    print(script, flush=True)
    if not submit:
        return 0
    return subprocess.run(["bash", "-c", "set -e\n" + script], check=False).returncode


def fail(error: Exception) -> None:
    """Exits with a one-line error (no traceback: the message names the field)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)

