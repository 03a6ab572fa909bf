"""Small configs, batches and a step runner shared by the training tests."""

from __future__ import annotations

import jax
import numpy as np

from tests.training import small_config as small_config_lib
from unijax.data import pipeline
from unijax.data.worlds import shards
from unijax.training import optim, sharding
from unijax.training import state as state_lib
from unijax.training import train as train_lib


def small_config(worlds_dir: str, **overrides):
    """tests/training/small_config.py reading the worlds in `worlds_dir`; overrides are
    "section.name" -> value."""
    c = small_config_lib.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return shards.resolve_world_paths(c, worlds_dir)


def write_small_worlds(directory: str) -> str:
    """The small config's worlds, written into `directory` (once)."""
    shards.ensure_worlds(directory, shards.WorldSettings.from_config(
        small_config_lib.get_config().data.worlds))
    return directory


def host_batches(config, count: int) -> list:
    """The first `count` host batches of `config`'s training stream (numpy)."""
    iterator = pipeline.make_iterator(config)
    return [next(iterator) for _ in range(count)]


class Trainer:
    """The small model's state and compiled train step on a mesh over `devices`."""

    def __init__(self, config, devices):
        self.config = config
        self.mesh = sharding.make_mesh(config.mesh, devices=devices)
        self.spec = state_lib.ModelSpec.build(config)
        self.tx = optim.make_optimizer(config, self.spec.abstract_params)
        _, self.shardings = state_lib.abstract_state(config, self.mesh, self.spec, self.tx)
        self.step = train_lib.make_train_step(config, self.spec, self.tx, self.shardings,
                                              self.mesh)

    def init(self):
        return state_lib.init_state(self.config, self.mesh, self.spec, self.tx)[0]

    def run(self, state, batches):
        """One step per host batch; returns (losses, state). `state` is donated."""
        losses = []
        with jax.set_mesh(self.mesh):
            for batch in batches:
                state, m = self.step(state, pipeline.global_batch(batch, self.mesh))
                losses.append(float(m["loss"]))
        return np.asarray(losses), state


def run_steps(config, devices, batches):
    """Trains a fresh state one step per batch; returns (losses, final state)."""
    trainer = Trainer(config, devices)
    return trainer.run(trainer.init(), batches)


def to_host(tree):
    """Every array of a pytree as numpy (gathered)."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
