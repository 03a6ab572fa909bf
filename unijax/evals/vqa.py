"""Scoring of short VQA answers: exact match after normalisation.

  normalize_answer("The Red one.")  -> "red one"
  normalize_answer("Three")         -> "3"
  exact_match("It's 3.", "three")   -> False  (only the normalised strings are compared)
  score(preds, golds, types)        -> {"colour": 0.9, ..., "overall": 0.85}

Normalisation (in this order): lower-case; punctuation becomes a space (apostrophes dropped);
articles (a, an, the) removed; number words zero..twenty become digits; whitespace collapsed.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty").split()
_NUMBERS = {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation.replace("'", "")) + "]")


def normalize_answer(text: str) -> str:
    """The canonical form of an answer (see the module docstring)."""
    text = _PUNCTUATION.sub(" ", str(text).lower().replace("'", "").replace("\u2019", ""))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, gold: str) -> bool:
    """Whether two answers are equal after normalisation."""
    return normalize_answer(prediction) == normalize_answer(gold)


def score(predictions: Sequence[str], golds: Sequence[str],
          types: Sequence[str] | None = None) -> dict[str, float]:
    """Exact-match accuracy per question type, plus 'overall' (over all questions).

    Args:
      predictions, golds: answers, one per question.
      types: the question type of each (None: all of type "all").
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    types = ["all"] * len(golds) if types is None else list(types)
    if len(types) != len(golds):
        raise ValueError(f"{len(types)} question types for {len(golds)} gold answers")
    hits: dict[str, list[bool]] = {}
    for p, g, t in zip(predictions, golds, types):
        hits.setdefault(t, []).append(exact_match(p, g))
    result = {t: float(np.mean(h)) for t, h in hits.items()}
    if golds:
        result["overall"] = float(np.mean([h for hs in hits.values() for h in hs]))
    return result
