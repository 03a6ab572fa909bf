"""The KV cache gives what the training forward gives over the same sequence.

Each test lays a sequence out as training does (one document, `data.packing.layout`), runs the
full forward once, then builds the same sequence through the cache (prefill of a context, then
one token at a time, or a denoising step) and compares, in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.inference import helpers
from unijax.inference import text as text_lib
from unijax.inference.cache import CacheFullError, Context
from unijax.inference.image import image_item

ATOL = 2e-4


@pytest.fixture(scope="module")
def setup():
    cfg = helpers.config()
    model = helpers.random_model(cfg)
    return cfg, model, helpers.engine(cfg, model)


def _answer_logits(model, cfg, context_items, answer: str):
    """Full-forward logits at `<|im_start|>` and every answer token of the last text."""
    batch = helpers.full_batch(cfg, [[*context_items, helpers.text(answer, loss=True)]])
    logits = np.asarray(model(batch).logits)[0]
    ids = helpers.TOKENIZER.encode(answer)
    start = int(np.nonzero(np.asarray(batch.text_weight)[0] > 0)[0][0])  # <|im_start|>
    return logits[start:start + len(ids) + 1], ids


def _incremental_logits(engine, ctx, rows_tokens):
    """Feeds `<|im_start|>`, then each row's tokens one at a time; logits per fed token."""
    steps = max(len(t) for t in rows_tokens)
    out = []
    tokens = np.full(ctx.batch_size, engine.special.im_start)
    for i in range(steps + 1):
        ctx, logits = text_lib.feed(engine, ctx, tokens)
        out.append(np.asarray(logits))
        tokens = np.array([t[i] if i < len(t) else 0 for t in rows_tokens])
    return ctx, np.stack(out, axis=1)


@pytest.mark.parametrize("image", ["none", "vit", "vae"])
def test_incremental_decoding_equals_full_forward(setup, image):
    cfg, model, engine = setup
    items = {"none": [], "vit": [helpers.vit_image(seed=1)],
             "vae": [helpers.vae_image(seed=2)]}[image]
    context = [*items, helpers.text("what colour is the circle?")]
    want, ids = _answer_logits(model, cfg, context, "red")
    ctx = Context.empty(engine, 1, 256).append(engine, [context])
    _, got = _incremental_logits(engine, ctx, [ids])
    np.testing.assert_allclose(got[0], want, atol=ATOL, rtol=1e-4)
    assert np.abs(want).max() > 0.1  # the logits are not trivially small


def test_batched_rows_of_different_lengths(setup):
    cfg, model, engine = setup
    contexts = [[helpers.vit_image(seed=3), helpers.text("how many?")],
                [helpers.text("a much longer question about the small blue square here?")]]
    answers = ["three", "no"]
    ctx = Context.empty(engine, 2, 320).append(engine, contexts)
    _, got = _incremental_logits(engine, ctx, [helpers.TOKENIZER.encode(a) for a in answers])
    for r in range(2):
        want, ids = _answer_logits(model, cfg, contexts[r], answers[r])
        np.testing.assert_allclose(got[r, :len(ids) + 1], want, atol=ATOL, rtol=1e-4)


def test_chunked_prefill_equals_token_by_token(setup):
    """A text prefilled as one chunk leaves the cache a token-by-token feed would."""
    cfg, model, engine = setup
    context = [helpers.vit_image(seed=4), helpers.text("describe")]
    base = Context.empty(engine, 1, 256).append(engine, [context])
    ids = helpers.TOKENIZER.encode("a red circle")
    chunked, out = base.append_with_logits(engine, [[helpers.text("a red circle")]])
    logits, chunk = out
    fed, per_token = _incremental_logits(engine, base, [ids])
    # The chunk's und slots: <|im_start|>, ids, <|im_end|>, then padding.
    np.testing.assert_allclose(np.asarray(logits)[0, :len(ids) + 1], per_token[0], atol=ATOL,
                               rtol=1e-4)
    assert chunked.next_position[0] == fed.next_position[0] + 1  # + <|im_end|>


