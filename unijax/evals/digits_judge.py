"""A digit classifier trained on the real digits' training split, to judge generated digits.

  digits_judge.classify(images)              # [N] predicted digits of [H, W, 3] uint8 images
  digits_judge.held_out_accuracy()           # its accuracy on the 359 held-out real digits
  digits_judge.score_images(images, digits)  # fraction classified as asked

Every image, whatever its size, is read the same way: grey, area-averaged to 8x8, inverted
(`digits.to_grid`). The classifier (an RBF support-vector machine) is fitted on the training
split after the same round trip through `digits.render` at the world's image size, so it sees
exactly the blur the generator's images carry. Fitting takes well under a second and is cached.
Chance is 1/10.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from unijax.data.worlds import digits

_ANSWER_QUESTION = re.compile(r"(which|what) digit")


def _features(grids: np.ndarray) -> np.ndarray:
    return np.asarray(grids, np.float32).reshape(len(grids), 64)


def _round_trip(grids: np.ndarray, image_size: int) -> np.ndarray:
    return np.stack([digits.to_grid(digits.render(g, image_size)) for g in grids])


@functools.lru_cache(maxsize=4)
def classifier(image_size: int = 32):
    """The fitted scikit-learn classifier for images rendered at `image_size` (cached)."""
    from sklearn.svm import SVC  # slow import, needed only here

    images, labels = digits.split("train")
    model = SVC(C=10.0, gamma=0.001)  # the classic setting for 0-16 digit features
    model.fit(_features(_round_trip(images, image_size)), labels)
    return model


def classify(images: Sequence[np.ndarray], image_size: int = 32) -> np.ndarray:
    """[N] int64 predicted digits of N images ([H, W, 3] or [H, W] uint8, any size).

    `image_size` picks the classifier fitted to that rendering size (the world's).
    """
    if len(images) == 0:
        return np.zeros((0,), np.int64)
    grids = np.stack([digits.to_grid(im) for im in images])
    return np.asarray(classifier(image_size).predict(_features(grids)), np.int64)


def held_out_accuracy(image_size: int = 32) -> float:
    """Accuracy on the held-out real digits rendered at `image_size` (never seen in fitting)."""
    images, labels = digits.split("eval")
    rendered = [digits.render(g, image_size) for g in images]
    return float(np.mean(classify(rendered, image_size) == labels))


def score_images(images: Sequence[np.ndarray], wanted: Sequence[int],
                 image_size: int = 32) -> float:
    """Fraction of images classified as the digit their prompt asked for."""
    if len(images) != len(wanted):
        raise ValueError(f"{len(images)} images for {len(wanted)} digits")
    if not len(images):
        return float("nan")
    return float(np.mean(classify(images, image_size) == np.asarray(wanted)))


def answer_question(image: np.ndarray, question: str, image_size: int = 32) -> str:
    """Answers a digits-world question ('which digit is this?') with the classifier."""
    if not _ANSWER_QUESTION.search(question.lower()):
        raise ValueError(f"not a digits question: {question!r}")
    return str(int(classify([image], image_size)[0]))
