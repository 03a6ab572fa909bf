r"""A launch spec: what to run, where, on what hardware and in which environment.

  spec = LaunchSpec(name="bagel-v5p", config="configs/bagel_7b_mot.py",
                    workdir="gs://my-bucket/bagel", tpu="v5p-1024",
                    overrides={"data.batch_size": "512"}, image="us-docker.pkg.dev/p/r/unijax")
  spec.main_argv()    # ["python3", "-m", "unijax.main", "--config=configs/bagel_7b_mot.py", ...]
  check_config(spec)  # the config as the main job will parse it, validated on 512 chips

The backends turn a spec into exact commands: `launch/xpk.py` (GKE, what MaxText uses for pods),
`launch/tpu_vm.py` (`gcloud compute tpus tpu-vm ssh --worker=all`) and `launch/xm_launch.py`
(XManager); `python -m launch.pod` prints them. Every TPU launch passes `--distributed`, so each
host joins the run through `jax.distributed.initialize()` with the addresses the platform gives.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence

WORKLOAD_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # xpk's rule (GKE and TPU names)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(ValueError):
    """A launch spec, or the config it names, that cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """How one TPU generation is named and placed."""

    accelerator: str  # gcloud / xpk accelerator-type prefix ("v5litepod" in "v5litepod-256")
    cores_per_chip: int  # the type's number counts TensorCores (v4, v5p: 2 per chip) or chips
    dims: int  # dimensions of the chip topology ("16x16" or "8x8x8")
    gke_accelerator: str  # GKE node selector cloud.google.com/gke-tpu-accelerator
    runtime_version: str  # TPU-VM software version (`--version`)
    xm_resource: str  # xm.JobRequirements keyword


TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", 2, 3, "tpu-v4-podslice", "tpu-ubuntu2204-base", "tpu_v4"),
    "v5p": TpuGeneration("v5p", 2, 3, "tpu-v5p-slice", "v2-alpha-tpuv5", "tpu_v5p"),
    "v5e": TpuGeneration("v5litepod", 1, 2, "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite",
                         "tpu_v5e"),
    "v6e": TpuGeneration("v6e", 1, 2, "tpu-v6e-slice", "v2-alpha-tpuv6e", "tpu_v6e"),
}
_TPU_ALIASES = {"v5litepod": "v5e"}

# GPU kind -> xpk device-type prefix (8 GPUs per VM: "h100-80gb-8").
GPU_KINDS = {"a100": "a100-40gb", "h100": "h100-80gb", "h200": "h200-141gb", "b200": "b200"}


@dataclasses.dataclass(frozen=True)
class Tpu:
    """One TPU slice: generation, chips (= JAX devices) and their topology."""

    generation: str
    chips: int
    topology: str

    @property
    def spec(self) -> TpuGeneration:
        return TPU_GENERATIONS[self.generation]

    @property
    def accelerator_type(self) -> str:
        """gcloud's and xpk's name of the slice, e.g. "v5litepod-256", "v5p-1024"."""
        return f"{self.spec.accelerator}-{self.chips * self.spec.cores_per_chip}"

    @property
    def hosts(self) -> int:
        """VMs of the slice as GKE places them (4 chips each; a 1-chip slice is one VM)."""
        return 1 if self.chips == 1 else self.chips // 4


def default_topology(chips: int, dims: int) -> str:
    """The most even power-of-two topology of `chips` chips: 256 in 2D is "16x16", 512 in 3D
    "8x8x8", 1024 in 3D "8x8x16" (each is one of xpk's supported shapes)."""
    bits = chips.bit_length() - 1
    order = list(range(dims)) + [d for _ in range(bits) for d in reversed(range(dims))]
    exponents = [0] * dims
    for d in order[:bits]:
        exponents[d] += 1
    return "x".join(str(2 ** e) for e in exponents)


