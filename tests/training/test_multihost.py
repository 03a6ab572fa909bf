"""Two local processes (`jax.distributed` on localhost, gloo) train, checkpoint and restore:
the same code path as a multi-host pod, each host feeding its own shard of the data."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_hosts(workdir, worlds_dir, steps):
    """Runs the main job as 2 processes of 2 CPU devices each; returns their outputs."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "unijax.main", "--config=tests/training/small_config.py",
         f"--workdir={workdir}", f"--config.data.worlds.dir={worlds_dir}",
         f"--config.train.steps={steps}", "--config.checkpoint.every_steps=2",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_checkpoint_and_restore(worlds_dir, tmp_path):
    full = tmp_path / "full"
    out = _two_hosts(full, worlds_dir, 4)
    assert "over 4 cpu device(s)" in out[0]  # one global mesh over both hosts' devices
    state_files = sorted(os.listdir(full / "checkpoints" / "4" / "data_iter"))
    assert "process_0-of-2.json" in state_files and "process_1-of-2.json" in state_files

    resumed = tmp_path / "resumed"
    _two_hosts(resumed, worlds_dir, 2)
    out = _two_hosts(resumed, worlds_dir, 4)
    assert all("restored from step 2" in o for o in out)
    assert _losses(resumed) == _losses(full)  # the restored run continues exactly
