"""PackedBatch: the segment builder lays rows out the BAGEL way, and validate() catches bad rows."""

import dataclasses

import jax
import numpy as np
import pytest

from unijax import batch as batch_lib
from unijax import batch_builder as bb


def _edit_batch():
    # BAGEL's edit sample: [clean VAE(src), ViT(src)] -> text(instruction) -> noisy VAE(target).
    doc = [bb.vae_image(2, 2), bb.vit_image(2, 2), bb.text([7, 8, 9]),
           bb.vae_image(2, 2, noisy=True, t=0.5)]
    return bb.build([[doc]], num_und=32, num_gen=16, latent_grid=(2, 2), vit_patch_size=2)


def _in_order(batch, field, row=0):
    live = batch.doc_id[row] > 0
    ranked = np.argsort(np.where(live, batch.order[row], 1 << 30), kind="stable")
    return getattr(batch, field)[row][ranked[: live.sum()]]


def test_edit_sample_positions_match_bagel():
    batch = _edit_batch()
    batch_lib.validate(batch, latent_tokens_per_image=4)
    # bagel.md 1.4: clean VAE -> [0]*6, ViT -> [1]*6, text 2..6, noisy target -> [7]*6.
    expected = [0] * 6 + [1] * 6 + [2, 3, 4, 5, 6] + [7] * 6
    assert _in_order(batch, "position").tolist() == expected


def test_expert_major_layout():
    batch = _edit_batch()
    mod = batch.modality[0]
    assert set(mod[:32].tolist()) <= {batch_lib.PAD, batch_lib.TEXT, batch_lib.VIT}
    assert set(mod[32:].tolist()) <= {batch_lib.PAD, batch_lib.VAE}
    assert (mod[32:40] == batch_lib.VAE).all()  # 2 images x 4 latent tokens
    # Markers of both VAE images are text tokens of the und expert.
    assert (batch.text_ids[0] == bb.SpecialTokens().vision_start).sum() == 3


def test_noisy_span_and_flow_targets():
    batch = _edit_batch()
    noisy = batch.noisy[0]
    # The target image's 4 latents and its 2 markers are noisy; only its latents carry flow loss.
    assert noisy.sum() == 6
    assert (batch.flow_weight[0] > 0).sum() == 4
    assert batch.vae_timestep[0].tolist() == [0.0, 0.5]
    assert (batch.text_weight == 0).all()  # the instruction has no loss


def test_text_loss_predicts_next_token():
    batch = bb.build([[[bb.text([5, 6], loss=True)]]], num_und=8, num_gen=0)
    ids = _in_order(batch, "text_ids").tolist()
    assert ids == [256, 5, 6, 257]
    assert _in_order(batch, "text_targets").tolist() == [5, 6, 257, 0]
    assert _in_order(batch, "text_weight").tolist() == [1, 1, 1, 0]


def test_documents_restart_positions_and_payloads_point_at_their_patches():
    pixels = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3) / 100
    rows = [[[bb.text("ab")], [bb.vit_image(1, 2, pixels=pixels), bb.text("c")]]]
    batch = bb.build(rows, num_und=16, num_gen=0, vit_patch_size=2)
    batch_lib.validate(batch)
    assert _in_order(batch, "doc_id").tolist() == [1] * 4 + [2] * 7
    assert _in_order(batch, "position").tolist() == [0, 1, 2, 3, 0, 0, 0, 0, 1, 2, 3]
    vit = np.nonzero(batch.modality[0] == batch_lib.VIT)[0]
    idx = batch.payload_index[0, vit]
    # Second patch = pixels[:, 2:4], flattened (row-in-patch, col-in-patch, channel).
    np.testing.assert_array_equal(batch.vit_patches[0, idx[1]], pixels[:, 2:4].reshape(-1))
    assert batch.vit_patch_rc[0, idx].tolist() == [[0, 0], [0, 1]]
    assert batch.vit_grid_hw[0, idx[0]].tolist() == [1, 2]


def test_batch_is_a_pytree_with_static_num_und():
    batch = _edit_batch()
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    assert len(leaves) == 19
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.num_und == 32 and rebuilt.num_gen == 16
    out = jax.jit(lambda b: b.doc_id.sum() + b.num_und)(batch)
    assert int(out) == int(batch.doc_id.sum()) + 32


