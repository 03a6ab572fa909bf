"""Packing: layout equals batch_builder's, (hypothesis) nothing lost, duplicated or mixed with or
without the look-ahead buffer, and the buffer's order and fill."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unijax import batch as batch_lib
from unijax import batch_builder as bb
from unijax.data import images, packing
from unijax.data.plan import DocKey, ImageItem, SequencePlan, TextItem
from unijax.kernels.mask import dense_mask

SPEC = packing.PackSpec(num_und=64, num_gen=32, max_vit_patches=24, max_vae_images=3,
                        vit_patch=2, vit_max_grid=8, max_latent_size=8, latent_cell=2,
                        latent_grid=(4, 4))


def _pixels(rng, h, w, stride):
    """Resized pixels as plans carry them: uint8."""
    return rng.integers(0, 256, (h * stride, w * stride, 3), dtype=np.uint8)


def test_layout_matches_batch_builder():
    rng = np.random.default_rng(0)
    vit_px, clean_px, noisy_px = _pixels(rng, 2, 3, 2), _pixels(rng, 2, 2, 2), _pixels(rng, 4, 3, 2)
    ids = [5, 6, 7]
    plans = [
        SequencePlan([TextItem(np.array(ids, np.int32), False),
                      ImageItem("vae", noisy_px, (4, 3), noisy=True, t=0.25, step=0),
                      ImageItem("vae", noisy_px, (4, 3)),
                      ImageItem("vit", vit_px, (2, 3)),
                      TextItem(np.array([9, 10], np.int32), True)], DocKey("a", "p", 0)),
        SequencePlan([ImageItem("vae", clean_px, (2, 2)), TextItem(np.array([1], np.int32), True)],
                     DocKey("a", "p", 1)),
    ]
    got = packing.layout([plans, [plans[1]]], SPEC)
    # batch_builder takes float pixels in [-1, 1]: the same images, normalised on the host.
    vit_f, clean_f, noisy_f = (batch_lib.normalize_pixels(x) for x in (vit_px, clean_px, noisy_px))
    want = bb.build(
        [[[bb.text(ids), bb.vae_image(4, 3, True, 0.25, noisy_f), bb.vae_image(4, 3, False, 0,
                                                                             noisy_f),
           bb.vit_image(2, 3, vit_f), bb.text([9, 10], loss=True)],
          [bb.vae_image(2, 2, pixels=clean_f), bb.text([1], loss=True)]],
         [[bb.vae_image(2, 2, pixels=clean_f), bb.text([1], loss=True)]]],
        num_und=64, num_gen=32, latent_grid=(4, 4), latent_cell=2, vit_patch_size=2,
        vit_max_grid=8, max_latent_size=8, max_vit_patches=24, max_vae_images=3)
    assert got["vit_patches"].dtype == got["vae_images"].dtype == np.uint8
    batch_lib.validate(packing.to_packed_batch(got, SPEC), latent_tokens_per_image=16)
    for name in got:
        # The builder's batches carry no dataset_id: every document counts as dataset 0.
        value = got[name]
        expected = want.dataset_index() if name == "dataset_id" else getattr(want, name)
        if name in batch_lib.PIXEL_FIELDS:
            # The model's view: normalised pixels inside each image, padding (uint8 0) ignored.
            live = _live_pixels(name, got, SPEC)
            assert not value[~live].any(), name
            value, expected = batch_lib.normalize_pixels(value)[live], expected[live]
        np.testing.assert_array_equal(value, expected, err_msg=name)


def _live_pixels(name, arrays, spec):
    """Mask of the payload entries that belong to an image (broadcast over channels)."""
    if name == "vit_patches":
        return np.broadcast_to((arrays["vit_image_id"] > 0)[..., None], arrays[name].shape)
    h, w = arrays[name].shape[2:4]
    extent = arrays["vae_grid_hw"] * spec.latent_cell
    inside = (np.arange(h)[:, None] < extent[..., 0, None, None]) & \
        (np.arange(w)[None, :] < extent[..., 1, None, None])
    return np.broadcast_to(inside[..., None], arrays[name].shape)


def test_float_plan_pixels_are_rejected_not_requantised():
    px = np.zeros((4, 4, 3), np.float32)
    plan = SequencePlan([ImageItem("vae", px, (2, 2)), TextItem(np.array([1], np.int32), True)],
                        DocKey("f", "p", 0))
    with pytest.raises(ValueError, match=r"grid=\(2, 2\)\).pixels: dtype float32"):
        packing.layout([[plan]], SPEC)


# --- property tests -------------------------------------------------------------------------

@st.composite
def documents(draw, index):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    items, group = [], 0
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["text", "text", "vit", "vae", "video"]))
        if kind == "text":
            n = draw(st.integers(1, 40))
            items.append(TextItem(rng.integers(0, 256, n).astype(np.int32), draw(st.booleans())))
        elif kind == "vit":
            h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            items.append(ImageItem("vit", _pixels(rng, h, w, 2), (h, w)))
        else:
            noisy = draw(st.booleans())
            frames = draw(st.integers(2, 3)) if kind == "video" else 1
            h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            for f in range(frames):
                step = 0 if noisy and f == frames - 1 else (1 if frames > 1 or not noisy else 0)
                items.append(ImageItem("vae", _pixels(rng, h, w, 2), (h, w), noisy,
                                       float(rng.uniform(0.01, 1)) if noisy else 0.0,
                                       group if frames > 1 else -1, step))
            group += frames > 1
    if not any((isinstance(i, TextItem) and i.loss) or (isinstance(i, ImageItem) and i.noisy)
               for i in items):
        items.append(TextItem(np.array([1, 2], np.int32), True))
    return SequencePlan(items, DocKey("h", "f", index))


@st.composite
def streams(draw):
    n = draw(st.integers(1, 12))
    return [draw(documents(i)) for i in range(n)]


def expected_stream(plan):
    """Per item: the marker/text ids, and images' payload, independently of packing.py."""
    out = []
    for it in plan.items:
        if isinstance(it, TextItem):
            out.append(("text", [256, *it.ids.tolist()] + ([257] if it.closed else []), it.loss))
        else:
            out.append((it.kind, it.pixels, it.noisy, it.t, it.grid))
    return out


