"""The train state and its creation, sharded from the first byte.

  spec = ModelSpec.build(config)                    # abstract model: graph, names, shardings
  tx = optim.make_optimizer(config, spec.abstract_params)
  state, shardings = init_state(config, mesh, spec, tx)   # one jit, out_shardings from rules
  model = spec.model(state.params, state.frozen)    # inside a jitted function

TrainState (a pytree, what a checkpoint holds):
  step        int32 []          optimizer steps taken (skipped non-finite steps included)
  params      dict              the trainable parameters (pure dict of arrays, `nnx` paths)
  frozen      dict              every other weight: frozen parameters and the VAE
  opt_state   optax state       moments of `params` only (float32, or bfloat16 with
                                config.train.optimizer_state_dtype)
  ema         dict | None       EMA of `params` (None when config.train.ema_decay == 0); in
                                pinned host memory with config.train.ema_memory="host"
  rng         uint32 [2]        the run's base key (raw key data); step keys fold in the step
  nonfinite   int32 [2]         non-finite steps skipped in total, and in a row now

The model is built inside `jax.jit` with `out_shardings` derived from the parameters' logical
axis names (`sharding.LOGICAL_RULES`), so every device creates only its own shards and no host
ever holds the full model or its EMA copy. Optimizer moments are sharded like their parameters
(`optax.tree_map_params`); counters and keys are replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import Mesh, PartitionSpec

from unijax import config as config_lib
from unijax.models import unified
from unijax.training import optim, sharding


@struct.dataclass
class TrainState:
    """See the module docstring."""

    step: jax.Array
    params: dict
    frozen: dict
    opt_state: Any
    ema: dict | None
    rng: jax.Array
    nonfinite: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is static about the model: its graph, parameter names and logical specs."""

    graphdef: Any
    abstract_params: dict  # trainable parameters as ShapeDtypeStructs
    abstract_frozen: dict
    param_specs: dict  # logical PartitionSpecs, same structure
    frozen_specs: dict
    names: tuple[str, ...]  # every nnx.Param's "/"-joined path (trainable or not)

    @classmethod
    def build(cls, config: ml_collections.ConfigDict) -> ModelSpec:
        """From abstract shapes only (nothing is allocated).

        Raises:
          config.ConfigError: when `config.train.{trainable,freeze,lr_multipliers}` hold a
            pattern that matches no parameter, or nothing would train.
        """
        abstract = nnx.eval_shape(lambda: unified.UnifiedModel(config, rngs=nnx.Rngs(0)))
        graphdef, params, frozen = nnx.split(abstract, optim.trainable_filter(config), ...)
        all_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
        names = tuple(optim.path_name(p) for p, _ in
                      jax.tree_util.tree_flatten_with_path(all_params)[0])
        problems = optim.pattern_problems(config, list(names))
        if not jax.tree.leaves(nnx.to_pure_dict(params)):
            problems.append("config.train: no parameter is left to train (check trainable, "
                            "freeze and config.model.llm.freeze_und_expert)")
        if problems:
            raise config_lib.ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
        pure = nnx.to_pure_dict
        specs = lambda s: _specs(pure(nnx.get_partition_spec(s)), pure(s))
        return cls(graphdef=graphdef, abstract_params=nnx.to_pure_dict(params),
                   abstract_frozen=nnx.to_pure_dict(frozen), param_specs=specs(params),
                   frozen_specs=specs(frozen), names=names)

    def model(self, params: dict, frozen: dict) -> unified.UnifiedModel:
        """The UnifiedModel holding these weights (cheap: call it inside the jitted step)."""
        return nnx.merge(self.graphdef, params, frozen)

    def trainable_names(self) -> list[str]:
        return [optim.path_name(p) for p, _ in
                jax.tree_util.tree_flatten_with_path(self.abstract_params)[0]]


def _specs(specs: dict, shapes: dict) -> dict:
    """Logical specs with a PartitionSpec at every array leaf (None where nothing was named)."""
    return jax.tree.map(lambda s, _: s if isinstance(s, PartitionSpec) else None, specs,
                        shapes, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))


