"""Checkpoints: Orbax saves of the train state, the data iterator and the config; preemption.

  ckpt = Checkpointer(directory, every_steps=1000, max_to_keep=3)
  step = ckpt.latest_step()                            # None: nothing saved yet
  state = ckpt.restore(step, target, data_iter)        # target: abstract_state(...) on any mesh
  ckpt.save(step, state, data_iter, config)            # async; only every `every_steps`
  ckpt.save(step, state, data_iter, config, force=True)  # now (preemption, end of training)

One checkpoint directory per step, `DIR/<step>/` with three items:
  state/      the TrainState, each array shard written by the host that holds it (Orbax +
              TensorStore; no host ever gathers the full state)
  data_iter/  the Grain iterator state of every host (`process_<i>-of-<n>.json`)
  config/     the resolved config as JSON
Orbax writes into a temporary directory and renames it when every host has finished, so a save
interrupted by a crash or a kill is never listed as a checkpoint (`latest_step` skips it; the
leftovers are removed when the next run opens the directory).

Restoring reads into the shardings of the target, so a checkpoint saved on one mesh restores on
another (another device count, other axis sizes).

`save_frozen=False` (LoRA runs) leaves the frozen weights out of every save: the state item
holds the adapters, their optimizer state and EMA, the step and the keys, with `frozen` empty;
`restore` then returns the state with `frozen` empty too, and the caller puts the base back
(the trainer reads it again from `config.init.checkpoint`).

Preemption: `PreemptionGuard` turns SIGTERM into a flag the loop reads at every step boundary;
on several hosts they agree (one all-gather of the flags), so all save the same step.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """An Orbax CheckpointManager for the three items above."""

    def __init__(self, directory: str, *, every_steps: int, max_to_keep: int,
                 async_save: bool = True, save_frozen: bool = True):
        self.save_frozen = bool(save_frozen)
        # Local paths are made absolute (Orbax needs it); gs://... and other URLs stay as given.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=every_steps,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data_iter": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iter, config, *, force: bool = False) -> bool:
        """Saves at `step` when it is a save step (or `force`); returns whether it saved.

        The iterator state is read now; the arrays are copied off the devices before this
        returns and written in the background (`wait` blocks until the write is complete).
        """
        if not force and step % self.every_steps:
            return False
        if not self.save_frozen:
            state = state.replace(frozen={})
        args = {"state": ocp.args.StandardSave(state),
                "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort()))}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, target, data_iter=None):
        """The train state saved at `step`, placed as `target`'s shardings say; `data_iter` is
        set to its saved position in place (`frozen` comes back empty with save_frozen=False)."""
        if not self.save_frozen:
            target = target.replace(frozen={})
        args = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        """The config saved with `step`, as a dict."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))
        return restored["config"]

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionGuard:
    """SIGTERM (a preemption notice) -> `reached()` is True at the next step boundary.

    Use as a context manager; the previous handler comes back on exit. Outside the main thread
    no handler can be installed and `reached()` stays False (logged).
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        else:
            logging.warning("preemption: not in the main thread, SIGTERM is not handled")
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum, frame) -> None:
        del frame
        logging.warning("received signal %d: saving at the next step boundary", signum)
        self._flag.set()

    def reached(self) -> bool:
        """Whether any host was told to stop (all hosts must call this at the same step)."""
        flag = self._flag.is_set()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag
