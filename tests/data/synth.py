"""Small real records of every kind (real PNG/JPEG bytes, seeded) and configs reading them."""

from __future__ import annotations

import ml_collections
import numpy as np

from configs import base, tiny
from unijax.data import images, records


def picture(rng: np.random.Generator, h: int = 24, w: int = 32) -> np.ndarray:
    """A uint8 [h, w, 3] image: a smooth gradient plus a coloured box (compresses like a photo)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                     np.full_like(xx, int(rng.integers(0, 255)))], -1)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    base[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, 3)
    return base.astype(np.uint8)


def png(rng, h=24, w=32) -> bytes:
    return images.encode_image(picture(rng, h, w), "image/png")


def jpeg(rng, h=24, w=32) -> bytes:
    return images.encode_image(picture(rng, h, w), "image/jpeg")


def make(kind: str, i: int, rng: np.random.Generator, source: str = "synth") -> dict:
    """A valid record of `kind` with id f"{kind}-{i}"."""
    seg = records
    words = f"sample {i} of kind {kind}"
    if kind == "text":
        segs = [seg.text_segment(f"plain text number {i}. " * 2, "context")]
    elif kind == "caption":
        segs = [seg.image_segment(jpeg(rng), "image/jpeg", "input"),
                seg.text_segment(f"a picture, {words}", "response")]
    elif kind == "vqa":
        segs = [seg.image_segment(png(rng), "image/png", "input"),
                seg.text_segment("what colour is the box?", "prompt"),
                seg.text_segment("red", "response"),
                seg.text_segment("and the size?", "prompt"),
                seg.text_segment("small", "response")]
    elif kind == "t2i":
        segs = [seg.text_segment(f"draw {words}", "prompt"),
                seg.image_segment(png(rng, 32, 32), "image/png", "target")]
    elif kind == "edit":
        segs = [seg.image_segment(png(rng, 16, 16), "image/png", "source"),
                seg.text_segment("make it blue", "prompt"),
                seg.image_segment(png(rng, 16, 16), "image/png", "target")]
    elif kind == "interleaved":
        segs = [seg.text_segment(f"first paragraph {i}", "context"),
                seg.image_segment(jpeg(rng, 16, 16), "image/jpeg", "context"),
                seg.text_segment("second paragraph", "context")]
    elif kind == "video":
        n = 3
        frames = [jpeg(rng, 16, 16) for _ in range(n)]
        segs = [seg.text_segment(f"a moving box {i}", "prompt"),
                seg.video_segment(frames, "image/jpeg", [k / 4 for k in range(n)], 4.0, "target",
                                  captions=["", "box moves right", "box moves down"])]
    else:
        raise ValueError(kind)
    return records.make_record(kind, f"{kind}-{i}", source, segs, {"i": i})


KINDS = records.KINDS


def data_config(pattern, batch_size=4, epochs=1, **kwargs):
    """configs/tiny.py reading `pattern` as the one dataset "mix" (whatever datasets and eval
    datasets the config file names are dropped)."""
    c = tiny.get_config()
    c.data.datasets = ml_collections.ConfigDict()
    c.data.eval_datasets = ml_collections.ConfigDict()
    c.data.batch_size = batch_size
    c.data.num_epochs = epochs
    c.data.read_threads = 2
    c.data.datasets.mix = base.data_source(str(pattern), **kwargs)
    return c
