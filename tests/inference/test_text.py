"""Text decoding: the token filters against numpy references, and `generate` against a loop
of single `feed` steps on a small random model (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.inference import helpers
from unijax.inference import text as text_lib
from unijax.inference.cache import Context
from unijax.inference.text import Sampling, filter_logits, next_token

PROMPTS = ["describe the picture", "a much longer question about the small blue square?"]


@pytest.fixture(scope="module")
def engine():
    return helpers.engine()


@pytest.fixture(scope="module")
def prompted(engine):
    """Two rows whose prompts have different lengths (the chunk pads the shorter one)."""
    return Context.empty(engine, 2, 128).append(engine, [[helpers.text(p)] for p in PROMPTS])


def _logits(shape=(6, 50), seed=0, scale=3.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _kept(filtered) -> np.ndarray:
    return np.isfinite(np.asarray(filtered))


# --- filter_logits / next_token --------------------------------------------------------------


def test_greedy_is_argmax_whatever_the_filters():
    logits = _logits()
    for sampling in (Sampling(), Sampling(top_k=3), Sampling(top_p=0.2)):
        got = next_token(jnp.asarray(logits), jax.random.key(0), sampling)
        np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 2, 7, 50, 80])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = _logits(seed=1)
    got = np.asarray(filter_logits(jnp.asarray(logits), Sampling(temperature=1.0, top_k=k)))
    want = np.zeros_like(logits, bool)
    np.put_along_axis(want, np.argsort(-logits, axis=-1)[:, :min(k, 50)], True, axis=-1)
    np.testing.assert_array_equal(_kept(got), want)
    np.testing.assert_array_equal(got[want], logits[want])  # the kept logits are untouched
    assert np.all(got[~want] == -np.inf)


def _top_p_reference(logits: np.ndarray, p: float) -> np.ndarray:
    """The smallest set of most likely tokens whose probability reaches p, per row."""
    keep = np.zeros_like(logits, bool)
    for r, row in enumerate(logits):
        order = np.argsort(-row)
        probs = np.exp(row[order] - row.max())
        cum = np.cumsum(probs / probs.sum())
        n = int(np.searchsorted(cum, p)) + 1  # first prefix whose mass is >= p
        keep[r, order[:n]] = True
    return keep


@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, temperature):
    logits = _logits(seed=2, scale=2.0)
    got = filter_logits(jnp.asarray(logits), Sampling(temperature=temperature, top_p=p))
    want = _top_p_reference(logits / temperature, p)
    np.testing.assert_array_equal(_kept(got), want)
    assert _kept(got)[np.arange(len(logits)), logits.argmax(-1)].all()  # most likely kept


def test_top_p_applies_after_top_k():
    logits = _logits(seed=3, scale=1.0)
    got = filter_logits(jnp.asarray(logits), Sampling(temperature=1.0, top_k=10, top_p=0.7))
    top_k = np.where(_kept(filter_logits(jnp.asarray(logits),
                                         Sampling(temperature=1.0, top_k=10))), logits, -np.inf)
    np.testing.assert_array_equal(_kept(got), _top_p_reference(top_k, 0.7))


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature_divides_the_logits(temperature):
    logits = _logits(seed=4)
    got = filter_logits(jnp.asarray(logits), Sampling(temperature=temperature))
    np.testing.assert_allclose(np.asarray(got), logits / temperature, rtol=1e-6)


def test_sampling_is_deterministic_per_key_and_top_k_1_is_greedy():
    logits = jnp.asarray(_logits(shape=(32, 50), seed=5, scale=1.0))
    hot = Sampling(temperature=1.0)
    a = next_token(logits, jax.random.key(1), hot)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(next_token(logits,
                                                                       jax.random.key(1), hot)))
    assert not np.array_equal(np.asarray(a), np.asarray(next_token(logits, jax.random.key(2),
                                                                   hot)))
    for seed in range(3):
        got = next_token(logits, jax.random.key(seed), Sampling(temperature=2.0, top_k=1))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(logits).argmax(-1))


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.5),
                                      Sampling(temperature=2.0, top_k=2),
                                      Sampling(temperature=1.0, top_p=0.6)])
def test_sample_frequencies_match_the_filtered_softmax(sampling):
    """4000 draws over 3 tokens: frequencies within 0.03 (about 4 sigma) of the target."""
    logits = np.array([1.0, 0.4, -0.5], np.float32)
    scaled = logits / sampling.temperature
    keep = np.ones(3, bool)
    if sampling.top_k:
        keep = scaled >= np.sort(scaled)[-sampling.top_k]
    if sampling.top_p < 1:
        keep &= _top_p_reference(scaled[None], sampling.top_p)[0]
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: next_token(jnp.asarray(logits)[None], k, sampling)[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=3) / 4000
    np.testing.assert_allclose(freq, probs, atol=0.03)
    assert np.all(freq[~keep] == 0)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0),
                                    dict(top_p=1.5)])
def test_sampling_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="Sampling: temperature="):
        Sampling(**kwargs)


# --- generate --------------------------------------------------------------------------------


def _greedy_by_feed(engine, ctx, max_new: int, stops=()) -> list[list[int]]:
    """The reference loop: feed `<|im_start|>`, then argmax after argmax; per row the ids up
    to its first stop token (excluded), at most max_new."""
    tokens = np.full(ctx.batch_size, engine.special.im_start)
    seqs = [[] for _ in range(ctx.batch_size)]
    done = np.zeros(ctx.batch_size, bool)
    for _ in range(max_new):
        ctx, logits = text_lib.feed(engine, ctx, tokens)
        tokens = np.asarray(logits).argmax(-1)
        for r, t in enumerate(tokens):
            done[r] |= int(t) in stops
            if not done[r]:
                seqs[r].append(int(t))
    return seqs


def test_greedy_generate_equals_a_feed_loop(engine, prompted):
    stops = (engine.special.im_end,)
    want = _greedy_by_feed(engine, prompted, 12, stops)
    out, got = text_lib.generate(engine, prompted, max_new_tokens=12)
    assert got == want
    assert all(len(row) > 0 for row in got)


def _pick_stop(seqs: list[list[int]]) -> tuple[int, int]:
    """(j, token): the first token of row 0 that is new at step j >= 1 and absent from row 1."""
    for j, token in enumerate(seqs[0]):
        if j >= 1 and token not in seqs[0][:j] and token not in seqs[1]:
            return j, token
    raise AssertionError(f"no usable stop token in the greedy rows {seqs}")


def test_a_stop_token_ends_its_row_only(engine, prompted):
    """Row 0 stops at its greedy token of step j: ids before it, the stop fed (position and
    order + 1 + j + 1), the cache as a feed loop leaves it; row 1 runs on, as it does alone."""
    max_new = 10
    _, free = text_lib.generate(engine, prompted, max_new_tokens=max_new, stop_ids=())
    j, stop = _pick_stop(free)
    out, ids = text_lib.generate(engine, prompted, max_new_tokens=max_new, stop_ids=(stop,))
    assert ids == [free[0][:j], free[1]]
    np.testing.assert_array_equal(out.next_position - prompted.next_position,
                                  [1 + j + 1, 1 + max_new])
    np.testing.assert_array_equal(out.next_order - prompted.next_order,
                                  [1 + j + 1, 1 + max_new])
    assert out.length == prompted.length + 1 + max_new  # the longest row's steps

    for r, text in enumerate(PROMPTS):  # each row alone gives its batched ids
        alone = Context.empty(engine, 1, 128).append(engine, [[helpers.text(text)]])
        assert text_lib.generate(engine, alone, max_new_tokens=max_new,
                                 stop_ids=(stop,))[1] == [ids[r]]

    # Row 0's cache now holds <|im_start|> ids stop: the next token sees what a feed loop left.
    by_feed = prompted
    for token in [engine.special.im_start, *free[0][:j], stop]:
        by_feed, _ = text_lib.feed(engine, by_feed, np.full(2, token))
    probe = np.full(2, helpers.TOKENIZER.encode("a")[0])
    _, want = text_lib.feed(engine, by_feed, probe)
    _, got = text_lib.feed(engine, out, probe)
    np.testing.assert_allclose(np.asarray(got)[0], np.asarray(want)[0], atol=2e-4, rtol=1e-4)


def test_max_new_tokens_caps_the_length(engine, prompted):
    out, ids = text_lib.generate(engine, prompted, max_new_tokens=4, stop_ids=())
    assert [len(row) for row in ids] == [4, 4]
    np.testing.assert_array_equal(out.next_position - prompted.next_position, [5, 5])
    assert out.length == prompted.length + 5  # <|im_start|> and 4 tokens, no stop
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        text_lib.generate(engine, prompted, max_new_tokens=0)


def test_sampled_generation_is_deterministic_per_seed(engine, prompted):
    hot = Sampling(temperature=1.0)
    a = text_lib.generate(engine, prompted, max_new_tokens=4, sampling=hot, stop_ids=(),
                          seed=0)[1]
    assert a == text_lib.generate(engine, prompted, max_new_tokens=4, sampling=hot,
                                  stop_ids=(), seed=0)[1]
    greedy = text_lib.generate(engine, prompted, max_new_tokens=4, stop_ids=())[1]
    top1 = text_lib.generate(engine, prompted, max_new_tokens=4, stop_ids=(), seed=3,
                             sampling=Sampling(temperature=1.0, top_k=1))[1]
    assert top1 == greedy
