"""Reads shapes-world images back into objects with classical image processing, and scores them.

  objects = detect_objects(image)                 # [H, W, 3] uint8 -> [DetectedObject]
  ok = score_image(image, geneval.parse_prompt("a photo of a red circle left of a square"))
  per_category = score_images(images, targets)    # {"position": 0.93, ...}

Pipeline: every pixel takes its nearest colour among the palette and the white background
(farther than MAX_COLOUR_DISTANCE from all of them: no colour); each palette colour's pixels
split into 4-connected components; components of fewer pixels than MIN_AREA_FRACTION of the
image are noise; each remaining component (holes filled) is classified by its fill ratio
(area / bbox area) and the height of its centroid in its bbox:

  square ~1.0; circle ~0.79 (pi/4); diamond ~0.5; triangle ~0.5 with the centroid at 2/3 height
  (apex up), the others at 1/2.

A box far from square (aspect ratio beyond MAX_ASPECT) is 'unknown'. Scores follow GenEval's
rules (`geneval.satisfies`): counts of matching objects, colours bound to shapes, relations by
GenEval's centre-offset rule.

Chance: a uniform-noise image holds no object at all, so it scores 0 in every category (its
pixels' nearest-colour components are specks far below the minimum area). An image that ignores
its prompt and draws a random target of the same category (`run.baseline("random")`) scores
1/4 single_object, 1/6 two_object, 1/12 counting, 1/24 colors, 1/180 color_attr (right shape
pair 1/6, times 1/30 for the ordered colour pair), and ~1/24 position (right pair in the right
order with the same relation, or swapped with the opposite one; 4.6% measured).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from unijax.data.worlds import geneval, questions
from unijax.data.worlds import scene as scene_lib

MAX_COLOUR_DISTANCE = 100.0  # RGB units; half the palette's smallest pairwise distance is ~58
MIN_AREA_FRACTION = 0.02  # of the image area: ~20 px at 32 px; a small triangle has >= 31
MAX_ASPECT = 1.6
_SQUARE_FILL, _CIRCLE_FILL = 0.92, 0.71
_TRIANGLE_CENTROID = 0.58
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """One object read from pixels: shape ('unknown' if unclassifiable), palette colour,
    bounding box (x0, y0, x1, y1) half-open in pixels, and area in pixels."""

    shape: str
    colour: str
    bbox: tuple[int, int, int, int]
    area: int

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the bounding-box centre, in pixels."""
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)


def colour_labels(image: np.ndarray) -> np.ndarray:
    """[H, W] int: index into scene.COLOURS of each pixel's nearest palette colour, -1 where
    the background is nearest or no colour is within MAX_COLOUR_DISTANCE."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    refs = np.array([*scene_lib.PALETTE.values(), scene_lib.BACKGROUND], np.float32)
    pixels = image.astype(np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :] - refs[None, None], axis=-1)  # [H, W, C + 1]
    nearest = dist.argmin(-1)
    too_far = dist.min(-1) > MAX_COLOUR_DISTANCE
    is_background = nearest == len(refs) - 1
    return np.where(too_far | is_background, -1, nearest)


def classify_shape(mask: np.ndarray) -> str:
    """The shape class of a [h, w] bool mask cropped to its bounding box, or 'unknown'."""
    h, w = mask.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "unknown"
    area = mask.sum()
    fill = area / (h * w)
    ys = np.nonzero(mask)[0]
    centroid = (ys.mean() + 0.5) / h  # 0 top, 1 bottom
    if centroid > _TRIANGLE_CENTROID:
        return "triangle" if 0.35 <= fill <= 0.8 else "unknown"
    if fill >= _SQUARE_FILL:
        return "square"
    if fill >= _CIRCLE_FILL:
        return "circle"
    return "diamond" if fill >= 0.35 else "unknown"


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """The objects of an [H, W, 3] uint8 image, ordered by colour then position."""
    labels = colour_labels(image)
    min_area = MIN_AREA_FRACTION * labels.size
    found = []
    for k, colour in enumerate(scene_lib.COLOURS):
        components, n = ndimage.label(labels == k, structure=_FOUR_CONNECTED)
        if n == 0:
            continue
        # Areas first: a noisy image has thousands of specks, sliced one by one they are slow.
        big = np.nonzero(np.bincount(components.ravel(), minlength=n + 1)[1:] >= min_area)[0]
        slices = ndimage.find_objects(components)
        for j in big + 1:
            ys, xs = slices[j - 1]
            mask = ndimage.binary_fill_holes(components[ys, xs] == j)
            bbox = (xs.start, ys.start, xs.stop, ys.stop)
            found.append(DetectedObject(classify_shape(mask), colour, bbox, int(mask.sum())))
    return found


def matches_scene(objects: Sequence[DetectedObject], scene: scene_lib.Scene) -> bool:
    """Whether detected objects are exactly the scene's: same multiset of (shape, colour,
    bounding box)."""
    got = sorted((o.shape, o.colour, tuple(o.bbox)) for o in objects)
    want = sorted((o.shape, o.colour, o.bbox) for o in scene.objects)
    return got == want


def score_image(image: np.ndarray, target: geneval.Target) -> bool:
    """Whether an image meets a text-to-image target (GenEval's rules)."""
    return geneval.satisfies(detect_objects(image), target)


def score_images(images: Sequence[np.ndarray], targets: Sequence[geneval.Target]
                 ) -> dict[str, float]:
    """Accuracy per GenEval category present in `targets`, plus 'overall' (mean of the
    per-category accuracies, GenEval's headline number)."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images for {len(targets)} targets")
    hits: dict[str, list[bool]] = {}
    for image, target in zip(images, targets):
        hits.setdefault(target.category, []).append(score_image(image, target))
    result = {c: float(np.mean(h)) for c, h in hits.items()}
    if result:
        result["overall"] = float(np.mean(list(result.values())))
    return result


def answer_question(image: np.ndarray, question: str) -> str:
    """Answers a shapes-world question (questions.py wording) from the image's pixels alone:
    a reference answerer whose accuracy bounds what the judge can verify."""
    image = np.asarray(image)
    return questions.answer(detect_objects(image), max(image.shape[:2]), question)
