"""Reads shapes-world images back into objects with classical image processing, and scores them.

  objects = detect_objects(image)                 # [H, W, 3] uint8 -> [DetectedObject]
  ok = score_image(image, geneval.parse_prompt("a photo of a red circle left of a square"))
  per_category = score_images(images, targets)    # {"position": 0.93, ...}

Pipeline: every pixel takes its nearest colour among the palette and the white background
(farther than MAX_COLOUR_DISTANCE from all of them: no colour); each palette colour's pixels
split into 4-connected components; components of fewer pixels than MIN_AREA_FRACTION of the
image are noise, unless blur thinned them: a core of MIN_CORE_FRACTION whose colour coverage,
summed over it and its 2 px halo, reaches MIN_AREA_FRACTION is an object too. Each object is
then read one of two ways:

  clean renderings (every pixel near it pure colour or pure background): the component (holes
  filled) must equal one shape's rendering at its bbox; `classify_shape` names it by fill
  ratio (area / bbox area) and centroid height (square ~1.0; circle ~0.79; diamond ~0.5;
  triangle ~0.5 with the centroid at 2/3 height, apex up, the others at 1/2);
  anything else (blur, noise, compression): `fit_shape` fits the object's colour coverage map
  (`colour_alpha`) with the four shapes rendered by the scene renderer at every square box
  near the component's, each blurred by every FIT_SIGMAS, and keeps the least squared error;
  a fit worse than MAX_FIT_ERROR per shape pixel is 'unknown'. The fitted box is the object's
  box, so blur does not shrink boxes (which positions are judged by).

Measured full-scene recovery (shape and colour multiset) at 32 px: 100% clean; under a
Gaussian blur of sigma 0.6 / 0.8 / 1.0 px, ~100% / ~100% / >=99.5% (fill-ratio rules alone:
~79% / ~47% / ~47%).

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
import functools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from unijax.data.worlds import geneval, questions
from unijax.data.worlds import scene as scene_lib

MAX_COLOUR_DISTANCE = 100.0  # RGB units; half the palette's smallest pairwise distance is ~58
MIN_AREA_FRACTION = 0.02  # of the image area: ~20 px at 32 px; a small triangle has >= 31
# Blur thins a small object's thresholded core below MIN_AREA_FRACTION; a core this large
# (fraction of the image area) still counts when its coverage summed with its halo reaches it.
MIN_CORE_FRACTION = 0.008
MAX_ASPECT = 1.6
_SQUARE_FILL, _CIRCLE_FILL = 0.92, 0.71
_TRIANGLE_CENTROID = 0.58
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
# Template fitting (blurred, noisy or compressed images).
FIT_SIGMAS = (0.0, 0.4, 0.6, 0.8, 1.0, 1.25)  # Gaussian blurs (px) the templates are tried at
MAX_MIX_DISTANCE = 70.0  # RGB units off the background -> colour line: not a mix of the two
MAX_FIT_ERROR = 0.3  # squared coverage error per shape pixel (fits of blurred, noisy or
# JPEG-compressed shapes stay below ~0.23; an L or an X lands above): above, 'unknown'
_PAD = 3  # template padding (px) that holds the blur's tails
_SLACK = 3  # how far (px) a fitted box edge may lie outside the thresholded box
_CLEAN_TOLERANCE = 0.02  # coverage this close to 0 or 1 everywhere: a clean rendering


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


def colour_alpha(pixels: np.ndarray, colour: str) -> np.ndarray:
    """[..., 3] uint8 pixels -> [...] float32 coverage in [0, 1] of a palette colour over the
    white background: the pixel's position along the background -> colour line in RGB (0 at
    the background, 1 at the colour). Pixels farther than MAX_MIX_DISTANCE from that line are
    no mix of the two (another object, noise) and get 0."""
    white = np.array(scene_lib.BACKGROUND, np.float32)
    step = white - np.array(scene_lib.PALETTE[colour], np.float32)
    offset = white - np.asarray(pixels, np.float32)
    alpha = offset @ step / float(step @ step)
    off_line = np.linalg.norm(offset - alpha[..., None] * step, axis=-1) > MAX_MIX_DISTANCE
    return np.where(off_line, 0.0, np.clip(alpha, 0.0, 1.0)).astype(np.float32)


@functools.lru_cache(maxsize=4096)
def _templates(side: int) -> np.ndarray:
    """[len(SHAPES) * len(FIT_SIGMAS), side + 2 * _PAD, side + 2 * _PAD] float32: each shape
    rendered by the scene renderer in a side x side box (padded by _PAD pixels), blurred by
    each of FIT_SIGMAS; shape-major order."""
    out = np.zeros((len(scene_lib.SHAPES), len(FIT_SIGMAS), side + 2 * _PAD, side + 2 * _PAD),
                   np.float32)
    for i, shape in enumerate(scene_lib.SHAPES):
        hard = np.pad(scene_lib.shape_mask(shape, side).astype(np.float32), _PAD)
        for j, sigma in enumerate(FIT_SIGMAS):
            out[i, j] = ndimage.gaussian_filter(hard, sigma, mode="constant") if sigma else hard
    out.flags.writeable = False
    return out.reshape(-1, *out.shape[2:])


def fit_shape(alpha: np.ndarray, bbox: tuple[int, int, int, int]
              ) -> tuple[str, tuple[int, int, int, int], float]:
    """Fits one object to a coverage map: the (shape, square box, blur) whose rendering,
    blurred by one of FIT_SIGMAS, is nearest to `alpha` in squared error.

    Args:
      alpha: [H, W] float coverage of the object's colour over the whole image (0 where other
        objects are).
      bbox: (x0, y0, x1, y1) of the object's thresholded pixels; the fitted box's edges lie
        within a few pixels of it (blur erodes thin tips, so the true box is usually larger).
    Returns:
      (shape, fitted box (x0, y0, x1, y1) inside the image, squared error over the box's
      surroundings per pixel of the fitted shape); ('unknown', bbox, inf) when no box fits.
    """
    height, width = alpha.shape
    x0, y0, x1, y1 = bbox
    side0 = max(x1 - x0, y1 - y0)
    # Zero-padded canvas and a validity map, so that every candidate window is a plain slice.
    margin = _PAD + _SLACK + 4
    canvas = np.pad(alpha, margin)
    inside = np.pad(np.ones_like(alpha), margin)
    reach = _PAD + _SLACK
    near = float((alpha[max(y0 - reach, 0):y1 + reach, max(x0 - reach, 0):x1 + reach] ** 2).sum())
    best = (np.inf, "unknown", bbox)
    for side in range(max(3, side0 - 1), side0 + _SLACK + 2):
        xs = [x for x in range(x0 - _SLACK, x0 + 2)
              if 0 <= x and x + side <= width and x1 - 1 <= x + side <= x1 + _SLACK]
        ys = [y for y in range(y0 - _SLACK, y0 + 2)
              if 0 <= y and y + side <= height and y1 - 1 <= y + side <= y1 + _SLACK]
        if not xs or not ys:
            continue
        templates = _templates(side)  # [T, n, n]
        n = templates.shape[-1]
        # The candidate windows, [P, n, n]: window p's top-left is (x - _PAD, y - _PAD).
        starts = [(y - _PAD + margin, x - _PAD + margin) for y in ys for x in xs]
        seen = np.stack([canvas[r:r + n, c:c + n] for r, c in starts])
        valid = np.stack([inside[r:r + n, c:c + n] for r, c in starts])
        err = (((seen[:, None] - templates[None]) ** 2) * valid[:, None]).sum((-1, -2))
        # Coverage left outside a window (within reach of any candidate) counts against it.
        err += (near - (seen ** 2 * valid).sum((-1, -2)))[:, None]
        p, t = np.unravel_index(int(err.argmin()), err.shape)
        if err[p, t] < best[0]:
            r, c = starts[p]
            x, y = c - margin + _PAD, r - margin + _PAD
            shape = scene_lib.SHAPES[t // len(FIT_SIGMAS)]
            best = (float(err[p, t]), shape, (x, y, x + side, y + side))
    err, shape, box = best
    if shape == "unknown":
        return shape, box, float("inf")
    area = float(scene_lib.shape_mask(shape, box[2] - box[0]).sum())
    return shape, box, err / area


def _exact_shape(mask: np.ndarray, alpha: np.ndarray) -> str | None:
    """The shape of a clean (unblurred) rendering: its mask is exactly one template and every
    pixel around it is pure colour or pure background. None when not that clean."""
    h, w = mask.shape
    if h != w or np.abs(alpha - np.round(alpha)).max() > _CLEAN_TOLERANCE:
        return None
    shape = classify_shape(mask)
    if shape != "unknown" and np.array_equal(mask, scene_lib.shape_mask(shape, h)):
        return shape
    return None


def _soft_area(component: np.ndarray, alpha: np.ndarray) -> float:
    """Coverage summed over a component and the 2 px around it, in pixels: blur spreads a
    small object's pixels into a halo below the nearest-colour threshold (where a dark
    colour's halo may even be nearest to another palette colour). Other objects lie farther
    than 2 px from it, so only this object's coverage is counted."""
    halo = ndimage.binary_dilation(component, iterations=2)
    return float(alpha[halo].sum())


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """The objects of an [H, W, 3] uint8 image, ordered by colour then position.

    Objects are found as nearest-colour components; each one's shape and box come from the
    exact mask on clean renderings, else from `fit_shape` on the colour's coverage map, which
    tolerates blur (Gaussian sigma up to ~1 px), noise and compression.
    """
    labels = colour_labels(image)
    min_area = MIN_AREA_FRACTION * labels.size
    alphas = {c: colour_alpha(image, c) for c in scene_lib.COLOURS}
    # Every object's component, numbered across colours: each object's fit ignores the others.
    owner = np.zeros(labels.shape, np.int32)
    parts = []
    for k, colour in enumerate(scene_lib.COLOURS):
        components, n = ndimage.label(labels == k, structure=_FOUR_CONNECTED)
        if n == 0:
            continue
        # Areas first: a noisy image has thousands of specks, sliced one by one they are slow.
        areas = np.bincount(components.ravel(), minlength=n + 1)[1:]
        slices = ndimage.find_objects(components)
        for j in np.nonzero(areas >= MIN_CORE_FRACTION * labels.size)[0] + 1:
            ys, xs = slices[j - 1]
            around = (slice(max(ys.start - 2, 0), ys.stop + 2),
                      slice(max(xs.start - 2, 0), xs.stop + 2))
            if areas[j - 1] < min_area and _soft_area(
                    components[around] == j, alphas[colour][around]) < min_area:
                continue
            mask = ndimage.binary_fill_holes(components[ys, xs] == j)
            owner[ys, xs][mask] = len(parts) + 1
            parts.append((colour, mask, (xs.start, ys.start, xs.stop, ys.stop)))
    found = []
    for i, (colour, mask, bbox) in enumerate(parts):
        x0, y0, x1, y1 = bbox
        h, w = mask.shape
        alpha = np.where((owner == 0) | (owner == i + 1), alphas[colour], 0.0)
        pad = (slice(max(y0 - 1, 0), y1 + 1), slice(max(x0 - 1, 0), x1 + 1))
        shape = _exact_shape(mask, alpha[pad])
        if shape is not None:
            found.append(DetectedObject(shape, colour, bbox, int(mask.sum())))
            continue
        if max(h, w) > MAX_ASPECT * min(h, w):
            found.append(DetectedObject("unknown", colour, bbox, int(mask.sum())))
            continue
        shape, box, err = fit_shape(alpha, bbox)
        if err > MAX_FIT_ERROR:
            shape = "unknown"
        area = int(scene_lib.shape_mask(shape, box[2] - box[0]).sum()) if shape != "unknown" \
            else int(mask.sum())
        found.append(DetectedObject(shape, colour, box, area))
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
