"""The main job as a user runs it: a subprocess from the repository root."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "unijax.main", *args, f"--workdir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def test_tiny_job_trains_and_reports(tmp_path):
    """The README's command on a few steps: worlds written, training logged, a checkpoint,
    a report with the judges' scores."""
    args = ("--config=configs/tiny.py", "--config.train.log_every=2",
            "--config.checkpoint.every_steps=4", "--config.train.eval_batches=1",
            "--config.judges.num_per_category=1", "--config.judges.num_digits=2",
            "--config.judges.steps=3", "--config.judges.tb_samples=1",
            "--config.data.worlds.shapes_train=400")
    result = _main(*args, "--config.train.steps=4", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh: {'data': 8, 'fsdp': 1, 'tensor': 1}" in result.stdout
    assert "steps: 4" in result.stdout and "report: 4 steps" in result.stdout
    assert (tmp_path / "worlds" / "manifest.json").exists()
    assert (tmp_path / "checkpoints" / "4" / "state").is_dir()
    assert any(name.startswith("events.out.tfevents") for name in
               os.listdir(tmp_path / "tensorboard"))
    assert "llm/layers/und/q_proj/kernel" in (tmp_path / "parameters.txt").read_text()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 4 and report["initial"]["ce"] > report["final"]["ce"]
    assert set(report["final"]) >= {"ce", "mse_t0.25", "mse_t0.5", "mse_t0.75", "mse_t0.9"}
    # The judges scored the untrained and the final model and the prompt-ignoring baseline
    # on the same items: every GenEval category and question type, both worlds.
    judged = report["judges"]
    assert judged["weights"] == "ema" and set(judged) >= {"initial", "final", "chance"}
    for name in ("initial", "final", "chance"):
        assert set(judged[name]["generation"]["shapes"]) >= {"single_object", "colors"}
        assert set(judged[name]["understanding"]["shapes"]) >= {"colour", "count"}
        assert "accuracy" in judged[name]["generation"]["digits"]
    assert "gen shapes/colors" in result.stdout
    assert (tmp_path / "judges_step0.json").exists()
    # Resuming the same command is tested on the small config (tests/training/test_checkpoint).


@pytest.mark.parametrize("override,message", [
    ("--config.model.llm.num_heads=3", "config.model.llm.num_heads=3 must be a multiple of"),
    ("--config.mesh.tensor=3", "num_heads=4 is not divisible by config.mesh.tensor=3"),
    ("--config.train.grad_accum=3", "config.data.batch_size=8 is not divisible by "
                                    "config.train.grad_accum=3"),
    ("--config.train.freeze=('vit/nothing',)", "'vit/nothing' matches no parameter"),
])
def test_bad_config_fails_before_compiling(tmp_path, override, message):
    result = _main("--config=configs/tiny.py", override, tmp_path=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "worlds").exists()
