"""SigLIP NaViT encoder: parity with HF `SiglipVisionModel`, NaViT packing, position modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from unijax.convert import vision as convert
from unijax.models import vit as vit_lib

PATCH, GRID = 4, 6  # tiny: 4 px patches, a 6 x 6 position table
SLOTS = 96  # one payload shape for every test image: one compilation per model

_forward = nnx.jit(lambda model, *payload: model(*payload))


def _cfg(mode: str):
    cfg = base.siglip_so400m_vit()
    cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size = 32, 2, 4, 48
    cfg.patch_size, cfg.max_grid, cfg.position_mode = PATCH, GRID, mode
    return cfg


def _patchify(image: np.ndarray) -> np.ndarray:
    """[h*p, w*p, 3] -> [h*w, p*p*3] in (row-in-patch, col-in-patch, channel) order."""
    h, w = image.shape[0] // PATCH, image.shape[1] // PATCH
    x = image.reshape(h, PATCH, w, PATCH, 3).transpose(0, 2, 1, 3, 4)
    return x.reshape(h * w, PATCH * PATCH * 3)


def _pack(images: list[np.ndarray], slots: int):
    """NaViT payload of one row [1, slots, ...] holding `images` back to back."""
    patches = np.zeros((1, slots, PATCH * PATCH * 3), np.float32)
    rc = np.zeros((1, slots, 2), np.int32)
    hw = np.zeros((1, slots, 2), np.int32)
    ids = np.zeros((1, slots), np.int32)
    start, spans = 0, []
    for i, image in enumerate(images, start=1):
        h, w = image.shape[0] // PATCH, image.shape[1] // PATCH
        n = h * w
        patches[0, start:start + n] = _patchify(image)
        rc[0, start:start + n] = np.stack(np.divmod(np.arange(n), w), axis=-1)
        hw[0, start:start + n] = (h, w)
        ids[0, start:start + n] = i
        spans.append((start, n))
        start += n
    return (patches, rc, hw, ids), spans


def _model(mode: str, seed: int | None = 0, **kw):
    """The encoder with random weights drawn in numpy (eager random init compiles a program per
    parameter shape: slow on CPU); seed=None leaves it abstract, for loading a checkpoint."""
    model = nnx.eval_shape(
        lambda: vit_lib.VisionTransformer(_cfg(mode), chunk_size=16, rngs=nnx.Rngs(0), **kw))
    if seed is None:
        return model
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        kind = str(getattr(path[-1], "key", path[-1]))
        noise = rng.normal(size=leaf.shape)
        return {"scale": 1 + 0.1 * noise, "bias": 0.1 * noise}.get(kind, 0.1 * noise)

    state = nnx.state(model, nnx.Param)
    convert.load_tree(model, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)),
                      what="vit")
    return model


def _hf_model(torch, transformers):
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        image_size=GRID * PATCH, patch_size=PATCH, layer_norm_eps=1e-6, vision_use_head=False,
        hidden_act="gelu_pytorch_tanh")
    model = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so every parameter is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_and_unijax():
    """HF SiglipVisionModel with random weights and unijax models (both modes) loaded from it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = _hf_model(torch, transformers)
    ours = {}
    for mode in ("extrapolate", "interpolate"):
        ours[mode] = _model(mode, seed=None)  # loading fills an abstract module
        convert.load_tree(ours[mode], convert.vit_from_hf(hf.state_dict(), num_heads=4),
                          what="vit")
    return torch, hf, ours


@pytest.mark.parity
@pytest.mark.parametrize("mode,grid", [
    ("extrapolate", (GRID, GRID)),  # table grid: HF's plain path, same ids as BAGEL's
    ("interpolate", (GRID, GRID)),
    ("interpolate", (3, 5)),  # downsampled, non-square
    ("interpolate", (8, 4)),  # taller than the table
    ("interpolate", (9, 10)),  # upsampled both ways
    ("interpolate", (1, 7)),
])
def test_matches_hf_siglip(hf_and_unijax, mode, grid):
    torch, hf, ours = hf_and_unijax
    image = np.random.default_rng(1).uniform(-1, 1, (grid[0] * PATCH, grid[1] * PATCH, 3))
    image = image.astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(image.transpose(2, 0, 1)[None]),
                 interpolate_pos_encoding=mode == "interpolate").last_hidden_state[0].numpy()
    payload, _ = _pack([image], SLOTS)
    out = np.asarray(_forward(ours[mode], *payload))[0]
    n = grid[0] * grid[1]
    np.testing.assert_allclose(out[:n], ref, atol=1e-5, rtol=1e-5)
    assert np.all(out[n:] == 0), "padding slots must be zero"


@pytest.mark.parity
def test_interpolated_table_matches_torch_bicubic():
    torch = pytest.importorskip("torch")
    g, d = 12, 5
    table = np.random.default_rng(0).normal(size=(g * g, d)).astype(np.float32)
    table_at = jax.jit(vit_lib.bicubic_positions, static_argnums=3)
    for h, w in [(37, 5), (4, 30), (12, 12), (2, 3)]:
        rc = np.zeros((1, 200, 2), np.int32)
        rc[0, :h * w] = np.stack(np.divmod(np.arange(h * w), w), axis=-1)
        hw = np.broadcast_to(np.int32([h, w]), rc.shape)
        got = np.asarray(table_at(table, rc, hw, g))[0, :h * w]
        src = torch.from_numpy(table.reshape(1, g, g, d)).permute(0, 3, 1, 2)
        ref = torch.nn.functional.interpolate(src, size=(h, w), mode="bicubic",
                                              align_corners=False)
        ref = ref.permute(0, 2, 3, 1).reshape(h * w, d).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"grid {(h, w)}")


