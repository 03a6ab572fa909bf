"""Converters: caption folders, OBELICS parquet, MMC4 JSONL, mp4 folders -> records -> reader."""

import collections
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.data import synth
from tests.data.test_video import clip
from unijax.data import records, video, write


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_caption_folder_both_kinds_and_bad_images(tmp_path, rng):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(synth.jpeg(rng))
        rows.append({"image": f"img/{i}.jpg", "caption": f"picture {i}"})
    (tmp_path / "img" / "bad.jpg").write_bytes(synth.jpeg(rng)[:50])  # truncated
    rows += [{"image": "img/bad.jpg", "caption": "x"}, {"image": "img/none.jpg", "caption": "y"}]
    _write_jsonl(tmp_path / "captions.jsonl", rows)
    counts = collections.Counter()
    recs = list(write.caption_folder(str(tmp_path), "caption", "pics", counts))
    assert [r["segments"][1]["text"] for r in recs] == [f"picture {i}" for i in range(4)]
    assert recs[0]["segments"][0]["bytes"] == (tmp_path / "img/0.jpg").read_bytes()
    assert counts == {"image_decode": 1, "FileNotFoundError": 1}
    t2i = list(write.caption_folder(str(tmp_path), "t2i", "pics"))
    assert [s["role"] for s in t2i[0]["segments"]] == ["prompt", "target"]
    paths = write.write_sharded(recs, str(tmp_path / "out" / "pics"), records_per_shard=3)
    assert len(paths) == 2
    assert [r for p in paths for r in records.read_records(p)] == recs


def test_obelics_parquet_bytes_paths_and_urls(tmp_path, rng):
    img_a, img_b = synth.png(rng), synth.jpeg(rng)
    (tmp_path / "b.jpg").write_bytes(img_b)
    # One arrow type per column, as in OBELICS: images as bytes in one file, paths in another.
    text_only = pa.table({"images": [[None]], "texts": [["only text"]], "metadata": ["[null]"],
                          "general_metadata": ["{}"]},
                         schema=pa.schema([("images", pa.list_(pa.binary())),
                                           ("texts", pa.list_(pa.string())),
                                           ("metadata", pa.string()),
                                           ("general_metadata", pa.string())]))
    pq.write_table(text_only, tmp_path / "text.parquet")
    mixed = pa.table({
        "images": [[img_a, None, None, None, None]],
        "texts": [[None, "para one", None, "para two", None]],
        "metadata": ["[]"], "general_metadata": [json.dumps({"url": "https://doc"})]})
    pq.write_table(mixed, tmp_path / "bytes.parquet")
    paths_table = pa.table({
        "images": [["b.jpg", None, "https://example.com/x.jpg"]],
        "texts": [[None, "caption text", None]], "metadata": ["[]"], "general_metadata": ["{}"]})
    pq.write_table(paths_table, tmp_path / "paths.parquet")
    counts = collections.Counter()
    recs = list(write.obelics_parquet(
        [str(tmp_path / n) for n in ("bytes.parquet", "paths.parquet", "text.parquet")],
        counts=counts))
    assert len(recs) == 3 and all(r["kind"] == "interleaved" for r in recs)
    segs = recs[0]["segments"]
    assert [s["type"] for s in segs] == ["image", "text"]
    assert segs[0]["bytes"] == img_a and segs[1]["text"] == "para one\n\npara two"
    assert json.loads(recs[0]["meta"])["general_metadata"] == {"url": "https://doc"}
    assert recs[1]["segments"][0]["bytes"] == img_b  # a local path, resolved next to the file
    assert counts == {"image_url_not_downloaded": 1}
    assert recs[2]["segments"] == [records.text_segment("only text", "context")]


def test_mmc4_images_go_before_their_sentence(tmp_path, rng):
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(synth.jpeg(rng) if name.endswith("jpg") else synth.png(rng))
    _write_jsonl(tmp_path / "docs.jsonl", [
        {"text_list": ["s0", "s1", "s2"], "url": "u",
         "image_info": [{"image_name": "b.png", "matched_text_index": 2},
                        {"image_name": "a.jpg", "matched_text_index": 0},
                        {"image_name": "gone.jpg", "matched_text_index": 1}]}])
    counts = collections.Counter()
    (rec,) = write.mmc4_jsonl([str(tmp_path / "docs.jsonl")], str(tmp_path), counts=counts)
    kinds = [(s["type"], s.get("text")) for s in rec["segments"]]
    assert kinds == [("image", None), ("text", "s0\n\ns1"), ("image", None), ("text", "s2")]
    assert rec["segments"][0]["mime"] == "image/jpeg" and rec["segments"][2]["mime"] == "image/png"
    assert counts == {"image_missing": 1}


def test_video_folder_samples_frames_and_captions(tmp_path):
    video.write_mp4(tmp_path / "a.mp4", clip(16), fps=8)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    _write_jsonl(tmp_path / "captions.jsonl", [
        {"video": "a.mp4", "caption": "a red box slides right",
         "frame_captions": [{"time": 0.4, "text": "it starts"}, {"time": 1.2, "text": "faster"}]},
        {"video": "broken.mp4", "caption": "x"}])
    counts = collections.Counter()
    (rec,) = write.video_folder(str(tmp_path), fps=2.0, max_frames=3, frame_size=24,
                                counts=counts)
    prompt, vid = rec["segments"]
    assert prompt["text"] == "a red box slides right" and vid["role"] == "target"
    assert vid["timestamps"] == [0.0, 0.5, 1.0] and vid["fps"] == 2.0
    assert vid["captions"] == ["", "it starts", ""]
    from unijax.data import images

    assert images.decode_image(vid["frames"][0]).shape == (16, 24, 3)  # long side 24
    assert counts == {"video_decode": 1}


def test_command_line(tmp_path, rng):
    (tmp_path / "x.png").write_bytes(synth.png(rng))
    _write_jsonl(tmp_path / "captions.jsonl", [{"image": "x.png", "caption": "hi"}])
    out = subprocess.run(
        [sys.executable, "-m", "unijax.data.write", "--format=captions", f"--input={tmp_path}",
         f"--output={tmp_path}/out/cap", "--kind=t2i"], capture_output=True, text=True,
        check=True)
    assert "wrote 1 records" in out.stdout
    (rec,) = records.read_records(tmp_path / "out" / "cap-00000.array_record")
    assert rec["kind"] == "t2i" and rec["source"] == "cap"
    assert np.array_equal(np.frombuffer(rec["segments"][1]["bytes"], np.uint8),
                          np.frombuffer((tmp_path / "x.png").read_bytes(), np.uint8))
