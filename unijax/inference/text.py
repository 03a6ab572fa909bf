"""Text generation over a cached context: greedy, temperature, top-k and top-p sampling.

  ctx, ids = generate(engine, ctx, max_new_tokens=64, sampling=Sampling(temperature=0.7))
  texts = [tokenizer.decode(row) for row in ids]

As in BAGEL (`generate_text`), decoding starts by feeding `<|im_start|>` at each row's next
RoPE position; each step feeds the token sampled last, so the answer enters the cache as the
training layout has it (`<|im_start|> ids <|im_end|>`). A row stops when it samples a stop
token (default `<|im_end|>`), which is fed as well, closing the text; afterwards its slots are
padding (doc id 0, no position used) while the other rows go on. The whole loop is one
`jax.lax.while_loop` on the device (compiled once per batch size, `max_new_tokens` and
sampling settings), so no token goes back to the host until the end.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unijax.inference import cache as cache_lib
from unijax.inference.cache import Context, Engine


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
      temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
      top_k: keep the k most likely tokens (0 = all).
      top_p: keep the smallest set of most likely tokens whose probability reaches p (1 = all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling: temperature={self.temperature} must be >= 0, "
                             f"top_k={self.top_k} >= 0 and top_p={self.top_p} in (0, 1]")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] float32 with the tokens top-k / top-p exclude set to -inf (after the
    temperature)."""
    logits = logits.astype(jnp.float32) / max(sampling.temperature, 1e-6)
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token is kept when the probability of the tokens before it is below p (so the
        # most likely token is always kept).
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def next_token(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """[B, V] logits -> [B] token ids (argmax when greedy)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, sampling)).astype(jnp.int32)


def feed(engine: Engine, ctx: Context, tokens) -> tuple[Context, jax.Array]:
    """Appends one text token per row ([B] ids, continuing the row's current text) and
    returns (the context, the logits [B, V] that token predicts): a single decoding step."""
    ctx.check_room(1)

    def build():
        def step(state, cache, tokens, position, order, length):
            chunk = cache_lib.text_chunk(tokens, position, order, jnp.ones_like(tokens, bool))
            out, (k, v) = engine._model(state).extend(chunk, cache.k, cache.v, cache.meta)
            cache = engine._constrain(cache_lib.write(cache, k, v, chunk.token_meta(), length))
            return cache, out.logits[:, 0]

        return jax.jit(step)

    with engine.scope():
        cache, logits = engine.function(("feed", ctx.batch_size), build)(
            engine.state, ctx.cache, jnp.asarray(tokens, jnp.int32),
            jnp.asarray(ctx.next_position, jnp.int32), jnp.asarray(ctx.next_order, jnp.int32),
            jnp.int32(ctx.length))
    return ctx.advanced(cache, 1, ctx.next_position + 1, ctx.next_order + 1), logits


def generate(engine: Engine, ctx: Context, *, max_new_tokens: int,
             sampling: Sampling = Sampling(), stop_ids: tuple[int, ...] | None = None,  # noqa: B008
             seed: int = 0) -> tuple[Context, list[list[int]]]:
    """Decodes up to `max_new_tokens` tokens per row after the context.

    Args:
      engine, ctx: the model and the rows' contexts.
      max_new_tokens: the most tokens a row generates (its stop token included).
      sampling: greedy by default.
      stop_ids: tokens that end a row (default: `<|im_end|>`).
      seed: the sampling key (rows draw independently).

    Returns:
      (the context with `<|im_start|>`, the answer and its stop token appended; per row the
      generated ids, without `<|im_start|>` and the stop token).

    Raises:
      cache.CacheFullError: when max_new_tokens + 1 more tokens might not fit.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    stop_ids = (engine.special.im_end,) if stop_ids is None else tuple(int(s) for s in stop_ids)
    steps = max_new_tokens + 1  # <|im_start|>, then every generated token
    ctx.check_room(steps)
    loop = _decode_loop(engine, ctx.batch_size, max_new_tokens, sampling, stop_ids)
    with engine.scope():
        cache, out, count, position, order, used = loop(
            engine.state, ctx.cache, jnp.int32(ctx.length),
            jnp.asarray(ctx.next_position, jnp.int32), jnp.asarray(ctx.next_order, jnp.int32),
            jax.random.key(seed))
    out, count, position, order, used = jax.device_get((out, count, position, order, used))
    ids = [[int(t) for t in row[:n]] for row, n in zip(out, count)]
    return ctx.advanced(cache, int(used), position, order), ids


def _decode_loop(engine: Engine, batch_size: int, max_new: int, sampling: Sampling,
                 stop_ids: tuple[int, ...]):
    """The jitted decoding loop for these settings (built once per engine and settings)."""
    return engine.function(("text", batch_size, max_new, sampling, stop_ids),
                           lambda: _build_decode_loop(engine, max_new, sampling, stop_ids))


def _build_decode_loop(engine: Engine, max_new: int, sampling: Sampling,
                       stop_ids: tuple[int, ...]):
    stops = jnp.asarray(stop_ids, jnp.int32)

    def loop(state, cache, length, position, order, rng):
        b = position.shape[0]
        start = jnp.full((b,), engine.special.im_start, jnp.int32)

        def body(carry):
            # The weights ride in the carry: nnx modules must be built from values of the
            # loop's own trace.
            (state, cache, step, token, position, order, fed_stop, stopped, out, count,
             rng) = carry
            live = ~fed_stop
            chunk = cache_lib.text_chunk(token, position, order, live)
            result, (k, v) = engine._model(state).extend(chunk, cache.k, cache.v, cache.meta)
            cache = engine._constrain(cache_lib.write(cache, k, v, chunk.token_meta(),
                                                      length + step))
            rng, key = jax.random.split(rng)
            sampled = next_token(result.logits[:, 0], key, sampling)
            # A row that fed its stop token this step is done; one that sampled a stop token
            # feeds it next step; the others record the token and go on.
            fed_stop = fed_stop | stopped
            is_stop = jnp.any(sampled[:, None] == stops[None, :], axis=-1)
            record = live & ~stopped & ~is_stop & (count < max_new)
            out = out.at[jnp.arange(b), jnp.minimum(count, max_new - 1)].set(
                jnp.where(record, sampled, out[jnp.arange(b), jnp.minimum(count, max_new - 1)]))
            count = count + record
            stopped = stopped | (live & is_stop) | (count >= max_new)
            position = position + live
            order = order + live
            token = jnp.where(live, sampled, token)
            return (state, cache, step + 1, token, position, order, fed_stop, stopped, out,
                    count, rng)

        def cond(carry):
            step, fed_stop = carry[2], carry[6]
            return (step < max_new + 1) & ~jnp.all(fed_stop)

        init = (state, cache, jnp.int32(0), start, position, order, jnp.zeros((b,), bool),
                jnp.zeros((b,), bool), jnp.zeros((b, max_new), jnp.int32),
                jnp.zeros((b,), jnp.int32), rng)
        _, cache, steps, _, position, order, _, _, out, count, _ = jax.lax.while_loop(
            cond, body, init)
        return cache, out, count, position, order, steps

    # No donation: the caller's context stays valid (it may be a guidance snapshot).
    return jax.jit(loop)


def decode(tokenizer, ids: list[list[int]]) -> list[str]:
    """Generated ids per row -> text."""
    return [tokenizer.decode(np.asarray(row, np.int64)) for row in ids]