def state_shardings(mesh: Mesh, spec: ModelSpec, tx: optax.GradientTransformation,
                    abstract_state: TrainState, ema_memory: str = "device") -> TrainState:
    """The NamedSharding of every leaf of the train state on `mesh`; the EMA's in pinned host
    memory when `ema_memory` is "host" (config.train.ema_memory)."""
    if ema_memory not in config_lib.EMA_MEMORIES:
        raise config_lib.ConfigError(f"config.train.ema_memory must be one of "
                                     f"{config_lib.EMA_MEMORIES}, got {ema_memory!r}")
    params = sharding.tree_shardings(mesh, spec.param_specs, spec.abstract_params)
    frozen = sharding.tree_shardings(mesh, spec.frozen_specs, spec.abstract_frozen)
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                                transform_non_params=lambda _: rep,
                                is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    ema = None
    if abstract_state.ema is not None:
        ema = params if ema_memory == "device" else jax.tree.map(
            lambda s: s.with_memory_kind(optim.HOST_MEMORY_KIND), params)
    return TrainState(step=rep, params=params, frozen=frozen, opt_state=opt, ema=ema,
                      rng=rep, nonfinite=rep)


def init_state(config: ml_collections.ConfigDict, mesh: Mesh, spec: ModelSpec,
               tx: optax.GradientTransformation) -> tuple[TrainState, TrainState]:
    """A fresh train state created under `jax.jit` with sharded outputs.

    Returns (state, shardings): both TrainState pytrees, the second of NamedShardings.
    """
    use_ema = float(config.train.ema_decay) > 0
    seed = int(config.seed)

    def init():
        key = jax.random.key(seed)
        model = unified.UnifiedModel(config, rngs=nnx.Rngs(jax.random.fold_in(key, 0)))
        _, params, frozen = nnx.split(model, optim.trainable_filter(config), ...)
        params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
            opt_state=tx.init(params), ema=jax.tree.map(jnp.copy, params) if use_ema else None,
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            nonfinite=jnp.zeros((2,), jnp.int32))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        abstract = jax.eval_shape(init)
        shardings = state_shardings(mesh, spec, tx, abstract, _ema_memory(config))
        state = jax.jit(init, out_shardings=shardings,
                        compiler_options=_init_compiler_options(mesh))()
    return state, shardings


def _init_compiler_options(mesh: Mesh) -> dict | None:
    """The init program runs once. On the CPU, LLVM's optimisation of its many RNG kernels is
    two thirds of its compile time (10 s -> 3 s for the test model) and buys nothing, so it is
    skipped there; the drawn values can then differ from an optimised build in the last bit of
    the normal transform, the same on every host of a run (all compile it the same way)."""
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_backend_optimization_level": 0}
    return None


def abstract_state(config: ml_collections.ConfigDict, mesh: Mesh, spec: ModelSpec,
                   tx: optax.GradientTransformation) -> tuple[TrainState, TrainState]:
    """The train state as ShapeDtypeStructs carrying their target shardings on `mesh` (what a
    checkpoint is restored into), and the shardings."""
    use_ema = float(config.train.ema_decay) > 0
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=spec.abstract_params,
        frozen=spec.abstract_frozen, opt_state=jax.eval_shape(tx.init, spec.abstract_params),
        ema=spec.abstract_params if use_ema else None,
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
        nonfinite=jax.ShapeDtypeStruct((2,), jnp.int32))
    shardings = state_shardings(mesh, spec, tx, shapes, _ema_memory(config))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    return target, shardings


def _ema_memory(config: ml_collections.ConfigDict) -> str:
    return config.train.get("ema_memory", "device")


def ema_weights(state: TrainState, shardings: TrainState) -> dict | None:
    """The EMA as device arrays for evaluation and sampling (a copy on the parameters'
    shardings when it lives in host memory), or None without an EMA."""
    if state.ema is None:
        return None
    if jax.tree.leaves(shardings.ema)[0].memory_kind == optim.HOST_MEMORY_KIND:
        return jax.device_put(state.ema, shardings.params)
    return state.ema
