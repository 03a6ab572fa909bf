"""Rectified flow pieces against numpy written from the formulas (BAGEL's conventions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unijax.training import flow


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_shift_time_matches_formula_and_keeps_ends(shift):
    t = np.linspace(0, 1, 11, dtype=np.float32)
    got = np.asarray(flow.shift_time(jnp.asarray(t), shift))
    np.testing.assert_allclose(got, shift * t / (1 + (shift - 1) * t), rtol=1e-6)
    assert got[0] == 0 and got[-1] == pytest.approx(1.0)
    if shift > 1:  # a larger shift means more noise at every inner time
        assert np.all(got[1:-1] > t[1:-1])


def test_flow_loss_equals_numpy_reference(rng):
    """x_t, the target and the weighted loss on a packed gen slice: token i reads grid token
    payload_index[i]; images 0 and 1 have 4 tokens each, image 1 is clean (t = 0)."""
    b, n, per, f = 2, 2, 4, 3
    x0 = rng.normal(size=(b, n * per, f)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    times = np.array([[0.3, 0.0], [0.8, 0.55]], np.float32)
    payload = np.array([[0, 1, 2, 3, 4, 5, -1], [7, 6, 5, 4, 0, 1, 2]], np.int32)
    weight = np.array([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 2, 2, 2]], np.float32)
    velocity = rng.normal(size=(b, payload.shape[1], f)).astype(np.float32)

    x_t, v = flow.noise_latents(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(times))
    t_grid = np.repeat(times, per, axis=1)[..., None]
    np.testing.assert_allclose(np.asarray(x_t), (1 - t_grid) * x0 + t_grid * noise, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(x_t)[0, per:], x0[0, per:])  # clean image: x0
    target = flow.gather_tokens(v, jnp.asarray(payload))
    got = float(flow.flow_loss_sum(jnp.asarray(velocity), target, jnp.asarray(weight)))

    expected = 0.0
    for row in range(b):
        for i, k in enumerate(payload[row]):
            if weight[row, i]:
                err = velocity[row, i] - (noise[row, k] - x0[row, k])
                expected += weight[row, i] * np.mean(err ** 2)
    assert got == pytest.approx(expected, rel=1e-5)


def test_row_noise_depends_on_each_row_key_alone():
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(4))
    whole = np.asarray(flow.row_noise(keys, (5, 2)))
    halves = [np.asarray(flow.row_noise(keys[i::2], (5, 2))) for i in range(2)]
    np.testing.assert_array_equal(whole[0::2], halves[0])
    np.testing.assert_array_equal(whole[1::2], halves[1])
    assert abs(whole.std() - 1) < 0.3 and not np.allclose(whole[0], whole[1])
