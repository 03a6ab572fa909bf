r"""Input-pipeline throughput per host: records/s and tokens/s per record type and worker count.

  PYTHONPATH=. python benchmarks/data.py                        # every kind, workers 0,1,2,4
  PYTHONPATH=. python benchmarks/data.py --kinds=caption,video --workers=2 --seconds=10
  PYTHONPATH=. python benchmarks/data.py --tiny --out=/tmp/rows.md     # seconds: a smoke test
  python -m unijax.data.worlds --out=/tmp/worlds_full && \
    PYTHONPATH=. python benchmarks/data.py --fill=/tmp/worlds_full --pack_buffers=0,4,16,50

Records are synthetic but real: photo-like 640x480 JPEGs (smooth colour fields plus sensor-like
noise, ~40-80 KB each), 16-frame 320x240 JPEG clips, English-like text. The pipeline is the
real one (`unijax.data.pipeline`: ArrayRecord -> decode -> plan -> pack) with the data shapes of
configs/bagel_7b_mot.py (ViT up to 980 px / patch 14, VAE 512-1024 px / 16 px latent cells,
und 20480 + gen 16384 tokens per row), one packed row per host batch. Tokens are the
non-padding tokens of packed rows (text, markers, ViT patches, VAE latents). A row for mp4
decoding (`video.sample_frames`, what the video converter does) is added. Rows are appended to
benchmarks/RESULTS.md (or --out) with device, date and command.

`--tiny` shrinks everything for a smoke test (the test suite runs it): images and clips 8x
smaller, the shapes of configs/tiny.py, 4 records per kind, a fixed count of batches
(`--batches`, default 2 with --tiny) instead of a timed interval, a short small mp4.

`--fill=DIR` measures packing instead: how full the rows of configs/tiny.py get on the embedded
worlds (`python -m unijax.data.worlds --out=DIR`, shapes and digits train splits mixed 2:1 by
record count) for each `config.data.pack_buffer` in --pack_buffers (0: first-fit without
look-ahead). Fill is the share of each budget (und tokens, gen tokens, ViT patch slots, VAE
image slots) that packed tokens use, over --fill_batches batches after the first
--fill_warmup (the look-ahead buffer has filled by then).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np

COLUMNS = ("device", "date", "record type", "workers", "records/s", "tokens/s",
           "tokens/record", "command")
FILL_COLUMNS = ("device", "date", "pack_buffer", "und fill", "gen fill", "ViT slots",
                "VAE slots", "docs/row", "tokens/row", "command")
WORDS = ("the a red blue small large circle square moves left right above below scene image "
         "shows people walking near river with trees and buildings under cloudy sky").split()


def photo(rng, h=480, w=640) -> np.ndarray:
    """A photo-like uint8 image: upsampled colour field plus noise (JPEG-compresses like one)."""
    low = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3))
    field = np.kron(low, np.ones((32, 32, 1)))[:h, :w]
    return np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def sentence(rng, n) -> str:
    return " ".join(rng.choice(WORDS, n)) + "."


def make_records(kind: str, n: int, rng, shrink: int = 1) -> list[dict]:
    """`n` records of one kind with real JPEG payloads (image sides divided by `shrink`)."""
    from unijax.data import images, records

    def jpeg(h=480, w=640):
        return images.encode_image(photo(rng, h // shrink, w // shrink), "image/jpeg", 90)

    seg_t, seg_i = records.text_segment, records.image_segment
    out = []
    for i in range(n):
        if kind == "text":
            segs = [seg_t(sentence(rng, 300), "context")]
        elif kind == "caption":
            segs = [seg_i(jpeg(), "image/jpeg", "input"), seg_t(sentence(rng, 40), "response")]
        elif kind == "vqa":
            segs = [seg_i(jpeg(), "image/jpeg", "input"), seg_t(sentence(rng, 12), "prompt"),
                    seg_t(sentence(rng, 30), "response")]
        elif kind == "t2i":
            segs = [seg_t(sentence(rng, 40), "prompt"), seg_i(jpeg(), "image/jpeg", "target")]
        elif kind == "edit":
            segs = [seg_i(jpeg(), "image/jpeg", "source"), seg_t(sentence(rng, 10), "prompt"),
                    seg_i(jpeg(), "image/jpeg", "target")]
        elif kind == "interleaved":
            segs = []
            for _ in range(3):
                segs += [seg_t(sentence(rng, 80), "context"),
                         seg_i(jpeg(360, 480), "image/jpeg", "context")]
            segs.append(seg_t(sentence(rng, 80), "context"))
        else:  # video: 16 frames of 320x240, one caption per frame
            frames = [jpeg(240, 320) for _ in range(16)]
            caps = [sentence(rng, 6) for _ in range(16)]
            segs = [seg_t(sentence(rng, 20), "prompt"),
                    records.video_segment(frames, "image/jpeg", [k / 2 for k in range(16)], 2.0,
                                          "target", caps)]
        out.append(records.make_record(kind, f"{kind}-{i}", "bench", segs))
    return out


def bench_config(pattern: str, workers: int, tiny: bool = False):
    import ml_collections

    from configs import bagel_7b_mot, base
    from configs import tiny as tiny_config

    c = tiny_config.get_config() if tiny else bagel_7b_mot.get_config()
    c.data.batch_size = 1  # one packed row per host batch (BAGEL: one sequence per GPU)
    c.data.num_workers = workers
    c.data.read_threads = 2
    c.data.datasets = ml_collections.ConfigDict()
    c.data.datasets.bench = base.data_source(pattern, max_video_frames=16,
                                             video_frame_size=c.data.vae_image_size if tiny
                                             else 512)
    return c


def measure(pattern: str, workers: int, seconds: float, batches: int = 0,
            tiny: bool = False) -> tuple[float, float, float]:
    """(records/s, tokens/s, tokens/record) after the first batch (worker start-up excluded),
    over `seconds` or, when `batches` > 0, over exactly that many batches."""
    from unijax.data import pipeline

    it = pipeline.make_iterator(bench_config(pattern, workers, tiny))
    for _ in range(max(1, workers)):  # every worker has started
        next(it)
    docs0, tokens, count, start = it.documents, 0, 0, time.perf_counter()
    while (count < batches) if batches else (time.perf_counter() - start < seconds):
        batch = next(it)
        tokens += int((batch.doc_id > 0).sum())
        count += 1
    elapsed = time.perf_counter() - start
    docs = it.documents - docs0
    it.close()
    return docs / elapsed, tokens / elapsed, tokens / max(docs, 1)


def measure_fill(worlds: str, pack_buffer: int, batches: int, warmup: int) -> dict:
    """Mean fill of each row budget over `batches` batches of configs/tiny.py on the worlds."""
    from configs import base, tiny
    from unijax.data import packing, pipeline

    c = tiny.get_config()
    c.data.num_workers = 0
    c.data.pack_buffer = pack_buffer
    c.data.datasets.shapes = base.data_source(os.path.join(worlds, "shapes", "train-*"), 2.0)
    c.data.datasets.digits = base.data_source(os.path.join(worlds, "digits", "train-*"), 1.0)
    spec = packing.PackSpec.from_config(c)
    it = pipeline.make_iterator(c)
    for _ in range(warmup):
        next(it)
    used, docs0 = np.zeros(4), it.documents
    for _ in range(batches):
        b = next(it)
        live = b.doc_id > 0
        used += (live[:, :b.num_und].sum(), live[:, b.num_und:].sum(),
                 (b.vit_image_id > 0).sum(), (b.vae_grid_hw[..., 0] > 0).sum())
    rows = batches * c.data.batch_size
    docs = it.documents - docs0
    it.close()
    fill = used / (rows * spec.capacity)
    return {"und": fill[0], "gen": fill[1], "vit": fill[2], "vae": fill[3],
            "docs/row": docs / rows, "tokens/row": (used[0] + used[1]) / rows}


def fill_rows(args, command: str) -> list[str]:
    """Result rows of --fill: one per pack_buffer."""
    rows = []
    for n in (int(k) for k in args.pack_buffers.split(",")):
        f = measure_fill(args.fill, n, args.fill_batches, args.fill_warmup)
        label = f"{n}" + (" (first-fit, no look-ahead)" if n == 0 else "")
        rows.append(f"| {args.device} | {args.date} | {label} | {f['und']:.1%} | "
                    f"{f['gen']:.1%} | {f['vit']:.1%} | {f['vae']:.1%} | "
                    f"{f['docs/row']:.2f} | {f['tokens/row']:.0f} | `{command}` |")
        print(rows[-1], flush=True)
    return rows


def bench_mp4(tmpdir: str, shrink: int = 1) -> tuple[float, float, str]:
    """(frames decoded/s, clips sampled at 2 fps/s, "WxH") on a 10 s 640x360 24 fps H.264 clip
    (with `shrink`: sides and length divided by it)."""
    from unijax.data import video

    rng = np.random.default_rng(0)
    even = lambda n: n // (2 * shrink) * 2  # H.264 wants even sides
    base_frame = photo(rng, even(360), even(640))
    frames = [np.roll(base_frame, 4 * k, axis=1) for k in range(240 // shrink)]
    path = os.path.join(tmpdir, "clip.mp4")
    video.write_mp4(path, frames, fps=24)
    start = time.perf_counter()
    every, _ = video.sample_frames(path)
    all_fps = len(every) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(3):
        video.sample_frames(path, fps=2.0, max_frames=16)
    return all_fps, 3 / (time.perf_counter() - start), f"{even(640)}x{even(360)}"


def tpu_estimate_row(date: str) -> str:
    """What a TPU v5p host consumes training BAGEL-7B-MoT, from first principles."""
    active = 7.6e9  # parameters a token passes through (one expert of the MoT per token)
    flops_per_token = 6 * active  # forward + backward, dense matmuls only
    chips, peak, mfu = 4, 459e12, 0.40  # v5p: 459 bf16 TFLOP/s per chip
    tokens = chips * peak * mfu / flops_per_token
    return (f"| estimate | {date} | BAGEL-7B-MoT on a TPU v5p host (4 chips) | - | - | "
            f"~{tokens / 1e3:.0f}k tokens/s consumed | - | assumes 40% MFU and 6 x 7.6e9 "
            f"FLOPs per token (attention, SigLIP and VAE-encoder FLOPs ignored, so the true "
            f"rate is lower); the host must supply this many packed tokens/s |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="text,caption,vqa,t2i,edit,interleaved,video")
    parser.add_argument("--workers", default="0,1,2,4")
    parser.add_argument("--records", type=int, default=24, help="records per kind")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per row")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--device", default=f"CPU {platform.processor() or platform.machine()}, "
                                            f"{os.cpu_count()} cores")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument("--fill", default="", help="worlds directory: measure row fill instead")
    parser.add_argument("--pack_buffers", default="0,4,16,50")
    parser.add_argument("--fill_batches", type=int, default=100)
    parser.add_argument("--fill_warmup", type=int, default=10)
    parser.add_argument("--tiny", action="store_true",
                        help="small images, configs/tiny.py shapes, few records: a smoke test")
    parser.add_argument("--batches", type=int, default=0,
                        help="measure this many batches instead of --seconds (--tiny: 2)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.records = min(args.records, 4)
        args.batches = args.batches or 2
    shrink = 8 if args.tiny else 1
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read an absl flag
    from unijax.data import records

    command = "PYTHONPATH=. python benchmarks/data.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.fill:
        rows = fill_rows(args, command)
        with open(args.out, "a") as f:
            f.write("\n## Packing fill on the worlds (benchmarks/data.py --fill)\n\n")
            f.write("| " + " | ".join(FILL_COLUMNS) + " |\n|" + "---|" * len(FILL_COLUMNS) + "\n")
            f.write("\n".join(rows) + "\n")
        return
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            path = os.path.join(tmp, f"{kind}.array_record")
            records.write_records(path, make_records(kind, args.records, rng, shrink))
            for workers in (int(w) for w in args.workers.split(",")):
                rec_s, tok_s, per = measure(path, workers, args.seconds, args.batches,
                                            args.tiny)
                label = f"{workers}" if workers else "0 (in-process)"
                row = (f"| {args.device} | {args.date} | {kind} | {label} | {rec_s:.1f} | "
                       f"{tok_s:,.0f} | {per:,.0f} | `{command}` |")
                print(row, flush=True)
                rows.append(row)
        all_fps, clips, size = bench_mp4(tmp, shrink)
        rows.append(f"| {args.device} | {args.date} | mp4 decode (PyAV, {size} H.264) | "
                    f"1 thread_type=AUTO | {clips:.1f} clips/s sampled at 2 fps | "
                    f"{all_fps:.0f} frames/s decoding every frame | - | `{command}` |")
        print(rows[-1])
    rows.append(tpu_estimate_row(args.date))
    print(rows[-1])
    with open(args.out, "a") as f:
        f.write("\n## Input pipeline (benchmarks/data.py)\n\n")
        f.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
