"""Two local processes (`jax.distributed` on localhost, gloo) train, checkpoint, agree on a
preemption and restore: the code path of a multi-host pod, each host feeding its own shard of
the data and writing its own shards of the state. The uninterrupted run and the final resume
go through `launch/local.py`, the workstation launcher (prefixed logs, one exit code)."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from launch import local

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(workdir, worlds_dir) -> list[str]:
    return ["--config=tests/training/small_config.py", f"--workdir={workdir}",
            f"--config.data.worlds.dir={worlds_dir}", f"--config.train.steps={STEPS}",
            "--config.checkpoint.every_steps=4", "--config.train.eval_batches=0"]


def _start(workdir, worlds_dir):
    """The main job as 2 processes of 2 CPU devices each (one mesh of 4 devices)."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    return [subprocess.Popen(
        [sys.executable, "-m", "unijax.main", *_flags(workdir, worlds_dir),
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]


def _launch(workdir, worlds_dir) -> str:
    """The main job through `launch.local` (2 processes of 2 devices); returns the joint log."""
    out = io.StringIO()
    code = local.launch(_flags(workdir, worlds_dir), 2, devices_per_process=2, out=out)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def _finish(procs) -> list[str]:
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        _kill(procs)
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _rows(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_agree_on_preemption_and_restore(worlds_dir, tmp_path):
    full = tmp_path / "full"
    log = _launch(full, worlds_dir)
    for i in range(2):  # both hosts' logs, prefixed; one global mesh over their 4 devices
        assert f"[{i}] mesh: {{'data': 4, 'fsdp': 1, 'tensor': 1}} over 4 cpu device(s)" in log
    step_dir = full / "checkpoints" / str(STEPS)
    assert sorted(os.listdir(step_dir / "data_iter"))[:2] == ["commit_success.txt",
                                                              "process_0-of-2.json"]
    assert (step_dir / "data_iter" / "process_1-of-2.json").exists()
    assert (step_dir / "state" / "ocdbt.process_1").is_dir()  # host 1 wrote its own shards

    # SIGTERM to host 1 only: both hosts save the same step and exit 0.
    resumed = tmp_path / "resumed"
    procs = _start(resumed, worlds_dir)
    try:
        deadline = time.monotonic() + 600
        while not any(s >= 2 for s in _losses(resumed)):
            for p in procs:
                assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "step 2 was not reached"
            time.sleep(0.05)
    except BaseException:
        _kill(procs)
        raise
    procs[1].send_signal(signal.SIGTERM)
    out = _finish(procs)
    saved = {int(o.split("preempted: saved step ")[1].split()[0]) for o in out}
    assert len(saved) == 1 and 2 <= min(saved) < STEPS, out

    log = _launch(resumed, worlds_dir)  # a second launch resumes
    assert all(f"[{i}] restored from step {min(saved)}" in log for i in range(2))
    assert _losses(resumed) == _losses(full)  # the restored run continues exactly
