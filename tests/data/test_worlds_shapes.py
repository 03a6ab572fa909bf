"""The shapes world: determinism, schema validity, and pixels exactly matching descriptions."""

import dataclasses
import json

import ml_collections
import numpy as np
import pytest

from unijax.data import records
from unijax.data.worlds import __main__ as worlds_main
from unijax.data.worlds import edits, geneval, questions, shapes
from unijax.data.worlds import scene as scene_lib
from unijax.data.worlds import shards as shards_lib
from unijax.evals import shapes_judge

CYCLE = sum(shapes.DEFAULT_MIX.values())


@pytest.fixture(scope="module")
def mixed():
    """Three full cycles of every kind at 32 px."""
    return list(shapes.generate(3 * CYCLE, split="train", seed=3))


def _images(rec):
    return [scene_lib.decode_image(s["bytes"]) for s in rec["segments"] if s["type"] == "image"]


def _texts(rec):
    return [s["text"] for s in rec["segments"] if s["type"] == "text"]


def test_every_kind_is_generated_and_valid(mixed):
    assert {r["kind"] for r in mixed} == set(shapes.KINDS)
    assert len({r["id"] for r in mixed}) == len(mixed)
    for r in mixed:
        records.validate_record(r)
        assert r["source"] == "shapes/train"


def test_deterministic_under_seed():
    a = list(shapes.generate(CYCLE, seed=11, image_size=40))
    b = list(shapes.generate(CYCLE, seed=11, image_size=40))
    c = list(shapes.generate(CYCLE, seed=12, image_size=40))
    assert a == b
    assert [r["meta"] for r in a] != [r["meta"] for r in c]
    assert shapes.shapes_record("t2i", 5, split="eval") != shapes.shapes_record("t2i", 5)
    # A record does not depend on the records generated before it.
    assert list(shapes.generate(3, seed=11, image_size=40, start=CYCLE - 3)) == a[-3:]


def test_round_trip_through_array_record(mixed, tmp_path):
    path = tmp_path / "shapes.array_record"
    assert records.write_records(path, mixed) == len(mixed)
    assert list(records.read_records(path)) == mixed


@pytest.mark.parametrize("size", [24, 32, 48, 64])
def test_image_size_and_scene_meta_match_pixels(size):
    for kind in ("caption", "vqa", "t2i", "text"):
        rec = shapes.shapes_record(kind, 1, image_size=size)
        meta = json.loads(rec["meta"])
        scene = scene_lib.Scene.from_dict(meta["scene"])
        assert scene.image_size == size
        for image in _images(rec):
            assert image.shape == (size, size, 3)
            np.testing.assert_array_equal(image, scene_lib.render(scene))


def test_scenes_have_unique_pairs_gaps_and_named_objects():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = scene_lib.sample_scene(rng, 32)
        objs = scene.objects
        assert 1 <= len(objs) <= scene_lib.MAX_OBJECTS
        assert len({(o.shape, o.colour) for o in objs}) == len(objs)
        for i, a in enumerate(objs):
            assert scene_lib.refer(scene, i) is not None
            for b in objs[i + 1:]:
                assert scene_lib.separated(a.bbox, b.bbox, scene_lib.min_gap(32))


def test_caption_names_every_object(mixed):
    for rec in (r for r in mixed if r["kind"] == "caption"):
        scene = scene_lib.Scene.from_dict(json.loads(rec["meta"])["scene"])
        text = _texts(rec)[0]
        assert text.startswith(geneval.NUMBER_WORDS[len(scene.objects)])
        for o in scene.objects:
            assert f"{scene.size_word(o)} {o.colour} {o.shape}" in text


@pytest.mark.parametrize("qtype", questions.QUESTION_TYPES)
def test_vqa_answers_are_exact(qtype):
    for i in range(8):
        rec = shapes.shapes_record("vqa", i, variant=qtype)
        meta = json.loads(rec["meta"])
        question, answer = _texts(rec)
        assert meta["question_type"] == qtype == questions.question_type(question)
        assert answer == meta["answer"]
        assert answer in questions.answer_vocabulary(qtype)
        scene = scene_lib.Scene.from_dict(meta["scene"])
        assert questions.answer(scene.objects, scene.image_size, question) == answer
        # ... and from the pixels alone.
        assert shapes_judge.answer_question(_images(rec)[0], question) == answer


