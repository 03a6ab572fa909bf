"""The Grain pipeline: coverage, corrupt data, mixture, workers, global arrays, config."""

import collections

import msgpack
import numpy as np
import pytest

from configs import base
from tests.data import synth
from tests.data.synth import data_config
from unijax import batch as batch_lib
from unijax import config as config_lib
from unijax.data import pipeline, records


def run(config, **kwargs):
    it = pipeline.make_iterator(config, **kwargs)
    docs = []
    for batch in it:
        batch_lib.validate(batch, latent_tokens_per_image=64)
        assert batch.batch_size == config.data.batch_size
        assert (batch.doc_id > 0).any(), "a batch without any document"
        # Decoded pixels stay uint8 up to the device (the model normalises them).
        assert batch.vit_patches.dtype == batch.vae_images.dtype == np.uint8
        docs += [d for row in it.last_documents for d in row]
    it.close()
    return it, docs


@pytest.mark.parametrize("pack_buffer", [0, 16])
def test_one_epoch_packs_every_record_exactly_once(record_files, pack_buffer):
    root, ids = record_files
    config = data_config(root / "*.array_record")
    config.data.pack_buffer = pack_buffer
    config_lib.validate(config)
    it, docs = run(config)
    assert sorted(d[3] for d in docs) == sorted(ids)
    assert len({(d[1], d[2]) for d in docs}) == len(ids)  # (file, index) unique
    assert it.skipped == {} and it.documents == len(ids)
    assert it.truncated == 6  # the 6 videos need 4 VAE slots; tiny rows have 2


def _broken_records(rng, copies: int) -> dict[str, list[bytes]]:
    """`copies` unusable records per skip reason, each a little different."""
    out = collections.defaultdict(list)
    for k in range(copies):
        truncated = synth.make("caption", 900 + k, rng)
        truncated["segments"][0]["bytes"] = truncated["segments"][0]["bytes"][:60 + k]
        out["image_decode"].append(msgpack.packb(truncated, use_bin_type=True))
        out["msgpack"].append(b"\x93garbage" + bytes([k]))
        giant = records.make_record("caption", f"giant-{k}", "s", [
            records.image_segment(synth.png(rng, 64, 64 + 8 * k), "image/png", "input"),
            records.text_segment("big", "response")])
        out["image_too_large"].append(msgpack.packb(giant, use_bin_type=True))
        bad_video = synth.make("video", 910 + k, rng)
        bad_video["segments"][1]["frames"][2] = bad_video["segments"][1]["frames"][2][:50 + k]
        out["video_decode"].append(msgpack.packb(bad_video, use_bin_type=True))
        out["schema_version"].append(
            msgpack.packb(dict(synth.make("text", 920 + k, rng), schema=7 + k), use_bin_type=True))
        no_segments = {key: v for key, v in synth.make("text", 930 + k, rng).items()
                       if key != "segments"}
        out["missing_field"].append(msgpack.packb(no_segments, use_bin_type=True))
    return out


@pytest.mark.parametrize("shuffle", [True, False])
def test_corrupt_records_are_skipped_and_counted(tmp_path, shuffle):
    """Three bad records per reason: two spread through the file, one in its last six
    records (unshuffled, the last records of the stream: they are read after the last good
    one and travel with no batch of their own). Every good record is packed once, every bad
    one counted under its reason and never packed."""
    rng = np.random.default_rng(1)
    good = [synth.make(k, i, rng) for i in range(16) for k in ("caption", "t2i", "interleaved",
                                                               "vqa", "text", "edit", "video")]
    broken = _broken_records(rng, copies=3)
    payloads = [records.encode_record(r) for r in good]
    spread = [b for reason in sorted(broken) for b in broken[reason][:2]]
    for k, payload in enumerate(spread):  # 12 of 124, spread through the file
        payloads.insert(3 + 9 * k, payload)
    payloads += [broken[reason][2] for reason in sorted(broken)]  # the last six records
    records.write_raw(tmp_path / "bad.array_record", payloads)
    config = data_config(tmp_path / "bad.array_record", batch_size=8)
    config.data.max_image_pixels = 48 * 48
    config.data.shuffle = shuffle
    it, docs = run(config)
    assert sorted(d[3] for d in docs) == sorted(r["id"] for r in good)
    assert dict(it.skipped) == {reason: 3 for reason in broken}
    good_index = {i for i, p in enumerate(payloads) if p in {records.encode_record(r)
                                                             for r in good}}
    assert {d[2] for d in docs} == good_index


