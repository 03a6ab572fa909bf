"""The shapes world's scene model: palette, shapes, scenes, rendering and spatial relations.

A scene is a square RGB canvas (white background) holding 1-4 flat-coloured shapes. Shapes are
rasterised exactly (no anti-aliasing) on pixel centres, so a judge can read every object back
from the pixels: colour, shape class and bounding box. Objects never overlap and keep a gap of at
least `min_gap(image_size)` pixels between their bounding boxes, so two shapes of one colour stay
two connected components.

Coordinates: pixels, x to the right, y downwards; a bounding box is (x0, y0, x1, y1), half-open.
"""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
from PIL import Image

# Far apart in RGB (smallest pairwise distance ~116, blue-purple) and from the white background,
# so nearest-palette segmentation of a slightly blurred image still finds the right colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 200, 20),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 60, 190),
    "black": (30, 30, 30),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
COLOURS: tuple[str, ...] = tuple(PALETTE)
# Triangles always point up; a diamond is a square turned by 45 degrees.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZE_WORDS: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MAX_OBJECTS = 4
MIN_IMAGE_SIZE = 24

# Side of an object's bounding box as a fraction of the image side, per size word.
_SIZE_FRACTIONS = {"small": (0.22, 0.28), "large": (0.36, 0.42)}
_SIZE_SPLIT = 0.32
# GenEval's rule: the centre offset is first shrunk by this fraction of the summed box sides.
_POSITION_SHRINK = 0.1


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One shape: class, palette colour and square bounding box (top-left x, y and side, px)."""

    shape: str
    colour: str
    x: int
    y: int
    size: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), half-open, in pixels."""
        return (self.x, self.y, self.x + self.size, self.y + self.size)

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the bounding-box centre, in pixels."""
        return (self.x + self.size / 2, self.y + self.size / 2)

    def replace(self, **changes) -> ShapeObject:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready description (bbox and centre spelled out for readers of the meta)."""
        return {"shape": self.shape, "colour": self.colour, "bbox": list(self.bbox),
                "centre": list(self.centre), "size": self.size}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeObject:
        """Inverse of to_dict."""
        x0, y0, x1, _ = d["bbox"]
        return cls(str(d["shape"]), str(d["colour"]), int(x0), int(y0), int(x1 - x0))


