"""The optimizer: which parameters train, at which learning rate, with which decay, and EMA.

Parameters are addressed by their path joined with "/", e.g. `llm/layers/gen/q_proj/kernel`,
`connector/fc1/bias`, `vit/...`. From `config.train`:

  trainable       regexes; when non-empty only matching parameters train (BAGEL's stage 1:
                  `("connector/.*", "vae2llm/.*", "llm2vae/.*", "time_embedder/.*")`)
  freeze          regexes of parameters that never train (e.g. `("vit/.*",)`: BAGEL
                  `freeze_vit`); `config.model.llm.freeze_und_expert` adds the und expert,
                  the embedding and the LM head (LlamaFusion / BAGEL `freeze_und`)
  lr_multipliers  (regex, factor) pairs, first match wins; others train at factor 1

LoRA (`config.model.llm.lora_rank > 0`): the adapters (`.../lora/lora_a`, `lora_b`) train and
every base weight is frozen; `trainable` then names what trains beside the adapters (e.g. the
connectors), `freeze` still wins. Adapters get no weight decay (they are not `kernel`s).

Frozen parameters are split off before the optimizer sees the model: they get no gradient, no
Adam moments and no EMA copy. A pattern that matches no parameter is a config error (a typo
would otherwise silently train everything).

The update (optax): clip by global norm (`grad_clip`; 0 = off) -> AdamW (`b1`, `b2`, `eps`,
decoupled `weight_decay` on weight matrices only: no decay on biases, norm scales and
embedding tables) at the scheduled learning rate -> the per-parameter multipliers. Schedule:
linear warmup from 0 over `warmup_steps`, then `schedule` = constant (BAGEL's default) |
cosine | linear down to `min_lr` at `steps`.

Memory levers (`config.train`):
  optimizer_state_dtype  "float32" (default) | "bfloat16": Adam's two moments are stored in
                         bf16 between steps (half their memory) and computed in float32
                         inside the update (`stored_in`). optax's own `mu_dtype` covers only
                         the first moment; bf16 resolution (2^-8) needs 1 - b1 and 1 - b2 of
                         at least 1/128, or the moments stop moving (config.py checks it).
  ema_memory             "device" (default) | "host": the EMA lives in pinned host memory
                         (`state.py` places it); `ema_update` brings it to the device for the
                         update, and the step's output shardings put it back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from unijax import config as config_lib
from unijax.models import lora, mot

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZER_STATE_DTYPES = config_lib.OPTIMIZER_STATE_DTYPES
HOST_MEMORY_KIND = "pinned_host"  # what `ema_memory="host"` places the EMA in


def path_name(path) -> str:
    """A pytree / nnx path as 'a/b/c'."""
    parts = []
    for key in path:
        key = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(key))
    return "/".join(parts)


def _patterns(config: ml_collections.ConfigDict, field: str) -> tuple[str, ...]:
    value = config.train.get(field, ()) or ()
    return (value,) if isinstance(value, str) else tuple(value)


def _multipliers(config: ml_collections.ConfigDict) -> tuple[tuple[str, float], ...]:
    return tuple((str(p), float(m)) for p, m in (config.train.get("lr_multipliers", ()) or ()))


def pattern_problems(config: ml_collections.ConfigDict, names: list[str]) -> list[str]:
    """Errors in `config.train.{trainable,freeze,lr_multipliers}` against the parameter names:
    a regex that does not compile or matches nothing, a non-positive multiplier."""
    problems = []
    entries = [(f, p) for f in ("trainable", "freeze") for p in _patterns(config, f)]
    entries += [("lr_multipliers", p) for p, _ in _multipliers(config)]
    for field, pattern in entries:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            problems.append(f"config.train.{field}: {pattern!r} is not a regex ({e})")
            continue
        if not any(regex.fullmatch(n) for n in names):
            problems.append(f"config.train.{field}: {pattern!r} matches no parameter (names "
                            f"look like {names[0]!r}, {names[len(names) // 2]!r})")
    for pattern, factor in _multipliers(config):
        if not factor > 0:
            problems.append(f"config.train.lr_multipliers: factor {factor} for {pattern!r} must "
                            "be positive (freeze the parameters instead)")
    return problems


def is_trainable_fn(config: ml_collections.ConfigDict) -> Callable[[str], bool]:
    """name -> whether the parameter trains (nnx.Param only; see the module doc)."""
    trainable = [re.compile(p) for p in _patterns(config, "trainable")]
    freeze = [re.compile(p) for p in _patterns(config, "freeze")]
    decoder = mot.DecoderConfig.from_config(config)
    und_frozen = ("llm/embed_tokens/", "llm/layers/und/", "llm/final_norm/und/", "llm/lm_head/")

    def is_trainable(name: str) -> bool:
        if any(r.fullmatch(name) for r in freeze):
            return False
        if decoder.lora_rank:  # adapters, and what `trainable` adds to them
            return lora.is_adapter(name) or any(r.fullmatch(name) for r in trainable)
        if decoder.freeze_und_expert and name.startswith(und_frozen):
            return False
        return not trainable or any(r.fullmatch(name) for r in trainable)

    return is_trainable


def trainable_filter(config: ml_collections.ConfigDict):
    """The nnx filter of the trainable parameters: `nnx.split(model, filter, ...)`."""
    is_trainable = is_trainable_fn(config)
    return lambda path, value: (isinstance(value, nnx.Param) and
                                is_trainable(path_name(path)))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Warmup from 0 to `lr` over `warmup_steps`, then constant / cosine / linear to `min_lr`
    at `steps` (the schedule counts optimizer updates)."""
    train = config.train
    lr, warmup, steps = float(train.lr), int(train.warmup_steps), int(train.steps)
    end = float(train.get("min_lr", 0.0))
    kind = train.get("schedule", "constant")
    decay_steps = max(1, steps - warmup)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif kind == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    else:
        raise ValueError(f"config.train.schedule must be one of {SCHEDULES}, got {kind!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params: Mapping) -> Mapping:
    """True on weight matrices (`kernel`), False on biases, norm scales and embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path_name(path).split("/")[-1] == "kernel", params)


def multiplier_labels(config: ml_collections.ConfigDict, params: Mapping) -> Mapping:
    """Each parameter's learning-rate factor (as a label string) by the first matching regex."""
    rules = [(re.compile(p), m) for p, m in _multipliers(config)]

    def label(path, _):
        name = path_name(path)
        return repr(next((m for r, m in rules if r.fullmatch(name)), 1.0))

    return jax.tree_util.tree_map_with_path(label, params)


def stored_in(inner: optax.GradientTransformation,
              dtype: jnp.dtype) -> optax.GradientTransformation:
    """`inner` with its floating-point state kept in `dtype` between steps: the state is cast
    to float32 for `inner.update` and its new state rounded back to `dtype` (integer leaves,
    e.g. Adam's count, are left alone). The updates themselves stay float32."""
    def cast(tree, to):
        return jax.tree.map(
            lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def _adamw(config: ml_collections.ConfigDict, params: Mapping) -> optax.GradientTransformation:
    """optax.adamw, with its moments stored in `config.train.optimizer_state_dtype`."""
    train = config.train
    schedule, mask = learning_rate_schedule(config), decay_mask(params)
    state_dtype = train.get("optimizer_state_dtype", "float32")
    if state_dtype not in OPTIMIZER_STATE_DTYPES:
        raise ValueError(f"config.train.optimizer_state_dtype must be one of "
                         f"{OPTIMIZER_STATE_DTYPES}, got {state_dtype!r}")
    if state_dtype == "float32":
        return optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps,
                           weight_decay=train.weight_decay, mask=mask)
    # optax.adamw's own chain, its Adam moments stored in bf16: same state structure.
    return optax.chain(
        stored_in(optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps),
                  jnp.dtype(state_dtype)),
        optax.add_decayed_weights(train.weight_decay, mask),
        optax.scale_by_learning_rate(schedule))


