"""XManager work units from launch specs: the job arguments, environment and requirements of
each, and adding them to an experiment (`launch/xm_launch.py` is the script around this).

Pure data until `add_work_units`, which needs the `xmanager` package (imported there only): the
rendered arguments are what tests check when xmanager is not installed, and with it installed
`xmanager.xm_mock.MockExperiment` records the same jobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from launch.spec import LaunchSpec

XMANAGER_MISSING = ("the xmanager package is not installed: `pip install xmanager` (a large "
                    "install, kept out of unijax's dependencies), or launch with "
                    "`python -m launch.pod --backend=xpk` instead")


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """One `xm.Job` of the experiment.

    Attributes:
      name: the run's name (the spec's).
      args: keyword flags of the main job, as `xm.Job(args=...)` takes them: {"config": ...,
        "workdir": ..., "config.train.lr": "3e-4", "distributed": True}.
      env_vars: the job's environment.
      requirements: `xm.JobRequirements` keywords: {"tpu_v5e": "16x16"} (a topology) or
        {"h100": 8}; a multi-slice run adds "replicas": num_slices, since xm has no slice count
        for TPUs (an executor that runs TPU pods maps replicas to slices).
    """

    name: str
    args: dict[str, object]
    env_vars: dict[str, str]
    requirements: dict[str, object]


def work_unit(spec: LaunchSpec) -> WorkUnit:
    """The work unit of one spec."""
    args: dict[str, object] = {"config": spec.config, "workdir": spec.workdir}
    args.update({f"config.{k}": v for k, v in spec.config_overrides().items()})
    if "--distributed" in spec.main_flags():
        args["distributed"] = True
    if spec.tpu:
        tpu = spec.tpu_slice
        requirements: dict[str, object] = {tpu.spec.xm_resource: tpu.topology}
        if spec.num_slices > 1:
            requirements["replicas"] = spec.num_slices
    else:
        requirements = {spec.gpu: spec.gpus_per_host}
        if spec.num_hosts > 1:
            requirements["replicas"] = spec.num_hosts
    return WorkUnit(spec.name, args, dict(spec.env), requirements)


def work_units(specs: Sequence[LaunchSpec]) -> list[WorkUnit]:
    """One work unit per spec (per sweep point)."""
    return [work_unit(spec) for spec in specs]


def render_args(args: Mapping[str, object]) -> list[str]:
    """Keyword args as XManager puts them on the command line: --key=value, a True flag as
    --key, a False one as --nokey (what `xm.SequentialArgs.to_list` does)."""
    out = []
    for key, value in args.items():
        if isinstance(value, bool):
            out.append(f"--{'' if value else 'no'}{key}")
        else:
            out.append(f"--{key}={value}")
    return out


def describe(units: Sequence[WorkUnit]) -> list[str]:
    """A printable line per work unit: requirements, environment and the main job's flags."""
    lines = []
    for i, unit in enumerate(units, start=1):
        needs = " ".join(f"{k}={v}" for k, v in unit.requirements.items())
        env = "".join(f" {k}={v}" for k, v in unit.env_vars.items())
        lines.append(f"work unit {i} [{needs}]{env}: python3 -m unijax.main "
                     + " ".join(render_args(unit.args)))
    return lines


def job_requirements(unit: WorkUnit):
    """The unit's `xm.JobRequirements` (TPU topologies as `xm.Topology`)."""
    from xmanager import xm

    resources = {k: xm.Topology(v) if k.startswith("tpu_") else v
                 for k, v in unit.requirements.items() if k != "replicas"}
    return xm.JobRequirements(**resources, replicas=unit.requirements.get("replicas"))


def add_work_units(experiment, executable, units: Sequence[WorkUnit],
                   make_executor: Callable[[WorkUnit], object]) -> None:
    """Adds one `xm.Job` per unit to `experiment` (`make_executor(unit)` places it)."""
    from xmanager import xm

    for unit in units:
        experiment.add(xm.Job(executable=executable, executor=make_executor(unit),
                              args=dict(unit.args), env_vars=dict(unit.env_vars)))