@dataclasses.dataclass(frozen=True)
class Scene:
    """The structured description of one image: its side in pixels and its objects."""

    image_size: int
    objects: tuple[ShapeObject, ...]

    def __post_init__(self):
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"Scene.image_size must be >= {MIN_IMAGE_SIZE}, "
                             f"got {self.image_size}")
        for o in self.objects:
            if o.shape not in SHAPES:
                raise ValueError(f"ShapeObject.shape must be one of {SHAPES}, got {o.shape!r}")
            if o.colour not in PALETTE:
                raise ValueError(f"ShapeObject.colour must be one of {COLOURS}, got {o.colour!r}")
            if o.size < 1 or min(o.bbox) < 0 or max(o.bbox) > self.image_size:
                raise ValueError(f"ShapeObject bbox {o.bbox} outside the {self.image_size}px "
                                 "canvas")

    def with_objects(self, objects) -> Scene:
        """The same canvas holding other objects."""
        return Scene(self.image_size, tuple(objects))

    def size_word(self, obj: ShapeObject) -> str:
        """'small' or 'large' (the two size ranges never meet)."""
        return size_word(obj.size, self.image_size)

    def to_dict(self) -> dict:
        """JSON-ready description."""
        return {"image_size": self.image_size, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """Inverse of to_dict."""
        return cls(int(d["image_size"]), tuple(ShapeObject.from_dict(o) for o in d["objects"]))


def size_range(image_size: int, word: str) -> tuple[int, int]:
    """Inclusive (min, max) side in pixels of a `word` ('small' | 'large') object."""
    lo, hi = _SIZE_FRACTIONS[word]
    return max(3, round(lo * image_size)), max(3, round(hi * image_size))


def size_word(side: float, image_size: int) -> str:
    """'small' or 'large' for an object `side` pixels wide on an image_size canvas."""
    return "small" if side < _SIZE_SPLIT * image_size else "large"


def min_gap(image_size: int) -> int:
    """Smallest gap in pixels between two objects' bounding boxes."""
    return max(2, image_size // 16)


@functools.lru_cache(maxsize=1024)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """[size, size] bool: the pixels of `shape` in a size x size box (sampled at pixel centres).

    Every mask touches all four sides of its box, so a judge recovers the exact bounding box.
    """
    c = (np.arange(size) + 0.5) / size
    u, v = c[None, :], c[:, None]
    eps = 1e-9  # boundary pixels sit exactly on the edge for some sizes
    if shape == "circle":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25 + eps
    elif shape == "square":
        mask = np.ones((size, size), bool)
    elif shape == "triangle":
        # The width at a pixel row's bottom edge, so the apex row is never empty.
        mask = np.abs(u - 0.5) <= (v + 0.5 / size) / 2 + eps
    elif shape == "diamond":
        mask = np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5 + eps
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    mask = np.broadcast_to(mask, (size, size)).copy()
    mask.flags.writeable = False
    return mask


def render(scene: Scene) -> np.ndarray:
    """[S, S, 3] uint8 RGB image of the scene on a white background."""
    s = scene.image_size
    image = np.empty((s, s, 3), np.uint8)
    image[:] = BACKGROUND
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        image[y0:y1, x0:x1][shape_mask(o.shape, o.size)] = PALETTE[o.colour]
    return image


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an [H, W, 3] uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """[H, W, 3] uint8 RGB array from encoded image bytes (PNG, JPEG, WebP)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def relation_score(box_a, box_b, relation: str) -> float:
    """How far `a <relation> b` holds, in [-1, 1]; GenEval's rule counts > 0.5 as holding.

    The centre offset a - b is shrunk towards zero by 0.1 of the summed box sides per axis
    (boxes that nearly share a centre have no relation), then divided by the unshrunk offset's
    length; the score is its component along the relation's direction (y grows downwards).
    Boxes are (x0, y0, x1, y1) in pixels.
    """
    a, b = np.asarray(box_a, float), np.asarray(box_b, float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sides = (a[2:] - a[:2]) + (b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - _POSITION_SHRINK * sides, 0.0) * np.sign(offset)
    norm = float(np.linalg.norm(offset))
    if norm == 0.0 or np.all(np.abs(shrunk) < 1e-3):
        return 0.0
    dx, dy = shrunk / norm
    scores = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}
    if relation not in scores:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    return float(scores[relation])


def relation_holds(box_a, box_b, relation: str) -> bool:
    """GenEval's decision: `a <relation> b` when relation_score > 0.5."""
    return relation_score(box_a, box_b, relation) > 0.5


def region_words(scene: Scene, obj: ShapeObject) -> str:
    """Where an object sits in a 3x3 grid: 'at the top left', 'on the right', 'in the centre'."""
    cx, cy = obj.centre
    third = scene.image_size / 3
    col = "left" if cx < third else ("right" if cx > 2 * third else "")
    row = "top" if cy < third else ("bottom" if cy > 2 * third else "")
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the centre"


def separated(box_a, box_b, gap: int) -> bool:
    """Whether two boxes are at least `gap` pixels apart along x or y."""
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    return ax0 >= bx1 + gap or bx0 >= ax1 + gap or ay0 >= by1 + gap or by0 >= ay1 + gap


def fits(scene: Scene, obj: ShapeObject, ignore: int | None = None) -> bool:
    """Whether `obj` lies on the canvas and keeps the gap to every object but `ignore` (index)."""
    x0, y0, x1, y1 = obj.bbox
    if x0 < 0 or y0 < 0 or x1 > scene.image_size or y1 > scene.image_size:
        return False
    gap = min_gap(scene.image_size)
    return all(separated(obj.bbox, o.bbox, gap)
               for i, o in enumerate(scene.objects) if i != ignore)


def place(rng: np.random.Generator, scene: Scene, shape: str, colour: str, size: int,
          tries: int = 60) -> ShapeObject | None:
    """A new object at a random free spot of `scene`, or None when none was found."""
    hi = scene.image_size - size
    if hi < 0:
        return None
    for _ in range(tries):
        obj = ShapeObject(shape, colour, int(rng.integers(0, hi + 1)),
                          int(rng.integers(0, hi + 1)), size)
        if fits(scene, obj):
            return obj
    return None


def random_size(rng: np.random.Generator, image_size: int, word: str | None = None) -> int:
    """A random side in pixels for a `word`-sized (or either) object."""
    word = word if word is not None else SIZE_WORDS[int(rng.integers(len(SIZE_WORDS)))]
    lo, hi = size_range(image_size, word)
    return int(rng.integers(lo, hi + 1))


def place_all(rng: np.random.Generator, image_size: int, specs, attempts: int = 30,
              base: Scene | None = None) -> Scene:
    """A scene holding `specs` [(shape, colour, size word or None)] at random free spots.

    Retries whole layouts; after half the attempts every object is made small. Raises
    RuntimeError naming the specs when nothing fits (cannot happen with <= 4 objects).
    """
    base = base if base is not None else Scene(image_size, ())
    for attempt in range(attempts):
        scene = base
        for shape, colour, word in specs:
            word = "small" if attempt >= attempts // 2 else word
            obj = place(rng, scene, shape, colour, random_size(rng, image_size, word))
            if obj is None:
                break
            scene = scene.with_objects(scene.objects + (obj,))
        else:
            return scene
    raise RuntimeError(f"could not place {specs} on a {image_size}px canvas")


def sample_scene(rng: np.random.Generator, image_size: int, num_objects: int | None = None
                 ) -> Scene:
    """A random scene of 1-4 objects (or `num_objects`), no two sharing shape and colour.

    Unique (shape, colour) pairs let every object be named: 'the triangle' when its shape is
    unique in the scene, else 'the red triangle'.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in [1, {MAX_OBJECTS}], got {n}")
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    return place_all(rng, image_size, [(*pairs[i], None) for i in chosen])


def refer(scene: Scene, index: int) -> str | None:
    """The shortest unique name of object `index` ('the circle', 'the red circle'), or None."""
    obj = scene.objects[index]
    same_shape = [o for o in scene.objects if o.shape == obj.shape]
    if len(same_shape) == 1:
        return f"the {obj.shape}"
    if sum(o.colour == obj.colour for o in same_shape) == 1:
        return f"the {obj.colour} {obj.shape}"
    return None


def describe(scene: Scene, obj: ShapeObject) -> str:
    """'a small red circle at the top left'."""
    return f"a {scene.size_word(obj)} {obj.colour} {obj.shape} {region_words(scene, obj)}"