@pytest.mark.parametrize("mode", ["extrapolate", "interpolate"])
def test_packed_images_match_single_images(mode):
    model = _model(mode, seed=3)
    rng = np.random.default_rng(2)
    sizes = [(2, 3), (5, 4), (6, 6)] if mode == "extrapolate" else [(2, 3), (7, 4), (6, 9)]
    images = [rng.uniform(-1, 1, (h * PATCH, w * PATCH, 3)).astype(np.float32)
              for h, w in sizes]
    payload, spans = _pack(images, SLOTS)
    packed = np.asarray(_forward(model, *payload))[0]
    for image, (start, n) in zip(images, spans):
        alone_payload, _ = _pack([image], SLOTS)
        alone = np.asarray(_forward(model, *alone_payload))[0, :n]
        np.testing.assert_allclose(packed[start:start + n], alone, atol=2e-5, rtol=1e-5)


def test_bf16_runs_and_is_close():
    """bfloat16 compute with the same weights: ~0.6% relative error (rounding); LayerNorm
    statistics or softmax in bfloat16 would give several %."""
    f32, bf16 = _model("extrapolate"), _model("extrapolate", dtype=jnp.bfloat16)
    image = np.random.default_rng(0).uniform(-1, 1, (3 * PATCH, 4 * PATCH, 3)).astype(np.float32)
    payload, _ = _pack([image], SLOTS)
    a, b = np.asarray(_forward(f32, *payload)), _forward(bf16, *payload)
    assert b.dtype == jnp.bfloat16
    b = np.asarray(b, np.float64)[0, :12]
    error = np.linalg.norm(b - a[0, :12]) / np.linalg.norm(a[0, :12])
    assert error < 2e-2, error
    np.testing.assert_allclose(b, a[0, :12], atol=2e-2 * np.abs(a).max())


@pytest.mark.slow
def test_remat_gives_same_gradients():
    image = np.random.default_rng(0).uniform(-1, 1, (2 * PATCH, 3 * PATCH, 3)).astype(np.float32)
    payload, _ = _pack([image], slots=8)
    grads = []
    for policy in ("none", "full"):
        model = _model("extrapolate", remat_policy=policy)
        loss = lambda m: jnp.sum(m(*payload) ** 2)
        grads.append(nnx.jit(nnx.grad(loss))(model))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_rejects_bad_position_mode():
    cfg = _cfg("bilinear")
    with pytest.raises(ValueError, match="position_mode"):
        vit_lib.VisionTransformer(cfg, rngs=nnx.Rngs(0))


def test_head_dim_padding_for_flash_kernels_is_exact():
    from unijax.batch import TokenMeta
    from unijax.kernels.attention import attention

    assert vit_lib.kernel_head_dim("pallas_gpu", 72) == 128
    assert vit_lib.kernel_head_dim("pallas_tpu", 16) == 64
    assert vit_lib.kernel_head_dim("pallas_tpu", 128) == 128
    assert vit_lib.kernel_head_dim("xla", 72) == 72
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 10, 2, 72)), jnp.float32) for _ in range(3))
    ids = jnp.asarray([[1] * 6 + [2] * 4], jnp.int32)
    meta = TokenMeta(doc_id=ids, order=jnp.arange(10)[None], split_id=ids,
                     noisy=jnp.zeros_like(ids, bool))
    ref = attention(q, k, v, meta)
    pad = ((0, 0), (0, 0), (0, 0), (0, 56))
    out = attention(*(jnp.pad(t, pad) for t in (q, k, v)), meta, scale=72**-0.5)
    np.testing.assert_allclose(out[..., :72], ref, atol=1e-6)
    np.testing.assert_array_equal(out[..., 72:], 0)


@pytest.mark.slow
def test_pallas_encoder_on_a_mesh_matches_xla(cpu_devices):
    """Pallas (interpreted, head dim zero-padded 8 -> 64) under a (1, 2, 2) mesh: the kernel
    runs per (row, head) shard and outputs and gradients equal the xla encoder's."""
    from jax.sharding import AxisType

    from unijax.training import sharding

    rng = np.random.default_rng(4)
    rows = [_pack([rng.uniform(-1, 1, (h * PATCH, w * PATCH, 3)).astype(np.float32)
                   for h, w in sizes], 128)[0] for sizes in ([(2, 3), (5, 4)], [(6, 6)])]
    payload = tuple(np.concatenate(parts) for parts in zip(*rows))

    def run(model):
        loss = lambda m: jnp.sum(jnp.sin(m(*payload)))
        return nnx.jit(nnx.value_and_grad(loss))(model)

    ref_loss, ref_grads = run(_model("extrapolate"))
    mesh = jax.make_mesh((1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=cpu_devices[:4])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        model = _model("extrapolate", attention_impl="pallas_gpu", attention_interpret=True)
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda s, *p: nnx.merge(graphdef, s)(*p))(state, *payload))
        loss, grads = run(model)
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
