"""Record schema: round trip of every kind, validation errors naming the field."""

import msgpack
import numpy as np
import pytest

from tests.data import synth
from unijax.data import records


@pytest.mark.parametrize("kind", records.KINDS)
def test_every_kind_round_trips_through_array_record(kind, tmp_path, rng):
    recs = [synth.make(kind, i, rng) for i in range(3)]
    path = tmp_path / f"{kind}.array_record"
    assert records.write_records(path, recs) == 3
    assert records.num_records(path) == 3
    back = list(records.read_records(path))
    assert back == recs
    assert back[0]["schema"] == records.SCHEMA_VERSION and back[0]["kind"] == kind
    for seg in back[0]["segments"]:
        if seg["type"] == "image":
            assert isinstance(seg["bytes"], bytes) and records.sniff_mime(seg["bytes"])


def test_encode_decode_preserves_bytes_and_meta(rng):
    rec = synth.make("video", 0, rng)
    data = records.encode_record(rec)
    back = records.decode_record(data)
    assert back["segments"][1]["frames"] == rec["segments"][1]["frames"]
    assert back["segments"][1]["captions"] == ["", "box moves right", "box moves down"]
    assert back["meta"] == '{"i": 0}'


def _bad(rec, **changes):
    rec = dict(rec)
    rec.update(changes)
    return rec


@pytest.mark.parametrize("mutate,field,reason", [
    (lambda r: _bad(r, schema=2), "schema", "schema_version"),
    (lambda r: {k: v for k, v in r.items() if k != "segments"}, "segments", "missing_field"),
    (lambda r: _bad(r, kind="podcast"), "kind", "bad_field"),
    (lambda r: _bad(r, id=""), "id", "bad_field"),
    (lambda r: _bad(r, meta="{not json"), "meta", "bad_field"),
    (lambda r: _bad(r, extra=1), "extra", "bad_field"),
    (lambda r: _bad(r, segments=[{"type": "text", "text": "x"}]), "segments[0].role",
     "missing_field"),
    (lambda r: _bad(r, segments=[{"type": "text", "text": "x", "role": "input"}]),
     "segments[0].role", "bad_field"),
    (lambda r: _bad(r, segments=[dict(r["segments"][0], mime="image/png"), r["segments"][1]]),
     "segments[0].bytes", "bad_field"),
    (lambda r: _bad(r, segments=[r["segments"][1]]), "segments", "bad_field"),
])
def test_validation_names_the_field(mutate, field, reason, rng):
    rec = synth.make("caption", 0, rng)  # [image(input, jpeg), text(response)]
    with pytest.raises(records.RecordError) as err:
        records.validate_record(mutate(rec))
    assert str(err.value).startswith(field), str(err.value)
    assert err.value.reason == reason


def test_video_segment_checks_lengths(rng):
    frames = [synth.jpeg(rng) for _ in range(2)]
    with pytest.raises(records.RecordError, match="timestamps"):
        records.make_record("video", "v", "s", [
            records.video_segment(frames, "image/jpeg", [0.0], 2.0, "target")])
    with pytest.raises(records.RecordError, match="captions"):
        records.make_record("video", "v", "s", [
            records.video_segment(frames, "image/jpeg", [0.0, 0.5], 2.0, "target", ["a"])])
    with pytest.raises(records.RecordError, match="timestamps"):
        records.make_record("video", "v", "s", [
            records.video_segment(frames, "image/jpeg", [0.5, 0.0], 2.0, "target")])


def test_decode_rejects_garbage_and_unknown_versions(rng):
    with pytest.raises(records.RecordError) as err:
        records.decode_record(b"\xc1 not msgpack")
    assert err.value.reason == "msgpack"
    rec = dict(synth.make("text", 0, rng), schema=99)
    with pytest.raises(records.RecordError) as err:
        records.decode_record(msgpack.packb(rec, use_bin_type=True))
    assert err.value.reason == "schema_version" and "99" in str(err.value)


def test_write_rejects_invalid_records(tmp_path, rng):
    good = synth.make("text", 0, rng)
    with pytest.raises(records.RecordError):
        records.write_records(tmp_path / "x.array_record", [good, dict(good, kind="?")])


def test_sniff_mime():
    from unijax.data import images

    img = np.zeros((4, 4, 3), np.uint8)
    for mime in records.MIMES:
        assert records.sniff_mime(images.encode_image(img, mime)) == mime
    assert records.sniff_mime(b"GIF89a....") is None
