"""The chunked cross-entropy equals the dense one (values and gradients), and the loss is
normalised by the global weight sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unijax.training import losses


def dense_reference(hidden, head, targets, weights):
    """Numpy: logits of every token at once, float64."""
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return {"ce_sum": np.sum(weights * (lse - target)), "z_sum": np.sum(weights * lse ** 2),
            "correct_sum": np.sum(weights * (logits.argmax(-1) == targets))}


@pytest.fixture
def problem(rng):
    b, s, d, v = 2, 37, 16, 50
    hidden = rng.normal(size=(b, s, d)).astype(np.float32)
    head = rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, s)).astype(np.int32)
    weights = (rng.random((b, s)) < 0.7).astype(np.float32) * rng.uniform(0.5, 2, (b, s))
    return hidden, head, targets, weights.astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_chunked_ce_equals_dense(problem, chunk):
    hidden, head, targets, weights = problem
    got = losses.cross_entropy_sums(jnp.asarray(hidden), jnp.asarray(targets),
                                    jnp.asarray(weights), lambda h: h @ jnp.asarray(head), chunk)
    want = dense_reference(hidden, head, targets, weights)
    for key in want:
        assert float(got[key]) == pytest.approx(want[key], rel=1e-5), key


def test_chunked_ce_gradient_equals_dense(problem):
    hidden, head, targets, weights = problem

    def dense(h, w_head):
        logits = h @ w_head
        lse = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(weights * (lse - tgt))

    def chunked(h, w_head):
        return losses.cross_entropy_sums(h, jnp.asarray(targets), jnp.asarray(weights),
                                         lambda x: x @ w_head, 8)["ce_sum"]

    args = (jnp.asarray(hidden), jnp.asarray(head))
    for g_dense, g_chunked in zip(jax.grad(dense, (0, 1))(*args),
                                  jax.grad(chunked, (0, 1))(*args)):
        np.testing.assert_allclose(np.asarray(g_chunked), np.asarray(g_dense), rtol=1e-4,
                                   atol=1e-5)


def test_chunked_ce_never_holds_all_logits(problem):
    """The largest float32 array of the chunked CE's jaxpr is one chunk of logits."""
    hidden, head, targets, weights = problem
    b, s, _ = hidden.shape
    v = head.shape[1]
    fn = lambda h: losses.cross_entropy_sums(h, jnp.asarray(targets), jnp.asarray(weights),
                                             lambda x: x @ jnp.asarray(head), 8)["ce_sum"]
    jaxpr = jax.make_jaxpr(jax.grad(fn))(jnp.asarray(hidden))

    def subjaxprs(value):
        values = value if isinstance(value, tuple | list) else (value,)
        for v in values:
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for value in eqn.params.values():
                for sub in subjaxprs(value):
                    yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) < b * s * v / 2
    assert max(sizes(jaxpr.jaxpr)) >= b * 8 * v  # one chunk's logits do exist



def test_lm_head_runs_only_on_chunks_with_targets(rng):
    """Row 0 has 20 targets scattered over 64 und tokens, row 1 has 5: with 16-token chunks the
    head runs on ceil(20 / 16) = 2 chunks, not 4, and the sums are still the dense ones."""
    b, s, d, v = 2, 64, 8, 30
    hidden = rng.normal(size=(b, s, d)).astype(np.float32)
    head = rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, s)).astype(np.int32)
    weights = np.zeros((b, s), np.float32)
    weights[0, rng.choice(s, 20, replace=False)] = 1.0
    weights[1, rng.choice(s, 5, replace=False)] = 0.5
    calls = []

    def head_fn(h):
        jax.debug.callback(lambda: calls.append(1))
        return h @ jnp.asarray(head)

    got = jax.jit(lambda h: losses.cross_entropy_sums(
        h, jnp.asarray(targets), jnp.asarray(weights), head_fn, 16))(jnp.asarray(hidden))
    jax.effects_barrier()
    assert len(calls) == 2
    want = dense_reference(hidden, head, targets, weights)
    for key in want:
        assert float(got[key]) == pytest.approx(want[key], rel=1e-5), key

def test_combine_normalises_by_global_totals():
    sums = {"ce_sum": 6.0, "z_sum": 40.0, "mse_sum": 3.0}
    totals = {"text_weight": 3.0, "flow_weight": 12.0}
    cfg = losses.LossConfig(ce_weight=0.5, mse_weight=2.0, z_loss_weight=1e-2)
    got = float(losses.combine(sums, totals, cfg))
    assert got == pytest.approx(0.5 * 6 / 3 + 1e-2 * 40 / 3 + 2.0 * 3 / 12)
    # No text in the step: the CE term is 0, not NaN.
    empty = float(losses.combine({"ce_sum": 0.0, "z_sum": 0.0, "mse_sum": 3.0},
                                 {"text_weight": 0.0, "flow_weight": 12.0}, cfg))
    assert empty == pytest.approx(0.5)


def test_per_dataset_ce_sums_add_up_and_equal_each_dataset_alone(problem, rng):
    """Bucketing by dataset index: bucket k is the CE sum of dataset k's tokens (the sum with
    every other token's weight set to 0), the buckets add up to the total, and padding (-1)
    and buckets beyond the bound count nowhere."""
    hidden, head, targets, weights = problem
    dataset = rng.integers(0, 3, targets.shape).astype(np.int32)
    dataset[:, -5:] = -1  # padding
    weights[:, -5:] = 0.0
    args = (jnp.asarray(hidden), jnp.asarray(targets))
    head_fn = lambda h: h @ jnp.asarray(head)
    got = losses.cross_entropy_sums(*args, jnp.asarray(weights), head_fn, 8,
                                    jnp.asarray(dataset), 4)
    per = np.asarray(got["ce_sum_per_dataset"])
    assert per.shape == (4,) and per[3] == 0.0
    assert per.sum() == pytest.approx(float(got["ce_sum"]), rel=1e-5)
    for k in range(3):
        alone = losses.cross_entropy_sums(*args, jnp.asarray(weights * (dataset == k)),
                                          head_fn, 8)["ce_sum"]
        assert per[k] == pytest.approx(float(alone), rel=1e-5), k
    counted = losses.per_dataset(jnp.ones(targets.shape), jnp.asarray(dataset), 2)
    assert np.asarray(counted).tolist() == [np.sum(dataset == 0), np.sum(dataset == 1)]
