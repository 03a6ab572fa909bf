"""launch/local.py: N local processes with prefixed, streamed logs that fail together."""

import io
import os
import sys
import time

import pytest

from launch import local


def test_one_failure_stops_the_others_and_sets_the_exit_code():
    fails = [sys.executable, "-c", "print('first'); print('second'); raise SystemExit(3)"]
    waits = [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(600)"]
    out = io.StringIO()
    started = time.monotonic()
    code = local.run_processes([fails, waits], [os.environ] * 2, out=out, grace_seconds=5)
    assert code == 3
    assert time.monotonic() - started < 120  # the waiting process was stopped, not awaited
    lines = out.getvalue().splitlines()
    assert lines.index("[0] first") < lines.index("[0] second")
    assert lines[-1] == "launch.local: process 0 exited with code 3; stopped the others"
    assert local.run_processes([[sys.executable, "-c", "print('ok')"]], [os.environ], out=out) == 0


def test_process_environment_and_flags():
    env = local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --x=1"},
                            1, "cpu", 2)
    assert env["XLA_FLAGS"] == "--x=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert local.process_env({}, 1, "gpu", 1)["CUDA_VISIBLE_DEVICES"] == "1"
    assert local.main_job_argv(["--config=c.py"], 1, 2, 1234)[1:] == [
        "-m", "unijax.main", "--config=c.py", "--coordinator_address=127.0.0.1:1234",
        "--num_processes=2", "--process_id=1"]
    with pytest.raises(ValueError, match="the launcher sets the distributed flags itself"):
        local.launch(["--config=c.py", "--num_processes=4"], 2)
    with pytest.raises(SystemExit):
        local.main(["--num_processes=2"])  # no main job flags after "--"


# Training across two processes through this launcher, a checkpoint and a second launch that
# resumes: tests/training/test_multihost.py (its uninterrupted run and its resume use launch()).
