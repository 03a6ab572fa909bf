"""benchmarks/mot_step.py and benchmarks/data.py end to end in their tiny modes: the rows they
append are well formed and their numbers agree with each other and with the layouts timed."""

import numpy as np
import pytest

from benchmarks import attention as attention_bench
from benchmarks import data as data_bench
from benchmarks import mot_step
from unijax.kernels import mask as mask_lib


def _table_rows(path, marker: str) -> list[list[str]]:
    """The cells of the table rows of `path` whose first cell is not a header."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("| ") and marker not in line:
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_mot_step_tiny_run_writes_a_consistent_row(tmp_path):
    """The tiny decoder, one 1024-token packed row, xla attention, full remat: one row whose
    tokens/s is L / step time and whose mask density is that of the packed layout."""
    out = tmp_path / "results.md"
    mot_step.main(["--model=tiny", "--length=1024", "--batch=1", "--impl=xla", "--remat=full",
                   "--steps=1", f"--out={out}"])
    (row,) = _table_rows(out, "step ms")
    assert row[2].startswith("tiny (") and row[3] == "1x1024" and row[4] == "xla"
    assert row[5] == "full"
    step_ms, tokens_per_s, tflops = (_number(c) for c in row[6:9])
    assert step_ms > 0 and tflops >= 0  # printed with one decimal: 0.0 on a CPU
    assert tokens_per_s == pytest.approx(1024 / (step_ms / 1e3), rel=2e-3)
    meta = attention_bench.packed_meta(np.random.default_rng(0), 1, 1024)  # run()'s layout
    density = np.asarray(mask_lib.dense_mask(meta)).mean()
    assert 0.01 < density < 0.5
    assert _number(row[10]) == pytest.approx(density, abs=6e-4)
    assert row[9] == "nan%"  # CPU: no peak FLOP/s, no MFU


def test_data_tiny_run_writes_a_row_per_kind(tmp_path):
    """Every record kind through the real pipeline in-process, a fixed number of batches:
    positive rates, tokens/s = records/s x tokens/record, an mp4 row and the TPU estimate."""
    out = tmp_path / "results.md"
    kinds = ("text", "caption", "t2i", "video")
    data_bench.main(["--tiny", f"--kinds={','.join(kinds)}", "--workers=0", f"--out={out}"])
    rows = _table_rows(out, "records/s")
    assert [r[2] for r in rows[:len(kinds)]] == list(kinds)
    for row in rows[:len(kinds)]:
        assert len(row) == len(data_bench.COLUMNS)
        records_s, tokens_s, per_record = (_number(c) for c in row[4:7])
        assert records_s > 0 and per_record > 10
        assert tokens_s == pytest.approx(records_s * per_record, rel=0.01)
        assert row[7] == f"`PYTHONPATH=. python benchmarks/data.py --tiny --kinds={','.join(kinds)} --workers=0 --out={out}`"  # noqa: E501
    assert rows[len(kinds)][2].startswith("mp4 decode (PyAV, 80x44 H.264)")
    assert rows[-1][0] == "estimate"


def test_sample_memory_rows_are_consistent(tmp_path, capsys):
    """benchmarks/sample_memory.py --no_compile on the tiny config: a row per mesh x weights x
    mode; sharding and int8 shrink the weights, editing's context is longer."""
    import json

    from benchmarks import sample_memory

    out = tmp_path / "rows.jsonl"
    sample_memory.main(["--config=configs/tiny.py", "--mesh=;tensor=2", "--image_size=64",
                        "--no_compile", f"--out={out}"])
    rows = {(json.dumps(r["mesh"]), r["quantize"], r["mode"]): r
            for r in map(json.loads, out.read_text().splitlines())}
    printed = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| ") and not line.startswith("| mesh")]
    assert len(rows) == 8 and len(printed) == 8
    one, two = json.dumps({"data": 1, "fsdp": 1, "tensor": 1}), json.dumps(
        {"data": 1, "fsdp": 1, "tensor": 2})
    for mode in ("t2i", "edit"):
        assert rows[(two, "none", mode)]["weights"] < rows[(one, "none", mode)]["weights"]
        assert rows[(one, "int8", mode)]["weights"] < rows[(one, "none", mode)]["weights"]
        assert rows[(one, "none", mode)]["phases"] == []
    assert rows[(one, "none", "edit")]["context_tokens"] > rows[(one, "none", "t2i")][
        "context_tokens"]


def test_convert_memory_reports_both_ways(tmp_path, capsys):
    """benchmarks/convert_memory.py on the tiny official layout: one row, a size, and a peak
    for each way that is the command's own (the test process holds far more)."""
    from benchmarks import convert_memory

    convert_memory.main(["--dims=tiny", f"--dir={tmp_path}", "--free_source"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert float(cells[1]) > 0
    peaks = [float(c.split()[0]) for c in cells[3:5]]
    assert all(0 < p < 2000 for p in peaks), row
    assert not (tmp_path / "tiny").exists()  # the scratch directory is emptied
