"""Layouts aimed at the tile classifier (`kernels/block_sparsity.classify`), fixed and random.

A row is a list of `Span`s in causal order; each span gets consecutive causal orders from one
row-wide counter (so orders are unique in the row, as the PackedBatch contract says), an image
span gets its own split (spans of one video frame group share one), and a "noisy" span is
noisy throughout. Spans are then placed physically: in causal order, expert-major (und kinds in
[0, num_und), gen kinds after, each slice padded at its end, as the batch builder does), or in
any permutation of the spans. Unlike `layouts.py` this places documents, images and padding at
chosen offsets, so a tile can be made to hold exactly the case one term of the FULL or EMPTY
rule decides.

`tile_terms` recomputes, in numpy and per tile, each term of `classify`'s rules from min/max
summaries; it is not an oracle (the dense mask is) but a way to measure which branches a set
of layouts reaches: for each term, the tiles where it alone stands between `classify` and a
wrong answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from einops import rearrange
from hypothesis import strategies as st

from unijax.batch import TokenMeta

UND_KINDS = ("text", "vit", "pad")
GEN_KINDS = ("vae", "noisy")


@dataclasses.dataclass(frozen=True)
class Span:
    """`n` tokens of one kind ("text", "vit", "vae", "noisy" or "pad") in document `doc`;
    image spans of one kind with the same non-negative `group` in one document share a split
    (the frames of a video clip)."""

    kind: str
    n: int
    doc: int = 1
    group: int = -1


def row_arrays(spans, length: int, num_und: int | None = None, arrange=None) -> dict:
    """One row's metadata [length] each, spans given in causal order.

    Args:
      spans: the row's `Span`s in causal order ("pad" spans take no order).
      length: tokens in the row (the rest is padding; spans that overflow are an error).
      num_und: expert-major placement with this und capacity (None: no expert split).
      arrange: physical order of the spans as a permutation of their indices (None: causal
        order); ignored when num_und is given.
    """
    doc = np.zeros(length, np.int32)
    order = np.zeros(length, np.int32)
    split = np.full(length, -1, np.int32)
    noisy = np.zeros(length, bool)
    # Causal orders and splits, in causal order.
    spans = list(spans)
    first_order, split_of, t, s, groups = [], [], 0, 0, {}
    for span in spans:
        first_order.append(t)
        if span.kind != "pad":
            t += span.n
        if span.kind in ("text", "pad"):
            split_of.append(-1)
        elif span.group >= 0 and (span.doc, span.group, span.kind) in groups:
            split_of.append(groups[(span.doc, span.group, span.kind)])
        else:
            split_of.append(s)
            groups[(span.doc, span.group, span.kind)] = s
            s += 1
    # Physical offsets.
    if num_und is not None:
        cursor = {"und": 0, "gen": num_und}
        offsets = []
        for span in spans:
            side = "und" if span.kind in UND_KINDS else "gen"
            offsets.append(cursor[side])
            cursor[side] += span.n
        if cursor["und"] > num_und or cursor["gen"] > length:
            raise ValueError(f"spans overflow the row: und {cursor['und']} > {num_und} or "
                             f"gen {cursor['gen']} > {length}")
    else:
        place = list(range(len(spans))) if arrange is None else list(arrange)
        offsets = [0] * len(spans)
        cursor = 0
        for i in place:
            offsets[i] = cursor
            cursor += spans[i].n
        if cursor > length:
            raise ValueError(f"spans of {cursor} tokens overflow the row of {length}")
    for span, lo, o, sp in zip(spans, offsets, first_order, split_of):
        if span.kind == "pad":
            continue
        sl = slice(lo, lo + span.n)
        doc[sl], order[sl], split[sl] = span.doc, np.arange(o, o + span.n), sp
        noisy[sl] = span.kind == "noisy"
    return dict(doc_id=doc, order=order, split_id=split, noisy=noisy)


def meta_from_rows(rows: list[dict]) -> TokenMeta:
    """Stacks `row_arrays` dicts into a numpy TokenMeta [B, L]."""
    return TokenMeta(*(np.stack([r[name] for r in rows])
                       for name in ("doc_id", "order", "split_id", "noisy")))


# ------------------------------------------------------------------------------------------
# Fixed layouts: one per case the classifier distinguishes (L = 64, two rows each).
# ------------------------------------------------------------------------------------------

LENGTH = 64
TILE_SIZES = [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (4, 8), (8, 4), (16, 8), (8, 16),
              (16, 32), (32, 16), (64, 64)]


def _row(spans, num_und=None, arrange=None):
    return row_arrays(spans, LENGTH, num_und, arrange)


def fixed_layouts() -> dict[str, TokenMeta]:
    """Named two-row layouts of 64 tokens, each built to reach one branch of `classify`."""
    S = Span
    layouts = {}
    # Fully live tiles of one document: causal text (FULL below the diagonal) and one image
    # filling aligned tiles (FULL by the split), then a long image that straddles tile edges.
    layouts["one_document"] = meta_from_rows([
        _row([S("text", 64)]),
        _row([S("text", 16), S("vit", 32), S("text", 16)]),
    ])
    # BAGEL's generated image: a noisy image and its clean copy in one gen-side tile, text
    # after them (it may see the clean copy, never the noisy latents), then more images.
    layouts["noisy_and_clean_copy_then_text"] = meta_from_rows([
        _row([S("text", 16), S("vae", 8), S("noisy", 8), S("vae", 8), S("text", 24)],
             num_und=40),
        _row([S("text", 5), S("noisy", 4), S("vae", 4), S("text", 11), S("vit", 8),
              S("text", 16), S("noisy", 4), S("vae", 4)], num_und=40),
    ])
    # An edit: clean source (VAE + ViT), instruction, noisy target; the target's tile also
    # holds a clean image the instruction may see.
    layouts["edit_then_generate"] = meta_from_rows([
        _row([S("vae", 8), S("vit", 8), S("text", 8), S("noisy", 8), S("vae", 8),
              S("text", 8), S("noisy", 16)], num_und=24),
        _row([S("vit", 4), S("vae", 4), S("text", 4), S("noisy", 12), S("text", 12),
              S("vae", 12), S("text", 16)], num_und=36),
    ])
    # Documents and images straddling tile edges (sizes 3, 5, 7, 9, 13 against tiles of 2..32).
    layouts["straddling_documents"] = meta_from_rows([
        _row([S("text", 3, 1), S("vit", 5, 1), S("text", 7, 1), S("text", 9, 2),
              S("vit", 13, 2), S("text", 5, 2), S("text", 13, 3), S("vit", 9, 3)]),
        _row([S("text", 7, 1), S("vae", 9, 1), S("text", 5, 1), S("vit", 3, 2),
              S("text", 13, 2), S("noisy", 7, 2), S("vae", 7, 2), S("text", 12, 3)],
             num_und=40),
    ])
    # Video frame groups: frames of one clip share a split (bidirectional across frames), one
    # noisy clip; text before and after.
    layouts["video_frame_groups"] = meta_from_rows([
        _row([S("text", 8), S("vae", 8, group=0), S("vae", 8, group=0), S("vae", 8, group=0),
              S("text", 8), S("noisy", 8, group=1), S("noisy", 8, group=1), S("text", 8)]),
        _row([S("text", 6), S("noisy", 6, group=0), S("noisy", 6, group=0), S("vae", 6, group=1),
              S("vae", 6, group=1), S("text", 10), S("vit", 8), S("text", 8)], num_und=32),
    ])
    # Padding: partly padded key tiles before fully live query tiles (expert-major rows pad
    # the und slice before the gen slice starts; padding inside a row) and an all-padding
    # tail (an all-padding row: `kernel_checks.check_fully_masked_rows`).
    layouts["padding"] = meta_from_rows([
        _row([S("text", 12), S("vae", 16)], num_und=16),
        _row([S("text", 10), S("pad", 6), S("vit", 8), S("text", 12)]),
    ])
    # Documents interleaved in causal order and placed out of order: a query block of one
    # document that follows a key block holding two documents, keys of another document in
    # the same tile, orders decreasing along the row.
    layouts["interleaved_documents"] = meta_from_rows([
        _row([S("text", 4, 1), S("text", 4, 2), S("text", 8, 1), S("text", 8, 2),
              S("vit", 8, 1), S("text", 16, 1), S("text", 16, 2)]),
        _row([S("text", 8, 1), S("text", 8, 2), S("vae", 8, 1), S("noisy", 8, 2),
              S("text", 8, 2), S("text", 8, 1), S("vit", 8, 2), S("text", 8, 1)],
             arrange=[7, 6, 5, 4, 3, 2, 1, 0]),
    ])
    # Images whose tiles hold other images: two clean images in one tile; an image tile and a
    # tile of a later image; a tile half image, half the text before or after it.
    layouts["images_sharing_tiles"] = meta_from_rows([
        _row([S("text", 4), S("vit", 4), S("vit", 4), S("vit", 4), S("vit", 8), S("text", 8),
              S("vit", 8), S("vae", 4), S("noisy", 4), S("text", 16)]),
        _row([S("vit", 6), S("text", 2), S("vae", 8), S("noisy", 8), S("text", 8),
              S("vae", 16), S("text", 16)], arrange=[0, 1, 3, 2, 4, 6, 5]),
    ])
    # A split whose causal orders surround another image's (two frames of one group with an
    # image between them, the frames placed side by side): the mask rule allows any orders.
    layouts["split_around_an_image"] = meta_from_rows([
        _row([S("vae", 8, group=0), S("vit", 16), S("vae", 8, group=0), S("text", 32)],
             num_und=48),
        _row([S("vae", 4, group=0), S("vit", 8), S("vae", 4, group=0), S("text", 8),
              S("vae", 8, group=1), S("vae", 16), S("vae", 8, group=1), S("text", 8)],
             arrange=[0, 2, 1, 3, 4, 6, 5, 7]),
    ])
    # A key one causal step after the first query of a 16-token tile: text that ends on the
    # first token of a query tile, and a one-token image right after it that ends a key tile
    # of earlier clean latents (the boundary case of `k.order_max <= q.order_min`).
    layouts["one_order_apart"] = meta_from_rows([
        _row([S("text", 4), S("vae", 8), S("vae", 15), S("text", 13), S("vae", 1),
              S("text", 23)], num_und=40),
        _row([S("text", 15), S("text", 1), S("vit", 1), S("text", 47)], arrange=[0, 2, 1, 3]),
    ])
    return layouts


def builder_layout():
    """A batch of the real batch builder (markers, positions, expert-major rows): a
    text-to-image document with a clean copy and text after it, an edit, a VQA document and
    padding, 48 und + 16 gen tokens."""
    from unijax import batch_builder as bb

    rows = [
        [[bb.text([65] * 3), bb.vae_image(2, 2, noisy=True, t=0.5), bb.vae_image(2, 2),
          bb.text([66] * 5, loss=True)],
         [bb.vit_image(2, 2), bb.text([67] * 4), bb.text([68] * 3, loss=True)]],
        [[bb.vae_image(2, 2), bb.vit_image(2, 2), bb.text([69] * 6),
          bb.vae_image(2, 2, noisy=True, t=0.3)],
         [bb.text([70] * 9, loss=True)]],
    ]
    return bb.build(rows, num_und=48, num_gen=16, latent_grid=(2, 2), max_vit_patches=16,
                    max_vae_images=3).token_meta()


# ------------------------------------------------------------------------------------------
# A hypothesis strategy for the same cases.
# ------------------------------------------------------------------------------------------

# Span lengths around the tile sizes (1..16): a span may end exactly on, just before or just
# after a tile edge.
_SIZES = st.sampled_from([1, 2, 3, 4, 4, 5, 7, 8, 8, 8, 9, 12, 15, 16, 16, 17])


@st.composite
def _spans(draw, max_tokens: int):
    """Spans in causal order: documents interleaved, images with clean copies, frame groups."""
    num_docs = draw(st.sampled_from([1, 2, 2, 3]))
    spans, used = [], 0
    for _ in range(draw(st.integers(1, 9))):
        doc = draw(st.integers(1, num_docs))
        kind = draw(st.sampled_from(["text", "text", "vit", "vae", "noisy", "noisy", "pad",
                                     "frames"]))
        n = draw(_SIZES)
        if kind == "frames":
            # Two frames of one group with another image between them in causal order:
            # expert-major placement puts the frames side by side, so one key tile holds
            # keys before and after the image.
            group = draw(st.integers(0, 1))
            new = [Span("vae", n, doc, group), Span("vit", draw(_SIZES), doc),
                   Span("vae", n, doc, group)]
        else:
            group = draw(st.sampled_from([-1, -1, 0])) if kind in ("vae", "noisy") else -1
            new = [Span(kind, n, doc, group)]
        if kind == "noisy" and draw(st.booleans()):  # its clean copy, then text that sees it
            new += [Span("vae", n, doc), Span("text", draw(_SIZES), doc)]
        cost = sum(s.n for s in new)
        if used + cost > max_tokens:
            break
        spans += new
        used += cost
    return spans


@st.composite
def tiled_meta(draw, num_rows: int = 2, length: int = LENGTH):
    """A TokenMeta [num_rows, length] of random rows placed causally, expert-major (with a
    random und capacity) or in a random span order."""
    rows = []
    for _ in range(num_rows):
        spans = draw(_spans(length))
        placement = draw(st.sampled_from(["causal", "expert_major", "expert_major",
                                          "permuted"]))
        if placement == "expert_major":
            und = sum(s.n for s in spans if s.kind in UND_KINDS)
            gen = sum(s.n for s in spans if s.kind in GEN_KINDS)
            num_und = draw(st.integers(und, length - gen))
            rows.append(row_arrays(spans, length, num_und=num_und))
        elif placement == "permuted":
            arrange = draw(st.permutations(range(len(spans))))
            rows.append(row_arrays(spans, length, arrange=arrange))
        else:
            rows.append(row_arrays(spans, length))
    return meta_from_rows(rows)


# ------------------------------------------------------------------------------------------
# Reach: which terms of the rules a layout exercises.
# ------------------------------------------------------------------------------------------

_BIG, _SMALL = np.iinfo(np.int32).max, np.iinfo(np.int32).min


def _summaries(meta: TokenMeta, block: int) -> dict[str, np.ndarray]:
    def blocks(x):
        return rearrange(np.asarray(x), "b (n k) -> b n k", k=block)

    doc, order, split = blocks(meta.doc_id), blocks(meta.order), blocks(meta.split_id)
    noisy = blocks(meta.noisy).astype(bool)
    live = doc != 0
    in_split = live & (split >= 0)
    lo = lambda m, x: np.where(m, x, _BIG).min(-1)
    hi = lambda m, x: np.where(m, x, _SMALL).max(-1)
    s_min, s_max = lo(in_split, split), hi(in_split, split)
    return dict(any_live=live.any(-1), all_live=live.all(-1), doc_min=lo(live, doc),
                doc_max=hi(live, doc), order_min=lo(live, order), order_max=hi(live, order),
                clean_order_min=lo(live & ~noisy, order), any_noisy=(live & noisy).any(-1),
                split_min=s_min, split_max=s_max,
                all_one_split=in_split.all(-1) & (s_min == s_max))


FULL_TERMS = ("q_all_live", "k_all_live", "q_one_doc", "k_one_doc", "same_doc", "k_clean",
              "k_before_q", "q_one_split", "k_one_split", "same_split")
EMPTY_TERMS = ("split_term", "causal_term")


def tile_terms(meta: TokenMeta, bq: int, bk: int) -> dict[str, np.ndarray]:
    """Each term of the FULL and EMPTY rules per tile, bool [B, nq, nk] (numpy)."""
    q = {k: v[:, :, None] for k, v in _summaries(meta, bq).items()}
    k = {k: v[:, None, :] for k, v in _summaries(meta, bk).items()}
    return dict(
        q_any_live=q["any_live"], k_any_live=k["any_live"],
        docs_disjoint=(q["doc_max"] < k["doc_min"]) | (k["doc_max"] < q["doc_min"]),
        split_term=~((q["split_min"] <= k["split_max"]) & (k["split_min"] <= q["split_max"])
                     & (q["split_max"] >= 0) & (k["split_max"] >= 0)),
        causal_term=k["clean_order_min"] > q["order_max"],
        causal_term_off_by_one=k["clean_order_min"] >= q["order_max"],
        q_all_live=q["all_live"], k_all_live=k["all_live"],
        q_one_doc=q["doc_min"] == q["doc_max"], k_one_doc=k["doc_min"] == k["doc_max"],
        same_doc=q["doc_min"] == k["doc_min"],
        k_clean=~k["any_noisy"], k_before_q=k["order_max"] <= q["order_min"],
        k_before_q_plus_one=k["order_max"] <= q["order_min"] + 1,
        q_one_split=q["all_one_split"], k_one_split=k["all_one_split"],
        same_split=q["split_min"] == k["split_min"],
    )


def _empty(t, **override):
    t = {**t, **override}
    return (~t["q_any_live"] | ~t["k_any_live"] | t["docs_disjoint"]
            | (t["split_term"] & t["causal_term"]))


def _full(t, **override):
    t = {**t, **override}
    return (t["q_all_live"] & t["k_all_live"] & t["q_one_doc"] & t["k_one_doc"]
            & t["same_doc"] & ((t["k_clean"] & t["k_before_q"])
                               | (t["q_one_split"] & t["k_one_split"] & t["same_split"])))


def reach(meta: TokenMeta, bq: int, bk: int, tiles: np.ndarray) -> dict[str, int]:
    """How many tiles reach each branch, and for each rule term how many tiles it alone keeps
    from a wrong class ("full_without_<term>": dropping the term would call a tile with a
    hidden pair FULL; "empty_without_<term>": would call a tile with a visible pair EMPTY;
    "full_off_by_one" / "empty_off_by_one": `k.order_max <= q.order_min + 1` /
    `k.clean_order_min >= q.order_max` would). tiles: the dense mask cut into
    tiles, bool [B, nq, nk, bq, bk]."""
    t = tile_terms(meta, bq, bk)
    empty, full = _empty(t), _full(t)
    some, every = tiles.any((-1, -2)), tiles.all((-1, -2))
    out = {
        "empty_padding": int((~t["q_any_live"] | ~t["k_any_live"]).sum()),
        "empty_documents": int((t["q_any_live"] & t["k_any_live"] & t["docs_disjoint"]).sum()),
        "empty_causal": int((empty & t["q_any_live"] & t["k_any_live"] & ~t["docs_disjoint"])
                            .sum()),
        "full_causal": int((full & t["k_clean"] & t["k_before_q"]).sum()),
        "full_split": int((full & t["q_one_split"] & t["same_split"] & t["k_one_split"]).sum()),
        "partial": int((~empty & ~full).sum()),
    }
    for term in FULL_TERMS:
        wrong = ~empty & _full(t, **{term: True}) & ~every
        out[f"full_without_{term}"] = int(wrong.sum())
    out["full_off_by_one"] = int(
        (~empty & _full(t, k_before_q=t["k_before_q_plus_one"]) & ~every).sum())
    for term in EMPTY_TERMS:
        wrong = _empty(t, **{term: True}) & some
        out[f"empty_without_{term}"] = int(wrong.sum())
    out["empty_off_by_one"] = int(
        (_empty(t, causal_term=t["causal_term_off_by_one"]) & some).sum())
    return out
