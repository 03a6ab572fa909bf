"""Image decode and the ViT / VAE resolution rules."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.data import synth
from unijax.data import images
from unijax.data.records import RecordError

VIT = images.ResizeRule(980, 224, 14)  # BAGEL's ImageTransform(980, 224, 14)


@pytest.mark.parametrize("h,w,expect", [
    (1960, 1960, (980, 980)),     # long side capped
    (100, 100, (224, 224)),       # short side raised
    (480, 640, (476, 644)),       # kept (rounded to multiples of 14)
    (300, 3000, (224, 980)),      # extreme aspect: short side raised, long side cropped
])
def test_vit_rule_matches_bagel_semantics(h, w, expect):
    _, _, oh, ow = images.target_size(h, w, VIT)
    assert (oh, ow) == expect
    assert oh % 14 == 0 and ow % 14 == 0


def test_token_budget_and_aspect_ratio():
    rule = images.ResizeRule(980, 224, 14, max_tokens=256)
    rh, rw, oh, ow = images.target_size(900, 1200, rule)
    assert (oh // 14) * (ow // 14) <= 256
    assert abs(rw / rh - 1200 / 900) < 0.1  # aspect ratio kept
    vae = images.ResizeRule(32, 16, 4, max_tokens=64)
    for h, w in [(10, 10), (32, 64), (64, 16), (33, 17), (1, 500)]:
        _, _, oh, ow = images.target_size(h, w, vae)
        assert oh % 4 == 0 and ow % 4 == 0 and max(oh, ow) <= 32 and (oh // 4) * (ow // 4) <= 64


def test_resize_range_shape_and_seeded_crop(rng):
    img = synth.picture(rng, 30, 120)
    rule = images.ResizeRule(32, 16, 4)
    out = images.resize(img, rule)
    assert out.dtype == np.float32 and out.shape == (16, 32, 3)
    assert out.min() >= -1 and out.max() <= 1
    # Pixels map to [-1, 1] as x / 127.5 - 1, and resizing a flat colour keeps it.
    flat = images.resize(np.full((30, 120, 3), (0, 51, 255), np.uint8), rule)
    np.testing.assert_allclose(flat, np.broadcast_to([-1.0, -0.6, 1.0], flat.shape), atol=1e-5)
    a = images.resize(img, rule, np.random.default_rng(3))
    b = images.resize(img, rule, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    crops = {images.resize(img, images.ResizeRule(16, 16, 4), np.random.default_rng(s)).tobytes()
             for s in range(8)}
    assert len(crops) > 1  # the crop offset comes from the generator


def test_decode_png_jpeg_webp_and_alpha(rng):
    img = synth.picture(rng, 12, 20)
    np.testing.assert_array_equal(images.decode_image(images.encode_image(img, "image/png")),
                                  img)
    for mime in ("image/jpeg", "image/webp"):  # lossy
        out = images.decode_image(images.encode_image(img, mime, quality=95))
        assert out.shape == img.shape and np.abs(out.astype(int) - img).mean() < 8
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, "PNG")
    assert (images.decode_image(buf.getvalue()) == 255).all()  # transparent -> white


def test_decode_failures_have_reasons(rng):
    data = synth.jpeg(rng, 64, 64)
    with pytest.raises(RecordError) as err:
        images.decode_image(data[: len(data) // 2])
    assert err.value.reason == "image_decode"
    with pytest.raises(RecordError) as err:
        images.decode_image(b"\x89PNG\r\n\x1a\n garbage")
    assert err.value.reason == "image_decode"
    with pytest.raises(RecordError) as err:
        images.decode_image(data, max_pixels=64 * 63)
    assert err.value.reason == "image_too_large"


def test_patchify_round_trip_and_order(rng):
    px = rng.uniform(-1, 1, (8, 12, 3)).astype(np.float32)
    patches = images.patchify(px, 4)
    assert patches.shape == (6, 48)
    np.testing.assert_array_equal(patches[1], px[0:4, 4:8].reshape(-1))  # (row, col, channel)
    np.testing.assert_array_equal(images.unpatchify(patches, (2, 3), 4), px)
    pic = synth.picture(rng)
    np.testing.assert_array_equal(images.denormalize(images.normalize(pic)), pic)


def test_resize_is_the_uint8_resize_normalised_with_the_model_formula(rng):
    from unijax.batch import normalize_pixels

    img = synth.picture(rng, 30, 120)
    rule = images.ResizeRule(32, 16, 4)
    pixels = images.resize_uint8(img, rule, np.random.default_rng(5))
    assert pixels.dtype == np.uint8  # rounded once, what plans and packed rows carry
    np.testing.assert_array_equal(images.resize(img, rule, np.random.default_rng(5)),
                                  normalize_pixels(pixels))
    np.testing.assert_array_equal(images.normalize(pixels), normalize_pixels(pixels))
    with pytest.raises(ValueError, match="dtype float32"):
        images.normalize(pixels.astype(np.float32))
