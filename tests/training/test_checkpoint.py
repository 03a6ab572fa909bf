"""Checkpoints: restore onto other meshes, incomplete saves, kill -9 and SIGTERM mid-run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.training import helpers
from unijax.data import pipeline
from unijax.training import checkpoint
from unijax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_saved_on_8_devices_restores_on_1_and_on_another_mesh(worlds_dir, batches, tmp_path):
    trainer = helpers.Trainer(helpers.small_config(worlds_dir, **{
        "mesh.data": 2, "mesh.fsdp": 4}), jax.devices())
    _, state = trainer.run(trainer.init(), batches[:2])
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, max_to_keep=2)
    ckpt.save(2, state, None, trainer.config)
    ckpt.wait()
    saved = helpers.to_host(state)
    next_loss, _ = trainer.run(state, batches[2:3])

    for mesh, devices in [({"mesh.data": 1}, jax.devices()[:1]),
                          ({"mesh.data": 4, "mesh.fsdp": 2}, jax.devices())]:
        other = helpers.Trainer(helpers.small_config(worlds_dir, **mesh), devices)
        target, _ = state_lib.abstract_state(other.config, other.mesh, other.spec, other.tx)
        restored = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1,
                                           max_to_keep=2).restore(2, target)
        kernel = restored.params["llm"]["layers"]["und"]["mlp"]["up_proj"]["kernel"]
        assert kernel.sharding.mesh.shape == other.mesh.shape
        for a, b in zip(jax.tree.leaves(helpers.to_host(restored)), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(a, b)
        loss, _ = other.run(restored, batches[2:3])
        np.testing.assert_allclose(loss, next_loss, rtol=2e-6)


def test_a_save_killed_before_its_commit_is_never_restored(tmp_path):
    directory = tmp_path / "ckpt"
    result = subprocess.run([sys.executable, "-m", "tests.training.kill_during_save",
                             str(directory)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    leftovers = [p.name for p in directory.iterdir() if "tmp" in p.name]
    assert leftovers and leftovers[0].startswith("2"), sorted(os.listdir(directory))
    written = [p for p in (directory / leftovers[0]).rglob("*") if p.is_file()]
    assert any("state" in str(p) and "ocdbt" in str(p) for p in written)  # step 2 was written
    ckpt = checkpoint.Checkpointer(str(directory), every_steps=1, max_to_keep=5)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1  # but never committed
    restored = ckpt.restore(1, {"w": jax.ShapeDtypeStruct((64, 64), np.float32)})
    assert float(restored["w"][0, 0]) == 1.0
    assert not [p for p in directory.iterdir() if "tmp" in p.name]  # cleaned up on open


STEPS = 8


def _main_job(workdir, worlds_dir, *extra, wait=True):
    command = [sys.executable, "-m", "unijax.main", "--config=tests/training/small_config.py",
               f"--workdir={workdir}", f"--config.data.worlds.dir={worlds_dir}",
               f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=1",
               "--config.checkpoint.max_to_keep=2", "--config.train.eval_batches=0", *extra]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _train_rows(workdir) -> dict[int, dict]:
    """step -> the train/* scalars of metrics.jsonl (one row per step: log_every=1)."""
    rows = {}
    for row in helpers_read(workdir):
        if "train/loss" in row:
            rows[row["step"]] = {k: v for k, v in row.items()
                                 if k.startswith("train/") and "time" not in k
                                 and "per_s" not in k}
    return rows


def helpers_read(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _committed_steps(workdir) -> list[int]:
    """Steps whose checkpoint directory has been renamed into place (a complete save)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return [int(name) for name in os.listdir(directory) if name.isdigit()]


def _wait_for_step(process, workdir, step, timeout=600) -> None:
    """Polls until `step` is logged and some checkpoint is complete; kills the run if that
    never comes."""
    deadline = time.monotonic() + timeout
    path = os.path.join(workdir, "metrics.jsonl")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {process.stderr.read()}")
        if os.path.exists(path) and _committed_steps(workdir) and any(
                r.get("step", 0) >= step and "train/loss" in r for r in helpers_read(workdir)):
            return
        time.sleep(0.05)
    process.kill()
    process.communicate()
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def reference_run(worlds_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    result = _main_job(workdir, worlds_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _train_rows(workdir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    return rows


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_is_exact(worlds_dir, tmp_path, reference_run):
    kill_at = random.randint(2, STEPS - 2)
    process = _main_job(tmp_path, worlds_dir, wait=False)
    _wait_for_step(process, tmp_path, kill_at)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    latest = max(_committed_steps(tmp_path))
    result = _main_job(tmp_path, worlds_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"restored from step {latest}" in result.stdout, f"killed at step {kill_at}"
    rows = _train_rows(tmp_path)
    assert sorted(rows) == sorted(reference_run)
    for step, row in reference_run.items():  # losses and batch counts, bit for bit
        assert rows[step] == row, f"killed at step {kill_at}; step {step} differs"


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_the_next_run_resumes_there(worlds_dir, tmp_path,
                                                             reference_run):
    process = _main_job(tmp_path, worlds_dir, wait=False)
    _wait_for_step(process, tmp_path, 3)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "preempted: saved step" in stdout
    saved = int(stdout.split("preempted: saved step ")[1].split()[0])
    assert 3 <= saved < STEPS
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), every_steps=1, max_to_keep=2)
    assert ckpt.latest_step() == saved and len(ckpt.all_steps()) == 2  # max_to_keep
    result = _main_job(tmp_path, worlds_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"restored from step {saved}" in result.stdout
    rows = _train_rows(tmp_path)
    assert all(rows[s] == reference_run[s] for s in reference_run)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == STEPS and report["restored_from"] == saved


def test_data_iterator_position_is_part_of_the_checkpoint(worlds_dir, tmp_path):
    """Saved with the state: the restored iterator yields the batch the saved one would."""
    config = helpers.small_config(worlds_dir)
    it = pipeline.make_iterator(config)
    next(it)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), every_steps=1, max_to_keep=1)
    ckpt.save(1, {"step": np.int32(1)}, it, config)
    ckpt.wait()
    expected = next(it)
    fresh = pipeline.make_iterator(config)
    ckpt.restore(1, {"step": jax.ShapeDtypeStruct((), np.int32)}, fresh)
    got = next(fresh)
    np.testing.assert_array_equal(got.text_ids, expected.text_ids)
    np.testing.assert_array_equal(got.vae_images, expected.vae_images)
    assert ckpt.restore_config(1)["data"]["batch_size"] == config.data.batch_size