def make_optimizer(config: ml_collections.ConfigDict,
                   params: Mapping) -> optax.GradientTransformation:
    """The optax update of the trainable `params` (a pure dict, arrays or abstract)."""
    train = config.train
    parts = []
    if train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
    parts.append(_adamw(config, params))
    if _multipliers(config):
        labels = multiplier_labels(config, params)
        factors = sorted(set(jax.tree.leaves(labels)))
        parts.append(optax.multi_transform({f: optax.scale(float(f)) for f in factors}, labels))
    return optax.chain(*parts)


def ema_update(ema: Mapping, params: Mapping, decay: float,
               finite: jax.Array | None = None) -> Mapping:
    """ema <- decay * ema + (1 - decay) * params (BAGEL: 0.9999 after every update); with
    `finite` (a traced bool) the old EMA is kept where it is False.

    Inside a jitted step, EMA leaves placed in host memory (`config.train.ema_memory="host"`)
    are brought to the device first; the result is a device array (the step's output sharding
    returns it to the host), since XLA computes only on operands of one memory space.
    """
    ema = jax.tree.map(_to_device, ema)
    new = optax.incremental_update(params, ema, step_size=1.0 - decay)
    if finite is None:
        return new
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, ema)


def _to_device(x: jax.Array) -> jax.Array:
    space = getattr(jax.typeof(x), "memory_space", None)
    if space is not None and space == jax.memory.Space.Host:
        return jax.device_put(x, jax.memory.Space.Device)
    return x


def global_norm(tree) -> jax.Array:
    """sqrt(sum of squares) over every leaf, in float32."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
