"""One conversation API over a trained unified model: text and images in, text and images out.

  chat = Chat.from_workdir(workdir)                        # EMA weights of the newest step
  chat.answer([image], ["what colour is the circle?"])    # -> ["red"]
  chat.generate(["a photo of a red circle"], num_images=4, seed=0)  # -> [[4 x uint8 image]]
  chat.edit([image], ["make the circle green"])            # -> [uint8 image, input's size]
  chat.generate(["a photo of two squares"], think=True)    # plan first, then the image
  chat.next_frame(["a circle moves right"], [[frame0, frame1]])    # -> [uint8 image]

  conv = chat.conversation(batch_size=1)                  # or step by step
  conv.add_image([image]); conv.add_text(["describe it"]); conv.generate_text()

A `Conversation` keeps three contexts per row (BAGEL's inferencer):
  cond          everything so far;
  text_uncond   cond as it was before the last text (the text-guidance baseline; empty for
                plain text-to-image);
  image_uncond  every text but no image (the image-guidance baseline).
Each `add_*` prefills them once (`cache.py`); generating an image runs only the image's tokens
against the three (`image.py`). Generated text goes into cond only, as BAGEL does with a
thought. Items are laid out as in training (`data/plan.py`): an image to understand enters as
ViT tokens (as clean VAE latents when the model has no ViT), an image to edit as clean VAE
latents then ViT tokens, video frames as clean VAE latents after the caption of what changed;
images are resized by the config's rules (`data/images.py`), as the data pipeline does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from unijax.data import images as images_lib
from unijax.data.plan import ImageItem, ImageSettings, TextItem
from unijax.data.tokenizer import load_tokenizer
from unijax.inference import image as image_lib
from unijax.inference import text as text_lib
from unijax.inference.cache import CHUNK_MULTIPLE, Context, Engine
from unijax.inference.image import Guidance
from unijax.inference.text import Sampling

# Think mode's instruction, prepended to the conditional and image-unconditional contexts.
THINK_PROMPT = ("Before drawing, think about the request: describe the objects, their colours "
                "and where they go, between <think> and </think>; then draw the image.")


def default_capacity(config: ml_collections.ConfigDict) -> int:
    """KV-cache slots per row: `config.sample.capacity`, or twice a training row."""
    capacity = int(config.sample.get("capacity", 0)) if "sample" in config else 0
    if not capacity:
        capacity = 2 * (int(config.data.und_capacity) + int(config.data.gen_capacity))
    return -(-capacity // CHUNK_MULTIPLE) * CHUNK_MULTIPLE


class Chat:
    """A model, its tokenizer and its sampling defaults (`config.sample`).

    Args:
      model: the UnifiedModel (e.g. from `inference.load.load_model`).
      config: its config.
      tokenizer: defaults to `config.data.tokenizer`.
      mesh, rules: where the weights live (see `cache.Engine`).
      capacity: KV-cache slots per conversation row (default `default_capacity`).
    """

    def __init__(self, model, config: ml_collections.ConfigDict, tokenizer=None, *, mesh=None,
                 rules=None, capacity: int | None = None):
        self.config = config
        self.tokenizer = tokenizer or load_tokenizer(config.data.get("tokenizer"))
        self.engine = Engine(model, config, self.tokenizer.special, mesh=mesh, rules=rules)
        self.settings = ImageSettings.from_config(config)
        self.capacity = capacity or default_capacity(config)
        self.has_vit = config.model.vit is not None
        self.cell = self.engine.latent_cell

    @classmethod
    def from_workdir(cls, workdir: str, *, step: int | None = None, weights: str = "ema",
                     mesh=None, rules=None, quantize: str | None = None, **kwargs) -> Chat:
        """The model of a training workdir's checkpoint (see `inference.load.load_model`; a
        LoRA run's adapters are merged into its base), its decoder kernels int8 with
        `quantize="int8"` (`inference.quantize`)."""
        from unijax.inference import load
        from unijax.inference import quantize as quantize_lib

        model, config, info = load.load_model(workdir, step=step, weights=weights, mesh=mesh,
                                              rules=rules, merge_lora=True)
        if quantize:
            model = quantize_lib.quantize_weights(model, quantize)
            info["quantize"] = quantize
            info["quantized_kernels"] = len(quantize_lib.quantized_paths(model))
            info["quantized_bytes"] = quantize_lib.kernel_bytes(model)
        chat = cls(model, config, mesh=mesh, rules=rules, **kwargs)
        chat.info = info
        return chat

    # --- settings -----------------------------------------------------------------------------

    def guidance(self, mode: str = "t2i", **overrides) -> Guidance:
        """The config's guidance for `mode` ("t2i" or "edit"), with overrides."""
        return Guidance.from_config(self.config, mode, **overrides)

    def default_grid(self) -> tuple[int, int]:
        """Latent grid of a square image of `config.data.vae_image_size` pixels."""
        side = int(self.config.data.vae_image_size) // self.cell
        return side, side

    def grid_for(self, size: tuple[int, int] | None) -> tuple[int, int]:
        """Latent grid of an image of `size` = (H, W) pixels (multiples of the latent cell)."""
        if size is None:
            return self.default_grid()
        h, w = (int(s) for s in size)
        limit = int(self.config.model.max_latent_size)
        if h % self.cell or w % self.cell or not (0 < h // self.cell <= limit and
                                                  0 < w // self.cell <= limit):
            raise ValueError(f"image size {(h, w)}: sides must be multiples of {self.cell} "
                             f"pixels and at most {limit * self.cell}")
        return h // self.cell, w // self.cell

    # --- items --------------------------------------------------------------------------------

    def text_item(self, text: str) -> TextItem:
        return TextItem(np.asarray(self.tokenizer.encode(text), np.int32), loss=False)

    def vit_item(self, image: np.ndarray) -> ImageItem:
        """An image to understand (clean VAE latents when the model has no ViT)."""
        if not self.has_vit:
            return self.vae_item(image)
        pixels = images_lib.resize_uint8(_uint8(image), self.settings.vit)
        stride = self.settings.vit.stride
        return ImageItem("vit", pixels, (pixels.shape[0] // stride, pixels.shape[1] // stride))

    def vae_item(self, image: np.ndarray, rule: images_lib.ResizeRule | None = None) -> ImageItem:
        """A clean conditioning image (VAE latents)."""
        rule = rule or self.settings.vae
        pixels = images_lib.resize_uint8(_uint8(image), rule)
        return ImageItem("vae", pixels, (pixels.shape[0] // rule.stride,
                                         pixels.shape[1] // rule.stride))

    def conversation(self, batch_size: int = 1) -> Conversation:
        """`batch_size` empty conversations."""
        empty = Context.empty(self.engine, batch_size, self.capacity)
        return Conversation(self, empty, empty, empty)

    # --- tasks --------------------------------------------------------------------------------

    def answer(self, images: Sequence[np.ndarray | None], questions: Sequence[str], *,
               max_new_tokens: int | None = None, sampling: Sampling = Sampling(),  # noqa: B008
               seed: int = 0) -> list[str]:
        """Answers each question about its image (None: a text-only question)."""
        if len(images) != len(questions):
            raise ValueError(f"answer: {len(images)} images for {len(questions)} questions")
        conv = self.conversation(len(questions))
        conv.add_items([[self.vit_item(im)] if im is not None else [] for im in images])
        conv.add_text(questions)
        return conv.generate_text(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)

    def generate(self, prompts: Sequence[str], *, num_images: int = 1, seed: int = 0,
                 size: tuple[int, int] | None = None, think: bool = False,
                 guidance: Guidance | None = None, max_think_tokens: int | None = None,
                 progress: bool = False) -> list[list[np.ndarray]]:
        """Text-to-image: `num_images` uint8 images per prompt (think: decode a plan first,
        kept in `self.thoughts`)."""
        grid = self.grid_for(size)  # a bad size fails before anything is prefilled
        conv = self.conversation(len(prompts))
        if think:
            conv.add_text([THINK_PROMPT] * len(prompts))
        conv.add_text(prompts)
        self.thoughts = None
        if think:
            conv.thoughts = self.thoughts = conv.generate_text(max_new_tokens=max_think_tokens)
        conv = conv.repeat(num_images)
        out = conv.generate_image(grid, guidance=guidance or self.guidance("t2i"),
                                  seed=seed, progress=progress)
        return [list(out[i * num_images:(i + 1) * num_images]) for i in range(len(prompts))]

    def edit(self, images: Sequence[np.ndarray], instructions: Sequence[str], *, seed: int = 0,
             guidance: Guidance | None = None, progress: bool = False) -> list[np.ndarray]:
        """Edits each image by its instruction; outputs have the (resized) input's size."""
        if len(images) != len(instructions):
            raise ValueError(f"edit: {len(images)} images for {len(instructions)} instructions")
        sources = [self.vae_item(im) for im in images]
        grids = {s.grid for s in sources}
        if len(grids) != 1:
            raise ValueError(f"edit: images of one batch must resize to one latent grid, got "
                             f"{sorted(grids)}; edit them in separate calls")
        conv = self.conversation(len(images))
        rows = [[s] + ([self.vit_item(im)] if self.has_vit else []) for s, im in
                zip(sources, images)]
        conv.add_items(rows)
        conv.add_text(instructions)
        return list(conv.generate_image(grids.pop(), guidance=guidance or self.guidance("edit"),
                                        seed=seed, progress=progress))

    def next_frame(self, prompts: Sequence[str], frames: Sequence[Sequence[np.ndarray]],
                   captions: Sequence[Sequence[str]] | None = None, *, seed: int = 0,
                   guidance: Guidance | None = None, progress: bool = False) -> list[np.ndarray]:
        """The next frame of each clip: its prompt, then each frame (after the caption of what
        changed when `captions` holds one per frame plus one for the frame to make)."""
        if len(prompts) != len(frames):
            raise ValueError(f"next_frame: {len(frames)} clips for {len(prompts)} prompts")
        rule = self.settings.video
        rows, wanted = [], []
        for i, clip in enumerate(frames):
            caps = captions[i] if captions is not None else None
            if caps is not None and len(caps) != len(clip) + 1:
                raise ValueError(f"next_frame: clip {i} has {len(clip)} frames and "
                                 f"{len(caps)} captions; give one per frame and one more")
            row = []
            for k, frame in enumerate(clip):
                if caps and caps[k]:
                    row.append(self.text_item(caps[k]))
                row.append(self.vae_item(frame, rule))
            rows.append(row)
            wanted.append(caps[-1] if caps else "")
        grids = {it.grid for row in rows for it in row if isinstance(it, ImageItem)}
        if len(grids) != 1:
            raise ValueError(f"next_frame: frames must share one latent grid, got {sorted(grids)}")
        conv = self.conversation(len(prompts))  # after the checks: nothing prefilled in vain
        conv.add_text(prompts)
        conv.add_items(rows, text_guidance=False)
        if any(wanted):
            conv.add_text(wanted)
        return list(conv.generate_image(grids.pop(), guidance=guidance or self.guidance("t2i"),
                                        seed=seed, progress=progress))


@dataclasses.dataclass
class Conversation:
    """B conversations and their guidance contexts (see the module docstring)."""

    chat: Chat
    cond: Context
    text_uncond: Context
    image_uncond: Context
    thoughts: list[str] | None = None

    @property
    def batch_size(self) -> int:
        return self.cond.batch_size

    def add_items(self, rows: Sequence[Sequence[TextItem | ImageItem]], *,
                  text_guidance: bool = True) -> Conversation:
        """Appends laid-out items, one list per row: text joins every context, images only
        cond (and text_uncond follows cond unless the items hold text: then it keeps the
        context before them, BAGEL's "before the last text")."""
        engine = self.chat.engine
        has_text = any(isinstance(it, TextItem) for row in rows for it in row)
        texts = [[it for it in row if isinstance(it, TextItem)] for row in rows]
        new_cond = self.cond.append(engine, rows)
        if not (has_text and text_guidance):
            self.text_uncond = new_cond
        else:
            self.text_uncond = self.cond
        self.image_uncond = self.image_uncond.append(engine, texts)
        self.cond = new_cond
        return self

    def add_text(self, texts: Sequence[str]) -> Conversation:
        """Each row's text (the text-unconditional context keeps what came before it)."""
        return self.add_items([[self.chat.text_item(t)] for t in texts])

    def add_image(self, images: Sequence[np.ndarray], *, vit: bool = True,
                  vae: bool = False) -> Conversation:
        """Each row's image: ViT tokens to understand it, clean VAE latents to condition
        generation on it (both: VAE then ViT, as an edit source)."""
        if not (vit or vae):
            raise ValueError("add_image: vit=False and vae=False add nothing")
        rows = []
        for im in images:
            row = [self.chat.vae_item(im)] if vae else []
            if vit and (self.chat.has_vit or not vae):
                row.append(self.chat.vit_item(im))
            rows.append(row)
        return self.add_items(rows)

    def generate_text(self, *, max_new_tokens: int | None = None,
                      sampling: Sampling = Sampling(), seed: int = 0) -> list[str]:  # noqa: B008
        """Each row's answer (greedy by default); it joins cond only."""
        sample = self.chat.config.get("sample") or {}
        limit = max_new_tokens or int(sample.get("max_new_tokens", 64))
        self.cond, ids = text_lib.generate(self.chat.engine, self.cond, max_new_tokens=limit,
                                           sampling=sampling, seed=seed)
        return text_lib.decode(self.chat.tokenizer, ids)

    def generate_image(self, grid: tuple[int, int], *, guidance: Guidance, seed: int = 0,
                       progress: bool = False) -> np.ndarray:
        """One uint8 image [B, H, W, 3] per row, at latent grid `grid`."""
        engine = self.chat.engine
        tokens = image_lib.sample(engine, self.cond, grid, text_uncond=self.text_uncond,
                                  image_uncond=self.image_uncond, guidance=guidance, seed=seed,
                                  progress=progress)
        return image_lib.decode(engine, tokens, grid)

    def repeat(self, n: int) -> Conversation:
        """Each row repeated n times (several samples of one conversation)."""
        if n == 1:
            return self
        return Conversation(self.chat, self.cond.repeat(n), self.text_uncond.repeat(n),
                            self.image_uncond.repeat(n), self.thoughts)


def _uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"an image must be [H, W, 3] (or [H, W]), got shape {image.shape}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.min() >= -1 and image.max() <= 1:
            return images_lib.denormalize(image)
        raise ValueError(f"an image must be uint8 (or float in [-1, 1]), got {image.dtype}")
    return image
