"""Test harness: 8 fake CPU devices (so sharding code runs on a real mesh) and parsed absl flags.

XLA_FLAGS must be set before jax is first imported, which is why this happens at import time.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, shared with the subprocesses the tests
# start (they inherit the environment): the trainer's tests compile the same small programs
# many times (a restarted run, each host of a multi-process run), and XLA's CPU compiler takes
# seconds per program. The cache is keyed by the program, the jax version and the flags, so a
# cached executable is the one a fresh compile would give. pytest-xdist workers (`-n 2`) inherit
# the controller's directory, so they share it too.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="unijax-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # A size cap turns on jax's file lock around each cache read and write. Without it, two
    # workers that compile the same program both write its entry (truncate, then write), and a
    # third process can read a half-written executable (the likely cause of a worker's abort).
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(32 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain's multiprocessing prefetch reads an absl flag; pytest never parses absl flags.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def cpu_devices():
    """The 8 fake CPU devices."""
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 fake CPU devices, got {devices}"
    return devices


@pytest.fixture
def tiny_config():
    """A fresh (unlocked) copy of configs/tiny.py."""
    from configs import tiny

    return tiny.get_config()


@pytest.fixture
def rng():
    """A fixed numpy Generator: tests are deterministic."""
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(workdir, config) of the small model trained a few steps (tests/inference/trained.py),
    shared by the inference, sampling and eval tests."""
    from tests.inference import trained as trained_lib

    return trained_lib.train(tmp_path_factory)


# The longest test files, longest first (their summed durations on 2 workers). pytest-xdist's
# `--dist loadfile` hands files out in collection order as workers free up, so starting with
# these keeps one worker from running a long file alone at the end.
_LONGEST_FIRST = (
    "tests/training/test_step.py",
    "tests/training/test_checkpoint.py",
    "tests/training/test_multihost.py",
    "tests/test_main.py",
    "tests/models/test_mot.py",
    "tests/inference/test_chat.py",
    "tests/training/test_memory_levers.py",
    "tests/benchmarks/test_train_step.py",
)


def pytest_collection_modifyitems(config, items):
    del config
    rank = {path: i for i, path in enumerate(_LONGEST_FIRST)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    key = lambda item: rank.get(os.path.relpath(str(item.path), root), len(rank))
    items.sort(key=key)  # stable: the rest keep their order