def test_capacity_overflow_is_an_error():
    with pytest.raises(ValueError, match="more und tokens than its capacity"):
        bb.build([[[bb.text("a" * 20)]]], num_und=8, num_gen=0)
    with pytest.raises(ValueError, match="VAE image"):
        bb.build([[[bb.vae_image(3, 3)]]], num_und=8, num_gen=16, latent_grid=(2, 2))
    with pytest.raises(ValueError, match="flow time"):
        bb.vae_image(2, 2, noisy=True, t=0.0)


def _corrupt(batch, **changes):
    fields = {}
    for name, fn in changes.items():
        value = np.array(getattr(batch, name))
        fn(value)
        fields[name] = value
    return dataclasses.replace(batch, **fields)


def _set(idx, value):
    def fn(a):
        a[idx] = value
    return fn


@pytest.mark.parametrize("changes,message", [
    ({"modality": _set((0, 0), 7)}, r"modality\[0, 0\]: unknown modality"),
    ({"doc_id": _set((0, 47), 1)}, r"doc_id\[0, 47\]: doc_id must be 0 exactly on padding"),
    ({"order": _set((0, 1), 0)}, r"order\[0, 1\]: order 0 repeats"),
    ({"noisy": _set((0, 12), True)}, r"noisy\[0, 12\]: noisy token outside"),
    ({"text_weight": _set((0, 40), 1.0)}, r"text_weight\[0, 40\]: CE weight on a non-text"),
    ({"flow_weight": _set((0, 32), 1.0)}, r"flow_weight\[0, 32\]: flow weight on a token"),
    ({"payload_index": _set((0, 3), -1)}, r"payload_index\[0, 3\]: payload index must be set"),
    ({"payload_index": _set((0, 36), 99)}, r"payload_index\[0, 36\]: beyond 2 x 4"),
    ({"modality": _set((0, 33), batch_lib.TEXT)}, r"text/ViT token in the gen-expert slice"),
    ({"position": _set((0, 14), 0)}, r"position\[0, 14\]: RoPE position decreases"),
    ({"noisy": _set((0, 36), False), "flow_weight": _set((0, 36), 0.0)},
     r"span 2 is partly noisy"),
    ({"split_id": _set((0, 6), 0)}, r"span 0 is not contiguous"),
])
def test_validate_names_the_broken_field(changes, message):
    batch = _edit_batch()
    with pytest.raises(batch_lib.BatchError, match=message):
        batch_lib.validate(_corrupt(batch, **changes), latent_tokens_per_image=4)


def test_validate_rejects_wrong_dtype():
    batch = _edit_batch()
    bad = dataclasses.replace(batch, position=batch.position.astype(np.float32))
    with pytest.raises(batch_lib.BatchError, match="position: dtype float32"):
        batch_lib.validate(bad)


def test_validate_accepts_uint8_pixels_and_rejects_other_payload_dtypes():
    batch = _edit_batch()
    u8 = dataclasses.replace(batch, vit_patches=batch.vit_patches.astype(np.uint8),
                             vae_images=batch.vae_images.astype(np.uint8))
    batch_lib.validate(u8, latent_tokens_per_image=4)
    for name, dtype in [("vit_patches", np.float64), ("vae_images", np.int32),
                        ("vae_images", np.float16)]:
        bad = dataclasses.replace(batch, **{name: getattr(batch, name).astype(dtype)})
        with pytest.raises(batch_lib.BatchError, match=f"{name}: dtype {np.dtype(dtype)}"):
            batch_lib.validate(bad)


def test_normalize_pixels_maps_bytes_to_unit_range_for_numpy_and_jax():
    px = np.arange(256, dtype=np.uint8)
    out = batch_lib.normalize_pixels(px)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out[0] == -1.0 and out[255] == 1.0 and np.all(np.diff(out) > 0)
    np.testing.assert_allclose(out, px / 127.5 - 1, atol=1e-7)
    jout = batch_lib.normalize_pixels(jax.numpy.asarray(px))
    assert isinstance(jout, jax.Array) and jout.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(jout), out)  # host and device agree exactly
    np.testing.assert_array_equal(np.asarray(jax.jit(batch_lib.normalize_pixels)(px)), out)
    floats = np.array([-1.0, 0.25, 1.0], np.float64)
    passed = batch_lib.normalize_pixels(floats)  # already in [-1, 1]: only cast
    assert passed.dtype == np.float32 and passed.tolist() == [-1.0, 0.25, 1.0]


