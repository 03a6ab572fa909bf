"""PackedBatch: the one contract between data, models and training.

A PackedBatch holds B rows of fixed shape. Each row packs several documents (text, images to
understand, images to generate or edit) into one token sequence. Rows are **expert-major**:
tokens `[0, num_und)` belong to the understanding expert (text and ViT tokens, and the
start/end markers of every image), tokens `[num_und, L)` to the generation expert (VAE latent
tokens). Each expert's weights therefore apply to one static slice. Because the attention mask
is computed from per-token metadata (see `kernels/mask.py`), the physical order of tokens in a
row is free; `order` gives the logical (causal) order.

Per-token fields, shape [B, L] with L = num_und + num_gen (padding value in brackets):
  modality      int32  PAD=0, TEXT=1, VIT=2, VAE=3 [PAD]. Image markers are TEXT.
  doc_id        int32  document of the token within its row, 1..; 0 = padding [0].
  order         int32  causal order inside the row: the index the token would have in a plain
                       left-to-right sequence; unique among the row's non-padding tokens [0].
  split_id      int32  bidirectional span (one image with its markers, or a group of video
                       frames); unique within the row; -1 = causal text [-1].
  noisy         bool   the token belongs to a noisy span (an image being generated at flow time
                       t > 0, markers included): invisible to every token outside the span [False].
  position      int32  RoPE position: text counts up; all tokens of an image (markers included)
                       share one position and the counter then moves by one (by the frame-index
                       delta for grouped video frames); a noisy image does not advance it, so its
                       clean copy that follows shares its position; a condition dropped for
                       guidance leaves its position unused. Non-decreasing in causal order [0].
  text_ids      int32  input token id of TEXT tokens [0].
  text_targets  int32  next-token target id [0].
  text_weight   f32    cross-entropy weight of the target; 0 = no loss [0].
  flow_weight   f32    flow-matching (velocity MSE) weight of a noisy VAE token; 0 = none [0].
  payload_index int32  VIT: index of the token's patch in `vit_patches[b]`; VAE: index of the
                       token in the row's flattened latent-token grid,
                       `image * gh * gw + r * gw + c` with (gh, gw) = `latent_grid`
                       (the grid of the largest VAE image); -1 otherwise [-1].
  patch_pos     int32  2D position id `r * max_side + c` of a VIT or VAE token inside its image
                       (max_side: the ViT's `max_grid` / the model's `max_latent_size`) [0].
  dataset_id    int32  optional (None: every document is dataset 0, e.g. test and inference
                       batches): the dataset the token's document came from, its index in the
                       sorted names of `config.data.datasets` (of `eval_datasets` in eval
                       batches); one value per document, below `config.data.max_datasets`
                       (a static bound, so a new mixture does not recompile) [-1].

Image payloads:
  vit_patches   u8|f32 [B, P, p*p*3]  ViT patches, each flattened in (row-in-patch,
                                   col-in-patch, channel) order [0].
  vit_patch_rc  int32 [B, P, 2]    (row, col) of the patch in its image's patch grid [0].
  vit_grid_hw   int32 [B, P, 2]    patch grid (h, w) of the patch's image [0].
  vit_image_id  int32 [B, P]       NaViT image id, 1.. per row (patches of one image attend only
                                   to each other); 0 = padding [0].
  vae_images    u8|f32 [B, N, H, W, 3] images for the VAE side, top-left aligned in the
                                   H x W canvas [0]; the model reads only each image's
                                   `vae_grid_hw` area and sees the rest as 0 in [-1, 1] (BAGEL
                                   pads normalised images with zeros).
  vae_grid_hw   int32 [B, N, 2]    latent-token grid (h, w) of each image; (0, 0) = empty slot.
  vae_timestep  f32 [B, N]         flow time t in [0, 1] of each image before any shift;
                                   0 = clean (conditioning) image [0].

Pixel dtype of `vit_patches` and `vae_images` (each field on its own): uint8, raw pixels
0..255, which is 4x less to move from host to device than float and is what the data pipeline
emits; or float32, already in [-1, 1] (test and notebook batches). The model maps both with
`normalize_pixels` (x / 127.5 - 1 for uint8), so data and model share one formula.

Static (pytree metadata): `num_und`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import struct

PAD, TEXT, VIT, VAE = 0, 1, 2, 3
MODALITY_NAMES = {PAD: "pad", TEXT: "text", VIT: "vit", VAE: "vae"}

TOKEN_FIELDS = ("modality", "doc_id", "order", "split_id", "noisy", "position", "text_ids",
                "text_targets", "text_weight", "flow_weight", "payload_index", "patch_pos")
TOKEN_PAD_VALUES = {"split_id": -1, "payload_index": -1}
DATASET_PAD = -1  # `dataset_id` of padding tokens


@struct.dataclass
class PackedBatch:
    """Fixed-shape packed rows; the module docstring is the field-by-field spec."""

    modality: np.ndarray
    doc_id: np.ndarray
    order: np.ndarray
    split_id: np.ndarray
    noisy: np.ndarray
    position: np.ndarray
    text_ids: np.ndarray
    text_targets: np.ndarray
    text_weight: np.ndarray
    flow_weight: np.ndarray
    payload_index: np.ndarray
    patch_pos: np.ndarray
    vit_patches: np.ndarray
    vit_patch_rc: np.ndarray
    vit_grid_hw: np.ndarray
    vit_image_id: np.ndarray
    vae_images: np.ndarray
    vae_grid_hw: np.ndarray
    vae_timestep: np.ndarray
    # Optional so that every batch built without a mixture (tests, inference) stays valid.
    dataset_id: np.ndarray | None = None
    num_und: int = struct.field(pytree_node=False, default=0)

    @property
    def batch_size(self) -> int:
        return self.modality.shape[0]

    @property
    def length(self) -> int:
        return self.modality.shape[1]

    @property
    def num_gen(self) -> int:
        return self.length - self.num_und

    def dataset_index(self) -> Any:
        """[B, L] int32 dataset of each token: `dataset_id`, or without one 0 on every real
        token; DATASET_PAD (-1) on padding. Numpy or jax, like the batch (traceable)."""
        if self.dataset_id is not None:
            return self.dataset_id
        return (self.doc_id > 0).astype(np.int32) + DATASET_PAD

    def token_meta(self) -> TokenMeta:
        """The metadata the attention mask is computed from."""
        return TokenMeta(doc_id=self.doc_id, order=self.order, split_id=self.split_id,
                         noisy=self.noisy)


@struct.dataclass
class TokenMeta:
    """Per-token attention metadata, each [B, L] (see `kernels/mask.py` for the rule)."""

    doc_id: np.ndarray
    order: np.ndarray
    split_id: np.ndarray
    noisy: np.ndarray


_DTYPES = {
    "modality": np.int32, "doc_id": np.int32, "order": np.int32, "split_id": np.int32,
    "noisy": np.bool_, "position": np.int32, "text_ids": np.int32, "text_targets": np.int32,
    "text_weight": np.float32, "flow_weight": np.float32, "payload_index": np.int32,
    "patch_pos": np.int32, "vit_patches": np.float32, "vit_patch_rc": np.int32,
    "vit_grid_hw": np.int32, "vit_image_id": np.int32, "vae_images": np.float32,
    "vae_grid_hw": np.int32, "vae_timestep": np.float32,
}
# Pixel payloads: raw uint8 pixels or float32 in [-1, 1] (`_DTYPES` holds the float default).
PIXEL_FIELDS = ("vit_patches", "vae_images")
PIXEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


def normalize_pixels(x: Any) -> Any:
    """Pixel payload -> float32 in [-1, 1], for numpy and jax arrays alike.

    uint8 pixels in [0, 255] map to x / 127.5 - 1 (BAGEL's Normalize(0.5, 0.5): 0 -> -1,
    255 -> 1); float pixels are taken as already in [-1, 1] and only cast to float32. The
    result keeps the input's shape and array type (numpy in, numpy out; jax in, jax out).
    """
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.dtype == np.uint8:
        # Written as (x - 127.5) * (1 / 127.5): the subtraction is exact, so one rounding
        # remains and numpy, eager jax and any XLA fusion agree bit for bit (XLA turns a
        # division by a constant into a multiply and may fuse multiply-subtract into an FMA).
        return (x.astype(np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)
    return x.astype(np.float32)


FILL_KEYS = ("fill_und", "fill_gen", "fill_vit", "fill_vae_slots", "fill_vae_area")


def slice_fill(batch: PackedBatch, latent_grid: tuple[int, int]) -> dict[str, Any]:
    """How full a batch's per-row budgets are: fractions in [0, 1] over all of its rows.

    Args:
      batch: numpy or jax (traceable: only array methods are used).
      latent_grid: (gh, gw) latent tokens of the VAE canvas (`packing.PackSpec.latent_grid`).

    Returns:
      {"fill_und", "fill_gen": real tokens (doc_id > 0) over the und / gen slice capacity,
       "fill_vit": ViT patch slots with vit_image_id > 0 over all patch slots,
       "fill_vae_slots": VAE image slots with a non-empty vae_grid_hw over all slots,
       "fill_vae_area": the VAE images' latent area (= pixel area / cell^2) over the canvas
       area of all slots, N * gh * gw per row}; a budget of size 0 reads 0.
    """
    frac = lambda count, size: count / max(int(size), 1)
    live = batch.doc_id > 0
    und, gen = live[:, :batch.num_und], live[:, batch.num_und:]
    area = batch.vae_grid_hw[..., 0] * batch.vae_grid_hw[..., 1]
    gh, gw = latent_grid
    return {"fill_und": frac(und.sum(), und.size), "fill_gen": frac(gen.sum(), gen.size),
            "fill_vit": frac((batch.vit_image_id > 0).sum(), batch.vit_image_id.size),
            "fill_vae_slots": frac((area > 0).sum(), area.size),
            "fill_vae_area": frac(area.sum(), area.size * gh * gw)}


class BatchError(ValueError):
    """Inconsistent PackedBatch metadata; the message names the field, row and token."""


def validate(batch: PackedBatch, latent_tokens_per_image: int | None = None,
             max_datasets: int | None = None) -> None:
    """Checks shapes, dtypes and metadata consistency of a (host, numpy) PackedBatch.

    Args:
      batch: the batch to check.
      latent_tokens_per_image: gh * gw of the latent grid, to range-check VAE payload indices.
      max_datasets: `config.data.max_datasets`, to range-check `dataset_id`.

    Raises:
      BatchError: naming the field, the row and the token that break the contract.
    """
    b = {name: np.asarray(getattr(batch, name)) for name in _DTYPES}
    bsz, length = b["modality"].shape
    for name, dtype in _DTYPES.items():
        if name in PIXEL_FIELDS:
            if b[name].dtype not in PIXEL_DTYPES:
                raise BatchError(f"{name}: dtype {b[name].dtype}, expected uint8 (pixels 0..255)"
                                 f" or float32 (in [-1, 1])")
        elif b[name].dtype != dtype:
            raise BatchError(f"{name}: dtype {b[name].dtype}, expected {np.dtype(dtype)}")
        if name in TOKEN_FIELDS and b[name].shape != (bsz, length):
            raise BatchError(f"{name}: shape {b[name].shape}, expected {(bsz, length)}")
    if not 0 <= batch.num_und <= length:
        raise BatchError(f"num_und={batch.num_und} outside [0, {length}]")
    p = b["vit_patches"].shape[1]
    if b["vit_patch_rc"].shape != (bsz, p, 2) or b["vit_grid_hw"].shape != (bsz, p, 2) or \
            b["vit_image_id"].shape != (bsz, p):
        raise BatchError(f"vit_*: shapes {b['vit_patch_rc'].shape}, {b['vit_grid_hw'].shape}, "
                         f"{b['vit_image_id'].shape} disagree with vit_patches {(bsz, p)}")
    n = b["vae_images"].shape[1]
    if b["vae_grid_hw"].shape != (bsz, n, 2) or b["vae_timestep"].shape != (bsz, n):
        raise BatchError(f"vae_grid_hw {b['vae_grid_hw'].shape} / vae_timestep "
                         f"{b['vae_timestep'].shape} disagree with vae_images {(bsz, n)}")

    mod = b["modality"]

    def fail(field, row, idx, why):
        raise BatchError(f"{field}[{row}, {idx}]: {why}")

    def first_bad(mask):
        rows, cols = np.nonzero(mask)
        return rows[0], cols[0]

    checks = [
        ("modality", (mod < PAD) | (mod > VAE), "unknown modality"),
        ("doc_id", (mod == PAD) != (b["doc_id"] == 0), "doc_id must be 0 exactly on padding"),
        ("modality", (np.arange(length)[None] >= batch.num_und) & ((mod == TEXT) | (mod == VIT)),
         "text/ViT token in the gen-expert slice"),
        ("modality", (np.arange(length)[None] < batch.num_und) & (mod == VAE),
         "VAE token in the und-expert slice"),
        ("noisy", b["noisy"] & (b["split_id"] < 0), "noisy token outside a bidirectional span"),
        ("text_weight", (b["text_weight"] != 0) & (mod != TEXT), "CE weight on a non-text token"),
        ("flow_weight", (b["flow_weight"] != 0) & ~((mod == VAE) & b["noisy"]),
         "flow weight on a token that is not a noisy VAE latent"),
        ("payload_index", ((mod == VIT) | (mod == VAE)) != (b["payload_index"] >= 0),
         "payload index must be set exactly on ViT and VAE tokens"),
        ("payload_index", (mod == VIT) & (b["payload_index"] >= p), f"beyond {p} ViT patches"),
        ("split_id", ((mod == VIT) | (mod == VAE)) & (b["split_id"] < 0),
         "image token outside a bidirectional span"),
    ]
    if batch.dataset_id is not None:
        checks += _dataset_checks(batch, mod, max_datasets)
    if latent_tokens_per_image is not None:
        checks.append(("payload_index",
                       (mod == VAE) & (b["payload_index"] >= n * latent_tokens_per_image),
                       f"beyond {n} x {latent_tokens_per_image} latent tokens"))
    for field, bad, why in checks:
        if bad.any():
            fail(field, *first_bad(bad), why)

    if batch.dataset_id is not None:
        b["dataset_id"] = np.asarray(batch.dataset_id)
    for row in range(bsz):
        _validate_row(b, row, fail)


def _dataset_checks(batch: PackedBatch, mod: np.ndarray, max_datasets: int | None) -> list:
    """(field, bad mask, why) of `dataset_id`; its dtype and shape are checked at once."""
    ds = np.asarray(batch.dataset_id)
    if ds.dtype != np.int32:
        raise BatchError(f"dataset_id: dtype {ds.dtype}, expected int32")
    if ds.shape != mod.shape:
        raise BatchError(f"dataset_id: shape {ds.shape}, expected {mod.shape}")
    checks = [("dataset_id", (mod == PAD) & (ds != DATASET_PAD),
               f"padding must have dataset_id {DATASET_PAD}"),
              ("dataset_id", (mod != PAD) & (ds < 0), "negative dataset index on a real token")]
    if max_datasets is not None:
        checks.append(("dataset_id", ds >= max_datasets,
                       f"dataset index beyond max_datasets={max_datasets}"))
    return checks


def _validate_row(b, row, fail) -> None:
    live = b["doc_id"][row] > 0
    order = b["order"][row][live]
    idx = np.nonzero(live)[0]
    if len(np.unique(order)) != len(order):
        values, counts = np.unique(order, return_counts=True)
        dup = values[counts > 1][0]
        fail("order", row, idx[np.nonzero(order == dup)[0][1]], f"order {dup} repeats")
    ranked = idx[np.argsort(order, kind="stable")]
    doc = b["doc_id"][row][ranked]
    if len(doc) and np.count_nonzero(np.diff(doc)) + 1 != len(np.unique(doc)):
        fail("doc_id", row, ranked[0], "documents must be contiguous in causal order")
    for d in np.unique(doc):
        in_doc = ranked[doc == d]
        if "dataset_id" in b and len(np.unique(b["dataset_id"][row][in_doc])) != 1:
            fail("dataset_id", row, in_doc[0], f"document {d} mixes datasets")
        pos = b["position"][row][in_doc]
        if np.any(np.diff(pos) < 0):
            k = in_doc[1:][np.diff(pos) < 0][0]
            fail("position", row, k, f"RoPE position decreases inside document {d}")
    split = b["split_id"][row][ranked]
    for s in np.unique(split[split >= 0]):
        members = np.nonzero(split == s)[0]
        toks = ranked[members]
        if members[-1] - members[0] + 1 != len(members):
            fail("split_id", row, toks[0], f"span {s} is not contiguous in causal order")
        if len(np.unique(b["doc_id"][row][toks])) != 1:
            fail("split_id", row, toks[0], f"span {s} crosses documents")
        if len(np.unique(b["noisy"][row][toks])) != 1:
            fail("noisy", row, toks[0], f"span {s} is partly noisy")
