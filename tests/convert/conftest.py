"""Fixtures of the converter's tests: a tiny official-layout BAGEL directory and its unijax
conversion by the command line, built once per session."""

import os
import subprocess
import sys

import pytest

from tests.convert import official_layout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args: str) -> str:
    """`python -m unijax.convert.bagel ARGS` from the repository root; returns its stdout."""
    done = subprocess.run([sys.executable, "-m", "unijax.convert.bagel", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    """A tiny BAGEL-7B-MoT directory: bf16 ema.safetensors, fp32 ae.safetensors, JSONs and a
    tokenizer.json."""
    return official_layout.write_official(tmp_path_factory.mktemp("bagel") / "official")


@pytest.fixture(scope="session")
def converted(official, tmp_path_factory):
    """(unijax directory, CLI output) of `official` converted by the command line."""
    dst = str(tmp_path_factory.mktemp("bagel") / "unijax")
    return dst, run_cli(f"--src={official}", f"--dst={dst}")
