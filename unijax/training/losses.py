"""The unified model's training loss: next-token cross-entropy on text + rectified flow on
latent tokens, each normalised over the whole global batch.

    loss = ce_weight  * sum_und  w_text * CE(token)              / W_text
         + z_weight   * sum_und  w_text * logsumexp(logits)^2    / W_text
         + mse_weight * sum_gen  w_flow * mean_F (v_pred - v)^2  / W_flow

`w_text` / `w_flow` are the PackedBatch `text_weight` / `flow_weight` of each token and
`W_text` / `W_flow` their sums over the *global* batch (every row of every micro-batch on every
host), computed once per step before any micro-batch runs. So:
  * with unit weights the CE is the mean over every target token of the step and the flow term
    the mean over every noisy latent token of its per-feature MSE: BAGEL's normalisation
    (`train/pretrain_unified_navit.py`, "ce.sum() / total_ce_tokens");
  * with the data pipeline's CE reweighting (w = 1 / sqrt(len) per text) the CE is the weighted
    mean, as BAGEL's `--ce_loss_reweighting`;
  * a step made of k micro-batches adds k partial sums over the same denominators and equals
    the step on the full batch, whatever rows each micro-batch holds.
The z-loss (PaLM) keeps the softmax normaliser near 1; off (0.0) by default, as in BAGEL.

Per dataset (the batch's `dataset_id`, one bucket per index below the static bound
`config.data.max_datasets`, so the shapes never depend on the mixture) the same sums are split
into `sums["per_dataset"]`: [K] CE and MSE sums, text / flow weights and token counts. Bucket
k's CE is its CE sum over its text weight; the buckets' sums add up to the totals.

The CE never holds [B, L_und, V] logits at once: the und slice is cut into chunks of
`ce_chunk_size` tokens, each chunk's logits are formed, reduced to sums and dropped, and
rematerialised in the backward pass (`jax.checkpoint`). At BAGEL-7B's vocabulary (152,064) a
20k-token row would otherwise need 12 GB of float32 logits. The LM head runs only where a CE
target is: each row's target positions are first moved to its front (a stable sort, so the
sums are unchanged), and a chunk in which no row has a target is skipped (`lax.cond`), so the
head costs ceil(max targets per row / chunk) chunks instead of every und token (ViT tokens,
image markers and padding have no target).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from unijax.batch import PackedBatch
from unijax.data.pack_spec import DEFAULT_MAX_DATASETS
from unijax.training import flow

# Sums a loss evaluation returns, added over micro-batches and eval batches before dividing.
SUM_KEYS = ("ce_sum", "z_sum", "correct_sum", "mse_sum", "text_weight", "flow_weight",
            "text_tokens", "flow_tokens")
# The [K] per-dataset sums under `sums["per_dataset"]`.
DATASET_SUM_KEYS = ("ce_sum", "mse_sum", "text_weight", "flow_weight", "text_tokens",
                    "flow_tokens", "tokens")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss weights and settings of `config.train`."""

    ce_weight: float = 1.0
    mse_weight: float = 1.0
    z_loss_weight: float = 0.0
    timestep_shift: float = 1.0
    ce_chunk_size: int = 2048
    max_datasets: int = DEFAULT_MAX_DATASETS

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LossConfig:
        train = config.train
        return cls(ce_weight=float(train.ce_weight), mse_weight=float(train.mse_weight),
                   z_loss_weight=float(train.get("z_loss_weight", 0.0)),
                   timestep_shift=float(train.timestep_shift),
                   ce_chunk_size=int(train.get("ce_chunk_size", 2048)),
                   max_datasets=int(config.data.get("max_datasets", DEFAULT_MAX_DATASETS)))


def per_dataset(values: jax.Array, dataset: jax.Array, num_datasets: int) -> jax.Array:
    """Sums of `values` [B, S] over the tokens of each dataset index: [K] float32.

    A one-hot reduction (fused, never materialised) rather than a scatter, so it partitions
    like any sum over the sharded batch axis; an index outside [0, K) (padding: -1) counts in
    no bucket.
    """
    onehot = dataset[..., None] == jnp.arange(num_datasets, dtype=dataset.dtype)
    picked = jnp.where(onehot, values.astype(jnp.float32)[..., None], 0.0)
    return jnp.sum(picked, axis=tuple(range(values.ndim)))


