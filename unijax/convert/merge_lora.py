"""A LoRA run's checkpoint -> a plain unijax checkpoint with the adapters merged into the base.

  report = write_merged("/runs/lora", "/ckpt/merged")        # newest step, EMA adapters
  # /ckpt/merged/checkpoints/<step>/ then samples, fine-tunes (config.init.checkpoint) and
  # exports (`python -m unijax.convert.bagel --to_official`, which calls this itself for a
  # LoRA workdir) like any other unijax checkpoint.

The base is read from the run's `config.init.checkpoint` and the adapters from its own
checkpoint (`inference.load.load_model(merge_lora=True)`: W' = W + alpha / r * A B per
projection, `unijax.models.lora`), every weight in its dtype on disk (a merged kernel in its
base's). The written checkpoint holds every weight in its `ema` item
(no optimizer state, no data iterator) with the run's config at `lora_rank = 0`. The merged
model is held once in host memory while it is written.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from unijax.inference import load as load_lib


def is_lora_run(src: str, step: int | None = None) -> bool:
    """Whether the checkpoint at `src` (a workdir or checkpoint directory) is a LoRA run's."""
    config, _ = load_lib.load_config(src, step)
    return bool(config.model.llm.get("lora_rank", 0))


def write_merged(src: str, dst: str, *, step: int | None = None, weights: str = "ema") -> dict:
    """Writes the merged model of the LoRA checkpoint `src` as a unijax checkpoint under
    `dst/checkpoints/<step>`; returns {"checkpoint", "tensors", "bytes"}.

    Raises:
      FileExistsError: `dst/checkpoints` exists.
      ValueError: `src` is not a LoRA run, or its base does not match it.
    """
    ckpt_dir = os.path.join(os.path.abspath(dst), "checkpoints")
    if os.path.exists(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} exists: merge into a new directory")
    if not is_lora_run(src, step):
        raise ValueError(f"{src}: not a LoRA run (config.model.llm.lora_rank is 0)")
    model, config, info = load_lib.load_model(src, step=step, weights=weights, merge_lora=True,
                                              dtype=load_lib.SAVED)
    tree = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    del model
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False), item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
    manager.save(info["step"], args=ocp.args.Composite(
        state=ocp.args.PyTreeSave({"ema": tree}),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))
    manager.wait_until_finished()
    manager.close()
    leaves = jax.tree.leaves(tree)
    return {"checkpoint": os.path.join(ckpt_dir, str(info["step"])), "tensors": len(leaves),
            "bytes": int(sum(x.nbytes for x in leaves))}
