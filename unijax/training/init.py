"""Where a fresh run's weights come from: released parts (BAGEL's recipe) or another unijax run.

  state, _ = state_lib.init_state(config, mesh, spec, tx)   # random init, sharded
  state, sources = initialize(config, state, mesh)           # the weights config.init names
  sources  # {"llm/layers/und": "HF qwen2 /ckpt/Qwen2.5-7B", "connector": "fresh", ...}

`config.init` (configs/base.py), applied in this order (a later source replaces what an
earlier one set):
  checkpoint  a unijax workdir or checkpoint directory: the `checkpoint_weights` ("ema":
              BAGEL's finetune_from_ema, "params": resume_model_only) and the frozen weights of
              its checkpoint at `checkpoint_step` (-1: the newest), read by `inference.load`
              onto this mesh (any mesh saved it);
  llm         a HF Qwen2 / Qwen2.5 (or Qwen3) directory: the und expert (and the gen expert as
              a copy of it with `config.model.llm.init_gen_from_und`), embedding, LM head;
  vit         a HF SigLIP directory (SiglipVisionModel or SiglipModel weights);
  vae         FLUX's `ae.safetensors` (original names) or a diffusers AutoencoderKL directory.
The rules for the released parts (vocabulary rows, QK-norm, the gen expert) are in
`convert/released.py`. Every parameter no source names keeps its fresh init (e.g. the
connectors); each group's sources are logged. A source is checked whole before anything is
read, and one `InitError` lists every missing or mis-shaped tensor. The optimizer state stays
fresh and the step 0; the EMA restarts from the new weights. `state` is consumed: each array a
source replaces is deleted as soon as its replacement is placed, so the model is never held
twice.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging
from flax import nnx

from unijax.convert import released
from unijax.convert.released import InitError
from unijax.models import unified
from unijax.training import optim, sharding
from unijax.training import state as state_lib

__all__ = ["InitError", "has_sources", "initialize"]

SOURCES = ("checkpoint", "llm", "vit", "vae")
FRESH = "fresh"


def has_sources(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.init` names any source."""
    init = config.get("init")
    return init is not None and any(init.get(name, "") for name in SOURCES)


def initialize(config: ml_collections.ConfigDict, state: state_lib.TrainState,
               mesh) -> tuple[state_lib.TrainState, dict[str, str]]:
    """`state` (fresh) with the weights `config.init` names; see the module docstring.

    Args:
      config: the run's config.
      state: a fresh TrainState (`state_lib.init_state`); its arrays that are replaced are
        deleted.
      mesh: the state's mesh (a checkpoint is read directly onto it).

    Returns:
      (state, sources): sources maps each parameter group ("llm/layers/und", "vit", ...) to
      what initialised it ("fresh" for the random init; " + " between several).

    Raises:
      InitError: listing every missing or mis-shaped tensor and every disagreeing field of a
        source, before anything is read.
    """
    weights = _Weights(state)
    if has_sources(config):
        init = config.init
        if init.get("checkpoint"):
            _from_checkpoint(config, weights, mesh)
        for name, load in (("llm", released.load_llm), ("vit", released.load_vit),
                           ("vae", released.load_vae)):
            if init.get(name):
                load(config, str(init[name]), weights)
    sources = weights.groups()
    for group, source in sources.items():
        logging.info("init: %s <- %s", group, source)
    return weights.state(), sources


class _Weights:
    """The state's weights by "/"-joined name (params and frozen alike) while sources replace
    them; the EMA of a replaced parameter restarts from its new value."""

    def __init__(self, state: state_lib.TrainState):
        self._state = state
        self.trees = {}
        for tree in ("params", "frozen", "ema"):
            value = getattr(state, tree)
            self.trees[tree] = {} if value is None else _flat(value)
        self.tree_of = {n: t for t in ("params", "frozen") for n in self.trees[t]}
        self.source = dict.fromkeys(self.tree_of, FRESH)

    def __contains__(self, name: str) -> bool:
        return name in self.tree_of

    def names(self, prefix: str) -> list[str]:
        return [n for n in self.tree_of if n.startswith(prefix)]

    def get(self, name: str) -> jax.Array:
        return self.trees[self.tree_of[name]][name]

    def set(self, name: str, value: jax.Array, source: str) -> None:
        tree = self.trees[self.tree_of[name]]
        old, tree[name] = tree[name], value
        ema = self.trees["ema"]
        if name in ema and self.tree_of[name] == "params":
            # Its own buffer: the train step donates the state, params and EMA alike.
            old_ema, ema[name] = ema[name], jax.device_put(value, ema[name].sharding,
                                                           may_alias=False)
            _delete(old_ema)
        _delete(old)
        self.source[name] = source

    def groups(self) -> dict[str, str]:
        out: dict[str, list[str]] = {}
        for name, source in self.source.items():
            sources = out.setdefault(_group(name), [])
            if source not in sources:
                sources.append(source)
        return {group: " + ".join(sources) for group, sources in out.items()}

    def state(self) -> state_lib.TrainState:
        rebuilt = {}
        for tree in ("params", "frozen", "ema"):
            value = getattr(self._state, tree)
            if value is not None:
                leaves, treedef = jax.tree_util.tree_flatten_with_path(value)
                names = [optim.path_name(p) for p, _ in leaves]
                value = treedef.unflatten([self.trees[tree][n] for n in names])
            rebuilt[tree] = value
        return self._state.replace(**rebuilt)


def _flat(tree) -> dict:
    return {optim.path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _delete(array) -> None:
    if isinstance(array, jax.Array) and not array.is_deleted():
        array.delete()


def _group(name: str) -> str:
    """The parameter group a name is logged under: "llm/layers/und", "llm/embed_tokens", "vit"."""
    parts = name.split("/")
    if parts[0] != "llm":
        return parts[0]
    return "/".join(parts[:3] if parts[1] in ("layers", "final_norm") else parts[:2])


# --- a unijax checkpoint ----------------------------------------------------------------------


def _from_checkpoint(config, weights: _Weights, mesh) -> None:
    from unijax.inference import load as load_lib  # reads checkpoints the way sampling does

    init = config.init
    path, step = str(init.checkpoint), int(init.get("checkpoint_step", -1))
    # Shapes from the saved config first, so a checkpoint of another model fails unread.
    saved_config, step = load_lib.load_config(path, None if step < 0 else step)
    shapes = _flat(nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: unified.UnifiedModel(saved_config, rngs=nnx.Rngs(0))))))
    where = f"config.init.checkpoint={path!r} (step {step})"
    released.raise_problems(where, [
        f"{name}: checkpoint shape {tuple(shape.shape)}, the model needs "
        f"{tuple(weights.get(name).shape)}" for name, shape in shapes.items()
        if name in weights and tuple(shape.shape) != tuple(weights.get(name).shape)])
    model, _, info = load_lib.load_model(
        path, step=step, weights=str(init.get("checkpoint_weights", "ema")), mesh=mesh,
        rules=sharding.LOGICAL_RULES)
    saved = _flat(nnx.to_pure_dict(nnx.state(model)))
    del model
    ignored = sorted(set(saved) - set(weights.tree_of))
    if ignored:
        logging.warning("init: %s holds weights this model lacks, ignored: %s", where,
                        ignored[:20])
    source = f"{info['weights']} of {info['checkpoint']}"
    for name in [n for n in saved if n in weights]:
        ref, value = weights.get(name), saved.pop(name)
        if value.dtype != ref.dtype:
            value = value.astype(ref.dtype)
        weights.set(name, jax.device_put(value, ref.sharding), source)
