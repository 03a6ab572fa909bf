"""benchmarks/sample.py end to end in its tiny mode: every (capacity, context) gets its three
rows, well formed and positive (no timing assertions)."""

import json

from benchmarks import sample as sample_bench

KINDS = ("denoise step", "denoise step, text guidance", "text token (greedy)")


def test_sample_tiny_run_writes_well_formed_rows(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    returned = sample_bench.main(["--config=configs/tiny.py", "--tiny", f"--out={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == returned
    # --tiny: contexts 8 and 32 at capacity 64, then 8 at capacity 128; three rows each.
    plan = [(64, 8), (64, 32), (128, 8)]
    assert [(r["capacity"], r["context_tokens"]) for r in rows] == [p for p in plan
                                                                    for _ in KINDS]
    assert [r["what"] for r in rows] == list(KINDS) * len(plan)
    for r in rows:
        assert r["seconds"] > 0 and r["repeats"] == 1 and r["batch"] == 1
        assert r["config"] == "configs/tiny.py" and r["device"]
        # The prompt's chunk: <|im_start|> ids <|im_end|>, rounded up to 16 slots.
        assert r["cache_slots"] == -(-(r["context_tokens"] + 2) // 16) * 16 <= r["capacity"]
        if r["what"].startswith("denoise"):
            assert r["steps"] == 2 and r["grid"] == [2, 2]
        else:
            assert r["new_tokens"] == 4
    printed = capsys.readouterr().out
    assert "| what | capacity | context tokens | cache slots used | ms | per |" in printed
    assert printed.count("| text token (greedy) |") == len(plan)
