"""Build a PackedBatch from a human-readable list of segments (for tests and notebooks).

  rows = [
      [  # row 0: two documents
          [text("a red circle"), vae_image(2, 2, noisy=True, t=0.3)],  # text-to-image
          [vit_image(3, 3), text("what colour?"), text("red", loss=True)],  # VQA
      ],
  ]
  batch = build(rows, num_und=64, num_gen=16, latent_grid=(2, 2))

Layout follows BAGEL: a text segment is `<|im_start|> ids <|im_end|>` (causal, positions count
up; with `loss=True` each token predicts the next, `<|im_end|>` predicting nothing); an image is
`<|vision_start|> tokens <|vision_end|>`, one bidirectional span sharing one RoPE position, and
the position advances after it unless the image is noisy. Markers are text tokens of the und
expert; ViT tokens go to the und slice of the row, VAE latents to the gen slice.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unijax import batch as batch_lib


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of BAGEL's special tokens (defaults: the built-in byte-level tokenizer's)."""

    im_start: int = 256
    im_end: int = 257
    vision_start: int = 258
    vision_end: int = 259


@dataclasses.dataclass(frozen=True)
class Text:
    ids: tuple[int, ...]
    loss: bool = False


@dataclasses.dataclass(frozen=True)
class VitImage:
    grid: tuple[int, int]
    pixels: np.ndarray | None = None  # [h * patch, w * patch, 3] in [-1, 1]


@dataclasses.dataclass(frozen=True)
class VaeImage:
    grid: tuple[int, int]
    noisy: bool = False
    t: float = 0.0
    pixels: np.ndarray | None = None  # [h * cell, w * cell, 3] in [-1, 1]


def text(content: str | list[int], loss: bool = False) -> Text:
    """A text segment; a str becomes its UTF-8 bytes (the byte-level tokenizer's ids)."""
    ids = list(content.encode("utf-8")) if isinstance(content, str) else list(content)
    return Text(tuple(int(i) for i in ids), loss)


def vit_image(h: int, w: int, pixels: np.ndarray | None = None) -> VitImage:
    """An image to understand: an h x w grid of ViT patches."""
    return VitImage((h, w), pixels)


def vae_image(h: int, w: int, noisy: bool = False, t: float = 0.0,
              pixels: np.ndarray | None = None) -> VaeImage:
    """A VAE image of h x w latent tokens; noisy=True makes it a generation target at time t."""
    if noisy and not 0.0 < t <= 1.0:
        raise ValueError(f"a noisy VAE image needs a flow time t in (0, 1], got t={t}")
    return VaeImage((h, w), noisy, 0.0 if not noisy else float(t), pixels)


