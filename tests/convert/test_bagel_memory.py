"""Converting a ~2 GB BAGEL-layout checkpoint streams: the command line's peak RSS (its own
report, VmHWM: this program's peak alone, not the test process's) stays under 1.5x the
checkpoint's size, both ways. The 7B-sized figures: benchmarks/convert_memory.py."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.convert import official_layout
from tests.convert.conftest import REPO, run_cli
from unijax.convert import safetensors_io


def _peak_mib(output: str) -> float:
    match = re.search(r"peak RSS: (\d+) MiB", output)
    assert match, output
    return float(match.group(1))


def test_reported_peak_is_the_programs_own():
    """getrusage's ru_maxrss survives fork + exec: a converter started by a 600 MiB process
    would report >= 600 MiB. The converter's figure must not include its parent's memory."""
    ballast = np.ones(600 * 2**20, np.uint8)  # written: resident in this process
    code = "from unijax.convert.bagel_export import peak_rss_mib; print(peak_rss_mib())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert float(done.stdout) < 500, (done.stdout, ballast.nbytes)


@pytest.mark.slow
def test_peak_rss_is_under_one_and_a_half_checkpoints(tmp_path):
    src = official_layout.write_official(tmp_path / "official", official_layout.BIG,
                                         tokenizer=False, value=official_layout.fast_value)
    size_mib = official_layout.weight_mib(src)
    assert size_mib > 1800
    dst = str(tmp_path / "unijax")
    peak = _peak_mib(run_cli(f"--src={src}", f"--dst={dst}"))
    back = str(tmp_path / "back")
    peak_back = _peak_mib(run_cli("--to_official", f"--src={dst}", f"--dst={back}"))
    # Both bounds checked together, so a failure reports both figures.
    assert max(peak, peak_back) < 1.5 * size_mib, (peak, peak_back, size_mib)
    a, b = (safetensors_io.open_safetensors(os.path.join(d, "ema.safetensors"))
            for d in (src, back))
    assert {k: (a.dtype(k), a.shape(k)) for k in a} == {k: (b.dtype(k), b.shape(k)) for k in b}
    key = "language_model.model.layers.29.mlp_moe_gen.down_proj.weight"
    np.testing.assert_array_equal(a.read(key).view(np.uint16), b.read(key).view(np.uint16))
