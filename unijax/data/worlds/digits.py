"""The digits world: scikit-learn's bundled handwritten digits (real scans, 8x8, 0-16) as
captioning, VQA and text-to-image records.

  rec = digits_record("t2i", 5, split="eval")
  for rec in generate(1000, split="train"): ...

Images are upscaled (bilinear) to image_size x image_size RGB, dark ink on white. A fixed
stratified fifth of the 1797 digits is held out ("eval"); the split depends on SPLIT_SEED only,
never on the dataset seed, so no seed ever moves a held-out digit into training. Judges turn an
image back into the 8x8 grid with `to_grid`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image

from unijax.data import records
from unijax.data.worlds import geneval, shapes
from unijax.data.worlds import scene as scene_lib

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 1797
KINDS: tuple[str, ...] = ("caption", "vqa", "t2i")
DEFAULT_MIX: dict[str, int] = {"caption": 1, "vqa": 1, "t2i": 1}
PNG = "image/png"

_CAPTIONS = ("a handwritten digit {d}", "the digit {word}, handwritten")
_PROMPTS = ("a handwritten digit {d}", "a handwritten {word}")
_QUESTIONS = ("which digit is this?", "what digit is written here?")


@functools.lru_cache(maxsize=1)
def load() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: images [N, 8, 8] float32 in [0, 16] (ink high), labels [N] int64."""
    from sklearn.datasets import load_digits  # slow import, needed only here

    data = load_digits()
    images = np.asarray(data.images, np.float32)
    images.flags.writeable = False
    labels = np.asarray(data.target, np.int64)
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """Sorted dataset indices of the "train" and "eval" splits (stratified by digit, fixed)."""
    _, labels = load()
    rng = np.random.default_rng(SPLIT_SEED)
    held = []
    for d in range(10):
        idx = np.nonzero(labels == d)[0]
        held.append(rng.permutation(idx)[: round(HELD_OUT_FRACTION * len(idx))])
    held = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(labels)), held)
    return {"train": train, "eval": held}


def split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 8, 8] in [0, 16], labels [n]) of split `name` ("train" | "eval")."""
    if name not in shapes.SPLITS:
        raise ValueError(f"split must be one of {tuple(shapes.SPLITS)}, got {name!r}")
    images, labels = load()
    idx = split_indices()[name]
    return images[idx], labels[idx]


@functools.lru_cache(maxsize=8)
def _order(split_name: str, seed: int) -> np.ndarray:
    """The split's dataset indices in the seed's order (records walk it)."""
    which = split_indices()[split_name]
    return which[np.random.default_rng([seed, shapes.SPLITS[split_name]]).permutation(len(which))]


def render(grid: np.ndarray, image_size: int = 32) -> np.ndarray:
    """[S, S, 3] uint8: an 8x8 digit in [0, 16] upscaled (bilinear), dark ink on white."""
    grid = np.asarray(grid, np.float32)
    if grid.shape != (8, 8):
        raise ValueError(f"a digit grid must be [8, 8], got {grid.shape}")
    ink = Image.fromarray(np.round(np.clip(grid, 0, 16) * (255 / 16)).astype(np.uint8), "L")
    grey = 255 - np.asarray(ink.resize((image_size, image_size), Image.BILINEAR))
    return np.repeat(grey[:, :, None], 3, axis=-1)


def to_grid(image: np.ndarray) -> np.ndarray:
    """[8, 8] float32 in [0, 16] (ink high) from an [H, W, 3] or [H, W] uint8 image: grey,
    area-averaged down to 8x8, inverted. Inverse of `render` up to the upscaling blur."""
    image = np.asarray(image)
    grey = image.astype(np.float32).mean(-1) if image.ndim == 3 else image.astype(np.float32)
    small = Image.fromarray(grey, "F").resize((8, 8), Image.BOX)
    return (255.0 - np.asarray(small, np.float32)) * (16 / 255)


def parse_prompt(prompt: str) -> int:
    """The digit a text-to-image prompt (or caption) asks for; raises ValueError if none."""
    text = prompt.lower()
    if m := re.search(r"\b(\d)\b", text):
        return int(m[1])
    words = {w: n for n, w in geneval.NUMBER_WORDS.items() if n < 10}
    if m := re.search(r"\b(" + "|".join(words) + r")\b", text):
        return words[m[1]]
    raise ValueError(f"not a digits text-to-image prompt: {prompt!r}")


def _text(rng: np.random.Generator, templates, digit: int) -> str:
    template = templates[int(rng.integers(len(templates)))]
    return template.format(d=digit, word=geneval.NUMBER_WORDS[digit])


def digits_record(kind: str, index: int, *, split: str = "train", seed: int = 0,
                  image_size: int = 32) -> dict:
    """One validated digits record of the `index % n`-th digit of `split` (in the seed's order).

    Kinds: "caption" [image(input), text(response)], "vqa" [image(input), text(prompt),
    text(response) the digit], "t2i" [text(prompt), image(target)]. Meta: {"digit", "index"
    (into load())}.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    rng = shapes.record_rng("digits", split, kind, index, seed)
    images, labels = load()
    order = _order(split, seed)
    i = int(order[index % len(order)])
    digit = int(labels[i])
    png = scene_lib.encode_png(render(images[i], image_size))
    if kind == "caption":
        segs = [records.image_segment(png, PNG, "input"),
                records.text_segment(_text(rng, _CAPTIONS, digit), "response")]
    elif kind == "vqa":
        segs = [records.image_segment(png, PNG, "input"),
                records.text_segment(_text(rng, _QUESTIONS, digit), "prompt"),
                records.text_segment(str(digit), "response")]
    else:
        segs = [records.text_segment(_text(rng, _PROMPTS, digit), "prompt"),
                records.image_segment(png, PNG, "target")]
    meta = {"digit": digit, "index": i}
    return records.make_record(kind, f"digits/{split}/{kind}/{index:07d}", f"digits/{split}",
                               segs, meta)


def generate(count: int, *, split: str = "train", seed: int = 0, image_size: int = 32,
             mix: dict[str, int] | None = None, start: int = 0) -> Iterator[dict]:
    """Records number start .. start + count - 1 of the digits world, kinds cycling through
    `mix` ({kind: records per cycle}); consecutive records of one kind walk the split."""
    mix = DEFAULT_MIX if mix is None else mix
    cycle = [k for k, n in mix.items() for _ in range(n)]
    if not cycle:
        raise ValueError(f"mix must hold at least one record per cycle, got {mix}")
    for i in range(start, start + count):
        kind = cycle[i % len(cycle)]
        # Per-kind counter: every kind visits every digit of the split in turn.
        yield digits_record(kind, i // len(cycle) * mix[kind] + cycle[: i % len(cycle)].count(kind),
                            split=split, seed=seed, image_size=image_size)
