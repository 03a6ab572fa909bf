"""The unijax trainer, top to bottom: mesh, data, state, the update, checkpoints, evals, report.

  report = train(config, workdir)      # what `python -m unijax.main` runs

1. The embedded worlds are written once when the config's datasets name "{worlds}".
2. Mesh ("data", "fsdp", "tensor") from `config.mesh`; logical axis rules from `sharding.py`.
3. Data: this host's Grain iterator (`data.pipeline`), per-host rows assembled into global
   arrays (`pipeline.global_batch`); held-out batches read once (`evaluate.py`).
4. State: restored from the newest checkpoint in the workdir (any mesh), or created under
   `jax.jit` with sharded outputs (`state.py`) and given the weights `config.init` names
   (released parts or another run's checkpoint, `init.py`).
5. The update (`make_train_step`): per-row keys, the loss over 1..k micro-batches against the
   step's global normalisers (`losses.py`), AdamW (`optim.py`), EMA, and a guard that leaves
   the state unchanged when the loss or the gradients are not finite. One `jax.jit` with
   explicit in/out shardings and the state donated.
6. Loop: log every `log_every` steps (console bar, metrics.jsonl, TensorBoard: the step's
   losses, per dataset `train/<name>/ce` etc., the slices' fill `data/fill_*`), evaluate every
   `eval_every`, save every `checkpoint.every_steps` (async), and on SIGTERM save and stop.
7. Report: held-out CE and flow MSE of the untrained model and of the final one (and its EMA),
   steps, wall time, tokens/s, and with `config.judges.enabled` the judges' per-category
   scores of what the untrained and the final model (its EMA) draw and answer, next to the
   prompt-ignoring baseline (`judges.py`); on the console and in WORKDIR/report.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from unijax import batch as batch_lib
from unijax.batch import PackedBatch
from unijax.data import pack_spec, pipeline
from unijax.data.worlds import shards as worlds
from unijax.models import flops as flops_lib
from unijax.training import checkpoint as checkpoint_lib
from unijax.training import evaluate, losses, metrics, optim, sharding
from unijax.training import init as init_lib
from unijax.training import judges as judges_lib
from unijax.training import state as state_lib


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


def make_train_step(config: ml_collections.ConfigDict, spec: state_lib.ModelSpec,
                    tx: optax.GradientTransformation, shardings: state_lib.TrainState, mesh):
    """jit(state, batch) -> (state, metrics): one optimizer step over a global PackedBatch.

    The metrics are scalars, plus "per_dataset" ([K] per `config.data.max_datasets` bucket:
    ce, mse, their text / flow weights and token counts) and "fill" (`batch.slice_fill`).
    """
    loss_cfg = losses.LossConfig.from_config(config)
    latent_grid = pack_spec.PackSpec.from_config(config).latent_grid
    accum = int(config.train.get("grad_accum", 1))
    decay = float(config.train.ema_decay)
    schedule = optim.learning_rate_schedule(config)

    def loss_fn(params, frozen, batch, row_keys, totals):
        model = spec.model(params, frozen)
        return losses.train_loss(model, batch, row_keys, totals, loss_cfg)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_batches(tree):
        # Micro-batch j holds rows j, j + k, j + 2k, ...: every device keeps its own rows.
        return jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
            tree)

    def update(state: state_lib.TrainState, batch: PackedBatch):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(
            step_key, jnp.arange(batch.batch_size))
        totals = losses.batch_totals(batch)  # the step's global normalisers
        if accum == 1:
            (loss, sums), grads = grad_fn(state.params, state.frozen, batch, row_keys, totals)
        else:
            def accumulate(carry, micro):
                out = grad_fn(state.params, state.frozen, *micro, totals)
                return jax.tree.map(jnp.add, carry, out), None

            zero = jax.eval_shape(grad_fn, state.params, state.frozen,
                                  *jax.tree.map(lambda x: x[0], micro_batches((batch, row_keys))),
                                  totals)
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            ((loss, sums), grads), _ = jax.lax.scan(accumulate, zero,
                                                    micro_batches((batch, row_keys)))
        grad_norm = optim.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = None if state.ema is None else optim.ema_update(state.ema, params, decay, finite)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = 1 - finite.astype(jnp.int32)
        nonfinite = jnp.stack([state.nonfinite[0] + skipped,
                               jnp.where(finite, 0, state.nonfinite[1] + 1)])
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state), ema=ema,
            nonfinite=nonfinite)
        text, flow_total = (jnp.maximum(totals[k], 1e-6) for k in ("text_weight", "flow_weight"))
        step_metrics = {
            "loss": loss, "ce": sums["ce_sum"] / text, "mse": sums["mse_sum"] / flow_total,
            "z_loss": sums["z_sum"] / text, "accuracy": sums["correct_sum"] / text,
            "grad_norm": grad_norm, "param_norm": optim.global_norm(new_state.params),
            "learning_rate": schedule(state.step),
            "tokens": jnp.sum((batch.doc_id > 0).astype(jnp.float32)),
            "text_tokens": totals["text_tokens"], "flow_tokens": totals["flow_tokens"],
            "nonfinite_steps": nonfinite[0].astype(jnp.float32),
            "nonfinite_in_a_row": nonfinite[1].astype(jnp.float32),
            "per_dataset": _per_dataset_metrics(sums["per_dataset"]),
            "fill": batch_lib.slice_fill(batch, latent_grid)}
        return new_state, step_metrics

    return jax.jit(update, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def _per_dataset_metrics(per: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Each bucket's CE over its text weight and MSE over its flow weight, with the weights
    (the logger averages over steps by them) and the token counts, [K] each."""
    ratio = lambda key, weight: per[key] / jnp.maximum(per[weight], 1e-6)
    return {"ce": ratio("ce_sum", "text_weight"), "mse": ratio("mse_sum", "flow_weight"),
            **{k: per[k] for k in ("text_weight", "flow_weight", "text_tokens", "flow_tokens",
                                   "tokens")}}


