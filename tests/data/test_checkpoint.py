"""Save the iterator at step k with Orbax; a new process restores it and continues exactly,
including the documents the packer's look-ahead buffer held back (re-read on restore)."""

import json
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.data import synth
from tests.data.restore_worker import config_for, digest
from unijax.data import pipeline, records


def held_indices(state) -> list[int]:
    """The stream indices held by every packer's look-ahead buffer in a saved state."""
    if isinstance(state, str) and state.startswith("{"):
        state = json.loads(state)
    if isinstance(state, dict):
        own = list(state.get("held", []))
        return own + [i for k, v in state.items() if k != "held" for i in held_indices(v)]
    if isinstance(state, list):
        return [i for v in state for i in held_indices(v)]
    return []


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_records")
    rng = np.random.default_rng(3)
    kinds = ("caption", "t2i", "interleaved", "edit", "video")
    records.write_records(root / "a.array_record",
                          [synth.make(kinds[i % 5], i, rng, "a") for i in range(15)])
    bad = [records.encode_record(synth.make("vqa", i, rng, "b")) for i in range(6)]
    bad.insert(3, b"\x00broken")  # skip counters are part of the state too
    records.write_raw(root / "b.array_record", bad)
    return str(root / "*.array_record")


@pytest.mark.parametrize("workers", [0, 2])
def test_restore_in_a_new_process_continues_exactly(two_datasets, tmp_path, workers):
    k, n = 4, 3
    it = pipeline.make_iterator(config_for(two_datasets, workers))
    for _ in range(k):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data_iter": grain.checkpoint.CheckpointHandler()})
    mngr.save(k, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": np.array(k)}),
        data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    saved = {"documents": it.documents, "skipped": dict(it.skipped)}
    assert set(saved["skipped"]) == {"msgpack"}  # skip counters are part of the state
    expected = []
    for _ in range(n):
        expected.append((digest(next(it)), it.last_documents))
    it.close()
    saved_state = tmp_path / "ckpt" / str(k) / "data_iter" / "process_0-of-1.json"
    assert held_indices(json.loads(saved_state.read_text()))  # the buffer is part of the state

    out = tmp_path / "restored.json"
    subprocess.run([sys.executable, "-m", "tests.data.restore_worker", two_datasets,
                    str(tmp_path / "ckpt"), str(k), str(n), str(workers), str(out)],
                   check=True, timeout=120)
    got = json.loads(out.read_text())
    assert got["documents"] == saved["documents"] and got["skipped"] == saved["skipped"]
    assert got["batches"] == [e[0] for e in expected]
    assert got["docs"] == [[[list(d) for d in row] for row in e[1]] for e in expected]
