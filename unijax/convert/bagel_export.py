"""A unijax checkpoint -> BAGEL's files (`python -m unijax.convert.bagel --to_official`).

  report = to_official("/ckpt/bagel_unijax", "/ckpt/bagel_back")   # or a training workdir

Writes `ema.safetensors` (every Bagel weight under its official name and torch layout, the
fixed sin-cos tables recomputed), `ae.safetensors` (FLUX names), `llm_config.json`,
`vit_config.json` and the tokenizer files. A directory written by `to_unijax` holds
`official.json` (the original JSON files and every tensor's dtype): the files come back with
the same names, shapes, dtypes and bits. For another run the JSONs are made from its config
and each tensor keeps its saved dtype (`dtype` casts them all). Each weight is restored from
Orbax alone (a partial restore of one array), converted and appended to the file before the
next is read. A LoRA run's workdir is first merged (its base from `config.init.checkpoint`
plus its adapters, `convert.merge_lora`) into a temporary checkpoint, which is then exported.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from unijax.convert import bagel_layout as layout
from unijax.convert import safetensors_io
from unijax.convert.released import raise_problems
from unijax.inference import load as load_lib

# Bytes of weights restored from Orbax at once.
READ_BUDGET = 256 * 2**20


def peak_rss_mib() -> float:
    """This program's peak resident memory so far, MiB.

    Linux: /proc/self/status VmHWM, the high-water mark of this program's own address space.
    Not `getrusage`: its ru_maxrss survives fork and exec, so a converter started by a process
    of 3 GB would report at least 3 GB. Elsewhere getrusage (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def representable(config) -> list[str]:
    """What stops BAGEL's code from building the model `config` describes."""
    m, out = config.model, []
    llm = m.llm
    checks = [
        (m.vit is not None, "config.model.vit is None: BAGEL's release has a ViT"),
        (m.vae is not None, "config.model.vae is None: BAGEL generates with the FLUX VAE"),
        (llm.num_experts == 2, f"config.model.llm.num_experts={llm.num_experts}: BAGEL's "
                               "Qwen2MoTDecoderLayer has two experts"),
        (llm.qkv_bias, "config.model.llm.qkv_bias=False: Qwen2 has q/k/v biases"),
        (llm.qk_norm, "config.model.llm.qk_norm=False: BAGEL sets qk_norm=True"),
        (not llm.tie_embeddings, "config.model.llm.tie_embeddings=True: BAGEL unties them"),
        (llm.head_dim * llm.num_heads == llm.hidden_size,
         f"config.model.llm.head_dim={llm.head_dim} x num_heads={llm.num_heads} != "
         f"hidden_size={llm.hidden_size}: Qwen2Config has no head_dim"),
    ]
    if m.vit is not None:
        checks.append((m.vit.position_mode == "extrapolate",
                       f"config.model.vit.position_mode={m.vit.position_mode!r}: BAGEL indexes "
                       "the SigLIP table as 'extrapolate' does"))
    if m.vae is not None:
        for field, value in layout.FLUX_AE.items():
            checks.append((m.vae[field] == value, f"config.model.vae.{field}={m.vae[field]} "
                                                  f"but BAGEL's load_ae uses {value}"))
    out += [message for ok, message in checks if not ok]
    return out


def official_jsons(config, dtype: str) -> tuple[dict, dict]:
    """llm_config.json and vit_config.json for a unijax config (BAGEL drops the ViT's last
    layer, so vit_config says one more than the model has)."""
    llm, vit = config.model.llm, config.model.vit
    llm_json = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "hidden_act": "silu", "hidden_size": llm.hidden_size,
                "intermediate_size": llm.intermediate_size,
                "num_attention_heads": llm.num_heads, "num_hidden_layers": llm.num_layers,
                "num_key_value_heads": llm.num_kv_heads, "rms_norm_eps": llm.rms_norm_eps,
                "rope_theta": llm.rope_theta, "vocab_size": llm.vocab_size,
                "tie_word_embeddings": False, "max_position_embeddings": 32768,
                "torch_dtype": dtype, "qk_norm": True,
                "layer_module": layout.RELEASE["layer_module"]}
    vit_json = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
                "hidden_size": vit.hidden_size, "intermediate_size": vit.intermediate_size,
                "num_attention_heads": vit.num_heads,
                "num_hidden_layers": vit.num_layers + layout.RELEASE["vit_layers_dropped"],
                "patch_size": vit.patch_size, "image_size": vit.max_grid * vit.patch_size,
                "layer_norm_eps": vit.layer_norm_eps, "num_channels": 3,
                "attention_dropout": 0.0}
    return llm_json, vit_json


def _merged_to_official(config, src: str, dst: str, step: int, weights: str,
                        dtype: str | None) -> dict:
    """`to_official` of a LoRA run: merged into a temporary checkpoint first (the base's
    `official.json`, when it has one, keeps the released dtypes)."""
    from unijax.convert import merge_lora

    os.makedirs(dst, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst, prefix=".merged_") as tmp:
        merged = merge_lora.write_merged(src, tmp, step=step, weights=weights)
        base_meta = _meta(str(config.init.checkpoint))
        if base_meta is not None:
            with open(os.path.join(tmp, layout.OFFICIAL_META), "w") as f:
                json.dump(base_meta, f)
        logging.info("to_official: merged the LoRA adapters of %s into %s", src,
                     merged["checkpoint"])
        return to_official(tmp, dst, step=step, weights="ema", dtype=dtype)


def _meta(src: str) -> dict | None:
    for directory in (src, os.path.dirname(os.path.abspath(src))):
        file = os.path.join(directory, layout.OFFICIAL_META)
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)
    return None


