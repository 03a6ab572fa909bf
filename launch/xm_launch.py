r"""The XManager launch script: one experiment, one work unit per point of a config sweep.

  xmanager launch launch/xm_launch.py -- --name=bagel --config=configs/bagel_7b_mot.py \
      --workdir=gs://my-bucket/bagel --tpu=v5p-1024 --image=IMAGE \
      --sweep=train.lr=1e-4,3e-4 --submit -- --config.data.batch_size=512

  python -m launch.xm_launch --name=bagel ...   # the same flags: prints the work units

Without --submit it prints each work unit (requirements, environment, the main job's flags)
and needs no xmanager; with it, it creates the experiment through `xm_local` (the `xmanager`
package must be installed; it is not a unijax dependency). Every point's config is parsed and
validated for the hardware first. The job runs `image` (its entrypoint `python3 -m
unijax.main`, as launch/Dockerfile builds it) or, without one, the checkout packaged by
`xm.python_container`.

Open-source xm_local cannot place modern TPU pods (late 2026: Vertex maps only TPU v2/v3,
Kubernetes sets no TPU topology selectors, and TPU requirements take no slice count), so on GKE
prefer `python -m launch.pod --backend=xpk`; this script is the experiment an XManager backend
with TPU support runs (`--xm_executor` picks the xm_local one).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `xmanager launch` imports this file as a top-level module
    sys.path.insert(0, ROOT)

from launch import cli, xm_jobs  # noqa: E402
from launch.spec import LaunchError  # noqa: E402

try:  # at import: xmanager's modules define flags (--xm_launch_script) that `xmanager launch` sets
    from xmanager import xm, xm_local
except ImportError:
    xm = xm_local = None

cli.define_flags()
_EXECUTOR = flags.DEFINE_enum("xm_executor", "kubernetes", ["kubernetes", "vertex", "local"],
                              "The xm_local executor of the jobs (with --submit).")
_BASE_IMAGE = flags.DEFINE_string("xm_base_image", "python:3.12", "Base image when the "
                                  "checkout is packaged (no --image).")


def _executor(unit: xm_jobs.WorkUnit):
    requirements = xm_jobs.job_requirements(unit)
    if _EXECUTOR.value == "local":
        return xm_local.Local()
    cls = xm_local.Vertex if _EXECUTOR.value == "vertex" else xm_local.Kubernetes
    return cls(requirements=requirements)


def submit(name: str, image: str, units: list[xm_jobs.WorkUnit]) -> None:
    """Creates the experiment `name` with one work unit per unit."""
    if xm is None:
        raise LaunchError(xm_jobs.XMANAGER_MISSING)
    spec_cls = {"kubernetes": xm_local.Kubernetes, "vertex": xm_local.Vertex,
                "local": xm_local.Local}[_EXECUTOR.value]
    with xm_local.create_experiment(experiment_title=name) as experiment:
        if image:
            packageable = xm.container(executor_spec=spec_cls.Spec(), image_path=image)
        else:
            packageable = xm.python_container(executor_spec=spec_cls.Spec(), path=ROOT,
                                              base_image=_BASE_IMAGE.value,
                                              entrypoint=xm.ModuleName("unijax.main"))
        [executable] = experiment.package([packageable])
        xm_jobs.add_work_units(experiment, executable, units, _executor)


def main(argv) -> None:
    try:
        specs = cli.specs_from_flags(argv)
        units = xm_jobs.work_units(specs)
        print("\n".join(xm_jobs.describe(units)), flush=True)
        if flags.FLAGS.submit:
            submit(flags.FLAGS.name, flags.FLAGS.image, units)
    except LaunchError as e:
        cli.fail(e)


if __name__ == "__main__":
    app.run(main)