def prepare_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The config with "{worlds}" resolved, writing the worlds first when they are absent
    (process 0 writes; the others wait for it)."""
    if not worlds.uses_worlds(config):
        return config
    directory = config.data.worlds.get("dir") or os.path.join(workdir, "worlds")
    if jax.process_index() == 0:
        manifest, wrote = worlds.ensure_worlds(directory,
                                               worlds.WorldSettings.from_config(config.data.worlds))
        if wrote:
            logging.info("wrote the embedded worlds to %s in %.1f s", directory,
                         manifest["seconds"])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("unijax: worlds written")
    return worlds.resolve_world_paths(config, directory)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming from its newest checkpoint); returns the report.

    Raises:
      TrainingError: when `config.train.max_nonfinite_steps` steps in a row were not finite.
    """
    started = time.time()
    # Model and optimizer, from abstract shapes (this also checks the parameter patterns).
    spec = state_lib.ModelSpec.build(config)
    config = prepare_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    tx = optim.make_optimizer(config, spec.abstract_params)
    _write_overview(workdir, spec)

    # Data: this host's training stream and the held-out batches.
    data_iter = pipeline.make_iterator(config)
    eval_batches = evaluate.load_eval_batches(config, mesh)

    # State: the newest checkpoint of the workdir, restored onto this mesh, or a fresh one.
    # A LoRA run saves only what trains: its frozen base is config.init.checkpoint's.
    adapters_only = bool(config.model.llm.get("lora_rank", 0))
    ckpt = checkpoint_lib.Checkpointer(
        config.checkpoint.get("dir") or os.path.join(workdir, "checkpoints"),
        every_steps=int(config.checkpoint.every_steps),
        max_to_keep=int(config.checkpoint.max_to_keep),
        async_save=bool(config.checkpoint.get("async_save", True)),
        save_frozen=not adapters_only)
    target, shardings = state_lib.abstract_state(config, mesh, spec, tx)
    restored_from = ckpt.latest_step()
    if restored_from is not None:
        state = ckpt.restore(restored_from, target, data_iter)
        if adapters_only:  # the base again, from where the first run read it
            base, _ = state_lib.init_state(config, mesh, spec, tx)
            base, _ = init_lib.initialize(config, base, mesh)
            state = state.replace(frozen=base.frozen)
            del base
        logging.info("restored from step %d (%s)", restored_from, ckpt.directory)
        print(f"restored from step {restored_from}", flush=True)
        if init_lib.has_sources(config):
            logging.info("config.init is ignored: the run resumes from its own checkpoint")
    else:
        state, _ = state_lib.init_state(config, mesh, spec, tx)
        if init_lib.has_sources(config):  # released parts or another run (config.init)
            state, _ = init_lib.initialize(config, state, mesh)
    start = int(jax.device_get(state.step))

    # The update and the evaluation (each compiled on its first call).
    train_step = make_train_step(config, spec, tx, shardings, mesh)
    eval_step = evaluate.make_eval_step(config, spec)
    writer = metrics.MetricWriter(workdir, start)
    in_mesh = lambda: _MeshContext(mesh)
    # Bucket k of the per-dataset metrics is the k-th sorted name (what the packer wrote).
    names, eval_names = pack_spec.dataset_names(config), evaluate.split_names(config)

    def run_eval(step, params, name="eval"):
        if not eval_batches:
            return None
        with in_mesh():
            scores = evaluate.evaluate(eval_step, params, state.frozen, eval_batches,
                                       eval_names)
        writer.write(step, {f"{name}/{k}": v for k, v in scores.items()})
        logging.info("%s at step %d: %s", name, step, scores)
        return scores

    initial = _initial_scores(workdir, start, lambda: run_eval(0, state.params))
    judges = judges_lib.Judges(config, spec, mesh, writer)
    initial_judged = _initial_scores(
        workdir, start, lambda: judges.score(0, state.params, state.frozen),
        "judges_step0.json") if judges.enabled else None

    # The loop: log, evaluate, checkpoint; stop on SIGTERM.
    train_cfg = config.train
    steps, log_every = int(train_cfg.steps), max(1, int(train_cfg.log_every))
    eval_every = int(train_cfg.get("eval_every", 0))
    max_nonfinite = int(train_cfg.get("max_nonfinite_steps", 0))
    bar, timer = metrics.Progress(steps, start), metrics.StepTimer()
    model_flops, peak = _flop_counter(config), flops_lib.peak_flops(jax.devices()[0])
    pending, pending_flops, preempted, saved, logged = [], [], False, restored_from, start
    with checkpoint_lib.PreemptionGuard() as guard, in_mesh():
        for step in range(start, steps):
            host_batch = next(data_iter)
            batch = pipeline.global_batch(host_batch, mesh)
            state, step_metrics = train_step(state, batch)
            done = step + 1
            if step == start:  # the first step compiles: the rates count the others
                jax.block_until_ready(step_metrics)
                timer.start()
            else:
                pending.append(step_metrics)
                # Counted on the host while the device runs the step (dispatch is async).
                pending_flops.append(model_flops(host_batch))
            if done % log_every == 0 or done == steps:
                rows = jax.device_get(pending)
                timer.add(len(rows), sum(float(r["tokens"]) for r in rows), sum(pending_flops))
                rows = rows or [jax.device_get(step_metrics)]
                _log(writer, done, rows, data_iter, timer, names, peak)
                bar.update(done - logged, loss=float(rows[-1]["loss"]))
                pending, pending_flops, logged = [], [], done
                if max_nonfinite and rows[-1]["nonfinite_in_a_row"] >= max_nonfinite:
                    bar.close()
                    ckpt.close()
                    writer.close()
                    raise TrainingError(
                        f"{int(rows[-1]['nonfinite_in_a_row'])} steps in a row had a non-finite "
                        f"loss or gradient (config.train.max_nonfinite_steps={max_nonfinite}); "
                        f"stopped at step {done}, the state is that of the last finite step")
            if eval_every and done % eval_every == 0 and done != steps:
                run_eval(done, state.params)
                if judges.enabled:
                    judges.samples(done, state_lib.ema_weights(state, shardings) or
                                   state.params, state.frozen)
            if ckpt.save(done, state, data_iter, config):
                saved = done
            if guard.reached():
                preempted = True
                break
        bar.close()
        last_step = int(jax.device_get(state.step))
        if saved != last_step:
            ckpt.save(last_step, state, data_iter, config, force=True)
        ckpt.wait()
    if preempted:
        print(f"preempted: saved step {last_step} in {ckpt.directory}; run again to resume",
              flush=True)
        ckpt.close()
        writer.close()
        return {"status": "preempted", "step": last_step}

    # The report: held-out scores before and after, of the parameters and of their EMA.
    final = run_eval(last_step, state.params)
    ema = state_lib.ema_weights(state, shardings)  # on the device even when kept on the host
    final_ema = run_eval(last_step, ema, "eval_ema") if ema is not None else None
    judged = None
    if judges.enabled:
        judges.samples(last_step, ema or state.params, state.frozen)
        judged = {"weights": "ema" if ema is not None else "params",
                  "initial": initial_judged, "chance": judges.chance(),
                  "final": judges.score(last_step, ema or state.params, state.frozen)}
    ckpt.close()
    writer.close()
    report = {"status": "done", "steps": last_step, "restored_from": restored_from,
              "wall_time_s": time.time() - started, "train_time_s": timer.seconds,
              **timer.rates(), "initial": initial, "final": final, "final_ema": final_ema,
              "judges": judged, "nonfinite_steps": int(jax.device_get(state.nonfinite[0])),
              "skipped_records": dict(data_iter.skipped)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(metrics.format_report(report), flush=True)
    return report


class _MeshContext:
    """`jax.set_mesh(mesh)` + the logical axis rules, as one context manager."""

    def __init__(self, mesh):
        self._contexts = [jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES)]

    def __enter__(self):
        for context in self._contexts:
            context.__enter__()
        return self

    def __exit__(self, *exc):
        for context in reversed(self._contexts):
            context.__exit__(*exc)


