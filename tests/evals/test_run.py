"""The eval entry point: ground-truth callables score ~100%, random ones near chance, reports
land in JSON and TensorBoard."""

import json
import logging
import sys

import numpy as np
import pytest

from unijax.data import records
from unijax.data.worlds import digits, geneval, questions, shapes
from unijax.evals import run


@pytest.fixture(scope="module")
def eval_set():
    return run.eval_records(num_per_category=12, num_digits=40, seed=0)


def test_eval_items_cover_every_category_and_question_type(eval_set):
    gen, und = run.items_from_records(eval_set)
    shapes_gen = [it for it in gen if it.world == "shapes"]
    assert {it.category for it in shapes_gen} == set(geneval.CATEGORIES)
    assert sum(it.world == "digits" for it in gen) == 40
    assert {it.type for it in und if it.world == "shapes"} == set(questions.QUESTION_TYPES)
    assert all(r["source"].endswith("/eval") for r in eval_set)


def test_oracle_scores_about_100_percent_and_writes_reports(eval_set, tmp_path):
    gen, ans = run.baseline("oracle")
    out, tb = tmp_path / "eval.json", tmp_path / "tb"
    results = run.evaluate(gen, ans, records=eval_set, out_path=str(out), tb_dir=str(tb),
                           step=7)
    assert results["step"] == 7
    shapes_gen = results["generation"]["shapes"]
    assert set(shapes_gen) == {*geneval.CATEGORIES, "overall"}
    assert min(shapes_gen.values()) >= 0.99, shapes_gen
    assert results["generation"]["digits"]["accuracy"] >= 0.95
    und = results["understanding"]
    assert min(und["shapes"].values()) >= 0.99, und
    assert und["digits"]["accuracy"] >= 0.95
    assert json.loads(out.read_text()) == results
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())


def _chance_interval(p) -> tuple[float, float]:
    """The hit rate of independent trials with success probabilities `p`: its mean within
    4 standard deviations plus one trial (a fixed seed keeps the test deterministic)."""
    p = np.asarray(p, np.float64)
    half = 4 * np.sqrt(np.sum(p * (1 - p))) + 1
    return (p.sum() - half) / len(p), (p.sum() + half) / len(p)


@pytest.fixture(scope="module")
def large_eval_set():
    return run.eval_records(num_per_category=48, num_digits=300, seed=5)


def test_random_scores_chance_bounded_from_below_and_above(large_eval_set):
    """The random baseline lands at chance, not just below a ceiling: a judge that fails
    everything (or passes everything) is caught. Chance per item: shapes generation the
    probability that a random target of the category meets the prompt; digits 1/10;
    understanding one over the size of the question type's answer vocabulary."""
    from tests.evals.test_judges import RANDOM_TARGET_CHANCE

    gen_items, und_items = run.items_from_records(large_eval_set)
    results = run.evaluate(*run.baseline("random", seed=1), records=large_eval_set)
    checked = []

    def check(score, chances, what, from_below=True):
        lo, hi = _chance_interval(chances)
        assert score <= hi, f"{what}: {score:.3f} above chance's [{lo:.3f}, {hi:.3f}]"
        if from_below:  # where the interval is informative (enough items, chance not tiny)
            assert 0 < lo <= score, f"{what}: {score:.3f} below chance's [{lo:.3f}, {hi:.3f}]"
        checked.append(what)

    shapes_gen = [it for it in gen_items if it.world == "shapes"]
    check(results["generation"]["shapes"]["overall"],
          [RANDOM_TARGET_CHANCE[it.category] for it in shapes_gen], "shapes generation")
    for category, chance in RANDOM_TARGET_CHANCE.items():
        n = sum(it.category == category for it in shapes_gen)
        check(results["generation"]["shapes"][category], [chance] * n, category, False)
    num_digits = sum(it.world == "digits" for it in gen_items)
    check(results["generation"]["digits"]["accuracy"], [0.1] * num_digits, "digits generation")
    shapes_und = [it for it in und_items if it.world == "shapes"]
    chance = {t: 1 / len(questions.answer_vocabulary(t)) for t in questions.QUESTION_TYPES}
    check(results["understanding"]["shapes"]["overall"], [chance[it.type] for it in shapes_und],
          "shapes understanding")
    for qtype in questions.QUESTION_TYPES:
        n = sum(it.type == qtype for it in shapes_und)
        check(results["understanding"]["shapes"][qtype], [chance[qtype]] * n, qtype,
              from_below=chance[qtype] == 0.5)
    check(results["understanding"]["digits"]["accuracy"],
          [0.1] * sum(it.world == "digits" for it in und_items), "digits understanding")
    assert len(checked) == 18


def test_noise_scores_zero(eval_set):
    gen, ans = run.baseline("noise")
    results = run.evaluate(gen, ans, records=eval_set)
    assert all(v == 0.0 for v in results["generation"]["shapes"].values())
    assert results["understanding"]["shapes"]["overall"] == 0.0


def test_batched_callables_and_records_from_shards(tmp_path):
    recs = list(shapes.generate(26, split="eval")) + list(digits.generate(6, split="eval"))
    path = tmp_path / "eval.array_record"
    records.write_records(path, recs)
    gen, ans = run.baseline("oracle")
    calls = []

    def generate_batch(prompts):
        calls.append(len(prompts))
        return [gen(p) for p in prompts]

    def answer_batch(images, questions_):
        calls.append(len(questions_))
        return [ans(im, q) for im, q in zip(images, questions_)]

    results = run.evaluate(generate_batch, answer_batch, records=records.read_records(path),
                           batched=True)
    counts = results["num_items"]
    assert calls == [counts["generation"], counts["understanding"]]
    assert counts["generation"] == sum(r["kind"] == "t2i" for r in recs)
    assert counts["understanding"] == sum(r["kind"] == "vqa" for r in recs)
    assert results["generation"]["shapes"]["overall"] == 1.0


def test_one_half_can_be_skipped_and_bad_images_are_rejected(eval_set):
    _, ans = run.baseline("oracle")
    results = run.evaluate(None, ans, records=eval_set)
    assert "generation" not in results and results["understanding"]["shapes"]["overall"] == 1.0
    with pytest.raises(ValueError, match="uint8"):
        run.evaluate(lambda p: np.zeros((32, 32, 3), np.float32), None, records=eval_set)
    with pytest.raises(ValueError, match="baseline"):
        run.baseline("perfect")


def test_tensorboard_is_skipped_with_a_warning_without_tensorboardx(eval_set, tmp_path,
                                                                   monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import fail
    gen, ans = run.baseline("noise")
    with caplog.at_level(logging.WARNING):
        run.evaluate(gen, ans, records=eval_set[:20], tb_dir=str(tmp_path / "tb"))
    assert "tensorboardX is not installed" in caplog.text
    assert not (tmp_path / "tb").exists()


def test_cli_writes_json(tmp_path):
    results = run.main([f"--out={tmp_path}", "--baseline=oracle", "--num_per_category=2",
                        "--num_digits=4"])
    assert json.loads((tmp_path / "eval.json").read_text()) == results
    assert results["generation"]["shapes"]["overall"] == 1.0
