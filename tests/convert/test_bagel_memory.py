"""Converting a ~2 GB BAGEL-layout checkpoint streams: the command line's peak RSS (its own
`resource.getrusage` report) stays under 1.5x the checkpoint's size, both ways."""

import os
import re

import jax
import ml_dtypes
import numpy as np
import pytest

from tests.convert import official_layout
from tests.convert.conftest import run_cli
from unijax.convert import safetensors_io

# 1.96 GB of bf16 weights: 30 MoT layers of width 1024 (MLP 4096), a 32k vocabulary.
BIG = dict(vocab=32768, hidden=1024, layers=30, heads=8, kv_heads=2, inter=4096)


def _fast_value(name, shape, dtype, seed):
    """Random finite bf16 bit patterns (|x| < 2), much cheaper than normal draws."""
    if np.dtype(dtype) != np.dtype(ml_dtypes.bfloat16):
        return official_layout.random_value(name, shape, dtype, seed)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**14, size=shape, dtype=np.uint16).view(ml_dtypes.bfloat16)


def _peak_mib(output: str) -> float:
    match = re.search(r"peak RSS: (\d+) MiB", output)
    assert match, output
    return float(match.group(1))


# Measured on jax 0.10.2 / flax 0.12.8 (Python 3.11): 6.1 GB peak converting the 1.9 GB
# checkpoint, against 1.0 GB on jax 0.12; the bound is only claimed for jax >= 0.12 (README).
# Run alone, when asked: inside the full two-worker suite the same command twice peaked at
# 3.0 GB (1.6x), against 1.0-1.3 GB alone, also with both cores or the disk kept busy; the cause
# is not found yet (README, "Converting").
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("UNIJAX_MEASURE_RSS"),
                    reason="a measurement: UNIJAX_MEASURE_RSS=1 python -m pytest "
                           "tests/convert/test_bagel_memory.py")
@pytest.mark.skipif(tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 12),
                    reason="peak RSS of the conversion exceeds 1.5x on jax < 0.12 (6.1 GB for "
                           "a 1.9 GB checkpoint on jax 0.10.2); the bound holds on jax 0.12")
def test_peak_rss_is_under_one_and_a_half_checkpoints(tmp_path):
    src = official_layout.write_official(tmp_path / "official", BIG, value=_fast_value,
                                         tokenizer=False)
    size_mib = sum(os.path.getsize(os.path.join(src, f)) for f in
                   ("ema.safetensors", "ae.safetensors")) / 2**20
    assert size_mib > 1800
    dst = str(tmp_path / "unijax")
    peak = _peak_mib(run_cli(f"--src={src}", f"--dst={dst}"))
    assert peak < 1.5 * size_mib, (peak, size_mib)
    back = str(tmp_path / "back")
    peak_back = _peak_mib(run_cli("--to_official", f"--src={dst}", f"--dst={back}"))
    assert peak_back < 1.5 * size_mib, (peak_back, size_mib)
    print(f"peak RSS {peak:.0f} / {peak_back:.0f} MiB for {size_mib:.0f} MiB")
    a, b = (safetensors_io.open_safetensors(os.path.join(d, "ema.safetensors"))
            for d in (src, back))
    assert {k: (a.dtype(k), a.shape(k)) for k in a} == {k: (b.dtype(k), b.shape(k)) for k in b}
    key = "language_model.model.layers.29.mlp_moe_gen.down_proj.weight"
    np.testing.assert_array_equal(a.read(key).view(np.uint16), b.read(key).view(np.uint16))