def parse_tpu(name: str, topology: str = "") -> Tpu:
    """A TPU type as gcloud names it ("v5p-1024", "v5litepod-256" or "v5e-256") and an optional
    topology ("16x16"; default `default_topology`)."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
    generation = _TPU_ALIASES.get(match.group(1), match.group(1)) if match else None
    if generation not in TPU_GENERATIONS:
        known = ", ".join(f"{g}-N" for g in TPU_GENERATIONS)
        raise LaunchError(f"tpu={name!r} is not a TPU type (known: {known}; v5litepod-N = v5e-N)")
    gen = TPU_GENERATIONS[generation]
    count = int(match.group(2))
    if count < gen.cores_per_chip or count % gen.cores_per_chip:
        raise LaunchError(f"tpu={name!r}: {generation} counts TensorCores, "
                          f"{gen.cores_per_chip} per chip")
    chips = count // gen.cores_per_chip
    if not topology:
        if chips & (chips - 1):
            raise LaunchError(f"tpu={name!r} has {chips} chips, not a power of two: give "
                              f"topology (--topology), e.g. '4x4x12'")
        topology = default_topology(chips, gen.dims)
    dims = topology.split("x")
    if len(dims) != gen.dims or not all(d.isdigit() and int(d) > 0 for d in dims) or \
            math.prod(int(d) for d in dims) != chips:
        raise LaunchError(f"topology={topology!r} does not fit tpu={name!r}: {generation} "
                          f"needs {gen.dims} dimensions multiplying to {chips} chips")
    return Tpu(generation, chips, topology)


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """One training run on a pod (or a GPU cluster).

    Attributes:
      name: workload / TPU name (lowercase letters, digits and '-', at most 40 characters).
      config: the config file, relative to `code_dir` ("configs/x.py" or "configs/x.py:arg").
      workdir: where checkpoints and logs go; every host must see it (gs://... or an absolute
        path on shared storage).
      tpu, topology: TPU type as gcloud names it ("v5e-256", "v5p-1024") and its topology
        (default: the most even one); or
      gpu, gpus_per_host, num_hosts: a GPU kind (GPU_KINDS) and how many.
      num_slices: TPU slices joined over the data-centre network (sets config.mesh.num_slices).
      overrides: config overrides, "train.lr" -> "3e-4" (passed as --config.train.lr=3e-4).
      env: environment variables of the job.
      image: docker image holding this checkout and its dependencies (xpk, XManager, or TPU VMs
        running docker); venv: a virtualenv on every TPU VM to activate instead.
      code_dir: directory of the checkout on every host ("": the image's working directory).
      project, zone, cluster: Google Cloud placement (cluster: xpk's GKE cluster).
      max_restarts: restarts of a failed workload (xpk); the main job resumes from its newest
        checkpoint.
    """

    name: str
    config: str
    workdir: str
    tpu: str = ""
    topology: str = ""
    num_slices: int = 1
    gpu: str = ""
    gpus_per_host: int = 8
    num_hosts: int = 1
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    image: str = ""
    venv: str = ""
    code_dir: str = ""
    project: str = ""
    zone: str = ""
    cluster: str = ""
    max_restarts: int = 0

    def __post_init__(self):
        object.__setattr__(self, "overrides", {str(k): str(v) for k, v in self.overrides.items()})
        object.__setattr__(self, "env", {str(k): str(v) for k, v in self.env.items()})
        if not (WORKLOAD_NAME.fullmatch(self.name) and len(self.name) <= 40):
            raise LaunchError(f"name={self.name!r} must match {WORKLOAD_NAME.pattern} and have "
                              "at most 40 characters (xpk's and GKE's rule)")
        if not self.config:
            raise LaunchError("config (--config) is required, e.g. configs/bagel_7b_mot.py")
        if not (self.workdir.startswith("gs://") or posixpath.isabs(self.workdir)):
            raise LaunchError(f"workdir={self.workdir!r} must be gs://... or an absolute path "
                              "that every host sees")
        if bool(self.tpu) == bool(self.gpu):
            raise LaunchError(f"give exactly one of tpu (--tpu) and gpu (--gpu), got "
                              f"tpu={self.tpu!r}, gpu={self.gpu!r}")
        if self.tpu:
            parse_tpu(self.tpu, self.topology)
        elif self.gpu not in GPU_KINDS:
            raise LaunchError(f"gpu={self.gpu!r} must be one of {sorted(GPU_KINDS)}")
        for field in ("num_slices", "gpus_per_host", "num_hosts"):
            if getattr(self, field) < 1:
                raise LaunchError(f"{field}={getattr(self, field)} must be >= 1")
        if self.num_slices > 1 and not self.tpu:
            raise LaunchError(f"num_slices={self.num_slices}: slices are TPU slices; give tpu")
        for key in self.overrides:
            if key.startswith("config.") or not re.fullmatch(r"\w+(\.\w+)*", key):
                raise LaunchError(f"override {key!r} must be a config path like 'train.lr' "
                                  "(without 'config.')")
        for key in self.env:
            if not ENV_NAME.fullmatch(key):
                raise LaunchError(f"env {key!r} is not an environment variable name")
        if self.image and self.venv:
            raise LaunchError(f"give image (--image) or venv (--venv), not both (got "
                              f"{self.image!r} and {self.venv!r})")

    @property
    def tpu_slice(self) -> Tpu | None:
        """The TPU slice (None for GPUs)."""
        return parse_tpu(self.tpu, self.topology) if self.tpu else None

    @property
    def num_devices(self) -> int:
        """JAX devices of the whole run (TPU chips over all slices, or GPUs)."""
        if self.tpu:
            return self.tpu_slice.chips * self.num_slices
        return self.gpus_per_host * self.num_hosts

    @property
    def num_processes(self) -> int:
        """Hosts of the whole run (one main-job process each)."""
        return self.tpu_slice.hosts * self.num_slices if self.tpu else self.num_hosts

    def config_overrides(self) -> dict[str, str]:
        """The overrides the main job gets: `overrides`, plus the slice count of a multi-slice
        run."""
        out = dict(self.overrides)
        if self.num_slices > 1:
            out.setdefault("mesh.num_slices", str(self.num_slices))
        return out

    def main_flags(self) -> list[str]:
        """The main job's flags: --config, --workdir, the overrides, --distributed."""
        out = [f"--config={self.config}", f"--workdir={self.workdir}"]
        out += [f"--config.{k}={v}" for k, v in self.config_overrides().items()]
        if self.tpu or self.num_hosts > 1:
            out.append("--distributed")
        return out

    def main_argv(self) -> list[str]:
        """The command every host runs."""
        return ["python3", "-m", "unijax.main", *self.main_flags()]

    def shell_command(self, env: Mapping[str, str] | None = None) -> str:
        """The bash line every host runs: cd `code_dir`, activate `venv`, then the main job
        with `env` (variable -> value) set for it."""
        parts = [f"cd {shell_path(self.code_dir)}"] if self.code_dir else []
        if self.venv:
            parts.append(f"source {shell_path(posixpath.join(self.venv, 'bin', 'activate'))}")
        assign = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
        parts.append(" ".join([*assign, shell_join(self.main_argv())]))
        return " && ".join(parts)


def shell_join(argv: Sequence[str]) -> str:
    """`shlex.join`, but a `--flag=value` whose value needs quotes reads `--flag='value'`."""
    out = []
    for arg in argv:
        match = re.fullmatch(r"(--[\w-]+=)(.*)", arg, re.S)
        out.append(match.group(1) + shlex.quote(match.group(2)) if match else shlex.quote(arg))
    return " ".join(out)


def shell_path(path: str) -> str:
    """`path` quoted for bash, a leading "~/" left outside the quotes so it still expands."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """`--config.train.lr=3e-4` arguments (what follows `--` on a launcher's command line) as
    {"train.lr": "3e-4"}."""
    out = {}
    for arg in args:
        match = re.fullmatch(r"--config\.([\w.]+)=(.*)", arg, re.S)
        if not match:
            raise LaunchError(f"{arg!r}: after '--' give config overrides --config.KEY=VALUE")
        out[match.group(1)] = match.group(2)
    return out


def parse_sweep(sweeps: Sequence[str]) -> list[dict[str, str]]:
    """The grid of `--sweep` values: ["train.lr=1e-4,3e-4", "seed=0,1"] -> 4 override dicts,
    the first key varying slowest."""
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not values or key.startswith("config."):
            raise LaunchError(f"sweep {item!r} must be KEY=V1,V2,... (e.g. train.lr=1e-4,3e-4)")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)] if axes else [{}]


def sweep_specs(spec: LaunchSpec, points: Sequence[Mapping[str, str]]) -> list[LaunchSpec]:
    """One spec per sweep point: its overrides on top of `spec`'s and, when there are several
    points, name `NAME-<i>` and workdir `WORKDIR/<i>` (i from 1, like XManager's work units)."""
    if len(points) <= 1:
        return [dataclasses.replace(spec, overrides={**spec.overrides, **(points or [{}])[0]})]
    return [dataclasses.replace(spec, name=f"{spec.name[:36]}-{i}",
                                workdir=posixpath.join(spec.workdir, str(i)),
                                overrides={**spec.overrides, **point})
            for i, point in enumerate(points, start=1)]


def check_config(spec: LaunchSpec):
    """Parses the config file with the spec's overrides exactly as the main job will (same flag
    parser, locked config) and validates it for `spec.num_devices` devices and its slices, so a
    bad launch fails here and not on the pod. Returns the config.

    Raises:
      LaunchError: naming the config file and the field that is wrong.
    """
    from absl import flags
    from ml_collections import config_flags

    from unijax import config as config_lib
    from unijax.training import sharding

    argv = ["unijax.main", f"--config={spec.config}",
            *[f"--config.{k}={v}" for k, v in spec.config_overrides().items()]]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    where = f"{spec.config} (launch {spec.name!r})"
    try:
        values(argv)
        config = values["config"].value
    except (OSError, AttributeError, KeyError, ValueError, flags.Error) as e:
        raise LaunchError(f"{where}: {e}") from None
    hardware = f"{spec.num_devices} devices ({spec.tpu or spec.gpu} x {spec.num_slices})"
    target = config.copy_and_resolve_references()
    if target.attention.impl == "auto":  # the pod's backend, not this machine's
        target.attention.impl = "pallas_tpu" if spec.tpu else "pallas_gpu"
    try:
        config_lib.validate(target, num_devices=spec.num_devices)
        sharding.slice_shapes(config.mesh, spec.num_devices)
    except config_lib.ConfigError as e:
        raise LaunchError(f"{where} on {hardware}: {e}") from None
    if config.mesh.get("num_slices", 1) != spec.num_slices:
        raise LaunchError(f"{where}: config.mesh.num_slices={config.mesh.num_slices} but the "
                          f"launch has num_slices={spec.num_slices}")
    return config
