"""A small model trained a few steps by the real trainer: the checkpoint the inference, sampling
and eval tests load (the session fixture `trained` in tests/conftest.py calls `train` once)."""

from __future__ import annotations

import ml_collections

from tests.training import helpers
from unijax.training import train as train_lib

STEPS = 3


def train(tmp_path_factory) -> tuple[str, ml_collections.ConfigDict]:
    """(workdir, config): the small config trained STEPS steps on the 8 devices, a checkpoint
    every step, the ViT frozen (so the checkpoint's `frozen` holds weights too)."""
    worlds = helpers.write_small_worlds(str(tmp_path_factory.mktemp("worlds")))
    config = helpers.small_config(worlds, **{
        "train.steps": STEPS, "checkpoint.every_steps": 1, "checkpoint.max_to_keep": STEPS,
        "train.freeze": ("vit/.*",), "train.warmup_steps": 0})
    config.data.eval_datasets = ml_collections.ConfigDict()  # no evaluation: faster
    workdir = str(tmp_path_factory.mktemp("workdir"))
    assert train_lib.train(config, workdir)["status"] == "done"
    return workdir, config
