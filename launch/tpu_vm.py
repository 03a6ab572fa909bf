r"""Plain Cloud TPU VMs: the same command on every worker over `gcloud ... ssh --worker=all`.

  gcloud compute tpus tpu-vm ssh NAME --zone=Z --project=P --worker=all \
      --command='cd ~/unijax && source ~/venv/bin/activate && python3 -m unijax.main ...'

This is how big_vision, EasyLM and MaxText's multihost_runner drive TPU VMs. Every worker must
already hold the checkout (`code_dir`) and either the virtualenv (`venv`) or docker with
`image`. A multi-slice run is one ssh per slice (TPUs NAME-0, NAME-1, ... as a queued resource
with --node-prefix=NAME creates them), run side by side; each slice is told the slice count, its
slice id and the first worker of slice 0 as coordinator through the MEGASCALE_* variables, the
coordinator's address being read with `gcloud compute tpus tpu-vm describe` first.
`create_commands` prints the commands that create the TPUs.
"""

from __future__ import annotations

import dataclasses

from launch.spec import LaunchError, LaunchSpec, shell_join

MEGASCALE_PORT = "8080"
_COORDINATOR = "@COORDINATOR@"  # spliced as the local shell variable $COORDINATOR


def _placement(spec: LaunchSpec) -> list[str]:
    return [f"--{key}={value}" for key, value in (("zone", spec.zone), ("project", spec.project))
            if value]


def slice_names(spec: LaunchSpec) -> list[str]:
    """The TPU name of each slice: NAME on one slice; NAME-0, NAME-1, ... on several."""
    if spec.num_slices == 1:
        return [spec.name]
    return [f"{spec.name}-{i}" for i in range(spec.num_slices)]


def _host_command(spec: LaunchSpec, env: dict[str, str]) -> str:
    """What one worker runs: the main job in the venv, or in `image` under docker."""
    if not spec.image:
        return spec.shell_command(env)
    inner = dataclasses.replace(spec, image="", env={})
    docker = ["sudo", "docker", "run", "--rm", "--net=host", "--privileged"]
    for key, value in env.items():
        docker += ["-e", f"{key}={value}"]
    return shell_join([*docker, spec.image, "bash", "-c", inner.shell_command()])


def run_commands(spec: LaunchSpec) -> list[str]:
    """The bash lines that run `spec` on its TPU VMs (a script: print it, or run it with bash)."""
    if not spec.tpu:
        raise LaunchError(f"tpu (--tpu) is required for TPU VMs, got gpu={spec.gpu!r}")
    names = slice_names(spec)
    lines = []
    if len(names) > 1:
        lines.append("COORDINATOR=$(" + shell_join(
            ["gcloud", "compute", "tpus", "tpu-vm", "describe", names[0], *_placement(spec),
             "--format=value(networkEndpoints[0].ipAddress)"]) + ")")
    for slice_id, name in enumerate(names):
        env = dict(spec.env)
        if len(names) > 1:
            env.update(MEGASCALE_COORDINATOR_ADDRESS=f"{_COORDINATOR}:{MEGASCALE_PORT}",
                       MEGASCALE_NUM_SLICES=str(len(names)), MEGASCALE_SLICE_ID=str(slice_id),
                       MEGASCALE_PORT=MEGASCALE_PORT)
        ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *_placement(spec),
               "--worker=all", f"--command={_host_command(spec, env)}"]
        # The placeholder sits inside one level of single quotes: close them around the
        # variable so the launching shell expands it.
        line = shell_join(ssh).replace(_COORDINATOR, "'\"$COORDINATOR\"'")
        lines.append(line if len(names) == 1 else f"{line} & pid{slice_id}=$!")
    if len(names) > 1:
        lines.append(" && ".join(f"wait $pid{i}" for i in range(len(names))))
    return lines


def create_commands(spec: LaunchSpec) -> list[str]:
    """The commands that create the TPU VMs: one `tpu-vm create` for a slice, a queued
    resource of `num_slices` nodes (NAME-0, NAME-1, ...) for several."""
    tpu = spec.tpu_slice
    if tpu is None:
        raise LaunchError(f"tpu (--tpu) is required for TPU VMs, got gpu={spec.gpu!r}")
    if spec.num_slices == 1:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", spec.name, *_placement(spec),
                f"--accelerator-type={tpu.accelerator_type}",
                f"--version={tpu.spec.runtime_version}"]
    else:
        argv = ["gcloud", "compute", "tpus", "queued-resources", "create", spec.name,
                *_placement(spec), f"--accelerator-type={tpu.accelerator_type}",
                f"--runtime-version={tpu.spec.runtime_version}",
                f"--node-count={spec.num_slices}", f"--node-prefix={spec.name}"]
    return [shell_join(argv)]
