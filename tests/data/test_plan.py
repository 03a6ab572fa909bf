"""Sequence plans: roles -> ViT / clean VAE / noisy VAE / text loss, CFG dropout, video modes,
RoPE positions (dropped conditions, frame deltas) and CE length reweighting."""

import numpy as np
import pytest

from configs import tiny
from tests.data import synth
from unijax.data import packing, records
from unijax.data import plan as plan_lib
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


def laid_out(plan, config=None):
    """(positions, text weights) per item of `plan` packed alone in a row, in causal order."""
    config = config or tiny.get_config()
    config.data.max_vae_images = 8  # room for a whole clip
    out = packing.layout([[plan]], packing.PackSpec.from_config(config))
    live = np.nonzero(out["doc_id"][0])[0]
    live = live[np.argsort(out["order"][0][live])]
    positions, weights, k = [], [], 0
    for it in plan.items:
        n = (len(it.ids) + 1 + it.closed if isinstance(it, TextItem)
             else it.grid[0] * it.grid[1] + 2)
        positions.append(out["position"][0][live[k:k + n]].tolist())
        weights.append(out["text_weight"][0][live[k:k + n]])
        k += n
    return positions, weights


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


def test_dropped_images_keep_their_rope_position_dropped_text_does_not():
    """BAGEL `pack_sequence`: a dropped ViT/VAE condition still advances the position by one."""
    kept = make_plan("edit")
    assert describe(kept) == ["vae", "vit", "T", "noisy"]
    n = len(kept.items[2].ids) + 2
    # BAGEL's printed edit example: [0]*6, [1]*6, 2, 3, 4, 5, 6, [7]*6.
    pos, _ = laid_out(kept)
    assert set(pos[0]) == {0} and set(pos[1]) == {1}
    assert pos[2] == list(range(2, 2 + n)) and set(pos[3]) == {2 + n}
    images_dropped = plan_lib.PlanOptions(text_cond_dropout=0.0, vit_cond_dropout=1.0,
                                          vae_cond_dropout=1.0)
    plan = make_plan("edit", images_dropped)
    assert describe(plan) == ["T", "noisy"] and plan.items[0].gap == 2
    assert laid_out(plan)[0] == pos[2:]  # later positions do not move
    drop_all = plan_lib.PlanOptions(text_cond_dropout=1.0, vit_cond_dropout=1.0,
                                    vae_cond_dropout=1.0)
    plan = make_plan("edit", drop_all)
    assert describe(plan) == ["noisy"] and plan.items[0].gap == 2
    assert set(laid_out(plan)[0][0]) == {2}  # the dropped text left no position
    t2i = make_plan("t2i", drop_all)
    assert describe(t2i) == ["noisy"] and t2i.items[0].gap == 0
    assert set(laid_out(t2i)[0][0]) == {0}


def video_record(timestamps, fps=4.0):
    rng = np.random.default_rng(0)
    frames = [synth.jpeg(rng, 16, 16) for _ in timestamps]
    return records.make_record("video", "v", "s", [records.video_segment(
        frames, "image/jpeg", timestamps, fps, "target", [""] * len(timestamps))])


def test_grouped_video_advances_by_frame_index_delta():
    """BAGEL `_add_video`: frame i advances by frame_index[i + 1] - frame_index[i]."""
    grouped = dict(video_captions=False, text_cond_dropout=0, vit_cond_dropout=0,
                   vae_cond_dropout=0)
    rec = video_record([0.0, 0.25, 0.75, 1.0, 1.25])  # frame indices 0, 1, 3, 4, 5 at 4 fps
    plan = make_plan("video", plan_lib.PlanOptions(**grouped), record=rec)
    assert describe(plan) == ["vae", "noisy", "noisy", "noisy", "noisy"]
    assert [f.step for f in plan.items] == [1, 2, 1, 1, 0]
    assert [f.group for f in plan.items] == [0, 1, 1, 1, 1]  # one noisy split
    assert len({f.t for f in plan.items[1:]}) == 1  # shared: one flow time
    pos, _ = laid_out(plan)
    assert [p[0] for p in pos] == [0, 1, 3, 4, 5] and all(len(set(p)) == 1 for p in pos)
    # Subsampling to 3 of 5 frames keeps frames 0, 2, 4: indices 0, 3, 5.
    sub = make_plan("video", plan_lib.PlanOptions(max_video_frames=3, **grouped), record=rec)
    assert [f.step for f in sub.items] == [3, 2, 0]
    assert [p[0] for p in laid_out(sub)[0]] == [0, 3, 5]
    independent = make_plan("video", plan_lib.PlanOptions(video_noise="independent", **grouped),
                            record=rec)
    noisy = independent.items[1:]
    assert len({f.t for f in noisy}) == 4 and len({f.group for f in noisy}) == 1
    # Dropping the context group leaves one position, as any dropped image.
    dropped = make_plan("video", plan_lib.PlanOptions(
        video_captions=False, vae_cond_dropout=1.0), record=rec)
    assert describe(dropped) == ["noisy"] * 4 and dropped.items[0].gap == 1
    assert [p[0] for p in laid_out(dropped)[0]] == [1, 3, 4, 5]


def test_captioned_video_frames_follow_the_image_rule():
    rec = video_record([0.0, 0.5, 1.0])  # frame deltas of 2 do not apply between captions
    rec["segments"][0]["captions"] = ["", "moves", "stops"]
    plan = make_plan("video", record=rec)
    assert describe(plan) == ["vae", "T", "noisy", "vae", "T", "noisy"]
    assert [it.step for it in plan.items if isinstance(it, ImageItem)] == [1, 0, 1, 0]


def test_ce_loss_reweighting_weights_text_by_inverse_sqrt_length():
    """BAGEL `len2weight('square')`: each loss token of a text weighs 1/sqrt(n)."""
    weighted = plan_lib.PlanOptions(ce_loss_reweighting=True)
    plan = make_plan("vqa", weighted)
    texts = [it for it in plan.items if isinstance(it, TextItem)]
    assert [t.length_weighted for t in texts] == [t.loss for t in texts] == [False, True] * 2
    _, weights = laid_out(plan)
    for it, w in zip(plan.items, weights):
        if isinstance(it, TextItem) and it.loss:
            n = len(it.ids) + 1  # <|im_start|> + ids predict; <|im_end|> does not
            np.testing.assert_allclose(w[:-1], 1 / np.sqrt(n), rtol=1e-6)
            assert w[-1] == 0
        elif isinstance(it, TextItem):
            assert not w.any()
    _, plain = laid_out(make_plan("vqa"))
    assert {float(x) for w in plain for x in w} == {0.0, 1.0}  # off by default
    with pytest.raises(ValueError, match="ce_loss_reweighting"):
        plan_lib.PlanOptions(ce_loss_reweighting="yes")
