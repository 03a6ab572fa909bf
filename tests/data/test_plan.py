"""Sequence plans: roles -> ViT / clean VAE / noisy VAE / text loss, CFG dropout, video modes."""

import numpy as np
import pytest

from configs import tiny
from tests.data import synth
from unijax.data import plan as plan_lib
from unijax.data import records
from unijax.data.plan import ImageItem, TextItem
from unijax.data.tokenizer import ByteTokenizer

NO_DROP = plan_lib.PlanOptions(text_cond_dropout=0.0, vit_cond_dropout=0.0, vae_cond_dropout=0.0)


def describe(plan):
    out = []
    for it in plan.items:
        if isinstance(it, TextItem):
            out.append("T+" if it.loss else "T")
        else:
            out.append("vit" if it.kind == "vit" else ("noisy" if it.noisy else "vae"))
    return out


def make_plan(kind, options=NO_DROP, seed=0, config=None, record=None):
    config = config or tiny.get_config()
    settings = plan_lib.ImageSettings.from_config(config, options)
    record = record or synth.make(kind, 0, np.random.default_rng(seed))
    return plan_lib.plan_record(record, ByteTokenizer(), options, settings,
                                np.random.default_rng(seed))


@pytest.mark.parametrize("kind,expect", [
    ("text", ["T+"]),
    ("caption", ["vit", "T+"]),
    ("vqa", ["vit", "T", "T+", "T", "T+"]),
    ("t2i", ["T", "noisy"]),
    ("edit", ["vae", "vit", "T", "noisy"]),
    ("interleaved", ["T+", "noisy", "vae", "vit", "T+"]),  # BAGEL's triple
    ("video", ["T", "vae", "T", "noisy", "vae", "T", "noisy"]),
])
def test_roles_become_bagel_sequence_plans(kind, expect):
    plan = make_plan(kind)
    assert describe(plan) == expect
    for it in plan.items:
        if isinstance(it, ImageItem):
            assert (0.0 < it.t <= 1.0) if it.noisy else it.t == 0.0
            assert it.step == (0 if it.noisy else 1)
            stride = 4  # tiny: ViT patch 4, pixel-space latent patch 4
            assert it.pixels.shape == (it.grid[0] * stride, it.grid[1] * stride, 3)
    assert plan.has_loss


def test_interleaved_copies_share_pixels_and_understand_mode():
    noisy, clean, vit = make_plan("interleaved").items[1:4]
    np.testing.assert_array_equal(noisy.pixels, clean.pixels)
    assert vit.kind == "vit"
    understand = plan_lib.PlanOptions(interleaved_images="understand", context_text_loss=False)
    assert describe(make_plan("interleaved", understand)) == ["T", "vit", "T"]


def test_video_modes():
    shared = make_plan("video")
    t = [it.t for it in shared.items if isinstance(it, ImageItem) and it.noisy]
    assert len(t) == 2 and t[0] == t[1]
    independent = make_plan("video", plan_lib.PlanOptions(
        video_noise="independent", text_cond_dropout=0, vit_cond_dropout=0, vae_cond_dropout=0))
    t = [it.t for it in independent.items if isinstance(it, ImageItem) and it.noisy]
    assert len(t) == 2 and t[0] != t[1]
    grouped = make_plan("video", plan_lib.PlanOptions(
        video_captions=False, text_cond_dropout=0, vit_cond_dropout=0, vae_cond_dropout=0))
    assert describe(grouped) == ["T", "vae", "noisy", "noisy"]
    frames = grouped.items[1:]
    assert [f.group for f in frames] == [0, 1, 1] and [f.step for f in frames] == [1, 1, 0]
    rec = synth.make("video", 0, np.random.default_rng(0))
    rec["segments"][1]["role"] = "input"
    assert describe(make_plan("video", record=rec)) == ["T", "vit", "vit", "T+", "vit", "T+"]


def test_cfg_dropout_only_on_conditions_of_generation():
    drop_all = plan_lib.PlanOptions(text_cond_dropout=1.0, vit_cond_dropout=1.0,
                                    vae_cond_dropout=1.0)
    assert describe(make_plan("t2i", drop_all)) == ["noisy"]
    assert describe(make_plan("edit", drop_all)) == ["noisy"]
    assert describe(make_plan("vqa", drop_all)) == ["vit", "T", "T+", "T", "T+"]  # no target
    # Conditions after the last target stay.
    assert describe(make_plan("interleaved", drop_all)) == ["noisy", "vae", "vit", "T+"]
    bagel = plan_lib.PlanOptions()  # 0.1 text dropout
    kept = sum(describe(make_plan("t2i", bagel, seed=s))[0] == "T" for s in range(400))
    assert 320 <= kept <= 390  # ~90% keep the prompt


def test_plans_are_a_function_of_the_seed():
    a, b, c = make_plan("edit", seed=5), make_plan("edit", seed=5), make_plan("edit", seed=6)
    assert a.items[-1].t == b.items[-1].t != c.items[-1].t
    ts = [make_plan("t2i", seed=s).items[-1].t for s in range(200)]
    assert 0.4 < np.mean(ts) < 0.6 and min(ts) > 0 and max(ts) <= 1  # sigmoid(N(0, 1))


def test_without_vit_images_are_understood_as_clean_latents():
    config = tiny.get_config()
    config.model.vit = None
    assert describe(make_plan("caption", config=config)) == ["vae", "T+"]
    assert describe(make_plan("edit", config=config)) == ["vae", "T", "noisy"]


def test_bad_image_raises_with_reason():
    rec = synth.make("caption", 0, np.random.default_rng(0))
    rec["segments"][0]["bytes"] = rec["segments"][0]["bytes"][:40]
    with pytest.raises(records.RecordError) as err:
        make_plan("caption", record=rec)
    assert err.value.reason == "image_decode"
    rec = synth.make("video", 0, np.random.default_rng(0))
    rec["segments"][1]["frames"][1] = rec["segments"][1]["frames"][1][:40]
    with pytest.raises(records.RecordError) as err:
        make_plan("video", record=rec)
    assert err.value.reason == "video_decode"


def test_options_validation():
    with pytest.raises(ValueError, match="video_noise"):
        plan_lib.PlanOptions(video_noise="sometimes")
    with pytest.raises(ValueError, match="text_cond_dropout"):
        plan_lib.PlanOptions(text_cond_dropout=1.5)


def test_subsampled_video_keeps_every_change_caption():
    rng = np.random.default_rng(0)
    frames = [synth.jpeg(rng, 16, 16) for _ in range(5)]
    rec = records.make_record("video", "v", "s", [records.video_segment(
        frames, "image/jpeg", [k / 4 for k in range(5)], 4.0, "target",
        ["", "a", "b", "c", "d"])])
    options = plan_lib.PlanOptions(max_video_frames=3, text_cond_dropout=0,
                                   vit_cond_dropout=0, vae_cond_dropout=0)
    plan = make_plan("video", options, record=rec)
    texts = [bytes(it.ids.tolist()).decode() for it in plan.items if isinstance(it, TextItem)]
    assert texts == ["a b", "c d"]  # frames 0, 2, 4 kept
    assert describe(plan) == ["vae", "T", "noisy", "vae", "T", "noisy"]