def build(
    rows: list[list[list[Text | VitImage | VaeImage]]],
    *,
    num_und: int,
    num_gen: int,
    latent_grid: tuple[int, int] = (4, 4),
    latent_cell: int = 16,
    vit_patch_size: int = 14,
    vit_max_grid: int = 70,
    max_latent_size: int = 64,
    max_vit_patches: int | None = None,
    max_vae_images: int = 2,
    special: SpecialTokens = SpecialTokens(),  # noqa: B008 (frozen, immutable)
    seed: int = 0,
) -> batch_lib.PackedBatch:
    """Packs `rows` (each a list of documents, each a list of segments) into a PackedBatch.

    Args:
      rows: the segments, row by row and document by document.
      num_und, num_gen: per-row capacities of the und and gen slices.
      latent_grid: (gh, gw) latent-token grid of the VAE canvas (the largest VAE image).
      latent_cell: pixels per latent token side (16 with the FLUX VAE and patch 2).
      vit_patch_size, vit_max_grid, max_latent_size: ViT patch, 2D position table sides.
      max_vit_patches: ViT patch slots per row (default num_und).
      max_vae_images: VAE image slots per row.
      seed: random pixels for images given without pixels.

    Raises:
      ValueError: when a row does not fit its capacities.
    """
    rng = np.random.default_rng(seed)
    bsz, length = len(rows), num_und + num_gen
    p_slots = num_und if max_vit_patches is None else max_vit_patches
    gh, gw = latent_grid
    out = {name: np.full((bsz, length), batch_lib.TOKEN_PAD_VALUES.get(name, 0),
                         dtype=batch_lib._DTYPES[name]) for name in batch_lib.TOKEN_FIELDS}
    patch_dim = vit_patch_size * vit_patch_size * 3
    out.update(
        vit_patches=np.zeros((bsz, p_slots, patch_dim), np.float32),
        vit_patch_rc=np.zeros((bsz, p_slots, 2), np.int32),
        vit_grid_hw=np.zeros((bsz, p_slots, 2), np.int32),
        vit_image_id=np.zeros((bsz, p_slots), np.int32),
        vae_images=np.zeros((bsz, max_vae_images, gh * latent_cell, gw * latent_cell, 3),
                            np.float32),
        vae_grid_hw=np.zeros((bsz, max_vae_images, 2), np.int32),
        vae_timestep=np.zeros((bsz, max_vae_images), np.float32),
    )
    for r, documents in enumerate(rows):
        cursor = {"und": 0, "gen": num_und, "order": 0, "split": 0, "vit": 0, "vit_img": 0,
                  "vae": 0}

        def place(expert, row=r, cursor=cursor, **values):
            limit = num_und if expert == "und" else length
            if cursor[expert] >= limit:
                raise ValueError(f"row {row}: more {expert} tokens than its capacity "
                                 f"({num_und if expert == 'und' else num_gen})")
            i = cursor[expert]
            cursor[expert] += 1
            out["order"][row, i] = cursor["order"]
            cursor["order"] += 1
            for name, value in values.items():
                out[name][row, i] = value
            return i

        for d, segments in enumerate(documents, start=1):
            pos = 0
            for seg in segments:
                if isinstance(seg, Text):
                    ids = [special.im_start, *seg.ids, special.im_end]
                    for k, tok in enumerate(ids):
                        has_target = seg.loss and k + 1 < len(ids)
                        place("und", modality=batch_lib.TEXT, doc_id=d, position=pos,
                              text_ids=tok, text_targets=ids[k + 1] if has_target else 0,
                              text_weight=1.0 if has_target else 0.0)
                        pos += 1
                    continue
                split = cursor["split"]
                cursor["split"] += 1
                noisy = isinstance(seg, VaeImage) and seg.noisy
                span = dict(doc_id=d, position=pos, split_id=split, noisy=noisy)
                place("und", modality=batch_lib.TEXT, text_ids=special.vision_start, **span)
                h, w = seg.grid
                if isinstance(seg, VitImage):
                    start = cursor["vit"]
                    if start + h * w > p_slots:
                        raise ValueError(f"row {r}: more than {p_slots} ViT patch slots")
                    cursor["vit"] += h * w
                    cursor["vit_img"] += 1
                    pixels = seg.pixels if seg.pixels is not None else rng.uniform(
                        -1, 1, (h * vit_patch_size, w * vit_patch_size, 3))
                    patches = pixels.reshape(h, vit_patch_size, w, vit_patch_size, 3)
                    patches = patches.transpose(0, 2, 1, 3, 4).reshape(h * w, patch_dim)
                    out["vit_patches"][r, start:start + h * w] = patches
                    for k in range(h * w):
                        out["vit_patch_rc"][r, start + k] = (k // w, k % w)
                        out["vit_grid_hw"][r, start + k] = (h, w)
                        out["vit_image_id"][r, start + k] = cursor["vit_img"]
                        place("und", modality=batch_lib.VIT, payload_index=start + k,
                              patch_pos=(k // w) * vit_max_grid + k % w, **span)
                else:
                    slot = cursor["vae"]
                    if slot >= max_vae_images or h > gh or w > gw:
                        raise ValueError(f"row {r}: VAE image {seg.grid} does not fit "
                                         f"{max_vae_images} slots of grid {latent_grid}")
                    cursor["vae"] += 1
                    pixels = seg.pixels if seg.pixels is not None else rng.uniform(
                        -1, 1, (h * latent_cell, w * latent_cell, 3))
                    out["vae_images"][r, slot, :h * latent_cell, :w * latent_cell] = pixels
                    out["vae_grid_hw"][r, slot] = (h, w)
                    out["vae_timestep"][r, slot] = seg.t
                    for k in range(h * w):
                        row_k, col_k = divmod(k, w)
                        place("gen", modality=batch_lib.VAE,
                              payload_index=slot * gh * gw + row_k * gw + col_k,
                              patch_pos=row_k * max_latent_size + col_k,
                              flow_weight=1.0 if noisy else 0.0, **span)
                place("und", modality=batch_lib.TEXT, text_ids=special.vision_end, **span)
                if not noisy:
                    pos += 1
    fields = {k: v for k, v in out.items()}
    return batch_lib.PackedBatch(**fields, num_und=num_und)