def read_document(b, r, d):
    """Reconstructs document d of row r from the batch arrays alone."""
    live = np.nonzero(b.doc_id[r] == d)[0]
    toks = live[np.argsort(b.order[r][live])]
    out, k = [], 0
    while k < len(toks):
        t = toks[k]
        if b.modality[r, t] == batch_lib.TEXT and b.text_ids[r, t] == 258:  # image span
            n_end = k + 1
            while b.modality[r, toks[n_end]] != batch_lib.TEXT:
                n_end += 1
            body = toks[k + 1:n_end]
            mod = b.modality[r, body[0]]
            if mod == batch_lib.VIT:
                idx = b.payload_index[r, body]
                grid = tuple(b.vit_grid_hw[r, idx[0]])
                px = images.unpatchify(b.vit_patches[r, idx], grid, SPEC.vit_patch)
                out.append(("vit", px, False, 0.0, grid))
            else:
                gh, gw = SPEC.latent_grid
                slot = b.payload_index[r, body[0]] // (gh * gw)
                grid = tuple(b.vae_grid_hw[r, slot])
                cell = SPEC.latent_cell
                px = b.vae_images[r, slot, :grid[0] * cell, :grid[1] * cell]
                noisy = bool(b.noisy[r, body[0]])
                assert np.all(b.flow_weight[r, body] == float(noisy))
                out.append(("vae", px, noisy, float(b.vae_timestep[r, slot]), grid))
            assert b.text_ids[r, toks[n_end]] == 259
            k = n_end + 1
            continue
        run = [t]
        k += 1
        while k < len(toks) and b.split_id[r, toks[k]] < 0:
            run.append(toks[k])
            k += 1
            if b.text_ids[r, run[-1]] == 257:
                break
        out.append(("text", b.text_ids[r, run].tolist(), bool(b.text_weight[r, run].any())))
    return out


def same(a, b):
    if a[0] != b[0]:
        return False
    if a[0] == "text":
        return a[1] == b[1] and a[2] == b[2]
    return (a[1].dtype == b[1].dtype and np.array_equal(a[1], b[1]) and a[2] == b[2]
            and np.isclose(a[3], b[3], atol=1e-6) and tuple(a[4]) == tuple(b[4]))