@pytest.mark.parametrize("category", geneval.CATEGORIES)
def test_t2i_targets_and_prompts(category):
    for i in range(6):
        rec = shapes.shapes_record("t2i", i, variant=category, split="eval")
        meta = json.loads(rec["meta"])
        target = geneval.Target.from_dict(meta["target"])
        assert meta["category"] == target.category == category
        (prompt,) = _texts(rec)
        assert geneval.parse_prompt(prompt) == target
        assert geneval.prompt_text(target) == prompt
        scene = scene_lib.Scene.from_dict(meta["scene"])
        assert geneval.satisfies(scene.objects, target)
        assert shapes_judge.score_image(_images(rec)[0], target)


def _changed(source, target):
    return [i for i, (a, b) in enumerate(zip(source.objects, target.objects)) if a != b]


@pytest.mark.parametrize("edit_type", edits.EDIT_TYPES)
def test_edit_targets_are_exact(edit_type):
    for i in range(6):
        rec = shapes.shapes_record("edit", i, variant=edit_type)
        meta = json.loads(rec["meta"])
        src = scene_lib.Scene.from_dict(meta["source_scene"])
        tgt = scene_lib.Scene.from_dict(meta["target_scene"])
        source_image, target_image = _images(rec)
        assert shapes_judge.matches_scene(shapes_judge.detect_objects(source_image), src)
        assert shapes_judge.matches_scene(shapes_judge.detect_objects(target_image), tgt)
        k, value = meta["object"], meta["value"]
        obj = src.objects[k]
        (instruction,) = _texts(rec)
        assert instruction.endswith(value or "") and scene_lib.refer(src, k) in instruction
        if edit_type == "remove":
            assert tgt.objects == src.objects[:k] + src.objects[k + 1:]
            continue
        assert _changed(src, tgt) == [k]
        new = tgt.objects[k]
        if edit_type == "recolour":
            assert new == obj.replace(colour=value) and value != obj.colour
        elif edit_type == "reshape":
            assert new == obj.replace(shape=value) and value != obj.shape
        else:
            dx, dy = edits.DIRECTIONS[value]
            step = edits.move_distance(32)
            assert new == obj.replace(x=obj.x + dx * step, y=obj.y + dy * step)


def test_video_frames_match_their_descriptions():
    for i in range(8):
        rec = shapes.shapes_record("video", i)
        meta = json.loads(rec["meta"])
        (video,) = [s for s in rec["segments"] if s["type"] == "video"]
        scenes = [scene_lib.Scene.from_dict(s) for s in meta["scenes"]]
        assert len(video["frames"]) == len(scenes) == len(video["captions"]) == shapes.VIDEO_FRAMES
        assert video["timestamps"] == [t / video["fps"] for t in range(len(scenes))]
        for frame, scene in zip(video["frames"], scenes):
            found = shapes_judge.detect_objects(scene_lib.decode_image(frame))
            assert shapes_judge.matches_scene(found, scene)
        step = edits.video_step(32)
        for t in range(1, len(scenes)):
            prev, cur = scenes[t - 1], scenes[t]
            moved = [k for k in _changed(prev, cur)
                     if prev.objects[k].bbox != cur.objects[k].bbox]
            assert len(moved) == 1
            a, b = prev.objects[moved[0]], cur.objects[moved[0]]
            assert abs(a.x - b.x) + abs(a.y - b.y) == step
            assert scene_lib.refer(prev, moved[0]) in video["captions"][t]
            recoloured = [k for k in _changed(prev, cur)
                          if prev.objects[k].colour != cur.objects[k].colour]
            assert len(recoloured) == video["captions"][t].count(" turns ")


