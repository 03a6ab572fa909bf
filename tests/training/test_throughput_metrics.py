"""Throughput in the step logs: tokens/s and model TFLOP/s per device, and MFU where the
device's peak is known, consistent with the step time and `models.flops.step_flops`.

The logs read are those of the session's `trained` run (`tests/inference/trained.py`: the real
trainer, a few steps on the 8 devices), so this costs no training of its own.
"""

import jax
import numpy as np
import pytest

from tests.inference import trained as trained_lib
from tests.training import helpers
from unijax.models import flops
from unijax.training import metrics, optim

KEYS = ("train/tokens_per_s_per_device", "train/tflops_per_s_per_device")


def test_train_logs_per_device_throughput_consistent_with_step_flops(trained):
    workdir, config = trained
    rows = [r for r in metrics.read_metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Step 1 compiles and is not timed: no rates yet. CPU: no peak, so no MFU.
    assert not any(k in rows[0] for k in KEYS)
    assert not any("train/mfu" in r for r in rows)
    devices = jax.device_count()
    trainable = optim.is_trainable_fn(config)
    per_batch = [flops.step_flops(config, b, trainable=trainable)["model"]
                 for b in helpers.host_batches(config, trained_lib.STEPS)]  # what it trained
    tensorboard = metrics.read_tensorboard(workdir)
    for row in rows[1:]:
        timed = per_batch[1:row["step"]]  # the rates are cumulative over the timed steps
        tokens_per_device = row["train/tokens_per_s_per_device"]
        assert tokens_per_device * devices == pytest.approx(row["train/tokens_per_s"], rel=1e-3)
        # model FLOPs per step = per-device rate x devices x step time
        step_flops = row["train/tflops_per_s_per_device"] * 1e12 * devices * \
            row["train/step_time_s"]
        assert step_flops == pytest.approx(np.mean(timed), rel=1e-3)
        for key in KEYS:
            assert tensorboard[key][row["step"]] == pytest.approx(row[key], rel=1e-6)


def test_step_timer_per_device_rates_and_mfu():
    timer = metrics.StepTimer()
    timer.start()
    assert timer.per_device(8, 1e15) == {}  # nothing measured yet
    timer.add(2, 1000.0, 4e12)
    rates = timer.per_device(8, 1e15)
    seconds = 1000.0 / 8 / rates["tokens_per_s_per_device"]
    assert rates["tflops_per_s_per_device"] == pytest.approx(4.0 / seconds / 8, rel=1e-3)
    assert rates["mfu"] == pytest.approx(rates["tflops_per_s_per_device"] * 1e12 / 1e15)
    assert "mfu" not in timer.per_device(8, None)