def test_denoising_step_equals_training_forward(setup):
    cfg, model, engine = setup
    prompt = helpers.text("a photo of a red circle")
    t = 0.6
    noisy = helpers.vae_image(seed=5, noisy=True, t=t)
    batch = helpers.full_batch(cfg, [[helpers.vit_image(seed=6), prompt, noisy]])
    x_t = jax.random.normal(jax.random.key(7), (1, 64, engine.token_dim))
    # The row's canvas has two VAE slots; the image fills slot 0.
    canvas = jnp.concatenate([x_t, jnp.zeros_like(x_t)], axis=1)
    full = model(batch, latent_tokens=canvas, timesteps=jnp.asarray([[t, 0.0]]))
    gen = np.asarray(batch.modality)[0, batch.num_und:] == 3
    want = np.asarray(full.velocity)[0, gen]

    ctx = Context.empty(engine, 1, 256).append(engine, [[helpers.vit_image(seed=6), prompt]])
    chunk, _ = engine.chunk(ctx, [[image_item((8, 8), engine.latent_cell)]], latent_grid=(8, 8))
    out, _ = engine.extend(ctx.cache, chunk, x_t, jnp.asarray([[t]]), logits=False)
    got = np.asarray(out.velocity)[0, :64]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)
    assert np.abs(want).max() > 0.01


def test_cache_full_is_a_clear_error(setup):
    _, _, engine = setup
    ctx = Context.empty(engine, 1, 40)
    with pytest.raises(CacheFullError, match="KV cache full: 0 of 40 slots"):
        ctx.append(engine, [[helpers.text("x" * 60)]])
    ctx = ctx.append(engine, [[helpers.text("hello")]])  # 16 slots (one chunk)
    with pytest.raises(CacheFullError, match="make the context with a larger capacity"):
        text_lib.generate(engine, ctx, max_new_tokens=30)


def test_snapshots_stay_valid_after_appending(setup):
    """Contexts are values: appending to one leaves an earlier snapshot usable and unchanged."""
    _, _, engine = setup
    base = Context.empty(engine, 1, 128).append(engine, [[helpers.text("first")]])
    k_before = np.asarray(base.cache.k).copy()
    longer = base.append(engine, [[helpers.text("second")]])
    text_lib.generate(engine, longer, max_new_tokens=3)
    np.testing.assert_array_equal(np.asarray(base.cache.k), k_before)
    assert longer.length > base.length


def test_sharded_cache_equals_one_device(setup):
    """On a data 2 x tensor 2 mesh the cache holds rows over `data` and KV heads over `tensor`
    (as training shards them), the weights stay sharded, and the logits equal one device's."""
    import ml_collections
    from flax import nnx

    from unijax.training import sharding

    cfg, model, engine = setup
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 2}),
                              devices=jax.devices()[:4])
    graphdef, state = nnx.split(model)
    specs = nnx.get_partition_spec(state)  # logical names
    placed = jax.tree.map(
        lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(
            mesh, sharding.logical_to_mesh_spec(s, sharding.LOGICAL_RULES)))
        if isinstance(s, jax.sharding.PartitionSpec) else x, state, specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    sharded_model = nnx.merge(graphdef, placed)
    sharded = helpers.engine(cfg, sharded_model, mesh=mesh, rules=sharding.LOGICAL_RULES)
    contexts = [[helpers.vit_image(seed=8), helpers.text("what shape?")],
                [helpers.text("count the squares")]]
    answers = [helpers.TOKENIZER.encode("circle"), helpers.TOKENIZER.encode("two")]
    results = []
    for eng in (engine, sharded):
        ctx = Context.empty(eng, 2, 192).append(eng, contexts)
        results.append((ctx, _incremental_logits(eng, ctx, answers)[1]))
    (_, want), (ctx, got) = results
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    assert spec(ctx.cache.k) == (None, "data", None, "tensor", None)
    assert spec(ctx.cache.meta.doc_id) == ("data", None)
    kernel = sharded.state["llm"]["layers"]["und"]["mlp"]["up_proj"]["kernel"].value
    assert "tensor" in str(kernel.sharding.spec)
