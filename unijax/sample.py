r"""Sampling from a trained workdir: answer about an image, generate from text, edit an image.

  python -m unijax.sample --workdir=DIR --prompt="a photo of a red circle" --num_images=4
  python -m unijax.sample --workdir=DIR --image=cat.png --question="what colour is it?"
  python -m unijax.sample --workdir=DIR --image=scene.png --edit="make the circle green"
  python -m unijax.sample --workdir=DIR --prompt="two squares" --think

Loads the newest complete checkpoint of DIR (or --step), its EMA weights when it has them
(--weights=params for the raw ones), and the config saved with it; images go to
DIR/samples/ (or --out) as PNG, text to stdout. Sampling defaults are the config's
`config.sample` (BAGEL's: 50 points of the time grid, shift 3; text-to-image: text scale 4.0,
interval [0.4, 1.0], global renorm; editing: text 4.0, image 2.0, interval [0, 1],
text-channel renorm); --steps, --shift, --cfg_text, --cfg_image and --cfg_interval override
them. The weights go on one device, or sharded over the local devices with
--mesh=data,fsdp,tensor (e.g. --mesh=1,1,4).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from unijax.data import images as images_lib
from unijax.inference.chat import Chat
from unijax.inference.text import Sampling
from unijax.training import sharding

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoint dir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "Which weights to load.")
_OUT = flags.DEFINE_string("out", None, "Directory for images (default WORKDIR/samples).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Text-to-image prompt (repeatable).")
_IMAGE = flags.DEFINE_string("image", None, "Input image file (with --question or --edit).")
_QUESTION = flags.DEFINE_string("question", None, "A question about --image.")
_EDIT = flags.DEFINE_string("edit", None, "An instruction to edit --image by.")
_THINK = flags.DEFINE_bool("think", False, "Decode a plan before generating the image.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "Images per prompt.")
_STEPS = flags.DEFINE_integer("steps", None, "Points of the time grid (steps - 1 Euler steps).")
_SHIFT = flags.DEFINE_float("shift", None, "Time shift of the sampling grid.")
_CFG_TEXT = flags.DEFINE_float("cfg_text", None, "Text guidance scale.")
_CFG_IMAGE = flags.DEFINE_float("cfg_image", None, "Image guidance scale.")
_CFG_INTERVAL = flags.DEFINE_list("cfg_interval", None, "Guidance interval lo,hi (shifted t).")
_SIZE = flags.DEFINE_list("size", None, "Generated image H,W in pixels (default: config's).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8"], "Weight-only quantised decoder "
                              "kernels (unijax.inference.quantize).")
_MESH = flags.DEFINE_list("mesh", None, "data,fsdp,tensor sizes to shard the weights over the "
                          "local devices (default: one device).")
_MAX_TOKENS = flags.DEFINE_integer("max_new_tokens", None,
                                   "Longest answer (or --think plan), in tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Answer sampling temperature (0: greedy).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling of answers.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k sampling of answers (0: off).")


def _save(out_dir: str, name: str, image: np.ndarray) -> str:
    path = os.path.join(out_dir, name)
    Image.fromarray(image).save(path)
    print(f"wrote {path}", flush=True)
    return path


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return keep[:48] or "image"


def run(argv=None) -> dict:
    """What `main` does, returning {"texts": [...], "images": [paths]}."""
    del argv
    if not (_PROMPT.value or _IMAGE.value):
        raise app.UsageError("give --prompt (text-to-image) or --image with --question/--edit")
    if _IMAGE.value and not (_QUESTION.value or _EDIT.value):
        raise app.UsageError("--image needs --question or --edit")
    mesh = None
    if _MESH.value:
        sizes = [int(x) for x in _MESH.value]
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, sizes))))
    chat = Chat.from_workdir(_WORKDIR.value, step=_STEP.value, weights=_WEIGHTS.value,
                             mesh=mesh, rules=sharding.LOGICAL_RULES if mesh else None,
                             quantize=_QUANTIZE.value)
    print(f"loaded step {chat.info['step']} ({chat.info['weights']} weights) from "
          f"{chat.info['checkpoint']}", flush=True)
    if _QUANTIZE.value:
        print(f"{_QUANTIZE.value} weight-only: {chat.info['quantized_kernels']} decoder kernels, "
              f"{chat.info['quantized_bytes'] / 2**20:.2f} MiB with their scales", flush=True)
    out_dir = _OUT.value or os.path.join(_WORKDIR.value, "samples")
    os.makedirs(out_dir, exist_ok=True)
    overrides = dict(num_steps=_STEPS.value, shift=_SHIFT.value, text_scale=_CFG_TEXT.value,
                     image_scale=_CFG_IMAGE.value,
                     interval=tuple(float(x) for x in _CFG_INTERVAL.value)
                     if _CFG_INTERVAL.value else None)
    size = tuple(int(x) for x in _SIZE.value) if _SIZE.value else None
    result = {"texts": [], "images": []}
    tag = f"step{chat.info['step']}_seed{_SEED.value}"

    if _IMAGE.value:
        image = images_lib.decode_image(open(_IMAGE.value, "rb").read())
        if _QUESTION.value:
            sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
            answer = chat.answer([image], [_QUESTION.value], max_new_tokens=_MAX_TOKENS.value,
                                 sampling=sampling, seed=_SEED.value)[0]
            print(f"Q: {_QUESTION.value}\nA: {answer}", flush=True)
            result["texts"].append(answer)
        if _EDIT.value:
            edited = chat.edit([image] * _NUM_IMAGES.value, [_EDIT.value] * _NUM_IMAGES.value,
                               seed=_SEED.value, guidance=chat.guidance("edit", **overrides),
                               progress=True)
            for i, im in enumerate(edited):
                result["images"].append(_save(out_dir, f"edit_{_slug(_EDIT.value)}_{tag}_{i}.png",
                                              im))
    for prompt in _PROMPT.value:
        conv_images = chat.generate([prompt], num_images=_NUM_IMAGES.value, seed=_SEED.value,
                                    size=size, think=_THINK.value,
                                    max_think_tokens=_MAX_TOKENS.value,
                                    guidance=chat.guidance("t2i", **overrides), progress=True)
        if _THINK.value:
            print(f"thought: {chat.thoughts[0]}", flush=True)
            result["texts"].append(chat.thoughts[0])
        for i, im in enumerate(conv_images[0]):
            result["images"].append(_save(out_dir, f"t2i_{_slug(prompt)}_{tag}_{i}.png", im))
    return result


def main(argv) -> None:
    run(argv)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