def cross_entropy_sums(hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                       logits_fn: Callable[[jax.Array], jax.Array], chunk_size: int,
                       dataset: jax.Array | None = None,
                       num_datasets: int = 0) -> dict[str, jax.Array]:
    """Weighted next-token CE over the und slice, one chunk of tokens at a time.

    Args:
      hidden: [B, S, D] decoder output of the und slice.
      targets: [B, S] int target ids; weights: [B, S] float (0: no loss).
      logits_fn: hidden [B, c, D] -> logits [B, c, V] (the LM head).
      chunk_size: tokens per chunk; S is padded up to a multiple (padding has weight 0).
      dataset: [B, S] int dataset index of each token, with `num_datasets` buckets (optional).

    Returns:
      {"ce_sum": sum w * (logsumexp - logit[target]), "z_sum": sum w * logsumexp^2,
       "correct_sum": sum w * [argmax == target]}, float32 scalars, and with `dataset`
      "ce_sum_per_dataset": [K] the CE sum of each dataset's tokens.
    """
    b, s, _ = hidden.shape
    k = num_datasets if dataset is not None else 0
    if dataset is None:
        dataset = jnp.zeros_like(targets)
    # Targets first in every row (stable: their order is kept), so trailing chunks are empty.
    first = jnp.argsort(weights <= 0, axis=1, stable=True)
    hidden = jnp.take_along_axis(hidden, first[..., None], axis=1)
    targets, weights, dataset = (jnp.take_along_axis(x, first, axis=1)
                                 for x in (targets, weights, dataset))
    chunk = max(1, min(chunk_size, s))
    pad = -s % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
        dataset = jnp.pad(dataset, ((0, 0), (0, pad)), constant_values=-1)
    n = (s + pad) // chunk
    # [B, n*c, ...] -> [n, B, c, ...]: lax.map walks the chunks.
    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_sums(h, t, w, ds):
        logits = logits_fn(h).astype(jnp.float32)  # [B, c, V], freed after the reduction
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        w = w.astype(jnp.float32)
        correct = (jnp.argmax(logits, axis=-1) == t).astype(jnp.float32)
        ce = w * (lse - target_logit)
        return jnp.concatenate([jnp.stack([jnp.sum(ce), jnp.sum(w * lse * lse),
                                           jnp.sum(w * correct)]), per_dataset(ce, ds, k)])

    # The checkpoint wraps the cond as well: jax 0.10 otherwise keeps the branch's residuals
    # (a chunk of logits per chunk) for the backward pass.
    @jax.checkpoint
    def maybe_chunk_sums(xs):
        h, t, w, ds = xs
        return jax.lax.cond(jnp.any(w > 0), chunk_sums,
                            lambda *_: jnp.zeros((3 + k,), jnp.float32), h, t, w, ds)

    sums = jnp.sum(jax.lax.map(maybe_chunk_sums,
                               (split(hidden), split(targets), split(weights), split(dataset))),
                   axis=0)
    out = {"ce_sum": sums[0], "z_sum": sums[1], "correct_sum": sums[2]}
    if k:
        out["ce_sum_per_dataset"] = sums[3:]
    return out


def loss_sums(model, batch: PackedBatch, x0: jax.Array, noise: jax.Array,
              image_times: jax.Array, chunk_size: int,
              num_datasets: int = DEFAULT_MAX_DATASETS) -> dict[str, jax.Array]:
    """One forward of `model` over `batch` with the flow pair of (x0, noise) at `image_times`.

    Args:
      model: a `models.unified.UnifiedModel`.
      batch: the PackedBatch (device arrays).
      x0, noise: [B, T, F] clean latent tokens and standard normal noise on the latent grid.
      image_times: [B, N] time t' of each VAE image (after any shift; 0 = clean).
      chunk_size: CE chunk, in tokens.
      num_datasets: K, the per-dataset buckets (`config.data.max_datasets`).

    Returns:
      The `SUM_KEYS` sums of this batch (float32 scalars; divide by global totals) and
      "per_dataset": the `DATASET_SUM_KEYS` sums of each dataset, [K] each.
    """
    num_und = batch.num_und
    und, gen = slice(0, num_und), slice(num_und, batch.length)
    has_gen = batch.length > num_und
    if has_gen:
        x_t, v = flow.noise_latents(x0, noise, image_times)
        out = model(batch, latent_tokens=x_t, timesteps=image_times, logits=False)
    else:
        out = model(batch, logits=False)
    dataset = batch.dataset_index()
    text_w = batch.text_weight[:, und]
    sums = cross_entropy_sums(out.hidden[:, und], batch.text_targets[:, und], text_w,
                              model.llm.logits, chunk_size, dataset[:, und], num_datasets)
    per = dataset_totals(batch, num_datasets)
    per["ce_sum"] = sums.pop("ce_sum_per_dataset")
    flow_w = batch.flow_weight[:, gen]
    if has_gen:
        target = flow.gather_tokens(v, batch.payload_index[:, gen])
        sums["mse_sum"] = flow.flow_loss_sum(out.velocity, target, flow_w)
        # One bucket's flow weights per vmapped call: the squared errors do not depend on
        # the bucket, so they are computed once.
        buckets = dataset[None, :, gen] == jnp.arange(num_datasets)[:, None, None]
        per["mse_sum"] = jax.vmap(lambda m: flow.flow_loss_sum(
            out.velocity, target, jnp.where(m, flow_w, 0.0)))(buckets)
    else:
        sums["mse_sum"] = jnp.zeros((), jnp.float32)
        per["mse_sum"] = jnp.zeros((num_datasets,), jnp.float32)
    sums.update(batch_totals(batch))
    sums["per_dataset"] = per
    return sums


