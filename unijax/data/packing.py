"""Packing: sequence plans -> fixed-shape, expert-major PackedBatch rows.

Each row has four budgets, all from the config (`PackSpec`, in data/pack_spec.py): und tokens
(text, ViT tokens and every image marker; `config.data.und_capacity`), gen tokens (VAE
latents; `gen_capacity`), ViT patch slots (`max_vit_patches`) and VAE image slots
(`max_vae_images`). Documents are placed whole, first-fit over the rows of a batch; a
document that does not fit an empty row is truncated at a safe boundary (text may be cut
between tokens, an image or a video group is kept whole or not at all) or dropped, by
`config.data.overlong`. A truncated document must keep some loss, or it
is dropped too. A document that fits no open row waits in a look-ahead buffer of up to
`config.data.pack_buffer` documents while later ones fill the batch (`RowPacker`).

The token layout is `unijax.batch_builder`'s (BAGEL's): text is `<|im_start|> ids <|im_end|>`,
causal, positions counting up, each token predicting the next when the text has loss (CE
weight 1 per target, or 1/sqrt(targets) when `length_weighted`); an image is
`<|vision_start|> tokens <|vision_end|>`, one bidirectional span (a video group: several such
images in one span) whose tokens share one RoPE position, after which the position moves by
the item's step (0 for a noisy image, the frame-index delta inside a video clip). Positions of
images dropped for CFG stay unused (an item's `gap`). Markers and ViT tokens fill the und
slice, VAE latents the gen slice. Layout is vectorised per item, not per token.

Every token also carries its document's dataset (`dataset_id`: the index of `DocKey.dataset`
in the sorted names of `config.data.datasets`, `PackSpec.datasets`), for per-dataset metrics.

Pixels stay uint8 from decode to device: plans carry the resized uint8 pixels and the rows'
`vit_patches` / `vae_images` are uint8 copies of them (the model normalises with
`batch.normalize_pixels`), a quarter of the float bytes per step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unijax import batch as batch_lib
from unijax.data import images as images_lib
from unijax.data.pack_spec import (  # noqa: F401  (the packer's spec, re-exported)
    DEFAULT_MAX_DATASETS,
    DEFAULT_PACK_BUFFER,
    OVERLONG_MODES,
    PackSpec,
    dataset_names,
)
from unijax.data.plan import ImageItem, SequencePlan, TextItem


def _units(items) -> list[list]:
    """Items grouped into indivisible units: a text item, an image, or a video group."""
    units: list[list] = []
    for item in items:
        grouped = isinstance(item, ImageItem) and item.group >= 0
        if grouped and units and isinstance(units[-1][-1], ImageItem) and \
                units[-1][-1].group == item.group:
            units[-1].append(item)
        else:
            units.append([item])
    return units


def fit_document(plan: SequencePlan, spec: PackSpec) -> tuple[SequencePlan | None, str]:
    """Makes a document fit an empty row.

    Returns:
      (plan, status): status is "ok" (unchanged), "truncated" (a shorter plan), or
      "too_long" / "no_loss" with plan None (the document must be dropped).
    """
    cap = spec.capacity
    if np.all(np.array(plan.cost()) <= cap):
        return plan, "ok"
    if spec.overlong == "drop":
        return None, "too_long"
    kept: list = []
    used = np.zeros(4, np.int64)
    for unit in _units(plan.items):
        cost = np.array(SequencePlan(unit, plan.key).cost())
        if np.all(used + cost <= cap):
            kept.extend(unit)
            used += cost
            continue
        item = unit[0]
        room = cap[0] - used[0] - 1  # ids that fit after <|im_start|>, no <|im_end|>
        if isinstance(item, TextItem) and room > 0:
            kept.append(dataclasses.replace(item, ids=item.ids[:room], closed=False))
        break
    short = SequencePlan(kept, plan.key)
    if not kept or not short.has_loss:
        return None, "too_long"
    return short, "truncated"


@dataclasses.dataclass
class Pending:
    """A document ready for a row: its fitted plan, the `fit_document` status ("ok" or
    "truncated"), and `ref`, where the pipeline can read it again (its stream index)."""

    plan: SequencePlan
    status: str = "ok"
    ref: int = -1


class RowPacker:
    """First-fit of documents into `batch_size` rows, with a bounded look-ahead buffer.

    A document goes to the first row with room in all four budgets. One that fits no row of the
    open batch is held back, up to `spec.pack_buffer` documents (BAGEL's `max_buffer_size`),
    and later documents keep filling the batch; the batch is complete when a document fits no
    row while the buffer is full; that document is held too (so between batches the buffer
    holds up to `pack_buffer + 1`). The next batch is filled from the buffer first, oldest
    first. The oldest held document always fits an empty batch, so a document is held for at
    most `pack_buffer + 1` batches. With `pack_buffer = 0` this is plain first-fit that
    completes a batch as soon as one document does not fit. Everything is deterministic.
    """

    def __init__(self, spec: PackSpec, batch_size: int):
        self.spec, self.batch_size = spec, batch_size
        self.reset()

    def reset(self) -> None:
        """Empties every row and the buffer."""
        self.held: list[Pending] = []
        self._clear_rows()

    def _clear_rows(self) -> None:
        self.rows: list[list[SequencePlan]] = [[] for _ in range(self.batch_size)]
        self.used = np.zeros((self.batch_size, 4), np.int64)
        self.truncated = 0  # truncated documents in the open batch

    @property
    def empty(self) -> bool:
        """Whether the open batch has no document (the buffer may still hold some)."""
        return not any(self.rows)

    def _place(self, doc: Pending) -> bool:
        cost = np.array(doc.plan.cost())
        fits = np.all(self.used + cost <= self.spec.capacity, axis=1)
        if not fits.any():
            return False
        r = int(np.argmax(fits))
        self.rows[r].append(doc.plan)
        self.used[r] += cost
        self.truncated += doc.status == "truncated"
        return True

    def refill(self) -> None:
        """Places held documents into the open batch, oldest first; the rest stay held."""
        self.held = [doc for doc in self.held if not self._place(doc)]

    def offer(self, doc: Pending) -> bool:
        """Places a document (that fits an empty row) or holds it back.

        Returns:
          True when the open batch is complete: the document fit no row and the buffer
          already held `spec.pack_buffer` documents (the document is held all the same).
        """
        if self._place(doc):
            return False
        self.held.append(doc)
        return len(self.held) > self.spec.pack_buffer

    def take(self) -> tuple[list[list[SequencePlan]], int]:
        """Returns (per row its documents, how many of them are truncated) and empties the
        rows; held documents stay for `refill`."""
        rows, truncated = self.rows, self.truncated
        self._clear_rows()
        return rows, truncated

    def emit(self) -> tuple[dict[str, np.ndarray], list[list]]:
        """Lays the rows out; returns (arrays, docs) and empties the rows.

        `docs[r]` lists the `DocKey`s of row r as tuples, in document-id order.
        """
        rows, _ = self.take()
        return layout(rows, self.spec), document_keys(rows)


def document_keys(rows: list[list[SequencePlan]]) -> list[list[tuple]]:
    """Per row, the (dataset, path, index, record id) of its documents in document-id order."""
    return [[dataclasses.astuple(p.key) for p in row] for row in rows]


def empty_arrays(batch_size: int, spec: PackSpec) -> dict[str, np.ndarray]:
    """All-padding arrays of a batch (the PackedBatch fields, num_und excluded)."""
    length = spec.num_und + spec.num_gen
    out = {name: np.full((batch_size, length), batch_lib.TOKEN_PAD_VALUES.get(name, 0),
                         dtype=batch_lib._DTYPES[name]) for name in batch_lib.TOKEN_FIELDS}
    out["dataset_id"] = np.full((batch_size, length), batch_lib.DATASET_PAD, np.int32)
    gh, gw = spec.latent_grid
    b, p, n = batch_size, spec.max_vit_patches, spec.max_vae_images
    out.update(
        vit_patches=np.zeros((b, p, spec.vit_patch * spec.vit_patch * 3), np.uint8),
        vit_patch_rc=np.zeros((b, p, 2), np.int32),
        vit_grid_hw=np.zeros((b, p, 2), np.int32),
        vit_image_id=np.zeros((b, p), np.int32),
        vae_images=np.zeros((b, n, gh * spec.latent_cell, gw * spec.latent_cell, 3), np.uint8),
        vae_grid_hw=np.zeros((b, n, 2), np.int32),
        vae_timestep=np.zeros((b, n), np.float32),
    )
    return out


def _uint8_pixels(item: ImageItem) -> np.ndarray:
    """The item's pixels, which rows copy as they are (uint8, never re-quantised here).

    Raises:
      ValueError: for pixels of another dtype (e.g. float in [-1, 1]): a packed row holds raw
        uint8 pixels only; build float batches with `unijax.batch_builder`.
    """
    if item.pixels.dtype != np.uint8:
        raise ValueError(f"ImageItem({item.kind!r}, grid={item.grid}).pixels: dtype "
                         f"{item.pixels.dtype}, packing needs uint8 pixels in [0, 255]")
    return item.pixels


class _RowWriter:
    """Writes one row's documents into the batch arrays."""

    def __init__(self, out: dict[str, np.ndarray], row: int, spec: PackSpec):
        self.out, self.r, self.spec = out, row, spec
        self.und, self.gen, self.order, self.split = 0, spec.num_und, 0, 0
        self.vit, self.vit_img, self.vae, self.dataset = 0, 0, 0, 0

    def _put(self, lo: int, n: int, **fields) -> None:
        sl = slice(lo, lo + n)
        self.out["order"][self.r, sl] = np.arange(self.order, self.order + n)
        self.out["dataset_id"][self.r, sl] = self.dataset
        self.order += n
        for name, value in fields.items():
            self.out[name][self.r, sl] = value

    def text(self, item: TextItem, doc: int, pos: int) -> int:
        sp = self.spec.special
        tail = [sp.im_end] if item.closed else []
        ids = np.concatenate([[sp.im_start], item.ids, tail]).astype(np.int32)
        n = len(ids)
        targets = np.zeros(n, np.int32)
        weight = np.zeros(n, np.float32)
        if item.loss:
            # BAGEL's len2weight('square') over the n - 1 tokens that predict one.
            targets[:-1] = ids[1:]
            weight[:-1] = 1.0 / np.sqrt(n - 1) if item.length_weighted else 1.0
        self._put(self.und, n, modality=batch_lib.TEXT, doc_id=doc,
                  position=np.arange(pos, pos + n), text_ids=ids, text_targets=targets,
                  text_weight=weight)
        self.und += n
        return pos + n

    def image(self, item: ImageItem, doc: int, pos: int, split: int) -> int:
        sp, out, r = self.spec.special, self.out, self.r
        span = dict(doc_id=doc, position=pos, split_id=split, noisy=item.noisy)
        self._put(self.und, 1, modality=batch_lib.TEXT, text_ids=sp.vision_start, **span)
        self.und += 1
        h, w = item.grid
        n = h * w
        rows, cols = np.divmod(np.arange(n), w)
        if item.kind == "vit":
            lo = self.vit
            self.vit += n
            self.vit_img += 1
            out["vit_patches"][r, lo:lo + n] = images_lib.patchify(_uint8_pixels(item),
                                                                   self.spec.vit_patch)
            out["vit_patch_rc"][r, lo:lo + n] = np.stack([rows, cols], -1)
            out["vit_grid_hw"][r, lo:lo + n] = (h, w)
            out["vit_image_id"][r, lo:lo + n] = self.vit_img
            self._put(self.und, n, modality=batch_lib.VIT, payload_index=np.arange(lo, lo + n),
                      patch_pos=rows * self.spec.vit_max_grid + cols, **span)
            self.und += n
        else:
            slot = self.vae
            self.vae += 1
            gh, gw = self.spec.latent_grid
            ph, pw = item.pixels.shape[:2]
            out["vae_images"][r, slot, :ph, :pw] = _uint8_pixels(item)
            out["vae_grid_hw"][r, slot] = (h, w)
            out["vae_timestep"][r, slot] = item.t if item.noisy else 0.0
            self._put(self.gen, n, modality=batch_lib.VAE,
                      payload_index=slot * gh * gw + rows * gw + cols,
                      patch_pos=rows * self.spec.max_latent_size + cols,
                      flow_weight=float(item.noisy), **span)
            self.gen += n
        self._put(self.und, 1, modality=batch_lib.TEXT, text_ids=sp.vision_end, **span)
        self.und += 1
        return pos + item.step

    def document(self, plan: SequencePlan, doc: int) -> None:
        pos, group = 0, None
        self.dataset = self.spec.dataset_index(plan.key.dataset)
        for item in plan.items:
            pos += item.gap  # positions of images dropped for CFG stay unused
            if isinstance(item, TextItem):
                pos, group = self.text(item, doc, pos), None
                continue
            if item.group < 0 or item.group != group:
                self.split += 1
            group = item.group if item.group >= 0 else None
            pos = self.image(item, doc, pos, self.split - 1)


def layout(rows: list[list[SequencePlan]], spec: PackSpec) -> dict[str, np.ndarray]:
    """Lays rows of documents out as PackedBatch arrays (documents numbered 1.. per row).

    Raises:
      ValueError: when a row exceeds a budget of `spec`.
    """
    out = empty_arrays(len(rows), spec)
    for r, docs in enumerate(rows):
        total = np.sum([p.cost() for p in docs], axis=0) if docs else np.zeros(4)
        if np.any(total > spec.capacity):
            raise ValueError(f"row {r}: cost (und, gen, vit, vae) = {tuple(total)} exceeds "
                             f"the row capacity {tuple(spec.capacity)}")
        writer = _RowWriter(out, r, spec)
        for d, plan in enumerate(docs, start=1):
            writer.document(plan, d)
    return out


def to_packed_batch(arrays: dict[str, np.ndarray], spec: PackSpec) -> batch_lib.PackedBatch:
    """Wraps layout arrays as a PackedBatch."""
    return batch_lib.PackedBatch(**arrays, num_und=spec.num_und)


def pack(plans, spec: PackSpec, batch_size: int):
    """Packs a finite stream of plans into PackedBatches (`RowPacker`; the last one padded).

    Returns:
      (batches, docs, dropped): the PackedBatches, per batch the DocKey tuples of each row,
      and the (DocKey, status) of documents that could not be packed.
    """
    packer = RowPacker(spec, batch_size)
    batches, docs, dropped = [], [], []

    def flush():
        arrays, row_docs = packer.emit()
        batches.append(to_packed_batch(arrays, spec))
        docs.append(row_docs)
        packer.refill()

    for original in plans:
        plan, status = fit_document(original, spec)
        if plan is None:
            dropped.append((original.key, status))
            continue
        if packer.offer(Pending(plan, status)):
            flush()
    while not packer.empty:  # the open batch, then what the buffer still holds
        flush()
    return batches, docs, dropped
