"""The embedded-worlds evaluation: generate and answer for every eval item, score, report.

  results = evaluate(generate_fn, answer_fn, out_path="eval.json", tb_dir="tb", step=1000)

  generate_fn(prompt: str) -> [H, W, 3] uint8 image           (text-to-image)
  answer_fn(image: [H, W, 3] uint8, question: str) -> str     (VQA)

Either may be None to skip that half; with `batched=True` both take and return lists. Eval items
are the eval split's t2i and vqa records of both worlds (`eval_records`, balanced per GenEval
category and per question type) or any records given. Reports (JSON and, when tensorboardX is
installed, TensorBoard scalars `eval/<part>/<world>/<category>` plus a strip of generated
images):

  generation:    shapes: per GenEval category + overall (mean of categories);
                 digits: accuracy of the digit classifier on the generated images
  understanding: shapes: exact-match accuracy per question type + overall;
                 digits: accuracy

A trained model: `model_functions(chat)` (batched, over `inference.chat.Chat`), or
`python -m unijax.evals.run --workdir=DIR` (its newest checkpoint, EMA weights; results in
DIR/eval_<step>/eval.json).

Baselines (`baseline(name)`; `python -m unijax.evals.run --baseline=NAME --out=DIR`):
"oracle" renders each prompt's target and answers from pixels with the judges (the ceiling,
~100%); "random" ignores its input (a random target of the prompt's category; a uniform pick
from the answer vocabulary: chance); "noise" draws uniform noise and answers "".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from absl import logging

from unijax.data.worlds import digits, geneval, questions, shapes
from unijax.data.worlds import scene as scene_lib
from unijax.evals import digits_judge, shapes_judge, vqa

GenerateFn = Callable[[str], np.ndarray]
AnswerFn = Callable[[np.ndarray, str], str]


@dataclasses.dataclass(frozen=True)
class GenerationItem:
    """A prompt to generate from; target is a geneval.Target (shapes) or a digit (digits)."""

    world: str
    category: str
    prompt: str
    target: geneval.Target | int


@dataclasses.dataclass(frozen=True)
class QuestionItem:
    """A question about an image ([H, W, 3] uint8) with its gold answer."""

    world: str
    type: str
    image: np.ndarray
    question: str
    answer: str


def items_from_records(records: Iterable[dict]) -> tuple[list[GenerationItem], list[QuestionItem]]:
    """The t2i and vqa records among `records` as eval items (other kinds are ignored)."""
    gen, und = [], []
    for rec in records:
        world = rec["source"].split("/")[0]
        meta = json.loads(rec["meta"])
        texts = [s["text"] for s in rec["segments"] if s["type"] == "text"]
        if rec["kind"] == "t2i" and world == "shapes":
            gen.append(GenerationItem(world, meta["category"], texts[0],
                                      geneval.Target.from_dict(meta["target"])))
        elif rec["kind"] == "t2i" and world == "digits":
            gen.append(GenerationItem(world, "digits", texts[0], int(meta["digit"])))
        elif rec["kind"] == "vqa":
            image = next(s["bytes"] for s in rec["segments"] if s["type"] == "image")
            qtype = meta.get("question_type", "digit")
            und.append(QuestionItem(world, qtype, scene_lib.decode_image(image), texts[0],
                                    texts[1]))
    return gen, und


def eval_records(num_per_category: int = 16, image_size: int = 32, seed: int = 0,
                 num_digits: int = 100) -> list[dict]:
    """The built-in eval set: shapes t2i per GenEval category and vqa per question type
    (`num_per_category` each), digits t2i and vqa (`num_digits` each); all from the eval split."""
    out = []
    for kind, variants in (("t2i", geneval.CATEGORIES), ("vqa", questions.QUESTION_TYPES)):
        for variant in variants:
            out += [shapes.shapes_record(kind, i, split="eval", seed=seed, image_size=image_size,
                                         variant=variant) for i in range(num_per_category)]
    for kind in ("t2i", "vqa"):
        out += [digits.digits_record(kind, i, split="eval", seed=seed, image_size=image_size)
                for i in range(num_digits)]
    return out


def _call(fn, batched: bool, *columns):
    if batched:
        return list(fn(*(list(c) for c in columns)))
    return [fn(*args) for args in zip(*columns)]


def _as_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"generate_fn must return [H, W, 3] uint8 images, got "
                         f"{image.shape} {image.dtype}")
    return image


def score_generation(items: Sequence[GenerationItem], images: Sequence[np.ndarray],
                     image_size: int = 32) -> dict[str, dict[str, float]]:
    """{world: {category: accuracy}} of generated images (one per item)."""
    result = {}
    shape_idx = [i for i, it in enumerate(items) if it.world == "shapes"]
    if shape_idx:
        result["shapes"] = shapes_judge.score_images([images[i] for i in shape_idx],
                                                     [items[i].target for i in shape_idx])
    digit_idx = [i for i, it in enumerate(items) if it.world == "digits"]
    if digit_idx:
        result["digits"] = {"accuracy": digits_judge.score_images(
            [images[i] for i in digit_idx], [items[i].target for i in digit_idx], image_size)}
    return result


def score_understanding(items: Sequence[QuestionItem], answers: Sequence[str]
                        ) -> dict[str, dict[str, float]]:
    """{world: {question type: exact-match accuracy, "overall"}} of answers (one per item)."""
    result = {}
    for world in sorted({it.world for it in items}):
        idx = [i for i, it in enumerate(items) if it.world == world]
        scores = vqa.score([answers[i] for i in idx], [items[i].answer for i in idx],
                           [items[i].type for i in idx])
        result[world] = {"accuracy": scores["overall"]} if world == "digits" else scores
    return result


def _write_tensorboard(tb_dir: str, results: dict, step: int, samples: list[np.ndarray]):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logging.warning("tensorboardX is not installed: eval results go to JSON only")
        return
    with SummaryWriter(tb_dir) as writer:
        for part in ("generation", "understanding"):
            for world, scores in results.get(part, {}).items():
                for name, value in scores.items():
                    writer.add_scalar(f"eval/{part}/{world}/{name}", value, step)
        if samples:
            side = max(s.shape[0] for s in samples)
            strip = np.concatenate([np.pad(s, ((0, side - s.shape[0]), (0, 0), (0, 0)),
                                           constant_values=255) for s in samples], axis=1)
            writer.add_image("eval/generation/samples", strip, step, dataformats="HWC")


def evaluate(generate_fn: GenerateFn | None, answer_fn: AnswerFn | None, *,
             out_path: str | None = None, tb_dir: str | None = None, step: int = 0,
             records: Iterable[dict] | None = None, num_per_category: int = 16,
             num_digits: int = 100, image_size: int = 32, seed: int = 0,
             batched: bool = False, num_samples: int = 12) -> dict:
    """Runs the eval: generates for every t2i item, answers every vqa item, scores them.

    Args:
      generate_fn: prompt -> [H, W, 3] uint8 image (None: skip generation).
      answer_fn: (image, question) -> answer text (None: skip understanding).
      out_path: JSON file to write the results to (None: don't write).
      tb_dir: TensorBoard log dir (None: no TensorBoard); needs tensorboardX.
      step: the training step the results belong to.
      records: eval records (default: `eval_records(num_per_category, image_size, seed,
        num_digits)`).
      image_size: the worlds' image side (selects the digits classifier).
      batched: call generate_fn(list of prompts) and answer_fn(list of images, list of
        questions) once each instead of once per item.
      num_samples: generated images shown in TensorBoard.

    Returns:
      {"step", "generation": {world: {category: accuracy}}, "understanding": {world:
      {question type: accuracy}}, "num_items": {"generation": n, "understanding": n}}
    """
    if records is None:
        records = eval_records(num_per_category, image_size, seed, num_digits)
    gen_items, und_items = items_from_records(records)
    results: dict = {"step": step, "num_items": {}}
    samples = []
    if generate_fn is not None:
        images = [_as_image(im) for im in
                  _call(generate_fn, batched, [it.prompt for it in gen_items])]
        results["generation"] = score_generation(gen_items, images, image_size)
        results["num_items"]["generation"] = len(gen_items)
        samples = images[:: max(1, len(images) // num_samples)][:num_samples]
    if answer_fn is not None:
        answers = [str(a) for a in _call(answer_fn, batched, [it.image for it in und_items],
                                         [it.question for it in und_items])]
        results["understanding"] = score_understanding(und_items, answers)
        results["num_items"]["understanding"] = len(und_items)
    if out_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    if tb_dir is not None:
        _write_tensorboard(tb_dir, results, step, samples)
    return results


def model_functions(chat, *, batch_size: int = 64, seed: int = 0, guidance=None,
                    max_new_tokens: int = 16) -> tuple[Callable, Callable]:
    """Batched (generate_fn, answer_fn) of a trained model (`inference.chat.Chat`), for
    `evaluate(..., batched=True)`: images at the config's default size with its t2i guidance
    (or `guidance`), one seed per batch; greedy answers of at most `max_new_tokens` tokens."""

    def chunks(n):
        return [(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]

    def generate_fn(prompts):
        out = []
        for i, (a, b) in enumerate(chunks(len(prompts))):
            out += [imgs[0] for imgs in chat.generate(list(prompts[a:b]), seed=seed + i,
                                                      guidance=guidance)]
        return out

    def answer_fn(images, questions):
        out = []
        for a, b in chunks(len(questions)):
            out += chat.answer(list(images[a:b]), list(questions[a:b]),
                               max_new_tokens=max_new_tokens)
        return out

    return generate_fn, answer_fn


def _is_digits_prompt(prompt: str) -> bool:
    return "handwritten" in prompt.lower()


def oracle_generate(prompt: str, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """The prompt's target: a scene meeting it, or a held-out real digit of the asked class."""
    if _is_digits_prompt(prompt):
        images, labels = digits.split("eval")
        choices = np.nonzero(labels == digits.parse_prompt(prompt))[0]
        return digits.render(images[rng.choice(choices)], image_size)
    target = geneval.parse_prompt(prompt)
    return scene_lib.render(geneval.scene_for_target(rng, target, image_size))


def random_generate(prompt: str, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """Ignores the prompt beyond its category: a random target of the same category (or a
    random held-out digit)."""
    if _is_digits_prompt(prompt):
        images, _ = digits.split("eval")
        return digits.render(images[rng.integers(len(images))], image_size)
    target = geneval.sample_target(rng, geneval.parse_prompt(prompt).category)
    return scene_lib.render(geneval.scene_for_target(rng, target, image_size))


def noise_generate(prompt: str, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """Uniform RGB noise."""
    return rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)


def oracle_answer(image: np.ndarray, question: str, rng: np.random.Generator) -> str:
    """Answers from pixels with the judges (shapes: detected objects; digits: classifier)."""
    try:
        return shapes_judge.answer_question(image, question)
    except ValueError:
        return digits_judge.answer_question(image, question, max(np.shape(image)[:2]))


def random_answer(image: np.ndarray, question: str, rng: np.random.Generator) -> str:
    """A uniform pick from the question type's answer vocabulary (chance level)."""
    try:
        vocabulary = questions.answer_vocabulary(questions.question_type(question))
    except ValueError:
        vocabulary = tuple(str(d) for d in range(10))
    return str(vocabulary[int(rng.integers(len(vocabulary)))])


def empty_answer(image: np.ndarray, question: str, rng: np.random.Generator) -> str:
    """No answer at all."""
    return ""


_BASELINES = {
    "oracle": (oracle_generate, oracle_answer),
    "random": (random_generate, random_answer),
    "noise": (noise_generate, empty_answer),
}
BASELINES: tuple[str, ...] = tuple(_BASELINES)


def baseline(name: str, image_size: int = 32, seed: int = 0) -> tuple[GenerateFn, AnswerFn]:
    """(generate_fn, answer_fn) of a baseline, drawing from one seeded stream each (so the
    same prompt asked twice gets two independent draws; a run is deterministic)."""
    if name not in _BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {name!r}")
    gen, ans = _BASELINES[name]
    gen_rng, ans_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    return (lambda prompt: gen(prompt, gen_rng, image_size),
            lambda image, question: ans(image, question, ans_rng))


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m unijax.evals.run --workdir=DIR` scores a trained checkpoint (its EMA);
    `--baseline=oracle --out=DIR` a baseline."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--workdir", help="training workdir whose checkpoint to score")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--weights", choices=("ema", "params"), default="ema")
    parser.add_argument("--steps", type=int, help="sampling time-grid points (default: the "
                        "config's config.sample.steps)")
    parser.add_argument("--cfg_text", type=float, help="text guidance scale")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--baseline", choices=BASELINES, default="oracle")
    parser.add_argument("--out", help="directory for eval.json and tb/ (default: "
                        "WORKDIR/eval_<step> with --workdir)")
    parser.add_argument("--num_per_category", type=int, default=16)
    parser.add_argument("--num_digits", type=int, default=100)
    parser.add_argument("--image_size", type=int, default=32,
                        help="image side of the baselines (with --workdir: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    step = 0
    if args.workdir:
        from unijax.inference.chat import Chat

        chat = Chat.from_workdir(args.workdir, step=args.step, weights=args.weights)
        step = chat.info["step"]
        args.image_size = int(chat.config.data.vae_image_size)  # the model's image side
        guidance = chat.guidance("t2i", num_steps=args.steps, text_scale=args.cfg_text)
        gen, ans = model_functions(chat, batch_size=args.batch_size, seed=args.seed,
                                   guidance=guidance)
        out = args.out or os.path.join(args.workdir, f"eval_{step}")
    else:
        if not args.out:
            parser.error("--out is required with --baseline")
        gen, ans = baseline(args.baseline, args.image_size, args.seed)
        out = args.out
    results = evaluate(gen, ans, out_path=os.path.join(out, "eval.json"),
                       tb_dir=os.path.join(out, "tb"), num_per_category=args.num_per_category,
                       num_digits=args.num_digits, image_size=args.image_size, seed=args.seed,
                       batched=bool(args.workdir), step=step)
    print(json.dumps(results, indent=2, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
