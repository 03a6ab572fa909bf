"""Text-to-image prompts of the shapes world in GenEval's six categories, with structured targets.

A `Target` is what a judge checks in a generated image, following GenEval's rules:
- single_object  "a photo of a circle"                  >= 1 circle
- two_object     "a photo of a circle and a square"     >= 1 of each
- counting       "a photo of three circles"             exactly 3 circles
- colors         "a photo of a red circle"              >= 1 red circle
- position       "a photo of a circle left of a square" some circle left of some square
- color_attr     "a photo of a red circle and a blue square"  >= 1 of each, colours bound

The category tags are GenEval's. `scene_for_target` samples a scene that satisfies a target (the
image a record asks to generate); `parse_prompt` inverts `prompt_text`, so a prompt alone is
enough to build its target.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from unijax.data.worlds import scene as scene_lib

CATEGORIES: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNTS: tuple[int, ...] = (2, 3, 4)
NUMBER_WORDS: dict[int, str] = {
    0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
    8: "eight", 9: "nine", 10: "ten"}
# A position target is drawn until its relation holds this clearly (the judge needs > 0.5).
POSITION_MARGIN = 0.7


@dataclasses.dataclass(frozen=True)
class Requirement:
    """Objects an image must hold: `count` of `shape` (in `colour` when set); exactly when
    `exact`, else at least."""

    shape: str
    colour: str | None = None
    count: int = 1
    exact: bool = False

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Target:
    """A prompt's structured target: its category, requirements and an optional relation
    `requirements[0] <relation> requirements[1]`."""

    category: str
    requirements: tuple[Requirement, ...]
    relation: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"category": self.category, "relation": self.relation,
                "requirements": [r.to_dict() for r in self.requirements]}

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        """Inverse of to_dict."""
        reqs = tuple(Requirement(**r) for r in d["requirements"])
        return cls(str(d["category"]), reqs, d.get("relation"))


def _pick(rng: np.random.Generator, options, size: int | None = None):
    if size is None:
        return options[int(rng.integers(len(options)))]
    return [options[i] for i in rng.choice(len(options), size=size, replace=False)]


def sample_target(rng: np.random.Generator, category: str) -> Target:
    """A random target of `category` (shapes, colours, counts and relations drawn uniformly)."""
    shapes, colours = scene_lib.SHAPES, scene_lib.COLOURS
    if category == "single_object":
        return Target(category, (Requirement(_pick(rng, shapes)),))
    if category == "two_object":
        a, b = _pick(rng, shapes, 2)
        return Target(category, (Requirement(a), Requirement(b)))
    if category == "counting":
        n = _pick(rng, COUNTS)
        return Target(category, (Requirement(_pick(rng, shapes), count=n, exact=True),))
    if category == "colors":
        return Target(category, (Requirement(_pick(rng, shapes), _pick(rng, colours)),))
    if category == "position":
        a, b = _pick(rng, shapes, 2)
        return Target(category, (Requirement(a), Requirement(b)),
                      _pick(rng, scene_lib.RELATIONS))
    if category == "color_attr":
        a, b = _pick(rng, shapes, 2)
        ca, cb = _pick(rng, colours, 2)
        return Target(category, (Requirement(a, ca), Requirement(b, cb)))
    raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")


def _plural(shape: str) -> str:
    return shape + "s"


def _noun(req: Requirement) -> str:
    return f"{req.colour} {req.shape}" if req.colour else req.shape


def prompt_text(target: Target) -> str:
    """The GenEval-style prompt of a target, e.g. 'a photo of a red circle'."""
    reqs = target.requirements
    if target.category == "counting":
        return f"a photo of {NUMBER_WORDS[reqs[0].count]} {_plural(reqs[0].shape)}"
    if target.relation is not None:
        return f"a photo of a {_noun(reqs[0])} {target.relation} a {_noun(reqs[1])}"
    return "a photo of " + " and ".join(f"a {_noun(r)}" for r in reqs)


_COLOUR_RE = "|".join(scene_lib.COLOURS)
_SHAPE_RE = "|".join(scene_lib.SHAPES)
_NOUN_RE = rf"(?:({_COLOUR_RE}) )?({_SHAPE_RE})"
_COUNT_RE = "|".join(NUMBER_WORDS[n] for n in COUNTS)
_RELATION_RE = "|".join(scene_lib.RELATIONS)


def parse_prompt(prompt: str) -> Target:
    """Inverse of prompt_text (the category follows from the wording). Raises ValueError."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    words = {w: n for n, w in NUMBER_WORDS.items()}
    if m := re.fullmatch(rf"a photo of ({_COUNT_RE}) ({_SHAPE_RE})s", text):
        return Target("counting", (Requirement(m[2], count=words[m[1]], exact=True),))
    if m := re.fullmatch(rf"a photo of an? {_NOUN_RE} ({_RELATION_RE}) an? {_NOUN_RE}", text):
        return Target("position", (Requirement(m[2], m[1]), Requirement(m[5], m[4])), m[3])
    if m := re.fullmatch(rf"a photo of an? {_NOUN_RE} and an? {_NOUN_RE}", text):
        category = "color_attr" if m[1] and m[3] else "two_object"
        return Target(category, (Requirement(m[2], m[1]), Requirement(m[4], m[3])))
    if m := re.fullmatch(rf"a photo of an? {_NOUN_RE}", text):
        return Target("colors" if m[1] else "single_object", (Requirement(m[2], m[1]),))
    raise ValueError(f"not a shapes-world text-to-image prompt: {prompt!r}")


def _specs(rng: np.random.Generator, target: Target) -> list[tuple[str, str, str | None]]:
    specs = []
    for req in target.requirements:
        for _ in range(req.count):
            colour = req.colour or _pick(rng, scene_lib.COLOURS)
            # Counted objects are small so that four always fit.
            specs.append((req.shape, colour, "small" if req.count > 2 else None))
    return specs


def scene_for_target(rng: np.random.Generator, target: Target, image_size: int,
                     attempts: int = 200) -> scene_lib.Scene:
    """A random scene holding exactly the target's objects, its relation (if any) held clearly
    (relation_score > POSITION_MARGIN). Unspecified colours and all sizes and places are random.
    """
    specs = _specs(rng, target)
    for _ in range(attempts):
        scene = scene_lib.place_all(rng, image_size, specs)
        if target.relation is None:
            return scene
        a, b = scene.objects[0], scene.objects[1]
        if scene_lib.relation_score(a.bbox, b.bbox, target.relation) > POSITION_MARGIN:
            return scene
    raise RuntimeError(f"no {image_size}px scene found for {target}")


def satisfies(objects, target: Target) -> bool:
    """Whether objects (anything with .shape, .colour and .bbox) meet a target, GenEval's way.

    Each requirement counts the objects of its shape (and colour); a relation must hold between
    some object meeting the first requirement and some meeting the second.
    """
    objects = list(objects)
    matches = []
    for req in target.requirements:
        found = [o for o in objects
                 if o.shape == req.shape and (req.colour is None or o.colour == req.colour)]
        if len(found) < req.count or (req.exact and len(found) != req.count):
            return False
        matches.append(found)
    if target.relation is None:
        return True
    return any(scene_lib.relation_holds(a.bbox, b.bbox, target.relation)
               for a in matches[0] for b in matches[1])