@settings(max_examples=250, deadline=None, derandomize=True)
@given(streams(), st.integers(1, 3), st.sampled_from(packing.OVERLONG_MODES),
       st.sampled_from([0, 1, 3, 16]))
def test_packing_keeps_every_token_image_and_document_apart(plans, batch_size, overlong,
                                                             pack_buffer):
    spec = dataclasses.replace(SPEC, overlong=overlong, pack_buffer=pack_buffer)
    batches, docs, dropped = packing.pack(plans, spec, batch_size)
    fitted = {p.key: packing.fit_document(p, spec) for p in plans}
    placed = [tuple(k) for batch_docs in docs for row in batch_docs for k in row]
    assert len(placed) == len(set(placed))  # no document twice
    assert {DocKey(*k) for k in placed} | {k for k, _ in dropped} == {p.key for p in plans}
    assert all(fitted[k][0] is None for k, _ in dropped)
    for batch, batch_docs in zip(batches, docs):
        batch_lib.validate(batch, latent_tokens_per_image=16)
        assert batch.vit_patches.dtype == batch.vae_images.dtype == np.uint8
        b = batch
        for r, row in enumerate(batch_docs):
            used = np.sum([fitted[DocKey(*k)][0].cost() for k in row], axis=0) if row else 0
            assert np.all(used <= spec.capacity)  # budgets
            assert np.count_nonzero(b.doc_id[r]) == (used[0] + used[1] if row else 0)
            for d, key in enumerate(row, start=1):
                plan, status = fitted[DocKey(*key)]
                got, want = read_document(b, r, d), expected_stream(plan)
                assert len(got) == len(want) and all(map(same, got, want)), (key, status)
        mask = np.asarray(dense_mask(batch.token_meta()))
        cross_doc = b.doc_id[:, :, None] != b.doc_id[:, None, :]
        assert not (mask & cross_doc).any()  # documents never see each other
        split = b.split_id
        hidden = b.noisy[:, None, :] & (split[:, :, None] != split[:, None, :])
        assert not (mask & hidden).any()  # noisy spans are invisible from outside


def test_truncation_cuts_text_never_images():
    rng = np.random.default_rng(1)
    img = ImageItem("vit", _pixels(rng, 4, 4, 2), (4, 4))
    plan = SequencePlan([TextItem(np.arange(30, dtype=np.int32), True), img,
                         TextItem(np.arange(40, dtype=np.int32), True), img],
                        DocKey("t", "f", 0))
    short, status = packing.fit_document(plan, SPEC)
    assert status == "truncated"
    assert [type(i).__name__ for i in short.items] == ["TextItem", "ImageItem", "TextItem"]
    cut = short.items[2]
    assert not cut.closed and len(cut.ids) == 64 - 32 - 18 - 1
    assert short.cost()[0] == 64
    (batch,), _, _ = packing.pack([plan], SPEC, 1)
    last = np.argmax(np.where(batch.doc_id[0] > 0, batch.order[0], -1))
    assert batch.text_ids[0, last] == 12 and batch.text_weight[0, last] == 0  # no fake target
    dropped = packing.fit_document(plan, dataclasses.replace(SPEC, overlong="drop"))
    assert dropped == (None, "too_long")
    prompt_only = SequencePlan([TextItem(np.arange(100, dtype=np.int32), False)],
                               DocKey("t", "f", 1))
    assert packing.fit_document(prompt_only, SPEC) == (None, "too_long")  # no loss left


def text_doc(index, n):
    """A document of `n` und tokens (text with loss)."""
    return SequencePlan([TextItem(np.arange(n - 2, dtype=np.int32), True)], DocKey("b", "f", index))


def packed_order(sizes, pack_buffer, batch_size=1):
    spec = dataclasses.replace(SPEC, pack_buffer=pack_buffer)
    _, docs, _ = packing.pack([text_doc(i, n) for i, n in enumerate(sizes)], spec, batch_size)
    return [[[k[2] for k in row] for row in batch] for batch in docs]