def _with_datasets(batch, per_doc):
    """The batch with `dataset_id` set per (row, document id); padding -1."""
    ds = np.full(batch.doc_id.shape, batch_lib.DATASET_PAD, np.int32)
    for (row, doc), index in per_doc.items():
        ds[row][batch.doc_id[row] == doc] = index
    return dataclasses.replace(batch, dataset_id=ds)


def test_dataset_index_defaults_to_zero_on_real_tokens():
    batch = _edit_batch()
    assert batch.dataset_id is None
    want = np.where(batch.doc_id > 0, 0, batch_lib.DATASET_PAD)
    np.testing.assert_array_equal(batch.dataset_index(), want)
    traced = jax.jit(lambda b: b.dataset_index())(batch)
    np.testing.assert_array_equal(np.asarray(traced), want)
    tagged = _with_datasets(batch, {(0, 1): 3})
    batch_lib.validate(tagged, latent_tokens_per_image=4, max_datasets=4)
    assert tagged.dataset_index() is tagged.dataset_id


@pytest.mark.parametrize("change,message", [
    (_set((0, 47), 0), r"dataset_id\[0, 47\]: padding must have dataset_id -1"),
    (_set((0, 3), -1), r"dataset_id\[0, 3\]: negative dataset index on a real token"),
    (lambda ds: ds.__setitem__(ds >= 0, 4),
     r"dataset_id\[0, 0\]: dataset index beyond max_datasets=4"),
    (_set((0, 5), 2), r"dataset_id\[0, \d+\]: document 1 mixes datasets"),
])
def test_validate_rejects_bad_dataset_ids(change, message):
    batch = _with_datasets(_edit_batch(), {(0, 1): 1})
    assert batch.modality[0, 47] == batch_lib.PAD and batch.modality[0, 3] != batch_lib.PAD
    with pytest.raises(batch_lib.BatchError, match=message):
        batch_lib.validate(_corrupt(batch, dataset_id=change), max_datasets=4)


def test_validate_rejects_dataset_id_dtype_and_shape():
    batch = _with_datasets(_edit_batch(), {(0, 1): 0})
    with pytest.raises(batch_lib.BatchError, match="dataset_id: dtype int64"):
        batch_lib.validate(dataclasses.replace(batch, dataset_id=batch.dataset_id.astype(np.int64)))
    with pytest.raises(batch_lib.BatchError, match=r"dataset_id: shape \(1, 47\)"):
        batch_lib.validate(dataclasses.replace(batch, dataset_id=batch.dataset_id[:, :47]))


def test_slice_fill_counts_each_budget():
    edit = [bb.vae_image(2, 2), bb.vit_image(2, 2), bb.text([7, 8, 9]),
            bb.vae_image(2, 2, noisy=True, t=0.5)]  # und 15, gen 8, 4 patches, 2 slots
    small = [bb.text([1, 2]), bb.vae_image(1, 2)]  # und 6, gen 2, 1 slot of area 2
    batch = bb.build([[edit], [small]], num_und=32, num_gen=16, latent_grid=(2, 2),
                     vit_patch_size=2, max_vit_patches=8, max_vae_images=2)
    want = {"fill_und": 21 / 64, "fill_gen": 10 / 32, "fill_vit": 4 / 16,
            "fill_vae_slots": 3 / 4, "fill_vae_area": 10 / 16}
    got = batch_lib.slice_fill(batch, (2, 2))
    assert set(got) == set(batch_lib.FILL_KEYS)
    assert {k: float(v) for k, v in got.items()} == pytest.approx(want)
    traced = jax.jit(lambda b: batch_lib.slice_fill(b, (2, 2)))(batch)
    assert {k: float(v) for k, v in traced.items()} == pytest.approx(want)
    text_only = bb.build([[[bb.text([1])]]], num_und=8, num_gen=0, max_vit_patches=0)
    assert float(batch_lib.slice_fill(text_only, (2, 2))["fill_gen"]) == 0.0  # empty budget
