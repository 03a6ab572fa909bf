"""The embedded-world judges during training: what the model draws and answers, scored.

  judges = Judges(config, spec, mesh, writer)        # None-safe: judges.enabled
  scores = judges.score(step, params, frozen)         # per-category accuracies (evals/run.py)
  judges.samples(step, params, frozen)                # a strip of generated images to TB

`config.judges` (configs/base.py): the eval items are the worlds' eval split
(`evals.run.eval_records`: `num_per_category` prompts per GenEval category and questions per
type, `num_digits` digit prompts and questions); images are sampled through the KV-cached
sampler (`inference/`) with the config's text-to-image guidance and `steps` points of the time
grid, answers decoded greedily. The judges read the pixels back (`evals/`), so the scores say
what the model draws, not what its loss is. `chance` is the prompt-ignoring baseline
(`evals.run.baseline("random")`: a random target of the prompt's category, a uniform answer).
"""

from __future__ import annotations

import ml_collections

from unijax.evals import run as evals_run
from unijax.inference.chat import Chat
from unijax.training import sharding

SAMPLE_PROMPTS = ("a photo of a red circle", "a photo of a blue square",
                  "a photo of a green triangle and a yellow circle", "a photo of three squares",
                  "a handwritten digit 3", "a handwritten digit 7")


class Judges:
    """Scores and samples of the model with given weights (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, spec, mesh, writer):
        cfg = config.get("judges")
        self.enabled = bool(cfg and cfg.enabled)
        self.config, self.spec, self.mesh, self.writer = config, spec, mesh, writer
        self._cached = None
        if not self.enabled:
            return
        self.cfg = cfg
        self.image_size = int(config.data.vae_image_size)
        self.records = evals_run.eval_records(int(cfg.num_per_category), self.image_size,
                                              num_digits=int(cfg.num_digits))

    def _chat(self, params, frozen) -> Chat:
        """One Chat for the run: later calls swap its weights, so nothing recompiles."""
        model = self.spec.model(params, frozen)
        if self._cached is None:
            self._cached = Chat(model, self.config, mesh=self.mesh, rules=sharding.LOGICAL_RULES)
        else:
            self._cached.engine.set_weights(model)
        return self._cached

    def _guidance(self, chat: Chat):
        return chat.guidance("t2i", num_steps=int(self.cfg.steps))

    def score(self, step: int, params, frozen) -> dict:
        """{"generation": {world: {category: accuracy}}, "understanding": ...} at `step`."""
        chat = self._chat(params, frozen)
        generate_fn, answer_fn = evals_run.model_functions(
            chat, batch_size=int(self.cfg.batch_size), guidance=self._guidance(chat))
        results = evals_run.evaluate(generate_fn, answer_fn, records=self.records,
                                     image_size=self.image_size, batched=True, step=step)
        scalars = {}
        for part in ("generation", "understanding"):
            for world, scores in results.get(part, {}).items():
                scalars.update({f"judges/{part}/{world}/{k}": v for k, v in scores.items()})
        self.writer.write(step, scalars)
        return {k: results[k] for k in ("generation", "understanding")}

    def chance(self) -> dict:
        """The prompt-ignoring baseline's scores on the same items."""
        generate_fn, answer_fn = evals_run.baseline("random", self.image_size)
        results = evals_run.evaluate(generate_fn, answer_fn, records=self.records,
                                     image_size=self.image_size)
        return {k: results[k] for k in ("generation", "understanding")}

    def samples(self, step: int, params, frozen) -> None:
        """Images for `SAMPLE_PROMPTS` (`tb_samples` per prompt) to TensorBoard."""
        chat = self._chat(params, frozen)
        images = chat.generate(list(SAMPLE_PROMPTS), num_images=int(self.cfg.tb_samples),
                               guidance=self._guidance(chat))
        for i, row in enumerate(images):
            self.writer.images(step, f"samples/{i}_{SAMPLE_PROMPTS[i].replace(' ', '_')}", row)
