"""The on-disk record schema: one msgpack dict per ArrayRecord entry (`group_size:1`).

A record is a document in reading order:

  {"schema": 1, "kind": "caption", "id": "shapes/000017", "source": "shapes/train",
   "segments": [{"type": "image", "bytes": b"\\x89PNG...", "mime": "image/png", "role": "input"},
                {"type": "text", "text": "a red circle", "role": "response"}],
   "meta": "{}"}

Segments are `text` (role prompt | response | context), `image` (the original encoded
JPEG/PNG/WebP bytes; role input | target | source | context) and `video` (frames as encoded
images with timestamps in seconds, the sampling fps and optional per-frame captions of what
changed; role target | input). The sequence planner (`unijax.data.plan`) turns roles into
ViT / VAE / loss decisions. `meta` is a JSON string of free-form structured information.

Images stay encoded on disk and are decoded in the input pipeline's workers, so a record is
small and one dataset serves every resolution. Unknown schema versions are rejected.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence

import msgpack
from array_record.python import array_record_module

SCHEMA_VERSION = 1
KINDS = ("text", "caption", "vqa", "t2i", "edit", "interleaved", "video")
TEXT_ROLES = ("prompt", "response", "context")
IMAGE_ROLES = ("input", "target", "source", "context")
VIDEO_ROLES = ("target", "input")
MIMES = ("image/png", "image/jpeg", "image/webp")
ARRAY_RECORD_OPTIONS = "group_size:1"  # Grain's random access needs one record per chunk

_RECORD_KEYS = ("schema", "kind", "id", "source", "segments", "meta")
_SEGMENT_KEYS = {
    "text": {"type", "text", "role"},
    "image": {"type", "bytes", "mime", "role"},
    "video": {"type", "frames", "mime", "timestamps", "fps", "role", "captions"},
}
_OPTIONAL_KEYS = {"video": {"captions"}}


class RecordError(ValueError):
    """A record that breaks the schema or cannot be decoded.

    Attributes:
      reason: a short machine-readable cause, used as the key of the pipeline's skip counters
        (e.g. "schema_version", "missing_field", "bad_field", "msgpack", "image_decode").
    """

    def __init__(self, message: str, reason: str = "bad_field"):
        super().__init__(message)
        self.reason = reason


def sniff_mime(data: bytes) -> str | None:
    """The image MIME type from the magic bytes of encoded data, or None if unrecognised."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def text_segment(text: str, role: str) -> dict:
    """A text segment; role is "prompt" (no loss), "response" (CE loss) or "context"."""
    return {"type": "text", "text": text, "role": role}


def image_segment(encoded_bytes: bytes, mime: str, role: str) -> dict:
    """An image segment holding the original encoded bytes (JPEG/PNG/WebP)."""
    return {"type": "image", "bytes": bytes(encoded_bytes), "mime": mime, "role": role}


def video_segment(frames: Sequence[bytes], mime: str, timestamps: Sequence[float], fps: float,
                  role: str, captions: Sequence[str] | None = None) -> dict:
    """A video clip: encoded frames, their timestamps (seconds), the sampling fps, and
    optionally one caption per frame describing what changed since the previous frame."""
    seg = {"type": "video", "frames": [bytes(f) for f in frames], "mime": mime,
           "timestamps": [float(t) for t in timestamps], "fps": float(fps), "role": role}
    if captions is not None:
        seg["captions"] = [str(c) for c in captions]
    return seg


def make_record(kind: str, id: str, source: str, segments: Sequence[dict],
                meta: dict | None = None) -> dict:
    """Builds and validates a record; `meta` (JSON-serialisable) is stored as a JSON string.

    Raises:
      RecordError: naming the field that breaks the schema.
    """
    try:
        meta_json = json.dumps(meta or {}, sort_keys=True)
    except TypeError as e:
        raise RecordError(f"meta: not JSON-serialisable ({e})") from e
    record = {"schema": SCHEMA_VERSION, "kind": kind, "id": id, "source": source,
              "segments": list(segments), "meta": meta_json}
    validate_record(record)
    return record


def _check(ok: bool, message: str, reason: str = "bad_field") -> None:
    if not ok:
        raise RecordError(message, reason)


