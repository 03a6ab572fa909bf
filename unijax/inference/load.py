"""A trained model from a training workdir, for sampling: the config and the weights it needs.

  config, step = load_config(workdir)                    # the newest complete checkpoint's
  model, config, info = load_model(workdir)              # EMA weights on the default device
  model, config, info = load_model(workdir, step=2000, weights="params", dtype="bfloat16",
                                   mesh=mesh, rules=sharding.LOGICAL_RULES)  # sharded on mesh
  info   # {"step": 2000, "weights": "params", "checkpoint": ".../checkpoints/2000", ...}

`workdir` is a training workdir (its checkpoints are in WORKDIR/checkpoints) or a checkpoint
directory itself (a run that set `config.checkpoint.dir` saved there). The layout is the
trainer's (`unijax.training.checkpoint`): one directory per step with the items `state` (the
TrainState: params, frozen, opt_state, ema, ...), `data_iter` and `config`.

Only what the model needs is read: `ema` (or `params`) and `frozen`, by an Orbax partial restore
(`PyTreeRestore(partial_restore=True)`) into abstract targets; the optimizer moments (twice
the parameters) and the data iterator are never read. Each weight is read directly into its
target sharding and dtype: with a mesh, every device reads only its own shards, so a model
that does not fit one device is placed sharded. The mesh placement follows the parameters'
logical axis names and the `rules` table the model was trained with (the trainer's
`unijax.training.sharding.LOGICAL_RULES`, which this layer may not import: callers pass it).
Run the model under `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)`.

A LoRA run's checkpoints hold only the adapters (`config.model.llm.lora_rank > 0`, no `frozen`
item): the base weights are read from the run's `config.init.checkpoint` (its step and
`checkpoint_weights`), the adapters from the LoRA checkpoint, and `merge_lora=True` folds them
into the kernels (`unijax.models.lora`; the returned config then has `lora_rank = 0`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from unijax.models import lora, unified

WEIGHTS = ("ema", "params")
SAVED = "saved"  # load_model(dtype=SAVED): every weight in its dtype on disk
TRAIN_HINT = "train first: python -m unijax.main --config=configs/tiny.py --workdir=WORKDIR"

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def checkpoint_dir(workdir_or_ckpt_dir: str) -> str:
    """WORKDIR/checkpoints when it exists, else the path itself (a checkpoint directory)."""
    path = str(workdir_or_ckpt_dir)
    path = path if "://" in path else os.path.abspath(path)  # Orbax needs absolute paths
    inner = epath.Path(path) / "checkpoints"
    return str(inner) if inner.is_dir() else path


def load_config(workdir_or_ckpt_dir: str,
                step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
    """The config saved with the newest complete checkpoint (or with `step`), and that step.

    The config is the trainer's resolved config, unlocked; JSON lists are turned back into the
    tuples the config files use.

    Raises:
      FileNotFoundError: when the directory holds no complete checkpoint, or none at `step`
        (the message lists the available steps).
    """
    manager, step = _open(workdir_or_ckpt_dir, step)
    try:
        return _read_config(manager, step), step
    finally:
        manager.close()


def load_model(workdir: str, *, step: int | None = None, weights: str = "ema",
               mesh: Mesh | None = None, rules: Rules | None = None, dtype: Any = None,
               overrides: Mapping[str, Any] | None = None, merge_lora: bool = False,
               ) -> tuple[unified.UnifiedModel, ml_collections.ConfigDict, dict]:
    """The UnifiedModel of a checkpoint, holding its EMA (or trained) and frozen weights.

    Args:
      workdir: a training workdir or a checkpoint directory.
      step: the checkpoint to load (default: the newest complete one).
      weights: "ema" (falls back to "params", with a warning, when the run kept no EMA) or
        "params".
      mesh: place every weight sharded on this mesh as its logical axes and `rules` say (a
        dimension that a mesh axis does not divide is replicated over it); None: whole on
        this process's first device.
      rules: logical axis -> mesh axis (or tuple of axes, or None) pairs; required with `mesh`
        (`unijax.training.sharding.LOGICAL_RULES`).
      dtype: cast the floating weights to this dtype when reading (e.g. "bfloat16"); "saved":
        every weight in its dtype on disk (e.g. a converted BAGEL's fp32 VAE beside its bf16
        LLM); None: the dtypes the config builds the model in.
      overrides: "section.field" -> value applied to the saved config before the model is
        built (e.g. {"attention.impl": "cudnn"} to sample on another platform).

    Returns:
      (model, config, info): info holds `step`, `weights` (the ones used), `checkpoint` (the
      step's directory), `dtype` and `restored` (the state items read).

    Raises:
      FileNotFoundError: no complete checkpoint (or none at `step`).
      ValueError: a bad `weights`/`mesh`/`rules` argument, or a checkpoint whose weights do not
        match the model its config builds (the message names the missing and extra paths).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"load_model: weights must be one of {WEIGHTS}, got {weights!r}")
    if mesh is not None and rules is None:
        raise ValueError("load_model: a mesh needs the logical axis rules the model was trained "
                         "with: pass rules=unijax.training.sharding.LOGICAL_RULES")
    manager, step = _open(workdir, step)
    try:
        config = _read_config(manager, step)
        for key, value in (overrides or {}).items():
            *sections, name = key.split(".")
            _section(config, sections)[name] = value
        saved = manager.item_metadata(step)["state"].tree
        if weights == "ema" and saved.get("ema") is None:
            logging.warning("load_model: the checkpoint at step %d has no EMA "
                            "(config.train.ema_decay=0): using the trained params", step)
            weights = "params"

        abstract = nnx.eval_shape(lambda: unified.UnifiedModel(config, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        shapes = traverse_util.flatten_dict(nnx.to_pure_dict(state))
        logical = traverse_util.flatten_dict(
            nnx.to_pure_dict(nnx.get_partition_spec(state)))
        items = (weights, "frozen")
        base = {}
        if config.model.llm.get("lora_rank", 0) and not saved.get("frozen"):
            base = _lora_base(config, mesh, rules, dtype)  # adapters-only: the base from init
            items = (weights,)
        targets = _match({p: s for p, s in shapes.items() if p not in base},
                         {item: saved.get(item) or {} for item in items},
                         manager.directory / str(step))

        on_disk = {} if dtype != SAVED else {
            _name(p): meta.dtype for item in items
            for p, meta in traverse_util.flatten_dict(dict(saved.get(item) or {})).items()}

        def target(path):
            shape = shapes[path]
            if dtype == SAVED:
                return jax.ShapeDtypeStruct(shape.shape, on_disk[_name(path)],
                                            sharding=where_of(path))
            cast = dtype is not None and jnp.issubdtype(shape.dtype, jnp.floating)
            return jax.ShapeDtypeStruct(shape.shape, jnp.dtype(dtype) if cast else shape.dtype,
                                        sharding=where_of(path))

        def where_of(path):
            if mesh is None:
                return SingleDeviceSharding(jax.local_devices()[0])
            spec = logical.get(path)
            return NamedSharding(mesh, mesh_spec(
                spec if isinstance(spec, PartitionSpec) else (), shapes[path].shape, mesh, rules))

        item_targets = {item: traverse_util.unflatten_dict({p: target(p) for p in paths})
                        for item, paths in targets.items()}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item_targets, restore_args=ocp.checkpoint_utils.construct_restore_args(
                item_targets), partial_restore=True)))["state"]
    finally:
        manager.close()

    pure = dict(base)
    for item in items:
        pure.update(traverse_util.flatten_dict(restored.get(item) or {}))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(pure))
    model = nnx.merge(graphdef, state)
    info = {"step": step, "weights": weights, "checkpoint": str(manager.directory / str(step)),
            "dtype": dtype if dtype in (None, SAVED) else str(jnp.dtype(dtype)),
            "restored": items}
    if base:
        info["base"] = str(config.init.checkpoint)
    if merge_lora and config.model.llm.get("lora_rank", 0):
        model, config = lora.merge_model(model, config)
        info["merged_lora"] = True
    logging.info("load_model: %s weights of step %d from %s", weights, step, info["checkpoint"])
    return model, config, info


