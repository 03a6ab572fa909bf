"""Block classification and schedules: conservative, exact where it must be, jit-able.

Tile by tile against the dense mask of `kernels/mask.py`: a tile may be EMPTY only if no pair
is visible and FULL only if every pair is, on layouts built to reach every branch of
`classify` (`tile_layouts.py`: one-document tiles, a noisy image and its clean copy in one
tile followed by text, documents and images across tile edges, video frame groups, padding)
at tile sizes 1x1 to 64x64, and on random layouts from a strategy whose reach is asserted.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.kernels import layouts, tile_layouts
from unijax.batch import TokenMeta
from unijax.kernels import block_sparsity as bs
from unijax.kernels import mask as mask_lib

NUM_UND, NUM_GEN = 40, 24


def _tiles(meta: TokenMeta, bq: int, bk: int) -> np.ndarray:
    """The dense mask cut into tiles: bool [B, nq, nk, bq, bk]."""
    dense = np.asarray(mask_lib.dense_mask(meta))
    return rearrange(dense, "b (i x) (j y) -> b i j x y", x=bq, y=bk)


_classify = jax.jit(bs.classify, static_argnums=(2, 3))


def _check_conservative(meta: TokenMeta, bq: int, bk: int, where: str = "") -> np.ndarray:
    """Asserts, tile by tile, that EMPTY tiles hold no visible pair and FULL tiles no hidden
    one (the dense mask decides); returns the classes [B, nq, nk]."""
    cls = np.asarray(_classify(meta, meta, bq, bk))
    tiles = _tiles(meta, bq, bk)
    for name, wrong in (("EMPTY but has a visible pair", (cls == bs.EMPTY) & tiles.any((-1, -2))),
                        ("FULL but has a hidden pair", (cls == bs.FULL) & ~tiles.all((-1, -2)))):
        if wrong.any():
            b, i, j = (int(x[0]) for x in np.nonzero(wrong))
            raise AssertionError(f"{where} {bq}x{bk} tiles: {int(wrong.sum())} tiles are "
                                 f"{name}, the first (row {b}, q-block {i}, kv-block {j})")
    return cls


_FIXED = {**tile_layouts.fixed_layouts(), "batch_builder": tile_layouts.builder_layout()}


@pytest.mark.parametrize("name", sorted(_FIXED))
def test_fixed_layouts_are_classified_conservatively(name):
    """On every layout built for one branch of `classify`, at tile sizes from 1x1 to 64x64
    (square and not), no EMPTY tile has a visible pair and no FULL tile a hidden one."""
    meta = _FIXED[name]
    for bq, bk in tile_layouts.TILE_SIZES:
        _check_conservative(meta, bq, bk, name)


@pytest.mark.parametrize("name", sorted(_FIXED))
def test_one_token_tiles_are_classified_exactly(name):
    """A 1x1 tile is one (query, key) pair, so its summaries are the pair itself: FULL exactly
    where the pair is visible, EMPTY exactly where it is not (catches a rule that is too
    strict, e.g. `order_max < order_min` for `<=`, which conservativeness cannot)."""
    meta = _FIXED[name]
    cls = np.asarray(_classify(meta, meta, 1, 1))
    dense = np.asarray(mask_lib.dense_mask(meta))
    np.testing.assert_array_equal(cls, np.where(dense, bs.FULL, bs.EMPTY))


def _reach(meta: TokenMeta, sizes) -> collections.Counter:
    counts = collections.Counter()
    for bq, bk in sizes:
        counts.update(tile_layouts.reach(meta, bq, bk, _tiles(meta, bq, bk)))
    return counts


# Every branch of `classify`, and every rule term whose loss (or an off-by-one) would give a
# wrong class. `same_doc` (q.doc_min == k.doc_min) is left out because it never decides: when
# each block lies in one document and the two differ, `docs_disjoint` makes the tile EMPTY.
BRANCHES = ("empty_padding", "empty_documents", "empty_causal", "full_causal", "full_split",
            "partial", *(f"full_without_{t}" for t in tile_layouts.FULL_TERMS if t != "same_doc"),
            "full_off_by_one", *(f"empty_without_{t}" for t in tile_layouts.EMPTY_TERMS),
            "empty_off_by_one")


def test_fixed_layouts_reach_every_branch():
    """The fixed layouts hold, for every term of the FULL and EMPTY rules, a tile where that
    term alone keeps `classify` from a wrong class (so dropping the term, or moving its bound
    by one, is caught above), at all tile sizes together and at the Pallas kernels' test tiles
    alone (16 x 16 forward, 16 x 32 backward: `test_pallas_backends` runs these layouts)."""
    for sizes in (tile_layouts.TILE_SIZES, [(16, 16), (16, 32)]):
        counts = collections.Counter()
        for meta in _FIXED.values():
            counts += _reach(meta, sizes)
        missing = [b for b in BRANCHES if counts[b] == 0]
        assert not missing, f"at tile sizes {sizes} no fixed layout reaches {missing}"


_SIZES = st.sampled_from(tile_layouts.TILE_SIZES[:-1])


@settings(max_examples=100, deadline=None, derandomize=True)
@given(meta=layouts.packed_meta(2, NUM_UND, NUM_GEN), blocks=_SIZES)
def test_token_permuted_layouts_are_classified_conservatively(meta, blocks):
    """Rows whose tokens may be permuted one by one (mixed summaries in every tile)."""
    _check_conservative(meta, *blocks)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(meta=tile_layouts.tiled_meta(), blocks=_SIZES)
def test_random_layouts_are_classified_conservatively(meta, blocks):
    """Random rows of interleaved documents, images with clean copies, frame groups and
    padding, placed causally, expert-major or permuted: conservative at every tile size,
    exact at 1x1."""
    _check_conservative(meta, *blocks)
    cls = np.asarray(_classify(meta, meta, 1, 1))
    np.testing.assert_array_equal(
        cls, np.where(np.asarray(mask_lib.dense_mask(meta)), bs.FULL, bs.EMPTY))


def _strategy_reach(num_examples: int) -> tuple[collections.Counter, int]:
    """(in how many drawn (layout, tile size) examples each branch occurs, examples drawn)."""
    seen, drawn = collections.Counter(), []

    @settings(max_examples=num_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(meta=tile_layouts.tiled_meta(), blocks=_SIZES)
    def draw(meta, blocks):
        drawn.append(1)
        seen.update(k for k, v in _reach(meta, [blocks]).items() if v)

    draw()
    return seen, len(drawn)


def test_random_layouts_reach_every_branch():
    """The strategy of the test above hits every branch and every deciding term often enough
    that a wrong term is caught: each in at least 3% of the draws (most in far more)."""
    seen, n = _strategy_reach(300)
    assert n >= 250
    rare = {b: seen[b] for b in BRANCHES if seen[b] < 0.03 * n}
    assert not rare, f"branches reached in under 3% of {n} draws: {rare}"


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@seed(20261123)
@given(meta=tile_layouts.tiled_meta(num_rows=3), blocks=_SIZES)
def test_many_random_layouts_are_classified_conservatively(meta, blocks):
    """The same property on many more draws, three rows each (another fixed seed)."""
    _check_conservative(meta, *blocks)


def test_causal_text_is_classified_exactly():
    length, block = 64, 16
    meta = TokenMeta(np.ones((1, length), np.int32), np.arange(length, dtype=np.int32)[None],
                     np.full((1, length), -1, np.int32), np.zeros((1, length), bool))
    cls = np.asarray(bs.classify(meta, meta, block, block))[0]
    i, j = np.indices(cls.shape)
    np.testing.assert_array_equal(cls[i > j], bs.FULL)
    np.testing.assert_array_equal(cls[i < j], bs.EMPTY)
    np.testing.assert_array_equal(cls[i == j], bs.PARTIAL)


def test_fixed_layout_has_every_kind_of_tile():
    meta = layouts.fixed_meta(NUM_UND, NUM_GEN)
    cls = np.asarray(bs.classify(meta, meta, 8, 8))
    tiles = _tiles(meta, 8, 8)
    counts = {name: int(v) for name, v in bs.tile_counts(cls).items()}
    assert counts["empty"] > 0 and counts["full"] > 0 and counts["partial"] > 0, counts
    # Padding tiles (both rows end in 8 padding tokens) are empty, whatever the kv tile.
    assert (cls[:, -1, :] == bs.EMPTY).all() and (cls[:, :, -1] == bs.EMPTY).all()
    # An image aligned with the tiles (row 1, und 16..31) is FULL against itself.
    assert cls[1, 2, 2] == bs.FULL and cls[1, 3, 3] == bs.FULL
    # On this layout the summaries miss no empty tile.
    assert (cls == bs.EMPTY).sum() == (~tiles.any(axis=(-1, -2))).sum()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(meta=layouts.packed_meta(2, NUM_UND, NUM_GEN))
def test_schedules_list_exactly_the_nonempty_tiles(meta):
    cls = np.asarray(bs.classify(meta, meta, 8, 16))
    for sched, c in ((bs.schedule(jnp.asarray(cls)), cls),
                     (bs.transposed_schedule(jnp.asarray(cls)), np.swapaxes(cls, 1, 2))):
        index = np.asarray(sched.index)
        for b in range(c.shape[0]):
            for i in range(c.shape[1]):
                n_part, n_vis = int(sched.num_partial[b, i]), int(sched.num_visible[b, i])
                partial = np.nonzero(c[b, i] == bs.PARTIAL)[0]
                full = np.nonzero(c[b, i] == bs.FULL)[0]
                assert n_part == len(partial) and n_vis == len(partial) + len(full)
                np.testing.assert_array_equal(index[b, i, :n_part], partial)
                np.testing.assert_array_equal(index[b, i, n_part:n_vis], full)
                # Padding repeats the last visited index: no new copy on TPU.
                last = index[b, i, n_vis - 1] if n_vis else 0
                assert (index[b, i, n_vis:] == last).all()


def test_schedule_runs_under_jit_and_follows_the_batch():
    traces = []

    @jax.jit
    def fn(m):
        traces.append(1)
        return bs.schedule(bs.classify(m, m, 8, 8)).num_visible

    a = fn(layouts.fixed_meta(NUM_UND, NUM_GEN))
    b = fn(layouts.build_meta([[[("text", 64)]], [[("vit", 64)]]], NUM_UND, NUM_GEN))
    assert len(traces) == 1, "a new mask must not recompile"
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_packed_rows_skip_most_tiles():
    rows = [[[("text", 8), ("vit", 8)], [("text", 8), ("noisy", 8)], [("text", 16)],
             [("vae", 8), ("text", 8)]]] * 2
    meta = layouts.build_meta(rows, NUM_UND, NUM_GEN)
    assert float(bs.skipped_fraction(bs.classify(meta, meta, 8, 8))) > 0.6


def test_length_not_multiple_of_block_is_an_error():
    meta = layouts.fixed_meta(NUM_UND, NUM_GEN)
    with pytest.raises(ValueError, match="not a multiple of the block size 48"):
        bs.classify(meta, meta, 48, 16)
