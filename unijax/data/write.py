r"""Converters from common dataset layouts to unijax ArrayRecord shards.

  python -m unijax.data.write --format=captions --input=DIR --output=OUT/name [--kind=t2i]
  python -m unijax.data.write --format=obelics --input='shards/*.parquet' --output=OUT/web
  python -m unijax.data.write --format=mmc4 --input='docs/*.jsonl' --image_root=IMGS \
      --output=OUT/mmc4
  python -m unijax.data.write --format=video --input=CLIPS --fps=2 --max_frames=16 \
      --output=OUT/video

Formats:
  captions  a folder of images plus `captions.jsonl` lines {"image": "rel/path.jpg",
            "caption": str}; records of kind caption ([image(input), text(response)]) or t2i.
  obelics   parquet with OBELICS columns: `images` (list of bytes / local path / {"bytes",
            "path"} / None), `texts` (list of str / None), aligned by position, plus `metadata`
            and `general_metadata` JSON strings (kept in the record's meta). URLs are not
            downloaded: such images are left out and counted.
  mmc4      JSONL lines {"text_list": [...], "image_info": [{"image_name", "matched_text_index",
            ...}], "url": ...}; each image goes before the sentence it is matched to, images
            are read from --image_root.
  video     a folder of mp4 clips plus `captions.jsonl` lines {"video": "clip.mp4",
            "caption": str, "frame_captions": [{"time": s, "text": str}, ...] (optional)};
            frames are sampled with PyAV at --fps and stored as JPEG; a frame's caption is the
            text of the events since the previous kept frame (what changed).

Output: `OUT/name-00000.array_record`, ... with --records_per_shard records each. Every image
is decoded once here, so a shard never holds an image the training pipeline cannot read;
inputs that fail are logged and counted, never fatal.
"""

from __future__ import annotations

import collections
import glob
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np
from absl import app, flags, logging
from PIL import Image

from unijax.data import images, records, video

FORMATS = ("captions", "obelics", "mmc4", "video")