def _lora_base(config: ml_collections.ConfigDict, mesh: Mesh | None, rules: Rules | None,
               dtype: Any) -> dict:
    """The base weights of a LoRA run ({path tuple: array}), read from its
    `config.init.checkpoint` as its trainer read them."""
    init = config.init
    if not init.get("checkpoint"):
        raise ValueError("load_model: this LoRA checkpoint holds only adapters and its config "
                         "names no base (config.init.checkpoint is empty)")
    step = int(init.get("checkpoint_step", -1))
    base, _, info = load_model(str(init.checkpoint), step=None if step < 0 else step,
                               weights=str(init.get("checkpoint_weights", "ema")), mesh=mesh,
                               rules=rules, dtype=dtype)
    logging.info("load_model: LoRA base from %s", info["checkpoint"])
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(base)))


def mesh_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
              rules: Rules) -> PartitionSpec:
    """The mesh PartitionSpec of an array with these logical axes (the trainer's placement).

    Each logical name maps through `rules` to mesh axes, never using a mesh axis twice; axes the
    mesh lacks, and axes that do not divide their dimension, are left out (that dimension is
    then replicated over them, e.g. 2 KV heads on a tensor axis of 4).

    Raises:
      KeyError: for a logical name that no rule mentions.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, size in enumerate(shape):
        name = logical[i] if i < len(logical) else None
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table[name]
        axes = [a for a in ((target,) if isinstance(target, str) else tuple(target or ()))
                if a not in used]
        used.update(axes)
        kept, split = [], 1
        for axis in axes:
            if axis in mesh.shape and size % (split * mesh.shape[axis]) == 0:
                kept.append(axis)
                split *= mesh.shape[axis]
        out.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*out)


def _open(workdir_or_ckpt_dir: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
    """A read-only CheckpointManager on the checkpoint directory, and the step to read."""
    directory = checkpoint_dir(workdir_or_ckpt_dir)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}: {TRAIN_HINT}")
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0),
        # Every item the trainer saves has a handler, so Orbax has no unknown item to warn about.
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    steps = sorted(manager.all_steps())
    if not steps:
        manager.close()
        raise FileNotFoundError(
            f"no complete checkpoint in {directory}: {TRAIN_HINT} (a run that set "
            "config.checkpoint.dir saved its checkpoints there: pass that directory)")
    if step is None:
        return manager, steps[-1]
    if int(step) not in steps:
        manager.close()
        raise FileNotFoundError(
            f"no checkpoint at step {step} in {directory}; available steps: {steps}")
    return manager, int(step)


def _read_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(_tuples(saved["config"]))


def _section(config: ml_collections.ConfigDict, keys: list[str]) -> ml_collections.ConfigDict:
    for key in keys:
        config = config[key]
    return config


def _name(path) -> str:
    return "/".join(map(str, path))


def _tuples(tree):
    """JSON's lists back into tuples (every sequence in a config file is a tuple)."""
    if isinstance(tree, Mapping):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def _match(shapes: dict, saved: dict, where) -> dict[str, list[tuple]]:
    """The model's weight paths held by each saved item (e.g. {"ema": [...], "frozen": [...]}).

    Raises:
      ValueError: naming the model's weights no item holds, the saved ones the model lacks,
        and those whose shape differs.
    """
    by_name = {_name(path): path for path in shapes}
    found, extra, wrong = {}, [], []
    for item, tree in saved.items():
        found[item] = []
        for path, meta in traverse_util.flatten_dict(dict(tree)).items():
            name = _name(path)
            if name not in by_name:
                extra.append(f"{item}/{name}")
                continue
            model_path = by_name.pop(name)
            if tuple(meta.shape) != tuple(shapes[model_path].shape):
                wrong.append(f"{name}: saved {tuple(meta.shape)}, model "
                             f"{tuple(shapes[model_path].shape)}")
            found[item].append(model_path)
    missing = sorted(by_name)
    if missing or extra or wrong:
        problems = [f"{label} ({len(names)}): {'; '.join(names[:20])}"
                    + ("; ..." if len(names) > 20 else "")
                    for label, names in (("missing from the checkpoint", missing),
                                         ("not in the model", sorted(extra)),
                                         ("of another shape", wrong)) if names]
        raise ValueError(f"checkpoint {where} does not match the model its config builds "
                         f"({' + '.join(saved)}):\n  - " + "\n  - ".join(problems))
    return found