def test_a_stream_or_worker_share_of_bad_records_only_is_counted_without_a_batch(tmp_path):
    """Records skipped after a stream's last document carry no batch: with two workers and
    the bad records at odd indices, one worker reads nothing but bad records. They are all
    counted, and no all-padding batch is yielded for them (`run` checks every batch)."""
    rng = np.random.default_rng(3)
    good = [synth.make("text", i, rng) for i in range(6)]
    broken = _broken_records(rng, copies=1)
    bad = [broken[r][0] for r in ("msgpack", "schema_version", "missing_field")] * 2
    payloads = [p for pair in zip([records.encode_record(r) for r in good], bad) for p in pair]
    records.write_raw(tmp_path / "alternate.array_record", payloads)
    records.write_raw(tmp_path / "only_bad.array_record", bad)
    config = data_config(tmp_path / "only_bad.array_record")
    it, docs = run(config)
    assert docs == [] and dict(it.skipped) == {"msgpack": 2, "schema_version": 2,
                                               "missing_field": 2}
    config = data_config(tmp_path / "alternate.array_record")
    config.data.shuffle = False
    it, docs = run(config, num_workers=2)
    assert sorted(d[3] for d in docs) == sorted(r["id"] for r in good)
    assert dict(it.skipped) == {"msgpack": 2, "schema_version": 2, "missing_field": 2}


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_finite_mixture_reads_every_record_of_every_dataset(tmp_path, epochs):
    """Datasets of 20 and 5 records (weights 1 : 2), each ending in bad records: a finite pass
    packs every good record of both `epochs` times and counts every bad one (a plain
    `MapDataset.mix` would stop when the small dataset runs out)."""
    rng = np.random.default_rng(2)
    broken = _broken_records(rng, copies=2)
    a = [synth.make("text", i, rng, "a") for i in range(20)]
    b = [synth.make("caption", i, rng, "b") for i in range(5)]
    records.write_raw(tmp_path / "a.array_record",
                      [records.encode_record(r) for r in a] + broken["msgpack"])
    records.write_raw(tmp_path / "b.array_record",
                      [records.encode_record(r) for r in b] + broken["schema_version"])
    config = data_config(tmp_path / "a.array_record", epochs=epochs, weight=1.0)
    config.data.datasets.b = base.data_source(str(tmp_path / "b.array_record"), weight=2.0)
    it, docs = run(config)
    ids = collections.Counter(d[3] for d in docs)
    assert ids == {r["id"]: epochs for r in a + b}
    assert dict(it.skipped) == {"msgpack": 2 * epochs, "schema_version": 2 * epochs}


def test_finite_mixture_order():
    """Every element of every dataset once; while all last, the weights' proportions (2:1:1 in
    every cycle of 4); then the longer datasets alone."""
    mixture = pipeline.FiniteMixture([6, 30, 3], [2.0, 1.0, 1.0])
    picks = [mixture[i] for i in range(len(mixture))]
    assert sorted(picks) == sorted((d, j) for d, n in enumerate([6, 30, 3]) for j in range(n))
    for d in range(3):  # each dataset in its own order
        ranks = [j for k, j in picks if k == d]
        assert ranks == sorted(ranks)
    assert [k for k, _ in picks[:4]] == [0, 0, 1, 2]
    assert collections.Counter(k for k, _ in picks[:12]) == {0: 6, 1: 3, 2: 3}
    assert {k for k, _ in picks[12:]} == {1}
    assert len(pipeline.FiniteMixture([4, 4], [0.7, 0.3])) == 8
    with pytest.raises(IndexError):
        mixture[len(mixture)]
    with pytest.raises(ValueError, match="one positive weight per dataset"):
        pipeline.FiniteMixture([3, 3], [1.0, 0.0])


def test_overlong_documents_are_dropped_by_config(record_files):
    root, ids = record_files
    config = data_config(root / "*.array_record")
    config.data.overlong = "drop"
    it, docs = run(config)
    assert it.skipped == {"too_long": 6}
    assert sorted(d[3] for d in docs) == sorted(i for i in ids if not i.startswith("video"))


def test_mp_prefetch_with_two_workers(record_files):
    root, ids = record_files
    config = data_config(root / "*.array_record")
    it, docs = run(config, num_workers=2)
    assert sorted(d[3] for d in docs) == sorted(ids)
    assert it.documents == len(ids)


def test_mixture_follows_the_weights(tmp_path):
    rng = np.random.default_rng(2)
    records.write_records(tmp_path / "a.array_record",
                          [synth.make("text", i, rng, "a") for i in range(20)])
    records.write_records(tmp_path / "b.array_record",
                          [synth.make("caption", i, rng, "b") for i in range(20)])
    config = data_config(tmp_path / "a.array_record", epochs=0, weight=3.0)
    config.data.datasets.b = base.data_source(str(tmp_path / "b.array_record"), weight=1.0)
    it = pipeline.make_iterator(config)
    names = []
    for _ in range(12):
        next(it)
        names += [d[0] for row in it.last_documents for d in row]
    frac = names.count("mix") / len(names)
    assert 0.65 < frac < 0.85, frac


def test_global_batch_from_host_batches(record_files, cpu_devices):
    import jax
    from jax.sharding import Mesh

    root, _ = record_files
    config = data_config(root / "*.array_record", batch_size=8)
    batch = next(pipeline.make_iterator(config))
    mesh = Mesh(np.array(cpu_devices).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    arrays = pipeline.global_batch(batch, mesh)
    assert isinstance(arrays.modality, jax.Array) and arrays.num_und == batch.num_und
    assert arrays.vae_images.shape == batch.vae_images.shape
    assert arrays.vae_images.dtype == np.uint8  # 4x fewer bytes to the device than float32
    assert len(arrays.modality.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(arrays.text_ids), batch.text_ids)


def test_config_validation_names_dataset_fields(record_files):
    root, _ = record_files
    config = data_config(root / "*.array_record", weight=-1.0, video_noise="often",
                         ce_loss_reweighting=None)
    config.data.datasets.other = base.data_source("", interleaved_images="both")
    config.data.pack_buffer = -1
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(config)
    msg = str(err.value)
    for field in ("config.data.datasets.mix.weight", "config.data.datasets.mix.video_noise",
                  "config.data.datasets.mix.ce_loss_reweighting", "config.data.pack_buffer",
                  "config.data.datasets.other.paths",
                  "config.data.datasets.other.interleaved_images"):
        assert field in msg
    with pytest.raises(KeyError, match="video_nois"):
        base.data_source("x", video_nois="shared")
    config = data_config(root / "nothing-*.array_record")
    with pytest.raises(FileNotFoundError, match="config.data.datasets.mix.paths"):
        pipeline.make_iterator(config)