def test_interleaved_images_follow_the_story():
    for i in range(6):
        rec = shapes.shapes_record("interleaved", i)
        meta = json.loads(rec["meta"])
        scenes = [scene_lib.Scene.from_dict(s) for s in meta["scenes"]]
        images = _images(rec)
        assert len(images) == len(scenes) == len(meta["edits"]) + 1 >= 2
        assert all(s["role"] == "context" for s in rec["segments"])
        for image, scene in zip(images, scenes):
            np.testing.assert_array_equal(image, scene_lib.render(scene))
        for step, before, after in zip(meta["edits"], scenes, scenes[1:]):
            assert step["source_scene"] == before.to_dict()
            assert step["target_scene"] == after.to_dict()


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="kind"):
        shapes.shapes_record("poem", 0)
    with pytest.raises(ValueError, match="'weather'"):
        shapes.shapes_record("t2i", 0, variant="weather")
    with pytest.raises(ValueError, match="image_size"):
        shapes.shapes_record("t2i", 0, image_size=8)
    with pytest.raises(ValueError, match="split"):
        shapes.shapes_record("t2i", 0, split="test")
    with pytest.raises(ValueError, match="not a shapes-world"):
        geneval.parse_prompt("a photo of a dog")


def test_cli_writes_shards_and_manifest(tmp_path):
    flags = ["--shapes_train=30", "--shapes_eval=13", "--digits_train=9", "--digits_eval=6",
             "--records_per_shard=20", "--image_size=32", "--seed=4"]
    manifest = worlds_main.main([f"--out={tmp_path / 'a'}", *flags])
    shards = manifest["worlds"]["shapes"]["train"]["shards"]
    assert shards == ["train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
    for world, splits in manifest["worlds"].items():
        for split, info in splits.items():
            recs = [r for name in info["shards"]
                    for r in records.read_records(tmp_path / "a" / world / name)]
            assert len(recs) == info["records"] == sum(info["kinds"].values())
            assert {r["source"] for r in recs} == {f"{world}/{split}"}
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["flags"]["seed"] == 4
    worlds_main.main([f"--out={tmp_path / 'b'}", *flags])
    for world in ("shapes", "digits"):
        for name in sorted((tmp_path / "a" / world).iterdir()):
            assert name.read_bytes() == (tmp_path / "b" / world / name.name).read_bytes()


def test_mix_sets_the_train_kinds_and_a_bad_mix_names_the_item(tmp_path):
    assert shapes.parse_mix("") == shapes.DEFAULT_MIX
    assert list(shapes.parse_mix("t2i=3, vqa=1")) == ["t2i", "vqa"]
    for bad, match in [("t2i=3,poem=1", "'poem=1'"), ("t2i", "'t2i'"), ("t2i=x", "'t2i=x'"),
                       ("t2i=1,t2i=2", "twice"), ("t2i=0", "at least one")]:
        with pytest.raises(ValueError, match=match):
            shapes.parse_mix(bad)
    with pytest.raises(ValueError, match="poem"):
        worlds_main.main([f"--out={tmp_path / 'x'}", "--shapes_mix=poem=1"])
    assert not (tmp_path / "x").exists()  # nothing written before the check
    manifest = worlds_main.main([f"--out={tmp_path / 'm'}", "--shapes_train=12",
                                 "--shapes_eval=13", "--digits_train=3", "--digits_eval=3",
                                 "--shapes_mix=t2i=3,vqa=1"])
    shapes_world = manifest["worlds"]["shapes"]
    assert shapes_world["train"]["kinds"] == {"t2i": 9, "vqa": 3}
    # The eval split keeps every kind, so held-out metrics still cover all of them.
    assert set(shapes_world["eval"]["kinds"]) == set(shapes.KINDS)
    assert manifest["flags"]["shapes_mix"] == "t2i=3,vqa=1"
    train = [r for name in shapes_world["train"]["shards"]
             for r in records.read_records(tmp_path / "m" / "shapes" / name)]
    assert [r["kind"] for r in train[:4]] == ["t2i", "t2i", "t2i", "vqa"]
    from_config = shards_lib.WorldSettings.from_config(
        ml_collections.ConfigDict({"shapes_train": 12, "shapes_mix": "t2i=3,vqa=1"}))
    assert (from_config.shapes_train, from_config.shapes_mix) == (12, "t2i=3,vqa=1")
    # Another mix is other settings: ensure_worlds rewrites the directory.
    _, wrote = shards_lib.ensure_worlds(str(tmp_path / "m"), dataclasses.replace(
        shards_lib.WorldSettings(**manifest["flags"]), shapes_mix="t2i=1"))
    assert wrote