def _validate_segment(i: int, seg) -> None:
    where = f"segments[{i}]"
    _check(isinstance(seg, dict), f"{where}: expected a dict, got {type(seg).__name__}")
    kind = seg.get("type")
    _check(kind in _SEGMENT_KEYS, f"{where}.type: unknown segment type {kind!r}")
    allowed = _SEGMENT_KEYS[kind]
    for key in sorted(allowed - _OPTIONAL_KEYS.get(kind, set()) - set(seg)):
        raise RecordError(f"{where}.{key}: missing from a {kind} segment", "missing_field")
    for key in sorted(set(seg) - allowed):
        raise RecordError(f"{where}.{key}: unknown field of a {kind} segment")
    role = seg["role"]
    roles = {"text": TEXT_ROLES, "image": IMAGE_ROLES, "video": VIDEO_ROLES}[kind]
    _check(role in roles, f"{where}.role: {role!r} is not a {kind} role {roles}")
    if kind == "text":
        _check(isinstance(seg["text"], str), f"{where}.text: expected str, got "
               f"{type(seg['text']).__name__}")
        return
    _check(seg["mime"] in MIMES, f"{where}.mime: {seg['mime']!r} not in {MIMES}")
    if kind == "image":
        data = seg["bytes"]
        _check(isinstance(data, bytes) and len(data) > 0,
               f"{where}.bytes: expected non-empty bytes, got {type(data).__name__}")
        _check(sniff_mime(data) == seg["mime"],
               f"{where}.bytes: content looks like {sniff_mime(data)}, mime says {seg['mime']}")
        return
    frames, stamps = seg["frames"], seg["timestamps"]
    _check(isinstance(frames, list) and len(frames) > 0,
           f"{where}.frames: expected a non-empty list of encoded frames")
    for k, f in enumerate(frames):
        _check(isinstance(f, bytes) and sniff_mime(f) == seg["mime"],
               f"{where}.frames[{k}]: not {seg['mime']} bytes")
    _check(isinstance(stamps, list) and len(stamps) == len(frames),
           f"{where}.timestamps: {len(stamps) if isinstance(stamps, list) else stamps!r} "
           f"entries for {len(frames)} frames")
    _check(all(isinstance(t, float | int) and math.isfinite(t) for t in stamps) and
           all(b >= a for a, b in zip(stamps, stamps[1:])),
           f"{where}.timestamps: must be finite and non-decreasing, got {stamps}")
    _check(isinstance(seg["fps"], float | int) and seg["fps"] > 0,
           f"{where}.fps: must be positive, got {seg['fps']!r}")
    if "captions" in seg:
        caps = seg["captions"]
        _check(isinstance(caps, list) and len(caps) == len(frames) and
               all(isinstance(c, str) for c in caps),
               f"{where}.captions: expected {len(frames)} strings (one per frame)")


def _validate_kind(kind: str, segments: list[dict]) -> None:
    have = {(s["type"], s["role"]) for s in segments}
    types = {s["type"] for s in segments}
    need = {
        "text": lambda: types == {"text"},
        "caption": lambda: "image" in types and "text" in types,
        "vqa": lambda: ("image", "input") in have and ("text", "response") in have,
        "t2i": lambda: ("image", "target") in have,
        "edit": lambda: ("image", "source") in have and ("image", "target") in have,
        "interleaved": lambda: True,
        "video": lambda: "video" in types,
    }[kind]
    rule = {"text": "only text segments", "caption": "an image and a text",
            "vqa": "an input image and a response text", "t2i": "a target image",
            "edit": "a source and a target image", "interleaved": "", "video": "a video"}[kind]
    _check(need(), f"segments: a {kind!r} record needs {rule}, got {sorted(have)}")


def validate_record(record) -> None:
    """Checks a decoded record against the schema.

    Raises:
      RecordError: naming the field and the value; `reason` is "schema_version" for an
        unknown version, "missing_field" for an absent field, "bad_field" otherwise.
    """
    _check(isinstance(record, dict), f"record: expected a dict, got {type(record).__name__}")
    if "schema" not in record:
        raise RecordError("schema: missing", "missing_field")
    _check(record["schema"] == SCHEMA_VERSION,
           f"schema: unknown version {record['schema']!r} (this reader knows {SCHEMA_VERSION})",
           "schema_version")
    for key in _RECORD_KEYS:
        if key not in record:
            raise RecordError(f"{key}: missing", "missing_field")
    for key in sorted(set(record) - set(_RECORD_KEYS)):
        raise RecordError(f"{key}: unknown record field")
    _check(record["kind"] in KINDS, f"kind: {record['kind']!r} not in {KINDS}")
    _check(isinstance(record["id"], str) and record["id"] != "",
           f"id: expected a non-empty str, got {record['id']!r}")
    _check(isinstance(record["source"], str), f"source: expected str, got {record['source']!r}")
    segments = record["segments"]
    _check(isinstance(segments, list) and len(segments) > 0,
           "segments: expected a non-empty list")
    for i, seg in enumerate(segments):
        _validate_segment(i, seg)
    _validate_kind(record["kind"], segments)
    meta = record["meta"]
    _check(isinstance(meta, str), f"meta: expected a JSON string, got {type(meta).__name__}")
    try:
        json.loads(meta)
    except ValueError as e:
        raise RecordError(f"meta: not valid JSON ({e})") from e


def encode_record(record: dict) -> bytes:
    """Validates and msgpack-encodes a record (bytes stay bytes, str stays str)."""
    validate_record(record)
    return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """Decodes and validates msgpack bytes.

    Raises:
      RecordError: reason "msgpack" if the bytes are not a msgpack map, else as validate_record.
    """
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types on garbage
        raise RecordError(f"record: not valid msgpack ({type(e).__name__}: {e})",
                          "msgpack") from e
    validate_record(record)
    return record


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Writes records to one ArrayRecord shard (`group_size:1`); returns how many.

    Every record is validated first, so a shard never holds a record the reader would reject.
    """
    return write_raw(path, (encode_record(record) for record in records))


def write_raw(path: str | os.PathLike, payloads: Iterable[bytes]) -> int:
    """Writes already-encoded entries unchecked (tests use it to plant corrupt records)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = array_record_module.ArrayRecordWriter(path, ARRAY_RECORD_OPTIONS)
    count = 0
    try:
        for payload in payloads:
            writer.write(payload)
            count += 1
    finally:
        writer.close()
    return count


def num_records(path: str | os.PathLike) -> int:
    """How many entries an ArrayRecord shard holds."""
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Yields the decoded, validated records of one shard in file order.

    Raises:
      RecordError: on the first record that fails to decode (the pipeline skips instead).
    """
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    try:
        n, chunk = reader.num_records(), 64
        for start in range(0, n, chunk):
            for data in reader.read(start, min(n, start + chunk)):
                yield decode_record(data)
    finally:
        reader.close()
