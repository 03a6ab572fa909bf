"""Random packed layouts for the kernel tests: hypothesis strategies -> TokenMeta.

A layout is rows of documents of segments `(kind, n)`: "text" (n causal und tokens), "vit"
(an und span), "vae" (a clean gen span), "noisy" (a noisy gen span). Rows are expert-major
like the batch builder's (text and ViT in [0, num_und), VAE in [num_und, L)); segments that do
not fit are dropped, the rest is padding. Unlike the builder this allows one-token documents,
empty documents and images without markers, and a row may be permuted physically (the rule
depends on metadata only), which stresses the block summaries.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from unijax.batch import TokenMeta

KINDS = ("text", "vit", "vae", "noisy")


def build_meta(rows, num_und: int, num_gen: int, permute_seeds=None) -> TokenMeta:
    """rows: [[[(kind, n), ...] per document] per row] -> numpy TokenMeta [B, L]."""
    length = num_und + num_gen
    shape = (len(rows), length)
    doc = np.zeros(shape, np.int32)
    order = np.zeros(shape, np.int32)
    split = np.full(shape, -1, np.int32)
    noisy = np.zeros(shape, bool)
    for r, documents in enumerate(rows):
        cursor = {"und": 0, "gen": num_und}
        t = s = 0
        for d, segments in enumerate(documents, start=1):
            for kind, n in segments:
                side = "und" if kind in ("text", "vit") else "gen"
                limit = num_und if side == "und" else length
                n = min(n, limit - cursor[side])
                if n <= 0:
                    continue
                sl = slice(cursor[side], cursor[side] + n)
                doc[r, sl], order[r, sl] = d, np.arange(t, t + n)
                if kind != "text":
                    split[r, sl], noisy[r, sl] = s, kind == "noisy"
                    s += 1
                cursor[side] += n
                t += n
        if permute_seeds is not None and permute_seeds[r] is not None:
            perm = np.random.default_rng(permute_seeds[r]).permutation(length)
            for x in (doc, order, split, noisy):
                x[r] = x[r][perm]
    return TokenMeta(doc, order, split, noisy)


segment = st.tuples(st.sampled_from(KINDS), st.integers(1, 20))
document = st.lists(segment, min_size=0, max_size=4)
row = st.lists(document, min_size=1, max_size=4)


@st.composite
def packed_meta(draw, num_rows: int, num_und: int, num_gen: int, allow_permute: bool = True):
    """A TokenMeta of num_rows random rows of num_und + num_gen tokens."""
    rows = [draw(row) for _ in range(num_rows)]
    seeds = None
    if allow_permute:
        seeds = [draw(st.one_of(st.none(), st.integers(0, 2**16))) for _ in range(num_rows)]
    return build_meta(rows, num_und, num_gen, seeds)


def fixed_meta(num_und: int = 40, num_gen: int = 24) -> TokenMeta:
    """Two rows covering every case deterministically: one-token and empty documents, images
    across and on block boundaries, noisy + clean copies, padding."""
    rows = [
        [[("text", 1)], [], [("text", 7), ("noisy", 8), ("vae", 8), ("vit", 9), ("text", 5)],
         [("vit", 16), ("text", 2)]],
        [[("text", 16), ("vit", 16)], [("vae", 16), ("text", 3)]],
    ]
    return build_meta(rows, num_und, num_gen)
