"""The digits world: a fixed held-out split, valid deterministic records, faithful images."""

import json

import numpy as np
import pytest

from unijax.data import records
from unijax.data.worlds import digits
from unijax.data.worlds import scene as scene_lib


def test_split_is_fixed_disjoint_stratified_and_complete():
    idx = digits.split_indices()
    images, labels = digits.load()
    assert images.shape == (1797, 8, 8) and images.max() == 16
    train, held = idx["train"], idx["eval"]
    assert len(np.intersect1d(train, held)) == 0
    assert len(train) + len(held) == len(labels)
    per_class = np.bincount(labels[held], minlength=10) / np.bincount(labels, minlength=10)
    np.testing.assert_allclose(per_class, digits.HELD_OUT_FRACTION, atol=0.01)
    # Recomputing from scratch gives the same split.
    digits.split_indices.cache_clear()
    np.testing.assert_array_equal(digits.split_indices()["eval"], held)


@pytest.mark.parametrize("seed", [0, 7])
def test_records_never_cross_the_split(seed):
    held = set(digits.split_indices()["eval"].tolist())
    for split in ("train", "eval"):
        for rec in digits.generate(60, split=split, seed=seed):
            index = json.loads(rec["meta"])["index"]
            assert (index in held) == (split == "eval"), (split, rec["id"])


def test_records_valid_deterministic_and_round_trip(tmp_path):
    recs = list(digits.generate(30, split="train", seed=1))
    assert recs == list(digits.generate(30, split="train", seed=1))
    assert recs != list(digits.generate(30, split="train", seed=2))
    assert {r["kind"] for r in recs} == set(digits.KINDS)
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        records.validate_record(r)
    path = tmp_path / "digits.array_record"
    records.write_records(path, recs)
    assert list(records.read_records(path)) == recs


def test_one_walk_per_kind_covers_distinct_digits():
    recs = [r for r in digits.generate(90, split="eval") if r["kind"] == "vqa"]
    indices = [json.loads(r["meta"])["index"] for r in recs]
    assert len(set(indices)) == len(indices) == 30


@pytest.mark.parametrize("kind", digits.KINDS)
def test_record_content_matches_the_digit(kind):
    images, labels = digits.load()
    for i in range(5):
        rec = digits.digits_record(kind, i, split="eval", image_size=32)
        meta = json.loads(rec["meta"])
        assert labels[meta["index"]] == meta["digit"]
        (seg,) = [s for s in rec["segments"] if s["type"] == "image"]
        image = scene_lib.decode_image(seg["bytes"])
        assert image.shape == (32, 32, 3)
        np.testing.assert_array_equal(image, digits.render(images[meta["index"]], 32))
        texts = [s["text"] for s in rec["segments"] if s["type"] == "text"]
        if kind == "vqa":
            assert texts[1] == str(meta["digit"])
        else:
            assert digits.parse_prompt(texts[0]) == meta["digit"]


@pytest.mark.parametrize("size", [16, 32, 64])
def test_render_and_to_grid_round_trip(size):
    images, _ = digits.split("eval")
    for grid in images[:20]:
        image = digits.render(grid, size)
        assert image.dtype == np.uint8 and image.shape == (size, size, 3)
        assert image[0, 0].tolist() == [255, 255, 255]  # no ink in the corner: white
        back = digits.to_grid(image)
        # Bilinear upscaling blurs by about a pixel of the 8x8 grid.
        assert np.abs(back - grid).mean() < 2.0
        assert np.corrcoef(back.ravel(), grid.ravel())[0, 1] > 0.9


def test_parse_prompt_and_errors():
    assert digits.parse_prompt("a handwritten digit 7") == 7
    assert digits.parse_prompt("a handwritten seven") == 7
    assert digits.parse_prompt("the digit zero, handwritten") == 0
    with pytest.raises(ValueError, match="not a digits"):
        digits.parse_prompt("a handwritten letter")
    with pytest.raises(ValueError, match="kind"):
        digits.digits_record("edit", 0)
    with pytest.raises(ValueError, match="split"):
        digits.split("test")
