"""Test harness: 8 fake CPU devices (so sharding code runs on a real mesh) and parsed absl flags.

XLA_FLAGS must be set before jax is first imported, which is why this happens at import time.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