def _write_overview(workdir: str, spec: state_lib.ModelSpec) -> None:
    """clu's table of the trainable parameters, to the log and WORKDIR/parameters.txt."""
    overview = metrics.parameter_overview(spec.abstract_params)
    logging.info("trainable parameters:\n%s", overview)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "parameters.txt"), "w") as f:
            f.write(overview + "\n")


def _initial_scores(workdir: str, start: int, evaluate_now,
                    name: str = "eval_step0.json") -> dict | None:
    """The untrained model's scores: measured at step 0 and kept in WORKDIR/<name>, so a
    resumed run still reports them."""
    path = os.path.join(workdir, name)
    if start == 0:
        scores = evaluate_now()
        if jax.process_index() == 0 and scores is not None:
            with open(path, "w") as f:
                json.dump(scores, f)
        return scores
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _flop_counter(config: ml_collections.ConfigDict):
    """host batch -> model FLOPs (`flops_lib.step_flops`) of the step's global batch: this
    host's rows times the number of hosts (every host packs rows of the same mixture)."""
    trainable = optim.is_trainable_fn(config)
    return lambda host_batch: jax.process_count() * flops_lib.step_flops(
        config, host_batch, trainable=trainable)["model"]


def _log(writer, step, rows, data_iter, timer, names=(), peak=None) -> None:
    """Writes the mean of each step metric since the last log, per dataset (`names`: the
    sorted dataset names) its losses and token counts, the mean slice fill, the data counters
    and rates: per device, tokens/s, model TFLOP/s and with a known `peak` (FLOP/s per
    device) the MFU."""
    scalars = {f"train/{k}": float(np.mean([r[k] for r in rows])) for k in rows[-1]
               if k not in ("per_dataset", "fill")}
    per_dataset = metrics.dataset_scalars(names, [r["per_dataset"] for r in rows])
    scalars.update({f"train/{k}": v for k, v in per_dataset.items()})
    for k in rows[-1]["fill"]:
        scalars[f"data/{k}"] = float(np.mean([r["fill"][k] for r in rows]))
    for k in ("nonfinite_steps", "nonfinite_in_a_row", "learning_rate"):
        scalars[f"train/{k}"] = float(rows[-1][k])
    scalars["train/step_time_s"] = 1.0 / max(timer.rates()["steps_per_s"], 1e-9)
    scalars["train/tokens_per_s"] = timer.rates()["tokens_per_s"]
    for k, v in timer.per_device(jax.device_count(), peak).items():
        scalars[f"train/{k}"] = v
    for reason, count in data_iter.skipped.items():
        scalars[f"data/skipped_{reason}"] = count
    writer.write(step, scalars)
