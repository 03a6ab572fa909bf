r"""An xpk workload (GKE + JobSet + Kueue: how MaxText runs TPU pods) from a launch spec.

  xpk workload create --cluster=C --workload=NAME --project=P --zone=Z --tpu-type=v5p-1024 \
      --num-slices=1 --docker-image=IMG --command='python3 -m unijax.main ... --distributed'

xpk turns this into a JobSet: one replicated job per slice, one pod per VM of the slice (4
chips each), node selectors for the accelerator and topology, and the command wrapped in bash;
`--dry-run` prints all of it without touching the cluster. Environment variables travel as
`--env=K=V`. Multi-slice runs get `--num-slices`; the main job learns the slice count from
`--config.mesh.num_slices`, and jax finds the other slices through the MEGASCALE_* variables
GKE sets in a multi-slice JobSet.
"""

from __future__ import annotations

from launch.spec import GPU_KINDS, LaunchError, LaunchSpec


def workload_create_argv(spec: LaunchSpec, *, dry_run: bool = False) -> list[str]:
    """The `xpk workload create` command line of `spec` (`dry_run`: add xpk's --dry-run)."""
    if not spec.cluster:
        raise LaunchError("cluster (--cluster) is required for xpk: the GKE cluster to run on")
    if not spec.image:
        raise LaunchError("image (--image) is required for xpk: a docker image holding this "
                          "checkout and its dependencies (launch/Dockerfile builds one)")
    argv = ["xpk", "workload", "create", f"--cluster={spec.cluster}", f"--workload={spec.name}"]
    argv += [f"--{key}={value}" for key, value in (("project", spec.project),
                                                  ("zone", spec.zone)) if value]
    if spec.tpu:
        tpu = spec.tpu_slice
        # xpk names a slice by cores ("v5p-1024") or by generation and topology ("v5p-8x8x8").
        name = (f"{tpu.spec.accelerator}-{tpu.topology}" if spec.topology
                else tpu.accelerator_type)
        argv += [f"--tpu-type={name}", f"--num-slices={spec.num_slices}"]
    else:
        if spec.gpus_per_host != 8:
            raise LaunchError(f"gpus_per_host={spec.gpus_per_host}: xpk's GPU machines have 8")
        argv += [f"--device-type={GPU_KINDS[spec.gpu]}-8", f"--num-nodes={spec.num_hosts}"]
    argv.append(f"--docker-image={spec.image}")
    argv += [f"--env={key}={value}" for key, value in spec.env.items()]
    if spec.max_restarts:
        argv.append(f"--max-restarts={spec.max_restarts}")
    argv.append(f"--command={spec.shell_command()}")
    if dry_run:
        argv.append("--dry-run")
    return argv
