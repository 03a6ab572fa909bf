"""Visual questions about shapes-world scenes: templates, exact answers, and the inverse parser.

Every question has one correct short answer: a colour, a shape, a count (digits), 'small' /
'large', or 'yes' / 'no'. Position questions are asked only when the relation clearly holds or
clearly fails (relation_score > 0.7 or < 0.3), never in between. `answer` reads a question's
text back and answers it from a scene, which (with a scene parsed from pixels by the shapes
judge) gives a reference answerer.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from unijax.data.worlds import scene as scene_lib

QUESTION_TYPES: tuple[str, ...] = (
    "colour", "shape", "size", "count", "count_colour", "count_shape", "exists", "position")
_YES_MARGIN, _NO_MARGIN = 0.7, 0.3


@dataclasses.dataclass(frozen=True)
class Question:
    """A question about a scene, its type and its exact answer."""

    type: str
    text: str
    answer: str


def answer_vocabulary(qtype: str) -> tuple[str, ...]:
    """Every answer a question of `qtype` can have (a uniform pick from it is chance level)."""
    counts = tuple(str(n) for n in range(scene_lib.MAX_OBJECTS + 1))
    return {
        "colour": scene_lib.COLOURS, "shape": scene_lib.SHAPES, "size": scene_lib.SIZE_WORDS,
        "count": counts[1:], "count_colour": counts, "count_shape": counts,
        "exists": ("yes", "no"), "position": ("yes", "no"),
    }[qtype]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _named(scene: scene_lib.Scene, rng: np.random.Generator | None = None
           ) -> list[tuple[int, str]]:
    """(index, unique name) of every nameable object; with `rng`, an object whose colour is
    unique may instead be called by colour alone ('the red shape')."""
    named = []
    for i, o in enumerate(scene.objects):
        names = [r] if (r := scene_lib.refer(scene, i)) else []
        if rng is not None and sum(p.colour == o.colour for p in scene.objects) == 1:
            names.append(f"the {o.colour} shape")
        if names:
            named.append((i, _pick(rng, names) if rng is not None else names[0]))
    return named


def _ask(rng: np.random.Generator, scene: scene_lib.Scene, qtype: str) -> Question | None:
    objs = scene.objects
    if qtype in ("colour", "size"):
        named = _named(scene, rng if qtype == "size" else None)
        if not named:
            return None
        i, ref = _pick(rng, named)
        if qtype == "colour":
            return Question(qtype, f"what colour is {ref}?", objs[i].colour)
        return Question(qtype, f"is {ref} small or large?", scene.size_word(objs[i]))
    if qtype == "shape":
        unique = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
        if not unique:
            return None
        o = _pick(rng, unique)
        return Question(qtype, f"what shape is the {o.colour} object?", o.shape)
    if qtype == "count":
        return Question(qtype, "how many shapes are there?", str(len(objs)))
    if qtype == "count_colour":
        c = _pick(rng, scene_lib.COLOURS)
        return Question(qtype, f"how many {c} shapes are there?",
                        str(sum(o.colour == c for o in objs)))
    if qtype == "count_shape":
        s = _pick(rng, scene_lib.SHAPES)
        return Question(qtype, f"how many {s}s are there?", str(sum(o.shape == s for o in objs)))
    if qtype == "exists":
        if rng.random() < 0.5:
            o = _pick(rng, objs)
            s, c = o.shape, o.colour
        else:
            s, c = _pick(rng, scene_lib.SHAPES), _pick(rng, scene_lib.COLOURS)
        present = any(o.shape == s and o.colour == c for o in objs)
        return Question(qtype, f"is there a {c} {s}?", "yes" if present else "no")
    if qtype == "position":
        named = _named(scene, rng)
        if len(named) < 2:
            return None
        (i, ref_a), (j, ref_b) = (named[k] for k in rng.choice(len(named), 2, replace=False))
        rel = _pick(rng, scene_lib.RELATIONS)
        score = scene_lib.relation_score(objs[i].bbox, objs[j].bbox, rel)
        if _NO_MARGIN <= score <= _YES_MARGIN:
            return None
        return Question(qtype, f"is {ref_a} {rel} {ref_b}?", "yes" if score > 0.5 else "no")
    raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")


def sample_question(rng: np.random.Generator, scene: scene_lib.Scene,
                    qtype: str | None = None, tries: int = 20) -> Question | None:
    """A random question about `scene` (of `qtype`, or of a random applicable type).

    Returns None when `qtype` was given and no such question suits the scene (e.g. a position
    question about a one-object scene).
    """
    if not scene.objects:
        raise ValueError("sample_question needs a scene with at least one object")
    for _ in range(tries):
        q = _ask(rng, scene, qtype if qtype is not None else _pick(rng, QUESTION_TYPES))
        if q is not None:
            return q
    return None


_COLOUR = "|".join(scene_lib.COLOURS)
_SHAPE = "|".join(scene_lib.SHAPES)
_REF = rf"the (?:({_COLOUR}) )?({_SHAPE}|shape)"  # 'the red shape': any shape
_REL = "|".join(scene_lib.RELATIONS)


def _find(objects, colour: str | None, shape: str):
    found = [o for o in objects if shape in (o.shape, "shape")
             and (colour is None or o.colour == colour)]
    return found[0] if found else None


_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple((t, re.compile(p)) for t, p in (
    ("colour", rf"what colour is {_REF}\?"),
    ("size", rf"is {_REF} small or large\?"),
    ("shape", rf"what shape is the ({_COLOUR}) object\?"),
    ("count", r"how many shapes are there\?"),
    ("count_colour", rf"how many ({_COLOUR}) shapes are there\?"),
    ("count_shape", rf"how many ({_SHAPE})s are there\?"),
    ("exists", rf"is there an? ({_COLOUR}) ({_SHAPE})\?"),
    ("position", rf"is {_REF} ({_REL}) {_REF}\?"),
))


def _parse(question: str) -> tuple[str, re.Match]:
    q = " ".join(question.lower().strip().split())
    for qtype, pattern in _PATTERNS:
        if m := pattern.fullmatch(q):
            return qtype, m
    raise ValueError(f"not a shapes-world question: {question!r}")


def question_type(question: str) -> str:
    """The type of a question in this module's wording; raises ValueError for any other."""
    return _parse(question)[0]


def answer(objects, image_size: int, question: str) -> str:
    """Answers a question in this module's wording from a list of objects (anything with
    .shape, .colour and .bbox) on an image_size canvas; '' when a named object is missing.

    Raises ValueError for a question not in this module's wording.
    """
    objects = list(objects)
    qtype, m = _parse(question)
    if qtype in ("colour", "size"):
        o = _find(objects, m[1], m[2])
        if o is None:
            return ""
        if qtype == "colour":
            return o.colour
        return scene_lib.size_word(max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]), image_size)
    if qtype == "shape":
        found = [o for o in objects if o.colour == m[1]]
        return found[0].shape if found else ""
    if qtype == "count":
        return str(len(objects))
    if qtype == "count_colour":
        return str(sum(o.colour == m[1] for o in objects))
    if qtype == "count_shape":
        return str(sum(o.shape == m[1] for o in objects))
    if qtype == "exists":
        return "yes" if _find(objects, m[1], m[2]) else "no"
    a, b = _find(objects, m[1], m[2]), _find(objects, m[4], m[5])
    if a is None or b is None:
        return ""
    return "yes" if scene_lib.relation_holds(a.bbox, b.bbox, m[3]) else "no"
