"""The XManager experiment of a sweep: one work unit per point, the job arguments xm renders
equal to the ones the golden files hold. Rendering needs no xmanager; the experiment is built
with xmanager's own test doubles (`xm_mock`), only where the package is installed."""

import os
import subprocess
import sys

import pytest

from launch import spec, xm_jobs
from tests.launch.specs import SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sweep():
    points = spec.parse_sweep(["train.lr=1e-4,3e-4", "seed=0,1"])
    return xm_jobs.work_units(spec.sweep_specs(SPECS["two_slices"], points))


def test_sweep_gives_one_work_unit_per_point():
    units = _sweep()
    assert [u.name for u in units] == [f"bagel-2x-{i}" for i in range(1, 5)]
    assert [(u.args["config.train.lr"], u.args["config.seed"]) for u in units] == [
        ("1e-4", "0"), ("1e-4", "1"), ("3e-4", "0"), ("3e-4", "1")]
    assert units[3].args["workdir"] == "gs://my-bucket/bagel-2x/4"
    assert xm_jobs.render_args(units[0].args) == [
        "--config=configs/bagel_7b_mot.py", "--workdir=gs://my-bucket/bagel-2x/1",
        "--config.mesh.data=2", "--config.data.batch_size=512", "--config.train.lr=1e-4",
        "--config.seed=0", "--config.mesh.num_slices=2", "--distributed"]
    assert xm_jobs.render_args({"distributed": False}) == ["--nodistributed"]
    assert all(u.env_vars == {"TF_CPP_MIN_LOG_LEVEL": "2"} for u in units)


def test_submit_without_xmanager_says_how_to_get_it():
    if _has_xmanager():
        pytest.skip("xmanager is installed: --submit would try to launch")
    args = [f"--name={SPECS['v5e_256'].name}", "--config=configs/bagel_7b_mot.py",
            "--workdir=gs://my-bucket/x", "--tpu=v5e-256", "--nocheck_config", "--submit"]
    result = subprocess.run([sys.executable, "-m", "launch.xm_launch", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "error: the xmanager package is not installed: `pip install xmanager`" in result.stderr
    assert result.stdout.startswith("work unit 1 [tpu_v5e=16x16]: python3 -m unijax.main ")


def _has_xmanager() -> bool:
    try:
        import xmanager.xm  # noqa: F401
    except ImportError:
        return False
    return True


def test_experiment_through_xmanagers_test_doubles():
    xm = pytest.importorskip("xmanager.xm", reason="xmanager is not a unijax dependency")
    from xmanager import xm_mock

    units = _sweep()
    with xm_mock.MockExperiment() as experiment:
        [executable] = experiment.package([xm.container(
            executor_spec=xm_mock.MockExecutor.Spec(), image_path=SPECS["two_slices"].image)])
        xm_jobs.add_work_units(experiment, executable, units, lambda unit: xm_mock.MockExecutor())
    assert experiment.work_unit_count == 4
    assert len(experiment.launched_jobs) == 4
    for job, unit in zip(experiment.launched_jobs, units):
        assert job.args.to_list(str) == xm_jobs.render_args(unit.args)
        assert job.env_vars == unit.env_vars
    requirements = xm_jobs.job_requirements(units[0])
    assert requirements.replicas == 2
    assert requirements.topology == xm.Topology("16x16")
