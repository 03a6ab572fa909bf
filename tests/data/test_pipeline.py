"""The Grain pipeline: coverage, corrupt data, mixture, workers, global arrays, config."""

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


def test_corrupt_records_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(1)
    good = [synth.make(k, i, rng) for i in range(16) for k in ("caption", "t2i", "interleaved",
                                                               "vqa", "text", "edit", "video")]
    truncated = synth.make("caption", 900, rng)
    truncated["segments"][0]["bytes"] = truncated["segments"][0]["bytes"][:60]
    giant = records.make_record("caption", "giant", "s", [
        records.image_segment(synth.png(rng, 64, 64), "image/png", "input"),
        records.text_segment("big", "response")])
    bad_video = synth.make("video", 901, rng)
    bad_video["segments"][1]["frames"][2] = bad_video["segments"][1]["frames"][2][:50]
    unknown = msgpack.packb(dict(synth.make("text", 902, rng), schema=7), use_bin_type=True)
    no_segments = {k: v for k, v in synth.make("text", 903, rng).items() if k != "segments"}
    broken = [msgpack.packb(truncated, use_bin_type=True), b"\x93garbage",
              msgpack.packb(giant, use_bin_type=True), msgpack.packb(bad_video, use_bin_type=True),
              unknown, msgpack.packb(no_segments, use_bin_type=True)]
    payloads = [records.encode_record(r) for r in good]
    for k, payload in enumerate(broken):  # 6 of 118: 5%, spread through the file
        payloads.insert(10 + 19 * k, payload)
    records.write_raw(tmp_path / "bad.array_record", payloads)
    config = data_config(tmp_path / "bad.array_record", batch_size=8)
    config.data.max_image_pixels = 48 * 48
    it, docs = run(config)
    assert sorted(d[3] for d in docs) == sorted(r["id"] for r in good)
    assert dict(it.skipped) == {"image_decode": 1, "msgpack": 1, "image_too_large": 1,
                                "video_decode": 1, "schema_version": 1, "missing_field": 1}
    bad_index = {10 + 19 * k for k in range(6)}
    assert not bad_index & {d[2] for d in docs}


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