def image_bytes(data: bytes, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """Checks that encoded image bytes decode; other formats (GIF, BMP, ...) become PNG.

    Returns:
      (bytes, mime) ready for `records.image_segment`.

    Raises:
      records.RecordError: when the image does not decode or is too large.
    """
    pixels = images.decode_image(data, max_pixels)
    mime = records.sniff_mime(data)
    if mime is None:
        return images.encode_image(pixels, "image/png"), "image/png"
    return bytes(data), mime


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _jsonl(path: str) -> Iterator[tuple[int, dict]]:
    with open(path) as f:
        for n, line in enumerate(f):
            if line.strip():
                yield n, json.loads(line)


def caption_folder(folder: str, kind: str = "caption", source: str = "captions",
                   counts: collections.Counter | None = None) -> Iterator[dict]:
    """Records from `folder/captions.jsonl` (see the module docstring)."""
    counts = counts if counts is not None else collections.Counter()
    if kind not in ("caption", "t2i"):
        raise ValueError(f"kind must be 'caption' or 't2i', got {kind!r}")
    for n, row in _jsonl(os.path.join(folder, "captions.jsonl")):
        try:
            data, mime = image_bytes(_read_file(os.path.join(folder, row["image"])))
            text = row.get("caption", row.get("text"))
            if not isinstance(text, str):
                raise records.RecordError("caption: missing", "missing_field")
            if kind == "caption":
                segs = [records.image_segment(data, mime, "input"),
                        records.text_segment(text, "response")]
            else:
                segs = [records.text_segment(text, "prompt"),
                        records.image_segment(data, mime, "target")]
            yield records.make_record(kind, f"{source}/{n}", source, segs,
                                      {"image": row["image"]})
        except (OSError, KeyError, records.RecordError) as e:
            counts[getattr(e, "reason", type(e).__name__)] += 1
            logging.warning("captions.jsonl line %d: skipped (%s)", n, e)


def _resolve_image(entry, root: str, counts) -> tuple[bytes, str] | None:
    """An OBELICS/MMC4 image entry -> (bytes, mime), or None (URL or missing; counted)."""
    if isinstance(entry, dict):
        entry = entry.get("bytes") or entry.get("path")
    if isinstance(entry, str):
        if entry.startswith(("http://", "https://")):
            counts["image_url_not_downloaded"] += 1
            return None
        path = entry if os.path.isabs(entry) else os.path.join(root, entry)
        if not os.path.exists(path):
            counts["image_missing"] += 1
            return None
        entry = _read_file(path)
    if not isinstance(entry, bytes | bytearray):
        counts["image_missing"] += 1
        return None
    try:
        return image_bytes(bytes(entry))
    except records.RecordError as e:
        counts[e.reason] += 1
        return None


def _interleaved(pieces: Iterable[tuple[str, object]]) -> list[dict]:
    """("text", str) / ("image", (bytes, mime)) in order -> segments, merging adjacent texts."""
    segs: list[dict] = []
    for kind, value in pieces:
        if kind == "text":
            if not value or not value.strip():
                continue
            if segs and segs[-1]["type"] == "text":
                segs[-1]["text"] += "\n\n" + value
            else:
                segs.append(records.text_segment(value, "context"))
        else:
            segs.append(records.image_segment(value[0], value[1], "context"))
    return segs


def _json_or_raw(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def obelics_parquet(paths: Iterable[str], image_root: str = "", source: str = "obelics",
                    counts: collections.Counter | None = None) -> Iterator[dict]:
    """Interleaved records from OBELICS-style parquet files (see the module docstring)."""
    import pyarrow.parquet as pq

    counts = counts if counts is not None else collections.Counter()
    for path in paths:
        root = image_root or os.path.dirname(os.path.abspath(path))
        row_index = 0
        for table in pq.ParquetFile(path).iter_batches(batch_size=64):
            for row in table.to_pylist():
                n, row_index = row_index, row_index + 1
                imgs, texts = row.get("images") or [], row.get("texts") or []
                pieces = []
                for img, text in zip(imgs, texts):
                    if img is not None:
                        resolved = _resolve_image(img, root, counts)
                        if resolved is not None:
                            pieces.append(("image", resolved))
                    elif text is not None:
                        pieces.append(("text", text))
                segs = _interleaved(pieces)
                if not segs:
                    counts["empty_document"] += 1
                    continue
                meta = {"general_metadata": _json_or_raw(row.get("general_metadata")),
                        "metadata": _json_or_raw(row.get("metadata"))}
                yield records.make_record("interleaved", f"{os.path.basename(path)}/{n}",
                                          source, segs, meta)


def mmc4_jsonl(paths: Iterable[str], image_root: str, source: str = "mmc4",
               counts: collections.Counter | None = None) -> Iterator[dict]:
    """Interleaved records from MMC4-style JSONL (see the module docstring)."""
    counts = counts if counts is not None else collections.Counter()
    for path in paths:
        for n, doc in _jsonl(path):
            texts = doc.get("text_list") or []
            by_sentence = collections.defaultdict(list)
            for info in doc.get("image_info") or []:
                by_sentence[int(info.get("matched_text_index", 0))].append(info["image_name"])
            pieces = []
            for k, sentence in enumerate(texts):
                for name in by_sentence.get(k, []):
                    resolved = _resolve_image(name, image_root, counts)
                    if resolved is not None:
                        pieces.append(("image", resolved))
                pieces.append(("text", sentence))
            segs = _interleaved(pieces)
            if not segs:
                counts["empty_document"] += 1
                continue
            yield records.make_record("interleaved", f"{os.path.basename(path)}/{n}", source,
                                      segs, {"url": doc.get("url", "")})


def _frame_captions(events, stamps: list[float]) -> list[str] | None:
    """Per kept frame: the texts of events after the previous kept frame, up to this one."""
    if not events:
        return None
    events = sorted((float(e["time"]), str(e["text"])) for e in events)
    out, prev = [], float("-inf")
    for t in stamps:
        out.append(" ".join(text for time, text in events if prev < time <= t + 1e-6))
        prev = t + 1e-6
    return out


def _shrink(frame, max_side: int):
    h, w = frame.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return frame
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC))


