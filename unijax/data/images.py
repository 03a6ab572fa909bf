"""Image decoding and the two resolution policies of a unified model.

ViT side (NaViT, BAGEL's `ImageTransform(980, 224, 14)`): keep the aspect ratio, make the long
side at most `max_size` and the short side at least `min_size`, both sides multiples of the
patch size, and at most `max_tokens` patches. VAE side: the same rule with the latent cell
(8 * latent_patch_size pixels with a VAE, latent_patch_size in pixel space) as the stride and
the VAE canvas (`config.data.vae_image_size`) as the long-side limit, so every image is one of
a discrete set of resolution buckets that fits the canvas.

When the short-side minimum pushes the long side past `max_size` (extreme aspect ratios) the
long side is cropped: at a random offset from the given numpy Generator, centred without one,
so a transform is deterministic under a seed. Pixels come out uint8 (`resize_uint8`: the
resized pixels rounded once, what plans and packed batches carry); `resize` and `normalize` give
float32 in [-1, 1] with the model's formula (`batch.normalize_pixels`).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from einops import rearrange
from PIL import Image

from unijax.batch import normalize_pixels
from unijax.data.records import RecordError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ResizeRule:
    """One resolution policy.

    Attributes:
      max_size: pixels, upper bound of the long side.
      min_size: pixels, lower bound of the short side (small images are upscaled).
      stride: pixels; both output sides are multiples of it (ViT patch or latent cell).
      max_tokens: upper bound of (h / stride) * (w / stride), or None.
    """

    max_size: int
    min_size: int
    stride: int
    max_tokens: int | None = None

    def __post_init__(self):
        if self.stride <= 0 or self.max_size < self.stride:
            raise ValueError(f"ResizeRule: max_size={self.max_size} must be >= stride="
                             f"{self.stride} > 0")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes encoded image bytes to uint8 RGB [H, W, 3]; transparency is composited on white.

    Raises:
      RecordError: reason "image_too_large" when H * W > max_pixels (checked from the header,
        before decoding), "image_decode" when the bytes are not a complete image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise RecordError(f"image of {w}x{h} pixels exceeds max_pixels={max_pixels}",
                                  "image_too_large")
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(canvas, im)
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except RecordError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, hit when opening the header
        raise RecordError(f"image too large for PIL ({e})", "image_too_large") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise RecordError(f"image does not decode ({type(e).__name__}: {e})",
                          "image_decode") from e
    return rgb


def _round_to(x: float, stride: int) -> int:
    return max(stride, int(round(x / stride)) * stride)


def target_size(h: int, w: int, rule: ResizeRule) -> tuple[int, int, int, int]:
    """The resize size and the crop size for an h x w image.

    Returns:
      (resize_h, resize_w, out_h, out_w): resize to the first pair (aspect ratio kept, sides
      multiples of the stride), then crop to the second (long side <= max_size).
    """
    scale = min(1.0, rule.max_size / max(h, w))
    scale = max(scale, rule.min_size / min(h, w))
    if rule.max_tokens is not None:
        tokens = (h * scale / rule.stride) * (w * scale / rule.stride)
        if tokens > rule.max_tokens:
            scale *= math.sqrt(rule.max_tokens / tokens)
    rh, rw = _round_to(h * scale, rule.stride), _round_to(w * scale, rule.stride)
    cap = rule.max_size // rule.stride * rule.stride
    oh, ow = min(rh, cap), min(rw, cap)
    if rule.max_tokens is not None:
        # Rounding up can overshoot the budget by a row or column of patches.
        while (oh // rule.stride) * (ow // rule.stride) > rule.max_tokens:
            if oh >= ow:
                oh -= rule.stride
            else:
                ow -= rule.stride
    return rh, rw, oh, ow


def resize_uint8(image: np.ndarray, rule: ResizeRule,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Resizes (bicubic, antialiased) and crops a uint8 [H, W, 3] image to `rule`.

    Returns:
      uint8 [h, w, 3] with h, w multiples of rule.stride (4x smaller than float pixels, which
      is what travels between Grain worker processes).
    """
    h, w = image.shape[:2]
    rh, rw, oh, ow = target_size(h, w, rule)
    pil = Image.fromarray(image)
    if (rh, rw) != (h, w):
        pil = pil.resize((rw, rh), Image.Resampling.BICUBIC)
    top = (rh - oh) // 2 if rng is None else int(rng.integers(0, rh - oh + 1))
    left = (rw - ow) // 2 if rng is None else int(rng.integers(0, rw - ow + 1))
    if (oh, ow) != (rh, rw):
        pil = pil.crop((left, top, left + ow, top + oh))
    return np.asarray(pil, dtype=np.uint8)


def resize(image: np.ndarray, rule: ResizeRule,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """`resize_uint8`, then normalised: float32 [h, w, 3] in [-1, 1]."""
    return normalize(resize_uint8(image, rule, rng))


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1] (BAGEL's Normalize(0.5, 0.5));
    `batch.normalize_pixels`, the formula the model applies to uint8 payloads."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"normalize: pixels of dtype {image.dtype}, expected uint8")
    return normalize_pixels(image)


def denormalize(pixels: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    return np.clip(np.round((np.asarray(pixels) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[h * p, w * p, 3] -> [h * w, p * p * 3], each patch in (row, col, channel) order."""
    return rearrange(pixels, "(h p1) (w p2) c -> (h w) (p1 p2 c)", p1=patch, p2=patch)


def unpatchify(patches: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """Inverse of `patchify`: [h * w, p * p * 3] -> [h * p, w * p, 3]."""
    return rearrange(patches, "(h w) (p1 p2 c) -> (h p1) (w p2) c", h=grid[0], w=grid[1],
                     p1=patch, p2=patch)


def encode_image(image: np.ndarray, mime: str = "image/png", quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> encoded bytes ("image/png", "image/jpeg" or "image/webp")."""
    fmt = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}[mime]
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()
