"""Config validation: reject a bad combination before anything is built or compiled.

Every error names the config field and the value that was given. `validate` collects all
problems and raises one `ConfigError` listing them, so a user fixes a config in one pass.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import ml_collections

ATTENTION_IMPLS = ("xla", "auto", "pallas_tpu", "pallas_gpu", "cudnn")
REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "tensor")
VAE_DOWNSAMPLE = 8  # fixed by the FLUX autoencoder layout


class ConfigError(ValueError):
    """A config that cannot work; the message lists every offending field."""


def mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves the mesh axis sizes (one may be -1: "all devices the others leave").

    Raises:
      ConfigError: if the sizes cannot cover exactly `num_devices` devices.
    """
    sizes = {axis: int(mesh[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    bad = [f"config.mesh.{a}={s}" for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ConfigError(f"mesh axis sizes must be positive or -1, got {', '.join(bad)}")
    if len(free) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"the fixed mesh axes ({fixed} devices) do not divide the {num_devices} devices "
                f"available, so config.mesh.{free[0]}=-1 cannot be resolved"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config.mesh {sizes} covers {fixed} devices but {num_devices} are available"
        )
    return sizes


def vae_downsample(model: ml_collections.ConfigDict) -> int:
    """Pixels per latent cell side of `config.model`'s VAE: 2^(levels - 1) (FLUX: 8); 1 without
    a VAE (pixel space)."""
    if model.vae is None:
        return 1
    return 2 ** (len(model.vae.channel_mult) - 1)


def latent_cell(model: ml_collections.ConfigDict) -> int:
    """Pixels per latent-token side: VAE downsample x `latent_patch_size` (FLUX + 2x2: 16)."""
    return vae_downsample(model) * model.latent_patch_size


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks a finished config; raises ConfigError naming every bad field.

    Args:
      config: a config built by a file under `configs/`.
      num_devices: when given, the mesh is checked against this many devices too.
    """
    errors: list[str] = []

    def check(ok: bool, message: str | Callable[[], str]) -> None:
        if not ok:
            errors.append(message() if callable(message) else message)

    llm = config.model.llm
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "intermediate_size"):
        check(llm[name] > 0, f"config.model.llm.{name} must be positive, got {llm[name]}")
    check(llm.num_kv_heads > 0 and llm.num_heads % llm.num_kv_heads == 0,
          f"config.model.llm.num_heads={llm.num_heads} must be a multiple of "
          f"config.model.llm.num_kv_heads={llm.num_kv_heads} (grouped-query attention)")
    check(llm.num_experts in (1, 2),
          f"config.model.llm.num_experts must be 1 (dense) or 2 (MoT), got {llm.num_experts}")
    check(not (llm.freeze_und_expert and llm.num_experts == 1),
          "config.model.llm.freeze_und_expert=True needs num_experts=2: with one expert it "
          "would freeze the whole decoder")
    check(llm.remat_policy in REMAT_POLICIES,
          f"config.model.llm.remat_policy must be one of {REMAT_POLICIES}, "
          f"got {llm.remat_policy!r}")
    check(llm.rope_theta > 0, f"config.model.llm.rope_theta must be positive, got {llm.rope_theta}")
    _validate_lora(config, check)
    for name in ("dtype", "param_dtype"):
        check(config.model[name] in DTYPES,
              f"config.model.{name} must be one of {DTYPES}, got {config.model[name]!r}")
    check(config.attention.impl in ATTENTION_IMPLS,
          f"config.attention.impl must be one of {ATTENTION_IMPLS}, "
          f"got {config.attention.impl!r}")
    check(config.attention.chunk_size > 0,
          f"config.attention.chunk_size must be positive, got {config.attention.chunk_size}")
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
        block = config.attention.get(name, 0)
        check(block >= 0 and block % 8 == 0,
              f"config.attention.{name} must be 0 (platform default) or a positive multiple of "
              f"8, got {block}")

    _validate_vision(config, check)
    _validate_data(config, check)
    _validate_kernel_layouts(config, check)

    train = config.train
    check(train.steps > 0, f"config.train.steps must be positive, got {train.steps}")
    check(train.lr >= 0, f"config.train.lr must be >= 0, got {train.lr}")
    check(train.warmup_steps >= 0,
          f"config.train.warmup_steps must be >= 0, got {train.warmup_steps}")
    check(0 <= train.ema_decay < 1, f"config.train.ema_decay must be in [0, 1), got "
          f"{train.ema_decay}")
    check(train.timestep_shift > 0,
          f"config.train.timestep_shift must be positive, got {train.timestep_shift}")
    check(train.ce_weight >= 0 and train.mse_weight >= 0,
          f"config.train.ce_weight and mse_weight must be >= 0, got {train.ce_weight} and "
          f"{train.mse_weight}")
    _validate_train(config, check)
    _validate_sample(config, check)
    _validate_judges(config, check)
    _validate_init(config, check)

    _validate_mesh(config, num_devices, check, errors)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZER_STATE_DTYPES = ("float32", "bfloat16")
EMA_MEMORIES = ("device", "host")
BF16_MIN_MOMENT_RATE = 1 / 128
RENORM_MODES = ("global", "channel", "text_channel")


INIT_LLM_TYPES = ("qwen2", "qwen3")  # config.json model_type of a config.init.llm directory
INIT_VIT_TYPES = ("siglip_vision_model", "siglip")
INIT_WEIGHTS = ("ema", "params")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _validate_lora(config, check) -> None:
    llm = config.model.llm
    rank = llm.get("lora_rank", 0)
    check(isinstance(rank, int) and rank >= 0,
          f"config.model.llm.lora_rank must be an integer >= 0 (0: no LoRA), got {rank!r}")
    if not isinstance(rank, int) or rank <= 0:
        return
    experts = ("und", "gen")[:llm.num_experts]
    check(llm.lora_alpha > 0, f"config.model.llm.lora_alpha must be positive, got "
                              f"{llm.lora_alpha}")
    check(bool(llm.lora_experts) and set(llm.lora_experts) <= set(experts),
          f"config.model.llm.lora_experts={tuple(llm.lora_experts)} must name experts of "
          f"{experts}")
    check(bool(llm.lora_targets) and set(llm.lora_targets) <= set(LORA_TARGETS),
          f"config.model.llm.lora_targets={tuple(llm.lora_targets)} must name projections of "
          f"{LORA_TARGETS}")
    check(not (llm.freeze_und_expert and "und" in llm.lora_experts),
          "config.model.llm.lora_experts includes 'und' while freeze_und_expert=True stops "
          "every gradient at the und expert: its adapters would never train")
    check(bool(config.init.get("checkpoint")),
          "config.model.llm.lora_rank > 0 adapts a base model: set config.init.checkpoint to "
          "the base's workdir or checkpoint directory (LoRA checkpoints hold only the "
          "adapters, the base is read from there)")


def _validate_init(config, check) -> None:
    """`config.init` (training/init.py): the sources exist and are of a known kind (the paths
    are ConfigDict string fields, "" = none)."""
    init = config.get("init")
    if init is None:
        return
    check(not init.get("required", False) or any(init.get(f, "") for f in
                                                 ("checkpoint", "llm", "vit", "vae")),
          "config.init.required=True (a fine-tuning config) but no source is set: pass "
          "--config.init.checkpoint=DIR (a converted BAGEL or a unijax run)")
    from unijax.convert.safetensors_io import safetensors_files  # numpy only, no jax

    def hf_dir(field: str, key: str, known: tuple[str, ...]) -> None:
        path, name = init[field], f"config.init.{field}={init[field]!r}"
        if not os.path.isdir(path):
            return check(False, f"{name}: no such directory")
        try:
            safetensors_files(path)
            with open(os.path.join(path, "config.json")) as f:
                kind = json.load(f).get(key)
        except (OSError, ValueError) as e:
            return check(False, f"{name}: {e}")
        check(kind in known, f"{name}: config.json {key}={kind!r} is not a known kind {known}")

    if init.get("llm"):
        hf_dir("llm", "model_type", INIT_LLM_TYPES)
    if init.get("vit"):
        check(config.model.vit is not None, f"config.init.vit={init.vit!r} but "
              "config.model.vit is None (no ViT)")
        if config.model.vit is not None:
            hf_dir("vit", "model_type", INIT_VIT_TYPES)
    if init.get("vae"):
        check(config.model.vae is not None, f"config.init.vae={init.vae!r} but "
              "config.model.vae is None (no VAE)")
        if config.model.vae is not None and os.path.isdir(init.vae):
            hf_dir("vae", "_class_name", ("AutoencoderKL",))
        elif config.model.vae is not None:
            check(os.path.isfile(init.vae) and init.vae.endswith(".safetensors"),
                  f"config.init.vae={init.vae!r}: neither a FLUX ae.safetensors file nor a "
                  "diffusers AutoencoderKL directory")
    if init.get("checkpoint") and "://" not in init.checkpoint:
        check(os.path.isdir(init.checkpoint), f"config.init.checkpoint={init.checkpoint!r}: no "
              "such directory (a unijax workdir or its checkpoints directory)")
    check(init.get("checkpoint_weights", "ema") in INIT_WEIGHTS,
          f"config.init.checkpoint_weights must be one of {INIT_WEIGHTS}, got "
          f"{init.get('checkpoint_weights')!r}")
    check(init.get("checkpoint_step", -1) >= -1, f"config.init.checkpoint_step must be >= -1 "
          f"(-1: the newest), got {init.get('checkpoint_step')!r}")


def _validate_judges(config, check) -> None:
    judges = config.get("judges")
    if judges is None:
        return
    for name in ("num_per_category", "num_digits", "batch_size", "tb_samples"):
        check(isinstance(judges[name], int) and judges[name] >= 1,
              f"config.judges.{name} must be an int >= 1, got {judges[name]!r}")
    check(isinstance(judges.steps, int) and judges.steps >= 2,
          f"config.judges.steps must be an int >= 2, got {judges.steps!r}")


def _validate_sample(config, check) -> None:
    """The sampler's fields (`config.sample`, read by unijax/inference)."""
    sample = config.get("sample")
    if sample is None:
        return
    check(isinstance(sample.steps, int) and sample.steps >= 2,
          f"config.sample.steps must be an int >= 2, got {sample.steps!r}")
    check(sample.shift > 0, f"config.sample.shift must be positive, got {sample.shift}")
    check(isinstance(sample.capacity, int) and sample.capacity >= 0,
          f"config.sample.capacity must be an int >= 0, got {sample.capacity!r}")
    check(isinstance(sample.max_new_tokens, int) and sample.max_new_tokens >= 1,
          f"config.sample.max_new_tokens must be an int >= 1, got {sample.max_new_tokens!r}")
    for mode in ("t2i", "edit"):
        g = sample[mode]
        name = f"config.sample.{mode}"
        check(g.text_scale >= 0 and g.image_scale >= 0,
              f"{name}.text_scale and image_scale must be >= 0, got {g.text_scale} and "
              f"{g.image_scale}")
        interval = tuple(g.interval)
        check(len(interval) == 2 and 0 <= interval[0] <= interval[1] <= 1,
              f"{name}.interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {interval}")
        check(g.renorm in RENORM_MODES,
              f"{name}.renorm must be one of {RENORM_MODES}, got {g.renorm!r}")
        check(0 <= g.renorm_min <= 1, f"{name}.renorm_min must be in [0, 1], got "
              f"{g.renorm_min}")


def _validate_train(config, check) -> None:
    """The optimiser, loss, evaluation and checkpoint fields of the trainer."""
    train, ckpt = config.train, config.get("checkpoint")
    check(train.get("schedule", "constant") in SCHEDULES,
          f"config.train.schedule must be one of {SCHEDULES}, got {train.get('schedule')!r}")
    check(0 <= train.get("min_lr", 0.0) <= max(train.lr, 0.0),
          f"config.train.min_lr must be in [0, config.train.lr={train.lr}], got "
          f"{train.get('min_lr')}")
    for name in ("b1", "b2"):
        check(0 <= train[name] < 1, f"config.train.{name} must be in [0, 1), got {train[name]}")
    state_dtype = train.get("optimizer_state_dtype", "float32")
    check(state_dtype in OPTIMIZER_STATE_DTYPES,
          f"config.train.optimizer_state_dtype must be one of {OPTIMIZER_STATE_DTYPES}, got "
          f"{state_dtype!r}")
    if state_dtype == "bfloat16":
        # A bf16 moment moves by (1 - b) x its gap to the new value; below bf16's resolution
        # (2^-8 relative) that step rounds away and the moment stops following the gradients.
        for name in ("b1", "b2"):
            check(1 - train[name] >= BF16_MIN_MOMENT_RATE,
                  f"config.train.{name}={train[name]} is too close to 1 for "
                  f"config.train.optimizer_state_dtype='bfloat16' (1 - {name} must be >= "
                  f"{BF16_MIN_MOMENT_RATE}); keep the moments in float32")
    check(train.get("ema_memory", "device") in EMA_MEMORIES,
          f"config.train.ema_memory must be one of {EMA_MEMORIES}, got "
          f"{train.get('ema_memory')!r}")
    check(train.eps > 0, f"config.train.eps must be positive, got {train.eps}")
    for name in ("weight_decay", "grad_clip", "z_loss_weight", "max_nonfinite_steps",
                 "eval_every"):
        if name in train:
            check(train[name] >= 0, f"config.train.{name} must be >= 0, got {train[name]}")
    # eval_batches may be 0: no held-out evaluation.
    for name, low in (("grad_accum", 1), ("ce_chunk_size", 1), ("log_every", 1),
                      ("eval_batches", 0)):
        if name in train:
            check(isinstance(train[name], int) and train[name] >= low,
                  f"config.train.{name} must be an int >= {low}, got {train[name]!r}")
    accum = train.get("grad_accum", 1)
    if isinstance(accum, int) and accum >= 1:
        check(config.data.batch_size % accum == 0,
              f"config.data.batch_size={config.data.batch_size} is not divisible by "
              f"config.train.grad_accum={accum}")
    times = tuple(train.get("eval_timesteps", ()))
    check(len(times) > 0 and all(0 < t <= 1 for t in times),
          f"config.train.eval_timesteps must be flow times in (0, 1], got {times}")
    for name in ("trainable", "freeze"):
        value = train.get(name, ())
        check(isinstance(value, tuple | list) and all(isinstance(p, str) for p in value),
              f"config.train.{name} must be a tuple of regex strings, got {value!r}")
    pairs = train.get("lr_multipliers", ())
    check(isinstance(pairs, tuple | list) and all(
        isinstance(p, tuple | list) and len(p) == 2 and isinstance(p[0], str) and
        isinstance(p[1], int | float) for p in pairs),
        f"config.train.lr_multipliers must be (regex, factor) pairs, got {pairs!r}")
    if ckpt is not None:
        for name in ("every_steps", "max_to_keep"):
            check(isinstance(ckpt[name], int) and ckpt[name] >= 1,
                  f"config.checkpoint.{name} must be an int >= 1, got {ckpt[name]!r}")


def _validate_kernel_layouts(config, check) -> None:
    """The packed rows and the ViT payload must tile for a Pallas attention backend (for
    impl='auto': the backend of the platform this process runs on)."""
    from unijax.kernels import attention as attention_lib  # imports jax: only when validating

    name = config.attention.impl
    if name not in ATTENTION_IMPLS:
        return  # reported above
    impl = attention_lib.resolve_auto() if name == "auto" else name
    interpret = bool(config.attention.get("interpret", False))
    blocks = tuple(int(config.attention.get(b, 0)) for b in attention_lib.BLOCK_NAMES)
    llm, data, vit = config.model.llm, config.data, config.model.vit
    length = data.und_capacity + data.gen_capacity
    problems = attention_lib.layout_problems(impl, length, llm.head_dim, blocks,
                                             interpret=interpret)
    for field, problem in problems.items():
        where = (f"config.model.llm.head_dim={llm.head_dim}" if field == "head_dim" else
                 f"config.attention.{field}={config.attention.get(field, 0)} with rows of "
                 f"config.data.und_capacity + gen_capacity = {length} tokens")
        check(False, f"{where} (config.attention.impl={name!r}): {problem}")
    if vit is None or vit.hidden_size % vit.num_heads:
        return
    head_dim = attention_lib.kernel_head_dim(impl, vit.hidden_size // vit.num_heads)
    problems = attention_lib.layout_problems(impl, data.max_vit_patches, head_dim,
                                             interpret=interpret)
    for problem in problems.values():
        check(False, f"config.data.max_vit_patches={data.max_vit_patches} ViT patch slots per "
              f"row (config.attention.impl={name!r}; the ViT runs the backend's default "
              f"tiles): {problem}")


def _validate_vision(config, check) -> None:
    model, data = config.model, config.data
    vit = model.vit
    if vit is not None:
        check(vit.hidden_size % vit.num_heads == 0,
              f"config.model.vit.hidden_size={vit.hidden_size} is not divisible by "
              f"config.model.vit.num_heads={vit.num_heads}")
        check(vit.position_mode in ("extrapolate", "interpolate"),
              f"config.model.vit.position_mode must be 'extrapolate' or 'interpolate', got "
              f"{vit.position_mode!r}")
        side = data.vit_image_size // vit.patch_size
        check(data.vit_image_size % vit.patch_size == 0,
              f"config.data.vit_image_size={data.vit_image_size} is not a multiple of "
              f"config.model.vit.patch_size={vit.patch_size}")
        check(vit.position_mode == "interpolate" or side <= vit.max_grid,
              f"config.data.vit_image_size={data.vit_image_size} gives {side} patches per side, "
              f"more than config.model.vit.max_grid={vit.max_grid} (use position_mode="
              f"'interpolate' or smaller images)")
        # Larger images shrink to fit the row's budgets (`data.images.ResizeRule.max_tokens`),
        # so the budgets need only hold one image at the short-side minimum.
        small = min(data.vit_min_image_size, data.vit_image_size)
        least = (small // vit.patch_size) ** 2
        check(data.max_vit_patches >= least,
              f"config.data.max_vit_patches={data.max_vit_patches} cannot hold one "
              f"{small}px image ({least} patches; config.data.vit_min_image_size)")
        check(data.und_capacity >= least + 2,
              f"config.data.und_capacity={data.und_capacity} cannot hold one "
              f"{small}px ViT image ({least} tokens + 2 markers; "
              f"config.data.vit_min_image_size)")

    downsample = vae_downsample(model)
    check(model.llm.hidden_size % 4 == 0,
          f"config.model.llm.hidden_size={model.llm.hidden_size} must be a multiple of 4 (the 2D "
          "sin-cos position embeddings of ViT and latent tokens)")
    if model.vae is not None:
        vae = model.vae
        check(len(vae.channel_mult) >= 1 and all(m > 0 for m in vae.channel_mult),
              f"config.model.vae.channel_mult must be a non-empty tuple of positive ints, got "
              f"{vae.channel_mult}")
        widths = [vae.base_channels * m for m in vae.channel_mult]
        check(vae.norm_groups > 0 and all(w % vae.norm_groups == 0 for w in widths),
              f"config.model.vae.norm_groups={vae.norm_groups} must divide every level width "
              f"{widths} (base_channels x channel_mult)")
        check(model.vae.latent_channels == model.latent_channels,
              f"config.model.vae.latent_channels={model.vae.latent_channels} differs from "
              f"config.model.latent_channels={model.latent_channels}")
    else:
        check(model.latent_channels == 3,
              f"config.model.latent_channels must be 3 (RGB pixels) when config.model.vae is "
              f"None, got {model.latent_channels}")
    cell = downsample * model.latent_patch_size
    check(data.vae_image_size % cell == 0,
          f"config.data.vae_image_size={data.vae_image_size} is not a multiple of {cell} "
          f"(VAE downsample {downsample} x config.model.latent_patch_size="
          f"{model.latent_patch_size})")
    side = data.vae_image_size // cell
    check(side <= model.max_latent_size,
          f"config.data.vae_image_size={data.vae_image_size} gives {side} latent tokens per "
          f"side, more than config.model.max_latent_size={model.max_latent_size}")
    small = min(data.vae_min_image_size, data.vae_image_size)
    least = (small // cell) ** 2
    check(data.gen_capacity >= least,
          f"config.data.gen_capacity={data.gen_capacity} cannot hold one "
          f"{small}px VAE image ({least} latent tokens; config.data.vae_min_image_size)")


def _validate_data(config, check) -> None:
    data = config.data
    for name in ("batch_size", "und_capacity", "max_vae_images"):
        check(data[name] > 0, f"config.data.{name} must be positive, got {data[name]}")
    check(data.gen_capacity >= 0,
          f"config.data.gen_capacity must be >= 0, got {data.gen_capacity}")
    if "datasets" in data:
        _validate_datasets(data, check)
    if data.get("eval_datasets"):
        _validate_datasets(data, check, "eval_datasets")


DATA_OVERLONG = ("truncate", "drop")
DATA_INTERLEAVED_IMAGES = ("generate", "understand")
DATA_VIDEO_NOISE = ("shared", "independent")


def _validate_datasets(data, check, group: str = "datasets") -> None:
    """The input pipeline's fields and every `config.data.<group>.<name>` entry."""
    check(data.get("overlong", "truncate") in DATA_OVERLONG,
          f"config.data.overlong must be one of {DATA_OVERLONG}, got {data.get('overlong')!r}")
    for name in ("num_workers", "num_epochs", "vit_min_image_size", "vae_min_image_size"):
        if name in data:
            check(data[name] >= 0, f"config.data.{name} must be >= 0, got {data[name]}")
    for name in ("read_threads", "prefetch_buffer_size", "worker_buffer_size",
                 "max_image_pixels"):
        if name in data:
            check(data[name] > 0, f"config.data.{name} must be positive, got {data[name]}")
    pack_buffer = data.get("pack_buffer", 0)
    check(isinstance(pack_buffer, int) and not isinstance(pack_buffer, bool) and pack_buffer >= 0,
          f"config.data.pack_buffer must be an int >= 0, got {pack_buffer!r}")
    _validate_bad_data(data, check)
    limit = data.get("max_datasets", 16)  # the train step's static per-dataset metric buckets
    check(isinstance(limit, int) and len(data[group]) <= limit,
          f"config.data.{group} has {len(data[group])} datasets, more than "
          f"config.data.max_datasets={limit!r}")
    for ds_name, ds in data[group].items():
        field = f"config.data.{group}.{ds_name}"
        if not hasattr(ds, "get"):
            check(False, f"{field} must be a ConfigDict (configs.base.data_source), got {ds!r}")
            continue
        paths = ds.get("paths")
        if ds.get("tfds"):
            _validate_tfds(ds, field, check)
        else:
            check(isinstance(paths, str) and paths.strip() != "",
                  f"{field}.paths must be a non-empty glob string, got {paths!r}")
        weight = ds.get("weight", 1.0)
        check(isinstance(weight, int | float) and weight > 0,
              f"{field}.weight must be positive, got {weight!r}")
        for name in ("text_cond_dropout", "vit_cond_dropout", "vae_cond_dropout"):
            if name in ds:
                check(0.0 <= ds[name] <= 1.0, f"{field}.{name} must be in [0, 1], got {ds[name]}")
        check(ds.get("interleaved_images", "generate") in DATA_INTERLEAVED_IMAGES,
              f"{field}.interleaved_images must be one of {DATA_INTERLEAVED_IMAGES}, got "
              f"{ds.get('interleaved_images')!r}")
        check(ds.get("video_noise", "shared") in DATA_VIDEO_NOISE,
              f"{field}.video_noise must be one of {DATA_VIDEO_NOISE}, got "
              f"{ds.get('video_noise')!r}")
        check(ds.get("max_video_frames", 1) >= 1,
              f"{field}.max_video_frames must be >= 1, got {ds.get('max_video_frames')}")
        check(ds.get("video_context_frames", 0) >= 0,
              f"{field}.video_context_frames must be >= 0, got {ds.get('video_context_frames')}")
        check(ds.get("video_frame_size", 0) >= 0,
              f"{field}.video_frame_size must be >= 0, got {ds.get('video_frame_size')}")
        check(isinstance(ds.get("ce_loss_reweighting", False), bool),
              f"{field}.ce_loss_reweighting must be a bool, got {ds.get('ce_loss_reweighting')!r}")


DATA_ON_BAD_SHARD = ("skip", "fail")
DATA_TFDS_ADAPTERS = ("caption", "t2i", "vqa")
_TFDS_FEATURES = {"caption": ("image_feature", "text_feature"),
                  "t2i": ("image_feature", "text_feature"),
                  "vqa": ("image_feature", "question_feature", "answer_feature")}


def _validate_bad_data(data, check) -> None:
    """`on_bad_shard`, `max_skip_fraction`, `skip_fraction_min_records`."""
    check(data.get("on_bad_shard", "skip") in DATA_ON_BAD_SHARD,
          f"config.data.on_bad_shard must be one of {DATA_ON_BAD_SHARD}, got "
          f"{data.get('on_bad_shard')!r}")
    fraction = data.get("max_skip_fraction", 1.0)
    check(isinstance(fraction, int | float) and not isinstance(fraction, bool)
          and 0.0 <= fraction <= 1.0,
          f"config.data.max_skip_fraction must be in [0, 1] (1: never stop), got {fraction!r}")
    minimum = data.get("skip_fraction_min_records", 0)
    check(isinstance(minimum, int) and not isinstance(minimum, bool) and minimum >= 0,
          f"config.data.skip_fraction_min_records must be an int >= 0, got {minimum!r}")


def _validate_tfds(ds, field: str, check) -> None:
    """A `configs.base.tfds_source` entry: no `paths`, a name, a split, a known adapter."""
    tfds = ds.tfds
    check(not ds.get("paths"), f"{field}: give either paths or tfds, not both (paths="
          f"{ds.get('paths')!r}, tfds.name={tfds.get('name')!r})")
    for key in ("name", "split"):
        value = tfds.get(key)
        check(isinstance(value, str) and value.strip() != "",
              f"{field}.tfds.{key} must be a non-empty string, got {value!r}")
    check(isinstance(tfds.get("data_dir", ""), str),
          f"{field}.tfds.data_dir must be a string, got {tfds.get('data_dir')!r}")
    adapter = tfds.get("adapter")
    check(adapter in DATA_TFDS_ADAPTERS,
          f"{field}.tfds.adapter must be one of {DATA_TFDS_ADAPTERS}, got {adapter!r}")
    for key in _TFDS_FEATURES.get(adapter, ()):
        value = tfds.get(key)
        check(isinstance(value, str) and value != "",
              f"{field}.tfds.{key} must name a feature of the dataset, got {value!r}")


def _validate_mesh(config, num_devices, check, errors) -> None:
    llm, mesh = config.model.llm, config.mesh
    tensor = int(mesh.tensor)
    if tensor > 0:
        for name in ("num_heads", "intermediate_size"):
            check(llm[name] % tensor == 0,
                  f"config.model.llm.{name}={llm[name]} is not divisible by "
                  f"config.mesh.tensor={tensor}")
        check(llm.num_kv_heads % tensor == 0 or tensor % llm.num_kv_heads == 0,
              f"config.model.llm.num_kv_heads={llm.num_kv_heads} and config.mesh.tensor="
              f"{tensor} must divide one another")
    if num_devices is None:
        return
    try:
        sizes = mesh_shape(mesh, num_devices)
    except ConfigError as e:
        errors.append(str(e))
        return
    batch_shards = sizes["data"] * sizes["fsdp"]
    check(config.data.batch_size % batch_shards == 0,
          f"config.data.batch_size={config.data.batch_size} is not divisible by the "
          f"{batch_shards} batch shards (config.mesh.data x config.mesh.fsdp)")
    accum = config.train.get("grad_accum", 1)
    if isinstance(accum, int) and accum > 1 and config.data.batch_size % batch_shards == 0:
        check(config.data.batch_size % (accum * batch_shards) == 0,
              f"config.data.batch_size={config.data.batch_size} does not split into "
              f"config.train.grad_accum={accum} micro-batches of whole rows on each of the "
              f"{batch_shards} batch shards (config.mesh.data x config.mesh.fsdp)")
