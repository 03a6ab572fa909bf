"""Building blocks: RMSNorm, RoPE, Dense, SwiGLU, Embedding, sharded parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from unijax.models import layers
from unijax.training import sharding

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


def test_rms_norm_matches_formula_and_keeps_compute_dtype(rng):
    norm = layers.RMSNorm(8, eps=1e-6, **F32)
    norm.scale[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)
    bf16 = layers.RMSNorm(8, eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    bf16.scale[...] = norm.scale[...]
    y = bf16(jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert bf16.scale[...].dtype == jnp.float32
    # Statistics in float32: only the output rounding (2^-8 relative) is lost.
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    want = x16 / np.sqrt((x16**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2 * 2**-8, atol=1e-6)


def _rope_reference(x, positions, theta):
    """HF Qwen2 `apply_rotary_pos_emb`, written with numpy."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    freqs = positions[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], -1)[:, :, None]
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def test_rope_matches_hf_rotate_half_convention(rng):
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    positions = rng.integers(0, 1000, (2, 5))
    cos, sin = layers.rope_cos_sin(jnp.asarray(positions), 16, 1e6, jnp.float32)
    out = layers.apply_rope(jnp.asarray(x), cos, sin)
    np.testing.assert_allclose(out, _rope_reference(x, positions, 1e6), rtol=1e-4, atol=1e-4)


def test_rope_angles_are_float32_in_bfloat16_compute(rng):
    """Angles in float32 then cast (HF): at position 1000 a bfloat16 angle would be off by
    up to 4 radians."""
    positions = jnp.asarray(rng.integers(0, 1000, (2, 5)))
    cos16, sin16 = layers.rope_cos_sin(positions, 16, 1e6, jnp.bfloat16)
    cos32, sin32 = layers.rope_cos_sin(positions, 16, 1e6, jnp.float32)
    assert cos16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(cos16, cos32.astype(jnp.bfloat16))
    np.testing.assert_array_equal(sin16, sin32.astype(jnp.bfloat16))


def test_rope_scores_depend_only_on_position_difference(rng):
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)

    def score(pq, pk):
        cq, sq = layers.rope_cos_sin(jnp.array([[pq]]), 32, 10_000.0, jnp.float32)
        ck, sk = layers.rope_cos_sin(jnp.array([[pk]]), 32, 10_000.0, jnp.float32)
        return float(jnp.sum(layers.apply_rope(q, cq, sq) * layers.apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_dense_contracts_trailing_axes_and_adds_bias(rng):
    dense = layers.Dense((6,), (2, 4), in_axes=("embed",), out_axes=("heads", "head_dim"),
                         use_bias=True, rngs=nnx.Rngs(0), **F32)
    dense.bias[...] = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    x = rng.normal(size=(3, 5, 6)).astype(np.float32)
    y = dense(jnp.asarray(x))
    expected = np.einsum("bld,dhk->blhk", x, np.asarray(dense.kernel[...])) + np.asarray(
        dense.bias[...])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    back = layers.Dense((2, 4), (6,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                        use_bias=False, rngs=nnx.Rngs(0), **F32)
    assert back(y).shape == (3, 5, 6) and back.bias is None


def test_swiglu_matches_formula(rng):
    mlp = layers.SwiGLU(8, 16, rngs=nnx.Rngs(0), **F32)
    x = rng.normal(size=(2, 8)).astype(np.float32)
    g = x @ np.asarray(mlp.gate_proj.kernel[...])
    u = x @ np.asarray(mlp.up_proj.kernel[...])
    expected = (g / (1 + np.exp(-g)) * u) @ np.asarray(mlp.down_proj.kernel[...])
    np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_embedding_lookup_and_tied_attend(rng):
    emb = layers.Embedding(10, 4, rngs=nnx.Rngs(0), **F32)
    ids = jnp.array([[1, 9, 1]])
    table = np.asarray(emb.embedding[...])
    np.testing.assert_array_equal(emb(ids), table[[1, 9, 1]][None])
    h = rng.normal(size=(1, 2, 4)).astype(np.float32)
    np.testing.assert_allclose(emb.attend(jnp.asarray(h)), h @ table.T, rtol=1e-5, atol=1e-6)


def test_sharded_param_without_mesh_keeps_logical_names():
    dense = layers.Dense((8,), (16,), in_axes=("embed",), out_axes=("mlp",), use_bias=True,
                         rngs=nnx.Rngs(0), **F32)
    specs = nnx.get_partition_spec(nnx.state(dense))
    assert tuple(specs["kernel"].get_value()) == ("embed", "mlp")
    assert tuple(specs["bias"].get_value()) == ("mlp",)
    abstract = nnx.eval_shape(lambda: layers.Dense((8,), (16,), in_axes=("embed",),
                                                   out_axes=("mlp",), use_bias=False,
                                                   rngs=nnx.Rngs(0), **F32))
    assert abstract.kernel.get_value().shape == (8, 16)


def test_sharded_param_under_mesh_is_created_sharded(cpu_devices):
    mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        dense = layers.Dense((8,), (16,), in_axes=("embed",), out_axes=("mlp",),
                             use_bias=False, rngs=nnx.Rngs(0), **F32)
    assert dense.kernel[...].sharding.spec == jax.P("fsdp", "tensor")


def test_sharded_param_rejects_mismatched_axes():
    with pytest.raises(ValueError, match="2 axis names"):
        layers.sharded_param(nnx.initializers.zeros, None, (3,), ("embed", "mlp"), jnp.float32)
