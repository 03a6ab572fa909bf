"""Checks shared by the Pallas backend tests: each test module calls them with its backend.

Shapes are tiny (B=2, L=64, H=4, Hkv=2, D=32, tiles of 16/32 tokens) and every compiled
function is built once per backend (metadata are arguments, not constants), so hypothesis
examples reuse one compilation: interpret mode is slow on shared CPUs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import export
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.kernels import layouts
from unijax.batch import TokenMeta
from unijax.kernels import attention as attention_lib
from unijax.kernels import block_sparsity

B, H, HKV, D = 2, 4, 2, 32
NUM_UND, NUM_GEN = 40, 24
L = NUM_UND + NUM_GEN
BLOCKS = dict(block_q=16, block_kv=16, block_q_bwd=16, block_kv_bwd=32)


def inputs(dtype=jnp.float32, seed: int = 0, heads: int = H, kv_heads: int = HKV):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, L, heads, D), dtype)
    k = jax.random.normal(keys[1], (B, L, kv_heads, D), dtype)
    v = jax.random.normal(keys[2], (B, L, kv_heads, D), dtype)
    d_out = jax.random.normal(keys[3], (B, L, heads, D), jnp.float32)
    return q, k, v, d_out


def _value_and_grads(attend):
    def loss(q, k, v, d_out, meta):
        out = attend(q, k, v, meta)
        return jnp.sum(out.astype(jnp.float32) * d_out), out

    @jax.jit
    def run(q, k, v, d_out, meta):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            q, k, v, d_out, meta)
        return (out, *grads)

    return run


@functools.cache
def runner(impl: str):
    """jit(q, k, v, d_out, meta -> (out, dq, dk, dv)) for a backend, interpret mode."""
    if impl == "xla":
        return _value_and_grads(
            lambda q, k, v, m: attention_lib.attention(q, k, v, m, impl="xla", chunk_size=16))
    return _value_and_grads(lambda q, k, v, m: attention_lib.attention(
        q, k, v, m, impl=impl, interpret=True, **BLOCKS))


def assert_matches_xla(impl: str, meta: TokenMeta, dtype=jnp.float32, seed: int = 0,
                       rtol: float = 1e-5) -> tuple:
    """Forward and q/k/v gradients of `impl` equal the xla reference's (max-abs relative)."""
    q, k, v, d_out = inputs(dtype, seed)
    got = runner(impl)(q, k, v, d_out, meta)
    want = runner("xla")(q, k, v, d_out, meta)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), f"{impl}: {name} has NaN/inf"
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0)
        assert err <= rtol, f"{impl}: {name} differs from xla by {err:.3g} (relative)"
    return got


def check_fully_masked_rows(impl: str) -> None:
    """Padding queries and an all-padding row give zero outputs and zero, finite grads."""
    meta = layouts.build_meta([[[("text", 5), ("vit", 4)]], []], NUM_UND, NUM_GEN)
    out, dq, dk, dv = (np.asarray(x) for x in assert_matches_xla(impl, meta))
    pad = np.asarray(meta.doc_id) == 0
    assert pad[1].all() and pad[0].sum() > 0
    assert (out[pad] == 0).all() and (dq[pad] == 0).all()
    assert (dk[pad] == 0).all() and (dv[pad] == 0).all()


def check_visits(module, meta: TokenMeta) -> None:
    """The forward kernel processes exactly the non-empty tiles of each q-block."""
    q, k, v, _ = inputs()
    bq, bk = BLOCKS["block_q"], BLOCKS["block_kv"]
    visits = np.asarray(module.visit_counts(q, k, v, meta, meta, scale=D**-0.5, block_q=bq,
                                            block_kv=bk, interpret=True))
    cls = np.asarray(block_sparsity.classify(meta, meta, bq, bk))
    nonempty = (cls != block_sparsity.EMPTY).sum(-1)  # [B, nq]
    np.testing.assert_array_equal(visits, np.broadcast_to(nonempty[:, None], visits.shape))
    assert visits.sum() < visits.size * (L // bk), "the schedule must skip tiles"


def check_sharded(impl: str, cpu_devices) -> None:
    """Rows and heads split over a 2 x 2 mesh (shard_map) give the unsharded result."""
    mesh = jax.sharding.Mesh(np.asarray(cpu_devices[:4]).reshape(2, 2), ("data", "tensor"),
                             axis_types=(AxisType.Auto,) * 2)
    meta = layouts.fixed_meta(NUM_UND, NUM_GEN)
    q, k, v, d_out = inputs()
    qkv = NamedSharding(mesh, P("data", None, "tensor", None))
    rows = NamedSharding(mesh, P("data", None))
    sharded = _value_and_grads(lambda q, k, v, m: attention_lib.attention(
        q, k, v, m, impl=impl, interpret=True, shard=("data", "tensor"), mesh=mesh, **BLOCKS))
    args = (jax.device_put(q, qkv), jax.device_put(k, qkv), jax.device_put(v, qkv),
            jax.device_put(d_out, qkv), jax.tree.map(lambda x: jax.device_put(x, rows), meta))
    got = sharded(*args)
    assert got[0].sharding.spec == qkv.spec or got[0].sharding.is_equivalent_to(qkv, 4)
    want = runner(impl)(q, k, v, d_out, meta)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def exported_kernel_count(module, platform: str, custom_call: str, **blocks) -> int:
    """Lowers forward + backward for `platform` on this CPU machine (Pallas -> Mosaic or
    Triton IR) and returns how many kernels the module holds."""
    shape = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    meta = TokenMeta(ints, ints, ints, jax.ShapeDtypeStruct((1, 1024), jnp.bool_))

    def grads(q, k, v, m):
        fn = lambda q, k, v: module.attention(q, k, v, m, m, scale=0.1, **blocks)
        return jax.grad(lambda *x: fn(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    checks = [export.DisabledSafetyCheck.custom_call(custom_call)]
    exported = export.export(jax.jit(grads), platforms=(platform,), disabled_checks=checks)(
        shape, kv, kv, meta)
    return exported.mlir_module().count(custom_call)