def video_folder(folder: str, fps: float = 2.0, max_frames: int = 16, frame_size: int = 0,
                 quality: int = 90, source: str = "video",
                 counts: collections.Counter | None = None) -> Iterator[dict]:
    """Video records from `folder/captions.jsonl` and mp4 clips (see the module docstring)."""
    counts = counts if counts is not None else collections.Counter()
    for n, row in _jsonl(os.path.join(folder, "captions.jsonl")):
        try:
            frames, stamps = video.sample_frames(os.path.join(folder, row["video"]), fps,
                                                 max_frames)
        except (KeyError, records.RecordError) as e:
            counts[getattr(e, "reason", "missing_field")] += 1
            logging.warning("captions.jsonl line %d: skipped (%s)", n, e)
            continue
        encoded = [images.encode_image(_shrink(f, frame_size), "image/jpeg", quality)
                   for f in frames]
        segs = []
        if row.get("caption"):
            segs.append(records.text_segment(row["caption"], "prompt"))
        segs.append(records.video_segment(encoded, "image/jpeg", stamps, fps, "target",
                                          _frame_captions(row.get("frame_captions"), stamps)))
        yield records.make_record("video", f"{source}/{n}", source, segs,
                                  {"video": row["video"]})


def write_sharded(recs: Iterable[dict], output: str, records_per_shard: int = 1000) -> list[str]:
    """Writes records to `output-00000.array_record`, ...; returns the shard paths."""
    paths, shard = [], []

    def flush():
        path = f"{output}-{len(paths):05d}.array_record"
        records.write_records(path, shard)
        paths.append(path)
        shard.clear()

    for rec in recs:
        shard.append(rec)
        if len(shard) >= records_per_shard:
            flush()
    if shard:
        flush()
    return paths


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing is free)."""
    flags.DEFINE_enum("format", None, FORMATS, "input layout")
    flags.DEFINE_string("input", None, "folder (captions, video) or glob (obelics, mmc4)")
    flags.DEFINE_string("output", None, "output prefix: OUT/name")
    flags.DEFINE_string("source", None, "dataset name stored in records (default: name)")
    flags.DEFINE_enum("kind", "caption", ["caption", "t2i"], "captions: record kind")
    flags.DEFINE_string("image_root", "", "obelics/mmc4: folder of image files")
    flags.DEFINE_float("fps", 2.0, "video: frames per second to keep")
    flags.DEFINE_integer("max_frames", 16, "video: frames per clip")
    flags.DEFINE_integer("frame_size", 0, "video: long side of stored frames (0: keep)")
    flags.DEFINE_integer("jpeg_quality", 90, "video: JPEG quality of stored frames")
    flags.DEFINE_integer("records_per_shard", 1000, "records per ArrayRecord shard")
    flags.mark_flags_as_required(["format", "input", "output"])


def main(argv) -> None:
    """Converts --input to ArrayRecord shards under --output."""
    del argv
    f = flags.FLAGS
    source = f.source or os.path.basename(f.output)
    counts: collections.Counter = collections.Counter()
    if f.format == "captions":
        recs = caption_folder(f.input, f.kind, source, counts)
    elif f.format == "obelics":
        recs = obelics_parquet(sorted(glob.glob(f.input)), f.image_root, source, counts)
    elif f.format == "mmc4":
        recs = mmc4_jsonl(sorted(glob.glob(f.input)), f.image_root, source, counts)
    else:
        video.require_av()  # the optional extra: say so before reading any input
        recs = video_folder(f.input, f.fps, f.max_frames, f.frame_size, f.jpeg_quality, source,
                            counts)
    n = 0

    def counted():
        nonlocal n
        for r in recs:
            n += 1
            yield r

    paths = write_sharded(counted(), f.output, f.records_per_shard)
    print(f"wrote {n} records to {len(paths)} shards ({f.output}-*.array_record); "
          f"skipped: {dict(counts) or 'none'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
