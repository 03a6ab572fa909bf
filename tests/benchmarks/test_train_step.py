"""benchmarks/train_step.py in its tiny modes: one real train step of the tiny ladder rung
writes a consistent row, and the compile-only mode gives one row per depth."""

import numpy as np
import pytest

from benchmarks import train_rows
from benchmarks import train_step as bench
from unijax import batch as batch_lib


def _table_rows(path) -> list[list[str]]:
    """Cells of the data rows of the tables in `path` (header and rule lines left out)."""
    lines = path.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| device")]
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]


def test_packed_rows_are_bagel_like():
    """Several documents per row, text with CE targets, ViT patches, noisy VAE latents with
    flow weight, within the config's capacities, uint8 pixels."""
    config = bench.ladder_config("tiny", 2048)
    batch = train_rows.packed_rows(np.random.default_rng(0), config, 2)
    assert batch.vit_patches.dtype == np.uint8 and batch.vae_images.dtype == np.uint8
    assert batch.doc_id.max(axis=1).min() >= 2  # several documents in every row
    for modality in (batch_lib.TEXT, batch_lib.VIT, batch_lib.VAE):
        assert (batch.modality == modality).any()
    assert (batch.text_weight > 0).any() and (batch.flow_weight > 0).any()
    assert batch.vit_patches.shape[1] == config.data.max_vit_patches == 512
    assert batch.num_und == batch.num_gen == 1024


def test_tiny_rung_one_step_writes_a_consistent_row(tmp_path):
    """The tiny rung, one 1024-token row, xla: tokens/s = L / step time, MFU NaN on CPU; the
    GPU-only backends are skipped with their reason. 3 layers instead of 4, so that the next
    test's depth 3 is a hit in the session's compilation cache (tests/conftest.py)."""
    out = tmp_path / "results.md"
    bench.main(["--size=tiny", "--layers=3", "--row_tokens=1024", "--impl=xla,pallas_gpu",
                "--remat=full", "--steps=1", f"--out={out}"])
    (row,) = _table_rows(out)
    assert len(row) == len(bench.LADDER_COLUMNS)
    assert row[2].startswith("tiny (") and row[2].endswith("M)")
    assert row[3:7] == ["3", "1x1024", "xla", "full"]
    compile_s, step_ms, tokens_per_s, tflops = (float(c) for c in row[7:11])
    assert compile_s > 0 and step_ms > 0 and tflops > 0
    assert tokens_per_s == pytest.approx(1024 / (step_ms / 1e3), rel=2e-3)
    assert row[11] == "nan%" and row[12] == "nan%"  # CPU: no peak FLOP/s, no MFU / HFU
    assert 0.3 < float(row[13].rstrip("%")) / 100 <= 1.0  # row fill
    state_gib, temp_gib = (float(x) for x in row[14].split(" / "))
    assert state_gib > 0 and temp_gib > 0
    assert "skipped pallas_gpu: pallas_gpu needs a GPU (this device is cpu" in out.read_text()


def test_compile_only_gives_a_row_per_depth(tmp_path):
    """Scanned depths 1 and 3 compiled from abstract arrays: one row each, with positive
    times and XLA's memory analysis."""
    out = tmp_path / "results.md"
    bench.main(["--compile_only", "--size=tiny", "--layers=1,3", "--unscanned_layers=",
                "--row_tokens=1024", f"--out={out}"])
    rows = _table_rows(out)
    assert [r[3:5] for r in rows] == [["1", "yes"], ["3", "yes"]]
    for row in rows:
        assert len(row) == len(bench.COMPILE_COLUMNS)
        assert row[5:8] == ["1x1024", "xla", "full"]
        assert float(row[8]) > 0 and float(row[9]) > 0  # lower s, compile s
        assert float(row[10].split(" / ")[0]) > 0  # the state's GiB


def test_unknown_override_names_the_field():
    with pytest.raises(ValueError, match="no field 'train.no_such_knob'"):
        bench.ladder_config("tiny", 1024, overrides={"train.no_such_knob": 1})
