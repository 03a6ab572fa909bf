"""Bad storage: damaged chunks and unreadable shards are skipped and counted with their file,
the rest is read, bad shards can be fatal, too many skips stop the run, resume stays exact."""

import logging
import os

import grain
import msgpack
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python import array_record_module

from tests.data import synth
from tests.data.restore_worker import digest
from tests.data.synth import data_config
from unijax import config as config_lib
from unijax.data import pipeline, records, sources

NUM = 40


def _corrupt(path, offset: int, size: int = 4096) -> None:
    """Overwrites `size` bytes at `offset` with random bytes, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(offset).integers(0, 256, size, np.uint8).tobytes())


def _unreadable(path) -> list[int] | None:
    """The indices the ArrayRecord reader itself fails on (the ground truth); None when the
    file does not even open."""
    try:
        source = grain.sources.ArrayRecordDataSource([os.fspath(path)])
    except RuntimeError:
        return None
    bad = []
    for i in range(len(source)):
        try:
            source[i]
        except RuntimeError:
            bad.append(i)
    return bad


def _corrupt_the_middle(path) -> list[int]:
    """4 KB of random bytes over the records in the middle of the shard (where they lie
    depends on the compression); returns the unreadable indices."""
    pristine = path.read_bytes()
    best = None
    for offset in range(1000, len(pristine) - 8192, 1000):
        _corrupt(path, offset)
        bad = _unreadable(path)
        path.write_bytes(pristine)
        if bad is None and best is not None:
            break  # past the records: the index and footer
        if bad and 0 not in bad and NUM - 1 not in bad:  # the damage is inside the records
            distance = abs(np.median(bad) - NUM / 2)
            if best is None or distance < best[0]:
                best = (distance, offset)
    assert best is not None, "no 4 KB window damages only records in the middle"
    _corrupt(path, best[1])
    return _unreadable(path)


@pytest.fixture(scope="module", params=[1, 8], ids=["group1", "group8"])
def damaged(request, tmp_path_factory):
    """40 caption records (~1 KB each) with 4 KB of random bytes written into the middle of
    the file, and the written records. Group size 8 loses whole chunks of 8 records."""
    root = tmp_path_factory.mktemp(f"damaged{request.param}")
    rng = np.random.default_rng(5)
    recs = [synth.make("caption", i, rng) for i in range(NUM)]
    path = root / "damaged.array_record"
    writer = array_record_module.ArrayRecordWriter(str(path), f"group_size:{request.param}")
    for r in recs:
        writer.write(records.encode_record(r))
    writer.close()
    bad = _corrupt_the_middle(path)
    if request.param > 1:  # the whole damaged chunk(s) are lost
        assert len(bad) % request.param == 0
    return path, recs, bad


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_damaged_chunk_skips_its_records_and_reads_the_rest(damaged, shuffle, caplog):
    path, recs, bad = damaged
    config = data_config(path, batch_size=4)
    config.data.shuffle = shuffle
    it = pipeline.make_iterator(config)
    with caplog.at_level(logging.WARNING):
        docs = [d for _ in it for row in it.last_documents for d in row]
    it.close()
    assert sorted(d[3] for d in docs) == sorted(recs[i]["id"] for i in range(NUM)
                                                if i not in bad)
    assert {d[2] for d in docs} == set(range(NUM)) - set(bad)
    assert dict(it.skipped) == {"unreadable": len(bad)}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for i in bad:  # each one is logged with its file and index
        assert f"skipped record {path}:{i} (dataset mix, unreadable)" in logged
    assert "hash mismatch" in logged


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory):
    """A good shard of 12 text records, a truncated copy of it and a file of other bytes."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(6)
    recs = [synth.make("text", i, rng) for i in range(12)]
    records.write_records(root / "a-good.array_record", recs)
    data = (root / "a-good.array_record").read_bytes()
    (root / "b-truncated.array_record").write_bytes(data[:len(data) // 2])
    (root / "c-junk.array_record").write_bytes(b"not an array record file\n" * 4000)
    return root, recs


def test_unreadable_shards_are_skipped_counted_or_fatal(shard_files, caplog):
    root, recs = shard_files
    config = data_config(root / "*.array_record")
    config_lib.validate(config)
    with caplog.at_level(logging.ERROR):
        it = pipeline.make_iterator(config)
    docs = [d for _ in it for row in it.last_documents for d in row]
    it.close()
    assert sorted(d[3] for d in docs) == sorted(r["id"] for r in recs)
    assert dict(it.skipped) == {"bad_shard": 2}  # reaches data/skipped_bad_shard in train.py
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert str(root / "b-truncated.array_record") in logged
    assert str(root / "c-junk.array_record") in logged

    config.data.on_bad_shard = "fail"
    with pytest.raises(sources.BadShardError, match=r"b-truncated\.array_record.*on_bad_shard"):
        pipeline.make_iterator(config)
    config = data_config(root / "[bc]-*.array_record")
    with pytest.raises(sources.BadShardError,
                       match=r"config\.data\.datasets\.mix: none of its 2 shards is readable"):
        pipeline.make_iterator(config)
    config.data.on_bad_shard = "sometimes"
    with pytest.raises(config_lib.ConfigError, match="config.data.on_bad_shard"):
        config_lib.validate(config)


def test_skip_fraction_stops_the_run_with_counts_and_reasons(tmp_path):
    """10 good text records and 10 msgpack-garbage ones, alternating: over 20% skipped once
    10 records were read stops the run; below the minimum count it never does."""
    rng = np.random.default_rng(7)
    good = [records.encode_record(synth.make("text", i, rng)) for i in range(10)]
    payloads = [p for i, g in enumerate(good) for p in (g, b"\x93garbage" + bytes([i]))]
    records.write_raw(tmp_path / "half.array_record", payloads)
    config = data_config(tmp_path / "half.array_record", batch_size=2)
    config.data.shuffle = False
    config.data.max_skip_fraction = 0.2
    config.data.skip_fraction_min_records = 10
    config_lib.validate(config)
    it = pipeline.make_iterator(config)
    with pytest.raises(pipeline.DataError) as err:
        for _ in it:
            pass
    it.close()
    message = str(err.value)
    assert "config.data.max_skip_fraction=0.2" in message
    assert "config.data.skip_fraction_min_records=10" in message
    assert "top reasons: msgpack" in message
    skipped, read = (int(x) for x in message.split(" records read")[0].split(" of the "))
    assert read >= 10 and skipped > 0.2 * read
    config.data.skip_fraction_min_records = 1000  # never reached: the pass completes
    it = pipeline.make_iterator(config)
    assert sum(1 for _ in it) > 0 and it.skipped == {"msgpack": 10}
    it.close()


def test_skip_policy_counts_records_not_shards():
    policy = pipeline.SkipPolicy(max_fraction=0.1, min_records=20, bad_shards=3)
    policy.check({"bad_shard": 3, "msgpack": 1}, documents=0)  # under the minimum
    policy.check({"bad_shard": 3, "msgpack": 2}, documents=18)  # 2 of 20: 10%, not more
    with pytest.raises(pipeline.DataError, match="3 of the 21 records read"):
        policy.check({"bad_shard": 3, "msgpack": 2, "unreadable": 1}, documents=18)
    pipeline.SkipPolicy(max_fraction=1.0).check({"msgpack": 50}, documents=0)


def test_resume_across_a_damaged_chunk_is_exact(damaged, tmp_path):
    """Saved before the damaged chunk is read, restored into a fresh iterator: the same
    batches, documents and skip counts to the end of the pass."""
    path, _, bad = damaged
    config = data_config(path, batch_size=2)
    config.data.shuffle = False
    config.data.pack_buffer = 2
    it = pipeline.make_iterator(config)
    next(it)
    assert it.skipped == {}  # the damaged chunk is still ahead
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={
        "data_iter": grain.checkpoint.CheckpointHandler()})
    mngr.save(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [(digest(b), it.last_documents) for b in it]
    assert it.skipped == {"unreadable": len(bad)}
    it.close()

    fresh = pipeline.make_iterator(config)
    mngr.restore(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert [(digest(b), fresh.last_documents) for b in fresh] == expected
    assert fresh.skipped == it.skipped and fresh.documents == it.documents
    fresh.close()
    mngr.close()


def test_a_record_source_reports_reads_that_fail(damaged):
    """The source itself: an `Unreadable` with the reader's message in place of the bytes."""
    path, recs, bad = damaged
    source = sources.RecordSource([str(path)])
    data, where, index = source[bad[0]]
    assert isinstance(data, sources.Unreadable) and "Corrupted Riegeli" in data.message
    assert (where, index) == (str(path), bad[0])
    data, _, _ = source[NUM - 1]
    assert msgpack.unpackb(data)["id"] == recs[NUM - 1]["id"]
