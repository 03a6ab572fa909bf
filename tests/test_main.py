"""The main job as a user runs it: a subprocess from the repository root."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "unijax.main", *args, f"--workdir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_tiny_config_builds_mesh_and_exits_cleanly(tmp_path):
    result = _main("--config=configs/tiny.py", "--config.train.steps=5", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mesh: {'data': 8, 'fsdp': 1, 'tensor': 1}" in result.stdout
    assert "steps: 5" in result.stdout
    assert os.path.exists(tmp_path / "log.INFO") or any(
        name.startswith("log") for name in os.listdir(tmp_path)
    )


@pytest.mark.parametrize("override,message", [
    ("--config.model.llm.num_heads=3", "config.model.llm.num_heads=3 must be a multiple of"),
    ("--config.mesh.tensor=3", "num_heads=4 is not divisible by config.mesh.tensor=3"),
])
def test_bad_config_fails_before_compiling(tmp_path, override, message):
    result = _main("--config=configs/tiny.py", override, tmp_path=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
