"""benchmarks/attention.py on CPU: its baselines compute the same attention as unijax, its
metadata builders give the layouts they promise, and a tiny run writes well-formed rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention as bench
from unijax.kernels import mask as mask_lib
from unijax.kernels.attention import attention


def _qkv(length, h=2, hkv=1, d=128, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (2, length, h, d), jnp.float32),
            jax.random.normal(keys[1], (2, length, hkv, d), jnp.float32),
            jax.random.normal(keys[2], (2, length, hkv, d), jnp.float32))


@pytest.mark.parametrize("mask_name", ["causal", "documents"])
def test_splash_baseline_matches_unijax(mask_name):
    """Splash (interpreted) with segment ids computes exactly the documents mask."""
    length = 512
    meta = bench.META_BUILDERS[mask_name](np.random.default_rng(0), 2, length)
    jmeta = jax.tree.map(jnp.asarray, meta)
    if mask_name == "documents":
        assert len(np.unique(meta.doc_id[0])) > 1  # several documents per row
    q, k, v = _qkv(length)
    segments = jmeta.doc_id if mask_name == "documents" else None
    ours = attention(q, k, v, jmeta, impl="xla")
    theirs = jax.jit(lambda q, k, v: bench.splash(q, k, v, segments, interpret=True))(q, k, v)
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-5)


def test_metadata_builders():
    rng = np.random.default_rng(1)
    length = 4096
    docs = bench.documents_meta(rng, 2, length)
    assert (docs.doc_id > 0).all()  # the documents fill the row
    dense = np.asarray(mask_lib.dense_mask(jax.tree.map(jnp.asarray, docs)))
    runs = np.diff(docs.doc_id, axis=1) != 0
    expected = 0
    for row in range(2):
        sizes = np.diff(np.flatnonzero(np.r_[True, runs[row], True]))
        expected += int(np.sum(sizes * (sizes + 1) // 2))
    assert dense.sum() == expected == bench.visible_pairs(docs)
    causal = bench.causal_meta(1, 1024)
    assert bench.visible_pairs(causal) == 1024 * 1025 // 2
    packed = jax.tree.map(jnp.asarray, bench.packed_meta(rng, 2, length))
    kinds = {(bool(n), int(s) >= 0) for n, s in zip(np.ravel(packed.noisy),
                                                  np.ravel(packed.split_id))}
    assert kinds == {(False, False), (False, True), (True, True)}  # text, clean, noisy spans
    assert bench.visible_pairs(packed) == int(np.asarray(mask_lib.dense_mask(packed)).sum())


def test_tiny_run_writes_rows(tmp_path):
    out = tmp_path / "results.md"
    bench.main(["--lengths=2048", "--masks=causal,documents,packed", "--backends=xla",
                "--heads=2", "--kv_heads=1", "--head_dim=64", f"--out={out}"])
    rows = [line for line in out.read_text().splitlines()
            if line.startswith("| ") and "fwd ms" not in line]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(bench.COLUMNS)
        assert cells[bench.COLUMNS.index("backend")] == "xla"
        float(cells[bench.COLUMNS.index("fwd ms")])  # a number, not a failure message
        float(cells[bench.COLUMNS.index("fwd+bwd ms")])


def test_rejects_unknown_mask():
    with pytest.raises(SystemExit):
        bench.main(["--masks=causal,diagonal", "--out=/dev/null"])


def test_tile_table(tmp_path):
    out = tmp_path / "tiles.md"
    bench.main(["--tiles", "--lengths=2048", "--batch=2", f"--out={out}"])
    rows = {cells[2]: cells for cells in (
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.read_text().splitlines() if line.startswith("| 2048"))}
    assert set(rows) == {"packed", "causal", "documents"}
    percent = lambda cell: float(cell.split("%")[0])
    for cells in rows.values():
        visible = percent(cells[3])
        for cell in cells[4:]:  # a kernel visits at least the tiles holding visible pairs
            assert visible <= percent(cell) <= 100
    # 2048 tokens, 128 x 64 tiles: q-block i visits kv-blocks 0..2i+1, 272 of 16 x 32 tiles.
    assert percent(rows["causal"][4]) == pytest.approx(100 * 272 / 512, abs=0.05)
    assert percent(rows["packed"][4]) < percent(rows["causal"][4])
