"""Held-out evaluation during training: CE and flow MSE at fixed times with fixed noise.

  batches = load_eval_batches(config, mesh)          # read once, kept on device
  eval_step = make_eval_step(config, spec)
  scores = evaluate(eval_step, params, frozen, batches, split_names(config))
  # {"ce": ..., "accuracy": ..., "mse_t0.25": ..., ..., "text_tokens": ..., "flow_tokens": ...,
  #  "shapes/ce": ..., "shapes/mse_t0.25": ..., ..., "digits/ce": ..., ...}

The eval data is `config.data.eval_datasets` read in order (no shuffle, one pass, no condition
dropout: every prompt is kept) with a fixed seed, so every evaluation of every run sees the
same rows. Each noisy image is set to each time t of `config.train.eval_timesteps` (no shift),
noised with noise from `config.train.eval_seed` (one key per batch and row) and encoded with
the VAE posterior mean. CE is the weighted token mean over every eval batch, MSE the flow-weight
mean: the training normalisation over the whole eval set. The same numbers per eval split
(each entry of `config.data.eval_datasets`, from the batches' `dataset_id`) are
"<split>/ce", "<split>/mse_t<t>" and its token counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from unijax.data import pack_spec, pipeline
from unijax.training import losses

DROPOUTS = ("text_cond_dropout", "vit_cond_dropout", "vae_cond_dropout")


def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` reading `config.data.eval_datasets` once, in order, with no condition dropout."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.data.datasets = c.data.eval_datasets.copy_and_resolve_references()
        for entry in c.data.datasets.values():
            for name in DROPOUTS:
                entry[name] = 0.0
        c.data.shuffle = False
        c.data.num_epochs = 1
        c.data.num_workers = 0
    return c


def split_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The eval splits in `dataset_id` order: the sorted names of `config.data.eval_datasets`
    (the names the eval packer numbers its documents by)."""
    if not config.data.get("eval_datasets"):
        return ()
    return pack_spec.dataset_names(eval_data_config(config))


def load_eval_batches(config: ml_collections.ConfigDict, mesh) -> list:
    """Up to `config.train.eval_batches` global eval batches on `mesh` ([] without eval data
    or with eval_batches=0: no held-out evaluation).

    Every host reads its own shard of the eval data; all hosts stop at the same count.
    """
    if not config.data.get("eval_datasets") or int(config.train.eval_batches) == 0:
        return []
    eval_config = eval_data_config(config)
    iterator = pipeline.make_iterator(eval_config, seed=int(config.train.eval_seed))
    host = []
    for _ in range(int(config.train.eval_batches)):
        try:
            host.append(next(iterator))
        except StopIteration:
            break
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        counts = multihost_utils.process_allgather(np.int32(len(host)))
        host = host[:int(np.min(counts))]
    if not host:
        raise ValueError("config.data.eval_datasets yields no batch: check its paths and that "
                         "its records fit the rows")
    if iterator.skipped:
        logging.warning("eval data: skipped records %s", dict(iterator.skipped))
    return [pipeline.global_batch(b, mesh) for b in host]


def make_eval_step(config: ml_collections.ConfigDict, spec):
    """jit(params, frozen, batch, batch_index) -> {t: SUM_KEYS sums} for each eval time."""
    times = tuple(float(t) for t in config.train.eval_timesteps)
    chunk = int(config.train.get("ce_chunk_size", 2048))
    seed = int(config.train.eval_seed)
    num_datasets = int(config.data.get("max_datasets", pack_spec.DEFAULT_MAX_DATASETS))

    def step(params, frozen, batch, batch_index):
        model = spec.model(params, frozen)
        key = jax.random.fold_in(jax.random.key(seed), batch_index)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch.batch_size))
        return {t: losses.fixed_time_sums(model, batch, row_keys, t, chunk, num_datasets)
                for t in times}

    return jax.jit(step)


def evaluate(eval_step, params, frozen, batches, names=()) -> dict[str, float]:
    """Scores over all `batches`: ce, accuracy (weighted next-token), mse_t<t> per time, and
    for each split of `names` (name k: `dataset_id` k) "<name>/ce" and "<name>/mse_t<t>"
    (only where the split has text / flow weight) and "<name>/text_tokens", "/flow_tokens"."""
    totals = None
    for i, batch in enumerate(batches):
        sums = eval_step(params, frozen, batch, jnp.int32(i))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    first = next(iter(totals.values()))
    text = max(float(first["text_weight"]), 1e-6)
    scores = {"ce": float(first["ce_sum"]) / text,
              "accuracy": float(first["correct_sum"]) / text,
              "text_tokens": float(first["text_tokens"]),
              "flow_tokens": float(first["flow_tokens"])}
    for t, sums in totals.items():
        scores[f"mse_t{t:g}"] = float(sums["mse_sum"]) / max(float(sums["flow_weight"]), 1e-6)
    for k, name in enumerate(names):
        per = {key: float(value[k]) for key, value in first["per_dataset"].items()}
        if per["text_weight"] > 0:
            scores[f"{name}/ce"] = per["ce_sum"] / per["text_weight"]
        for t, sums in totals.items():
            flow_weight = float(sums["per_dataset"]["flow_weight"][k])
            if flow_weight > 0:
                scores[f"{name}/mse_t{t:g}"] = float(
                    sums["per_dataset"]["mse_sum"][k]) / flow_weight
        scores[f"{name}/text_tokens"] = per["text_tokens"]
        scores[f"{name}/flow_tokens"] = per["flow_tokens"]
    return scores