def test_look_ahead_buffer_fills_rows_from_later_documents():
    sizes = [40, 40, 20, 20]  # und capacity 64
    assert packed_order(sizes, 0) == [[[0]], [[1, 2]], [[3]]]  # first-fit: emit on overflow
    # Document 1 is held back; 2 joins document 0; 3 overflows the buffer of 1 and the next
    # batch takes the held documents first, oldest first.
    assert packed_order(sizes, 1) == [[[0, 2]], [[1, 3]]]


def test_held_documents_come_first_in_the_next_batch():
    sizes = [10, 60] + [10] * 10
    order = packed_order(sizes, 3)
    # The big document 1 waits while small ones fill batch 0, then opens batch 1.
    assert order[0] == [[0, 2, 3, 4, 5, 6]] and order[1][0][0] == 1
    assert sorted(i for b in order for row in b for i in row) == list(range(len(sizes)))


def test_truncated_length_weighted_text_weighs_each_target_by_its_count():
    ids = np.arange(100, dtype=np.int32)
    plan = SequencePlan([TextItem(ids, True, length_weighted=True)], DocKey("w", "f", 0))
    short, status = packing.fit_document(plan, SPEC)
    assert status == "truncated" and short.items[0].length_weighted
    (batch,), _, _ = packing.pack([plan], SPEC, 1)
    weights = batch.text_weight[0][batch.doc_id[0] == 1]
    targets = 64 - 1  # <|im_start|> and 62 ids predict; the cut last id predicts nothing
    np.testing.assert_allclose(np.sort(weights)[1:], 1 / np.sqrt(targets), rtol=1e-6)
    assert np.count_nonzero(weights) == targets


def test_documents_carry_the_index_of_their_dataset_name():
    """dataset_id is the position of DocKey.dataset among the sorted names, on every token of
    the document (images and markers too); padding is -1; "" (no dataset) is 0."""
    spec = dataclasses.replace(SPEC, datasets=("alpha", "beta", "gamma"))
    rng = np.random.default_rng(0)
    image = ImageItem("vae", _pixels(rng, 2, 2, 2), (2, 2), noisy=True, t=0.5, step=0)
    docs = [SequencePlan([TextItem(np.arange(3, dtype=np.int32), True)], DocKey(name, "p", i))
            for i, name in enumerate(["gamma", "alpha", ""])]
    docs.append(SequencePlan([image, TextItem(np.arange(2, dtype=np.int32), True)],
                             DocKey("beta", "p", 3)))
    out = packing.layout([docs[:2], docs[2:]], spec)
    batch = packing.to_packed_batch(out, spec)
    batch_lib.validate(batch, latent_tokens_per_image=16, max_datasets=spec.max_datasets)
    want = {(0, 1): 2, (0, 2): 0, (1, 1): 0, (1, 2): 1}
    for (row, doc), index in want.items():
        assert set(out["dataset_id"][row][out["doc_id"][row] == doc]) == {index}
    assert (out["dataset_id"][out["doc_id"] == 0] == batch_lib.DATASET_PAD).all()
    assert (out["dataset_id"][1][out["modality"][1] == batch_lib.VAE] == 1).all()


def test_unknown_dataset_and_too_many_datasets_are_errors():
    spec = dataclasses.replace(SPEC, datasets=("alpha",))
    plan = SequencePlan([TextItem(np.arange(3, dtype=np.int32), True)], DocKey("zeta", "p", 0))
    with pytest.raises(ValueError, match=r"dataset 'zeta': not one of the packed datasets"):
        packing.layout([[plan]], spec)
    with pytest.raises(ValueError, match=r"config.data.max_datasets=2 is below the 3 datasets"):
        dataclasses.replace(SPEC, datasets=("a", "b", "c"), max_datasets=2)


def test_spec_takes_the_sorted_names_and_the_bound_from_the_config(tiny_config):
    spec = packing.PackSpec.from_config(tiny_config)
    assert spec.datasets == packing.dataset_names(tiny_config) == ("digits", "shapes")
    assert spec.max_datasets == tiny_config.data.max_datasets == 16
    tiny_config.data.max_datasets = 1
    with pytest.raises(ValueError, match="config.data.max_datasets=1"):
        packing.PackSpec.from_config(tiny_config)