def to_official(src: str, dst: str, *, step: int | None = None, weights: str = "ema",
                dtype: str | None = None) -> dict:
    """Writes BAGEL's files for the unijax checkpoint `src` (a workdir or checkpoint directory)
    into `dst`.

    Args:
      step: the checkpoint step (default: the newest complete one).
      weights: "ema" (falls back to "params" when the run kept none) or "params".
      dtype: cast every tensor to it (default: as `official.json` says, else as saved).

    Returns: a report {"ema", "ae", "tensors", "bytes", "peak_rss_mib"}.

    Raises:
      ValueError: listing what BAGEL cannot represent, or weights the checkpoint lacks.
    """
    config, step = load_lib.load_config(src, step)
    if config.model.llm.get("lora_rank", 0):
        return _merged_to_official(config, src, dst, step, weights, dtype)
    where = f"unijax checkpoint {src} (step {step})"
    raise_problems(where, representable(config))
    meta = _meta(src)
    _, _, paths, abstract, _ = layout.abstract_model(config)
    shapes = {n: tuple(a.shape) for n, a in abstract.items()}
    sources, unmapped = layout.plan(config, shapes)
    raise_problems(where, [f"{n}: BAGEL has no tensor for it" for n in unmapped])
    manager = ocp.CheckpointManager(
        load_lib.checkpoint_dir(src), options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    saved = manager.item_metadata(step)["state"].tree
    if weights == "ema" and not saved.get("ema"):
        logging.warning("to_official: %s has no EMA: writing its trained params", where)
        weights = "params"
    found = {}
    for item in (weights, "frozen"):
        for p, leaf in traverse_util.flatten_dict(dict(saved.get(item) or {})).items():
            found.setdefault("/".join(map(str, p)), (item, p, leaf))
    raise_problems(where, [f"{n}: not in the checkpoint's {weights} / frozen weights"
                           for n in paths if n not in found])

    def restore(names: list[str]) -> dict[str, np.ndarray]:
        target, args = {}, {}
        for name in names:
            item, p, leaf = found[name]
            target[(item, *p)] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
            args[(item, *p)] = ocp.RestoreArgs(restore_type=np.ndarray)
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=traverse_util.unflatten_dict(target), partial_restore=True,
            restore_args=traverse_util.unflatten_dict(args))))["state"]
        flat = traverse_util.flatten_dict(out)
        return {name: flat[(found[name][0], *found[name][1])] for name in names}

    def batches(names: list[str]):
        """`names` in order, in groups of at most READ_BUDGET bytes (one restore each)."""
        group, size = [], 0
        for name in names:
            leaf = found[name][2]
            nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
            if group and size + nbytes > READ_BUDGET:
                yield group
                group, size = [], 0
            group.append(name)
            size += nbytes
        if group:
            yield group

    def dtype_of(part: str, key: str, default) -> np.dtype:
        if dtype is not None:
            return np.dtype(dtype)
        stored = (meta or {}).get("dtypes", {}).get(part, {}).get(key)
        return safetensors_io.DTYPES[stored] if stored else np.dtype(default)

    os.makedirs(dst, exist_ok=True)
    report, count, total = {}, 0, 0
    dim = int(config.model.llm.hidden_size)
    embed_dtype = found["llm/embed_tokens/embedding"][2].dtype
    try:
        for part in (layout.EMA, layout.AE):
            names = [n for n in paths if sources[n].file == part]
            specs = [(key, dtype_of(part, key, found[n][2].dtype),
                      sources[n].official_shape(shapes[n])) for n in names for key in
                     sources[n].keys]
            sides = layout.table_sides(config) if part == layout.EMA else {}
            specs += [(key, dtype_of(part, key, embed_dtype), (side * side, dim))
                      for key, side in sides.items()]
            dtypes = {key: dt for key, dt, _ in specs}

            def arrays(names=names, sides=sides, dtypes=dtypes):
                for group in batches(names):
                    values = restore(group)
                    for name in group:
                        src_, value = sources[name], values.pop(name)
                        for key, layer in zip(src_.keys, value if src_.stacked else [value]):
                            yield np.asarray(src_.to_official(layer)).astype(dtypes[key],
                                                                             copy=False)
                        del value
                for key, side in sides.items():
                    yield layout.sincos_table(dim, side, dtypes[key])

            path = os.path.join(dst, layout.FILES[part])
            safetensors_io.write_safetensors(path, specs, arrays(), metadata={"format": "pt"})
            report[part] = path
            count += len(specs)
            total += sum(int(np.prod(s)) * np.dtype(d).itemsize for _, d, s in specs)
    finally:
        manager.close()
    llm_json, vit_json = official_jsons(config, str(np.dtype(dtype or embed_dtype)))
    if meta is not None:  # the source's own files, only the dtype updated when cast
        llm_json, vit_json = dict(meta["llm_config"]), meta["vit_config"]
        if dtype is not None:
            llm_json["torch_dtype"] = str(np.dtype(dtype))
    for name, content in ((layout.LLM_JSON, llm_json), (layout.VIT_JSON, vit_json)):
        with open(os.path.join(dst, name), "w") as f:
            json.dump(content, f, indent=2)
    tokenizer = str(config.data.get("tokenizer", "byte"))
    if tokenizer not in ("", "byte"):
        layout.copy_tokenizer(tokenizer if os.path.isdir(tokenizer)
                              else os.path.dirname(tokenizer), dst)
    return {**report, "tensors": count, "bytes": total, "peak_rss_mib": peak_rss_mib()}
