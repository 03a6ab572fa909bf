"""The mask rule and the xla reference backend; the `attention` entry's dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import repeat
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels import layouts
from unijax import batch as batch_lib
from unijax import batch_builder as bb
from unijax.kernels import attention as attention_lib
from unijax.kernels import mask as mask_lib


def _dense_reference(q, k, v, meta):
    """Plain softmax attention with the dense mask (GQA by repeating K/V), float32."""
    group = q.shape[2] // k.shape[2]
    k, v = (repeat(x, "b l h d -> b l (h g) d", g=group) for x in (k, v))
    allowed = mask_lib.dense_mask(meta)[:, None]  # [B, 1, Lq, Lk]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(allowed, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(jnp.where(allowed, s, -1e30), -1, keepdims=True))
    p = jnp.where(allowed, p, 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _loss(fn, d_out):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * d_out)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (4, 1)])
def test_xla_matches_dense_softmax(heads, kv_heads):
    meta = layouts.fixed_meta()
    b, length, d = 2, 64, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, length, heads, d))
    k = jax.random.normal(keys[1], (b, length, kv_heads, d))
    v = jax.random.normal(keys[2], (b, length, kv_heads, d))
    d_out = jax.random.normal(keys[3], (b, length, heads, d))
    xla = lambda q, k, v: attention_lib.attention(q, k, v, meta, impl="xla", chunk_size=24)
    dense = lambda q, k, v: _dense_reference(q, k, v, meta)
    np.testing.assert_allclose(jax.jit(xla)(q, k, v), dense(q, k, v), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(_loss(xla, d_out), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(_loss(dense, d_out), argnums=(0, 1, 2)))(q, k, v)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)


def test_xla_fully_masked_rows_are_zero_not_nan():
    meta = layouts.build_meta([[[("text", 3)]], []], 8, 8)
    q = jax.random.normal(jax.random.key(1), (2, 16, 2, 8))
    attend = jax.jit(lambda q: attention_lib.attention(q, q, q, meta, impl="xla", chunk_size=4))
    grads = jax.jit(jax.grad(lambda q: attend(q).sum()))(q)
    out = attend(q)
    pad = np.asarray(meta.doc_id) == 0
    assert np.isfinite(np.asarray(grads)).all() and np.isfinite(np.asarray(out)).all()
    assert (np.asarray(out)[pad] == 0).all() and (np.asarray(grads)[pad] == 0).all()



def _meta(doc_id, order, split_id, noisy=None):
    arrays = [np.asarray(x, np.int32) for x in (doc_id, order, split_id)]
    noisy = np.zeros_like(arrays[0], bool) if noisy is None else np.asarray(noisy, bool)
    return batch_lib.TokenMeta(*arrays, noisy)


def test_xla_never_computes_hidden_tiles():
    """Keys and values that no query of a tile may see are NaN: if that tile were computed,
    0 * NaN would poison the output. Row 0: two 16-token documents, then 16 padding tokens;
    row 1: one 48-token document. With 16-token tiles the cross-document and padding tiles
    are hidden and must be skipped; every result equals the dense reference on clean inputs,
    rows with different numbers of visible tiles in one batch included."""
    causal = np.tile(np.arange(16), 3)
    meta = _meta([[1] * 16 + [2] * 16 + [0] * 16, [1] * 48],
                 [causal, np.arange(48)], np.full((2, 48), -1))
    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (2, 48, 4, 8))
    k = jax.random.normal(keys[1], (2, 48, 2, 8))
    v = jax.random.normal(keys[2], (2, 48, 2, 8))
    d_out = jax.random.normal(keys[3], (2, 48, 4, 8))
    # Padding keys and values of row 0 are NaN; so are its document-1 keys for the queries of
    # document 2 (cross attention: document-2 queries over a copy whose document-1 block is NaN).
    poison = np.zeros((2, 48, 1, 1), bool)
    poison[0, 32:] = True
    k_bad, v_bad = (jnp.where(poison, jnp.nan, x) for x in (k, v))
    xla = lambda q, k, v: attention_lib.attention(q, k, v, meta, impl="xla", chunk_size=16)
    dense = lambda q, k, v: _dense_reference(q, k, v, meta)
    out = jax.jit(xla)(q, k_bad, v_bad)
    np.testing.assert_allclose(out, dense(q, k, v), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(_loss(xla, d_out), argnums=(0, 1, 2)))(q, k_bad, v_bad)
    want = jax.jit(jax.grad(_loss(dense, d_out), argnums=(0, 1, 2)))(q, k, v)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)

    cross_k = jnp.where(np.arange(48)[None, :, None, None] < 16, jnp.nan, k)[:1]
    q_meta = _meta([[2] * 16], [np.arange(16)], [[-1] * 16])
    kv_meta = _meta([meta.doc_id[0]], [meta.order[0]], [meta.split_id[0]])
    got = attention_lib.attention(q[:1, 16:32], cross_k, cross_k, q_meta, kv_meta, impl="xla",
                                  chunk_size=16)
    assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("lq,lk,chunk", [(1, 40, 16), (5, 40, 16), (40, 40, 16), (37, 37, 64)])
def test_xla_uneven_lengths_and_short_queries(lq, lk, chunk):
    """Queries shorter than the keys (a decode step against a cache) and lengths that are not
    multiples of the tile: the last queries of a 40-token document against all its keys."""
    meta = _meta([[1] * lk], [np.arange(lk)], [[-1] * lk])
    q_meta = _meta([[1] * lq], [np.arange(lk - lq, lk)], [[-1] * lq])
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (1, lq, 4, 8))
    k = jax.random.normal(keys[1], (1, lk, 2, 8))
    v = jax.random.normal(keys[2], (1, lk, 2, 8))
    d_out = jax.random.normal(keys[3], (1, lq, 4, 8))
    xla = lambda q, k, v: attention_lib.attention(q, k, v, q_meta, meta, impl="xla",
                                                  chunk_size=chunk)
    dense = lambda q, k, v: _dense_reference(
        jnp.zeros((1, lk, 4, 8)).at[:, lk - lq:].set(q), k, v, meta)[:, lk - lq:]
    np.testing.assert_allclose(jax.jit(xla)(q, k, v), dense(q, k, v), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(_loss(xla, d_out), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(_loss(dense, d_out), argnums=(0, 1, 2))(q, k, v)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)

# ------------------------------------------------------------------------------------------
# The rule: dense_mask == brute force, and what it means, on builder layouts.
# ------------------------------------------------------------------------------------------

_text = st.builds(lambda n: bb.text([65] * n), st.integers(0, 4))
_vit = st.builds(lambda h, w: bb.vit_image(h, w), st.integers(1, 2), st.integers(1, 2))
_vae = st.builds(lambda h, w, noisy: bb.vae_image(h, w, noisy=noisy, t=0.5),
                 st.integers(1, 2), st.integers(1, 2), st.booleans())
_documents = st.lists(st.lists(st.one_of(_text, _vit, _vae), min_size=1, max_size=4),
                      min_size=1, max_size=3)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(rows=st.lists(_documents, min_size=1, max_size=2))
def test_dense_mask_is_the_rule(rows):
    try:
        batch = bb.build(rows, num_und=48, num_gen=24, latent_grid=(2, 2),
                         max_vit_patches=48, max_vae_images=8)
    except ValueError:
        return  # the drawn documents do not fit the row: nothing to check
    batch_lib.validate(batch)
    dense = np.asarray(mask_lib.dense_mask(batch.token_meta()))
    for r in range(batch.batch_size):
        f = {name: np.asarray(getattr(batch, name))[r]
             for name in ("doc_id", "order", "split_id", "noisy", "modality")}
        m = dense[r]
        np.testing.assert_array_equal(
            m, mask_lib.brute_force_mask(f["doc_id"], f["order"], f["split_id"], f["noisy"]))
        doc, order, split, noisy = f["doc_id"], f["order"], f["split_id"], f["noisy"]
        qi, ki = np.indices(m.shape)
        live = doc[qi] > 0
        # Documents never see each other, and padding sees and is seen by nothing.
        assert not m[doc[qi] != doc[ki]].any() and not m[~live].any()
        same_doc = live & (doc[qi] == doc[ki])
        text_pair = same_doc & (split[qi] < 0) & (split[ki] < 0)
        # Text is causal.
        np.testing.assert_array_equal(m[text_pair], (order[ki] <= order[qi])[text_pair])
        # The tokens of one image (markers included) all see each other.
        same_split = same_doc & (split[qi] >= 0) & (split[qi] == split[ki])
        assert m[same_split].all()
        # Noisy latents are invisible to every token outside their own image.
        assert not m[noisy[ki] & ~same_split].any()
        # Clean latents and ViT tokens are visible to every later token of the document.
        image = (f["modality"][ki] == batch_lib.VIT) | (
            (f["modality"][ki] == batch_lib.VAE) & ~noisy[ki])
        later = same_doc & image & (order[ki] < order[qi])
        assert m[later].all()


# ------------------------------------------------------------------------------------------
# The entry point.
# ------------------------------------------------------------------------------------------


def test_auto_picks_per_platform():
    assert attention_lib.resolve_auto("tpu") == "pallas_tpu"
    assert attention_lib.resolve_auto("gpu") == "pallas_gpu"
    assert attention_lib.resolve_auto("cpu") == "xla"
    q = jnp.ones((1, 16, 2, 8))
    meta = layouts.build_meta([[[("text", 16)]]], 16, 0)
    np.testing.assert_array_equal(
        attention_lib.attention(q, q, q, meta, impl="auto"),  # CPU here: xla
        attention_lib.attention(q, q, q, meta, impl="xla"))


def test_entry_errors_and_config():
    q = jnp.ones((1, 16, 2, 8))
    meta = layouts.build_meta([[[("text", 16)]]], 16, 0)
    with pytest.raises(ValueError, match="unknown impl 'flash'"):
        attention_lib.attention(q, q, q, meta, impl="flash")
    with pytest.raises(ValueError, match="shard= needs a mesh"):
        attention_lib.attention(q, q, q, meta, impl="pallas_gpu", shard=(None, None))
    with pytest.raises(ValueError, match="no interpret mode"):
        attention_lib.attention(q, q, q, meta, impl="cudnn", interpret=True)
    config = {"impl": "auto", "chunk_size": 64, "block_q": 0, "block_kv": 32, "other": 1}
    assert attention_lib.kwargs_from_config(config) == {
        "impl": "auto", "chunk_size": 64, "block_q": 0, "block_kv": 32}


def test_config_block_sizes_are_validated(tiny_config):
    from unijax import config as config_lib

    tiny_config.attention.block_kv = 100
    with pytest.raises(config_lib.ConfigError, match=r"config\.attention\.block_kv .* got 100"):
        config_lib.validate(tiny_config)
    tiny_config.attention.block_kv = 128
    config_lib.validate(tiny_config)
    assert attention_lib.kwargs_from_config(tiny_config.attention)["block_kv"] == 128
