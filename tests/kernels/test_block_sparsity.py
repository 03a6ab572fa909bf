"""Block classification and schedules: conservative, exact where it must be, jit-able."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels import layouts
from unijax.batch import TokenMeta
from unijax.kernels import block_sparsity as bs
from unijax.kernels import mask as mask_lib

NUM_UND, NUM_GEN = 40, 24


def _tiles(meta: TokenMeta, bq: int, bk: int) -> np.ndarray:
    """The dense mask cut into tiles: bool [B, nq, nk, bq, bk]."""
    dense = np.asarray(mask_lib.dense_mask(meta))
    return rearrange(dense, "b (i x) (j y) -> b i j x y", x=bq, y=bk)


_classify = jax.jit(bs.classify, static_argnums=(2, 3))


@settings(max_examples=25, deadline=None)
@given(meta=layouts.packed_meta(2, NUM_UND, NUM_GEN),
       blocks=st.sampled_from([(8, 8), (16, 16), (16, 32), (32, 16), (64, 64)]))
def test_classification_is_conservative(meta, blocks):
    bq, bk = blocks
    cls = np.asarray(_classify(meta, meta, bq, bk))
    tiles = _tiles(meta, bq, bk)
    empty, full = cls == bs.EMPTY, cls == bs.FULL
    assert not tiles[empty].any(), "a tile called EMPTY has a visible pair"
    assert tiles[full].all(), "a tile called FULL has a hidden pair"


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


@settings(max_examples=15, deadline=None)
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