def dataset_totals(batch: PackedBatch, num_datasets: int) -> dict[str, jax.Array]:
    """Per dataset [K]: its text / flow weights, the tokens carrying them, all its tokens."""
    dataset = batch.dataset_index()
    text_w = batch.text_weight.astype(jnp.float32)
    flow_w = batch.flow_weight.astype(jnp.float32)
    count = lambda x: per_dataset(x, dataset, num_datasets)
    return {"text_weight": count(text_w), "flow_weight": count(flow_w),
            "text_tokens": count(text_w > 0), "flow_tokens": count(flow_w > 0),
            "tokens": count(batch.doc_id > 0)}


def batch_totals(batch: PackedBatch) -> dict[str, jax.Array]:
    """The normalisers: summed text / flow weights and the token counts that carry them."""
    text_w = batch.text_weight.astype(jnp.float32)
    flow_w = batch.flow_weight.astype(jnp.float32)
    return {"text_weight": jnp.sum(text_w), "flow_weight": jnp.sum(flow_w),
            "text_tokens": jnp.sum((text_w > 0).astype(jnp.float32)),
            "flow_tokens": jnp.sum((flow_w > 0).astype(jnp.float32))}


def train_loss(model, batch: PackedBatch, row_keys: jax.Array, totals: dict[str, jax.Array],
               cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective of one (micro-)batch, normalised by the global `totals`.

    Args:
      model: a `UnifiedModel` (the trainable parameters are what is differentiated).
      batch: the (micro-)batch.
      row_keys: [B] one PRNG key per row: VAE posterior sample and flow noise.
      totals: `batch_totals` of the whole global batch of the step.
      cfg: the loss weights.

    Returns:
      (loss, the `SUM_KEYS` sums of this micro-batch, with "per_dataset" as `loss_sums`).
    """
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(row_keys)
    posterior_keys, noise_keys = keys[:, 0], keys[:, 1]
    if batch.length > batch.num_und:
        x0 = model.latent_tokens(batch, posterior_keys)
        noise = flow.row_noise(noise_keys, x0.shape[1:])
    else:
        x0 = noise = None
    image_times = flow.shift_time(batch.vae_timestep.astype(jnp.float32), cfg.timestep_shift)
    sums = loss_sums(model, batch, x0, noise, image_times, cfg.ce_chunk_size, cfg.max_datasets)
    loss = combine(sums, totals, cfg)
    return loss, sums


def combine(sums: dict[str, jax.Array], totals: dict[str, jax.Array],
            cfg: LossConfig) -> jax.Array:
    """The weighted objective of `sums` over the normalisers `totals` (see the module doc)."""
    text = jnp.maximum(totals["text_weight"], 1e-6)
    flow_total = jnp.maximum(totals["flow_weight"], 1e-6)
    return (cfg.ce_weight * sums["ce_sum"] / text
            + cfg.z_loss_weight * sums["z_sum"] / text
            + cfg.mse_weight * sums["mse_sum"] / flow_total)


def fixed_time_sums(model, batch: PackedBatch, row_keys: jax.Array, t: float,
                    chunk_size: int,
                    num_datasets: int = DEFAULT_MAX_DATASETS) -> dict[str, jax.Array]:
    """Held-out sums with every noisy image at flow time `t` (no shift) and noise from
    `row_keys`; clean images stay at t = 0 and latents are the posterior mean. With fixed keys
    the numbers are comparable across steps and runs."""
    if batch.length > batch.num_und:
        x0 = model.latent_tokens(batch, None)
        noise = flow.row_noise(row_keys, x0.shape[1:])
    else:
        x0 = noise = None
    noisy = batch.vae_timestep > 0
    image_times = jnp.where(noisy, jnp.float32(t), jnp.float32(0.0))
    return loss_sums(model, batch, x0, noise, image_times, chunk_size, num_datasets)
