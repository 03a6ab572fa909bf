"""python -m unijax.evals.run --workdir: a trained checkpoint scored end to end (the small
model of the `trained` fixture, a few eval items and sampling steps)."""

import json
import os

import pytest

from unijax.data.worlds import geneval, questions
from unijax.evals import run
from unijax.inference import image as image_lib


def _scores(results) -> dict:
    return {f"{part}/{world}/{name}": value for part in ("generation", "understanding")
            for world, scores in results[part].items() for name, value in scores.items()}


def test_workdir_writes_eval_json_and_tensorboard(trained, capsys, monkeypatch):
    workdir, _ = trained
    used = []  # the guidance of every sampler call

    def sample(*args, guidance, **kwargs):
        used.append(guidance)
        return sampler(*args, guidance=guidance, **kwargs)

    sampler = image_lib.sample
    monkeypatch.setattr(image_lib, "sample", sample)
    results = run.main([f"--workdir={workdir}", "--steps=3", "--cfg_text=2.5",
                        "--num_per_category=1", "--num_digits=2"])
    # One batch of prompts, with the flags' overrides of the config's t2i guidance.
    assert [(g.num_steps, g.text_scale, g.interval) for g in used] == [(3, 2.5, (0.4, 1.0))]
    out = os.path.join(workdir, "eval_3")  # the checkpoint's step
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f) == results
    assert json.loads(capsys.readouterr().out) == results
    assert any(name.startswith("events.out.tfevents") for name in
               os.listdir(os.path.join(out, "tb")))
    assert results["step"] == 3
    n_gen, n_und = len(geneval.CATEGORIES) + 2, len(questions.QUESTION_TYPES) + 2
    assert results["num_items"] == {"generation": n_gen, "understanding": n_und}
    gen, und = results["generation"], results["understanding"]
    assert set(gen["shapes"]) == {*geneval.CATEGORIES, "overall"}
    assert set(gen["digits"]) == {"accuracy"}
    assert set(und["shapes"]) == {*questions.QUESTION_TYPES, "overall"}
    assert set(und["digits"]) == {"accuracy"}
    for name, value in _scores(results).items():
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (name, value)


def test_a_baseline_needs_out(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--baseline=random"])
    assert exit_info.value.code == 2
    assert "--out is required with --baseline" in capsys.readouterr().err
