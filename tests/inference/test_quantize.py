"""int8 weight-only sampling: what is quantised, how close it stays, where it is placed."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import qwix
from flax import nnx

from tests.inference import helpers
from unijax.inference import quantize
from unijax.inference.cache import Context
from unijax.inference.image import image_item
from unijax.training import sharding

# Stated tolerance: int8 per-channel absmax weights keep the small random model's logits and
# velocities within 3% of their largest magnitude (measured: about 1%).
RELATIVE = 0.03


@pytest.fixture(scope="module")
def models():
    cfg = helpers.config()
    full = helpers.random_model(cfg)
    return cfg, full, quantize.quantize_weights(nnx.clone(full))


def _relative(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_every_decoder_projection_and_the_lm_head_is_int8(models):
    _, full, q = models
    paths = quantize.quantized_paths(q)
    names = {"/".join(map(str, p)) for p in paths}
    assert "llm/lm_head" in names and "llm/layers/gen/mlp/down_proj" in names
    assert len(names) == 2 * 7 + 1  # two experts x seven projections, and the LM head
    modules = dict(nnx.iter_modules(q))
    for path in paths:
        kernel = modules[path].kernel[...]
        assert isinstance(kernel, qwix.QArray) and kernel.qvalue.dtype == jnp.int8
        # One scale per output channel (and stacked layer): the contracted axis has size 1.
        lead = 1 if path[1] == "layers" else 0
        assert kernel.scale.shape[lead] == 1 and kernel.scale.ndim == kernel.qvalue.ndim
    # The ViT, connectors, embedding and VAE are left alone.
    assert not isinstance(q.llm.embed_tokens.embedding[...], qwix.QArray)
    # fp32 -> int8 values + one fp32 scale per output channel.
    assert quantize.kernel_bytes(q) < 0.3 * quantize.kernel_bytes(full)


def test_forward_logits_and_velocity_stay_close_to_full_precision(models):
    cfg, full, q = models
    t = 0.6
    batch = helpers.full_batch(cfg, [[helpers.vit_image(seed=1), helpers.text("a red circle"),
                                      helpers.vae_image(seed=2, noisy=True, t=t)]])
    x_t = jax.random.normal(jax.random.key(3), (1, 128, full.patch ** 2 * full.latent_channels))
    run = lambda m: nnx.jit(lambda m, b: m(b, latent_tokens=x_t,
                                           timesteps=jnp.asarray([[t, 0.0]])))(m, batch)
    want, got = run(full), run(q)
    assert _relative(got.logits, want.logits) < RELATIVE
    gen = np.asarray(batch.modality)[0, batch.num_und:] == 3
    assert _relative(np.asarray(got.velocity)[0, gen], np.asarray(want.velocity)[0, gen]) < \
        RELATIVE
    assert _relative(got.logits, want.logits) > 1e-4  # it is not the same model


def test_cached_denoising_step_stays_close(models):
    cfg, full, q = models
    prompt = [helpers.text("a photo of a blue square")]
    x_t = jax.random.normal(jax.random.key(4), (1, 64, full.patch ** 2 * full.latent_channels))
    outs = []
    for model in (full, q):
        engine = helpers.engine(cfg, model)
        ctx = Context.empty(engine, 1, 192).append(engine, [prompt])
        chunk, _ = engine.chunk(ctx, [[image_item((8, 8), engine.latent_cell)]],
                                latent_grid=(8, 8))
        out, _ = engine.extend(ctx.cache, chunk, x_t, jnp.asarray([[0.5]]), logits=False)
        outs.append(np.asarray(out.velocity)[0, :64])
    assert _relative(outs[1], outs[0]) < RELATIVE


def test_sharded_kernels_stay_sharded(models):
    cfg, full, _ = models
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 2}),
                              devices=jax.devices()[:2])
    graphdef, state = nnx.split(full)
    specs = nnx.get_partition_spec(state)
    placed = jax.tree.map(
        lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(
            mesh, sharding.logical_to_mesh_spec(s, sharding.LOGICAL_RULES)))
        if isinstance(s, jax.sharding.PartitionSpec) else x, state, specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    q = quantize.quantize_weights(nnx.merge(graphdef, placed))
    kernel = q.llm.layers.und.mlp.up_proj.kernel[...]  # [N, embed, mlp]: mlp over tensor
    assert kernel.qvalue.sharding.spec == placed["llm"]["layers"]["und"]["mlp"]["up_proj"][
        "kernel"].value.sharding.spec
    assert "tensor" in str(kernel.scale.sharding.spec)
    with pytest.raises(ValueError, match="qtype"):
        quantize.quantize_weights(q, "int3")
