"""Sequence planning: a record becomes the ordered list of items one document packs into.

As in BAGEL (`data/dataset_base.py`, `interleave_t2i_dataset.py`), a plan item is text (with or
without next-token loss) or an image in one of three roles:

  ViT image      understood (und expert); clean, visible to every later token
  clean VAE      conditioning latents (edit sources, earlier video frames, copies of generated
                 images), flow time t = 0
  noisy VAE      a generation target at flow time t = sigmoid(N(0, 1)), flow loss; nothing
                 outside its span ever sees it

Roles map to items as follows (`records.py` documents the roles):
  text prompt -> text, no loss;  response -> text + loss;  context -> text + loss (option)
  image input -> ViT;  source -> clean VAE, ViT;  target -> noisy VAE (+ clean VAE, ViT when
  more of the document follows);  context -> the BAGEL triple noisy VAE -> clean VAE -> ViT
  ("generate") or ViT only ("understand")
  video target -> leading context frames as clean VAE, then the other frames noisy, either as
  one bidirectional group (no captions; BAGEL `_add_video`) or interleaved with the per-frame
  captions of what changed, each generated frame followed by its clean copy
  video input -> one ViT image per frame, each followed by its caption (with loss)

Classifier-free guidance: every item that conditions a later noisy target is dropped with the
dataset's probability (text 0.1, ViT 0.3, clean VAE 0.3 in BAGEL); understanding-only documents
are never dropped from, and a video group is dropped whole. Image start/end markers are added
at packing. All randomness comes from the Generator passed in, so a plan is a function of
(record, seed).

RoPE positions (BAGEL `dataset_base.py` `pack_sequence`): text advances one per token, a clean
image by one, a noisy image by zero (its clean copy takes the same position). An image dropped
for CFG still advances the position by one (BAGEL does the same per dropped ViT/VAE image, so a
dropped group of k frames advances by k); dropped text advances nothing. The advance of dropped
images is stored as `gap` on the next item that is kept.

Video generation, two layouts:
  grouped (no captions; BAGEL `_add_video`): the `video_context_frames` leading frames form one
    clean bidirectional span, the other frames one noisy span (one split, in both noise modes):
    "shared" draws one flow time for it (BAGEL's shared timestep), "independent" one per frame
    ("diffusion forcing" style). A frame advances the position by its frame-index delta to the
    next kept frame (index = round(timestamp * fps) on the record's sampling grid, so
    subsampling to `max_video_frames` gives deltas above 1; at least 1), the clip's last
    (noisy) frame by zero. The last context frame also advances by the delta to the first
    generated frame, keeping the clip on one time axis (BAGEL, calling `_add_video` once per
    group, would advance by one there).
  captioned: each frame follows the caption of what changed and is its own split, a noisy
    frame then its clean copy, positioned by the image rule (+0, +1: text lies between
    frames). "shared": one flow time for every frame of the clip; "independent": one per frame.

CE length reweighting (`ce_loss_reweighting`, BAGEL's `--ce_loss_reweighting` with
`len2weight('square')`): every token of a text with loss gets the CE weight 1 / sqrt(n)
instead of 1, n the number of tokens of that text that carry a target (`<|im_start|>` and the
ids, BAGEL's split length; one fewer for text cut by truncation, as it is computed at
packing). BAGEL then normalises the CE sum by the sum of the weights, not the token count.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from unijax.data import images as images_lib
from unijax.data.records import RecordError

INTERLEAVED_IMAGE_MODES = ("generate", "understand")
VIDEO_NOISE_MODES = ("shared", "independent")


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """Per-dataset planning options (a `config.data.datasets.<name>` entry holds the same)."""

    text_cond_dropout: float = 0.1
    vit_cond_dropout: float = 0.3
    vae_cond_dropout: float = 0.3
    context_text_loss: bool = True
    interleaved_images: str = "generate"
    video_noise: str = "shared"
    video_context_frames: int = 1
    video_captions: bool = True
    video_caption_loss: bool = False
    max_video_frames: int = 16
    video_frame_size: int = 0  # pixels, long side of a VAE video frame; 0 = vae_image_size
    ce_loss_reweighting: bool = False  # CE weight 1/sqrt(n) per text of n loss tokens (BAGEL)

    def __post_init__(self):
        for name in ("text_cond_dropout", "vit_cond_dropout", "vae_cond_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PlanOptions.{name} must be in [0, 1], got "
                                 f"{getattr(self, name)}")
        if self.interleaved_images not in INTERLEAVED_IMAGE_MODES:
            raise ValueError(f"PlanOptions.interleaved_images must be one of "
                             f"{INTERLEAVED_IMAGE_MODES}, got {self.interleaved_images!r}")
        if self.video_noise not in VIDEO_NOISE_MODES:
            raise ValueError(f"PlanOptions.video_noise must be one of {VIDEO_NOISE_MODES}, "
                             f"got {self.video_noise!r}")
        if not isinstance(self.ce_loss_reweighting, bool):
            raise ValueError(f"PlanOptions.ce_loss_reweighting must be a bool, got "
                             f"{self.ce_loss_reweighting!r}")
        if self.max_video_frames < 1 or self.video_context_frames < 0:
            raise ValueError(f"PlanOptions: max_video_frames={self.max_video_frames} must be "
                             f">= 1 and video_context_frames={self.video_context_frames} >= 0")

    @classmethod
    def from_config(cls, entry) -> PlanOptions:
        """The options named in a dataset config entry (other fields are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: entry[k] for k in names if k in entry})


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """Resolution rules of one dataset (from the config; see `images.ResizeRule`).

    Attributes:
      vit: the ViT rule, or None when the model has no ViT (understood images then enter as
        clean VAE latents, Transfusion-style).
      vae: the VAE rule (images to generate or condition on).
      video: the VAE rule for video frames (usually a smaller long side).
      vit_patch, vae_cell: pixels per ViT patch / per latent token side.
      max_pixels: decode limit; larger images are skipped as "image_too_large".
    """

    vit: images_lib.ResizeRule | None
    vae: images_lib.ResizeRule
    video: images_lib.ResizeRule
    max_pixels: int = images_lib.DEFAULT_MAX_PIXELS

    @classmethod
    def from_config(cls, config, options: PlanOptions = PlanOptions()) -> ImageSettings:  # noqa: B008
        """Rules from `config.data` and `config.model` (see configs/base.py)."""
        data, model = config.data, config.model
        vit = None
        if model.vit is not None:
            budget = min(data.max_vit_patches, data.und_capacity - 2)
            vit = images_lib.ResizeRule(data.vit_image_size,
                                        min(data.vit_min_image_size, data.vit_image_size),
                                        model.vit.patch_size, budget)
        cell = (8 if model.vae is not None else 1) * model.latent_patch_size
        budget = min(data.gen_capacity, model.max_latent_size ** 2)
        vae = images_lib.ResizeRule(data.vae_image_size,
                                    min(data.vae_min_image_size, data.vae_image_size), cell,
                                    budget)
        side = options.video_frame_size or data.vae_image_size
        video = images_lib.ResizeRule(side, min(data.vae_min_image_size, side), cell, budget)
        return cls(vit, vae, video, data.max_image_pixels)


@dataclasses.dataclass
class TextItem:
    """Text tokens (without BAGEL's `<|im_start|>` / `<|im_end|>`, added at packing).

    `closed=False` marks text cut by truncation: no `<|im_end|>` follows and its last token
    predicts nothing. `length_weighted`: CE weight 1/sqrt(tokens with a target) per token
    instead of 1 (`PlanOptions.ce_loss_reweighting`). `gap`: RoPE positions left unused before
    the text (images dropped for CFG just before it).
    """

    ids: np.ndarray  # int32 [n]
    loss: bool
    closed: bool = True
    length_weighted: bool = False
    gap: int = 0


@dataclasses.dataclass
class ImageItem:
    """One image in the sequence.

    Attributes:
      kind: "vit" or "vae".
      pixels: [gh * stride, gw * stride, 3], uint8 in [0, 255]: the resized pixels, rounded
        once; packed rows carry them as they are (the model normalises them).
      grid: (gh, gw) ViT patches or latent tokens.
      noisy: a generation target (flow loss at time t); False for conditioning.
      t: flow time in (0, 1] when noisy, else 0.
      group: consecutive items of one document with the same group >= 0 form one
        bidirectional span (video frames); -1: the image is its own span.
      step: how far the RoPE position moves after the image (0 noisy, 1 clean, the
        frame-index delta inside a video clip).
      gap: RoPE positions left unused before the image (images dropped for CFG before it).
    """

    kind: str
    pixels: np.ndarray
    grid: tuple[int, int]
    noisy: bool = False
    t: float = 0.0
    group: int = -1
    step: int = 1
    gap: int = 0


@dataclasses.dataclass(frozen=True)
class DocKey:
    """Where a document came from (for logs, skip reports and exact-coverage tests)."""

    dataset: str
    path: str
    index: int
    record_id: str = ""


@dataclasses.dataclass
class SequencePlan:
    """The items of one document, in causal order."""

    items: list[TextItem | ImageItem]
    key: DocKey

    def cost(self) -> tuple[int, int, int, int]:
        """(und tokens, gen tokens, ViT patches, VAE images) the plan occupies in a row."""
        und = gen = vit = vae = 0
        for item in self.items:
            if isinstance(item, TextItem):
                und += len(item.ids) + 1 + int(item.closed)
                continue
            n = item.grid[0] * item.grid[1]
            und += 2
            if item.kind == "vit":
                und += n
                vit += n
            else:
                gen += n
                vae += 1
        return und, gen, vit, vae

    @property
    def has_loss(self) -> bool:
        """Whether any item carries a loss (text CE or flow)."""
        return any((isinstance(i, TextItem) and i.loss and len(i.ids) > 0) or
                   (isinstance(i, ImageItem) and i.noisy) for i in self.items)


def flow_time(rng: np.random.Generator) -> float:
    """t = sigmoid(N(0, 1)) (logit-normal, BAGEL's training draw), kept inside (0, 1]."""
    return float(min(1.0, max(1e-5, 1.0 / (1.0 + math.exp(-rng.standard_normal())))))


class _Builder:
    """Accumulates items; the cfg tag says which dropout may remove an item."""

    def __init__(self, settings: ImageSettings, options: PlanOptions, rng: np.random.Generator):
        self.items: list[TextItem | ImageItem] = []
        self.cfg: list[str | None] = []
        self.settings, self.options, self.rng = settings, options, rng
        self.groups = 0

    def text(self, ids: list[int], loss: bool) -> None:
        if ids:
            weighted = loss and self.options.ce_loss_reweighting
            self.items.append(TextItem(np.asarray(ids, np.int32), loss, length_weighted=weighted))
            self.cfg.append("text")

    def image(self, pixels: np.ndarray, kind: str, noisy: bool = False, t: float = 0.0,
              group: int = -1, step: int | None = None, rule=None, fit: bool = True) -> None:
        """Appends an image; `fit=False` when `pixels` are already resized to `rule`."""
        if kind == "vit" and self.settings.vit is None:
            kind = "vae"  # no ViT: understood images enter as clean latents
        rule = rule or (self.settings.vit if kind == "vit" else self.settings.vae)
        if fit:
            pixels = images_lib.resize_uint8(pixels, rule)
        grid = (pixels.shape[0] // rule.stride, pixels.shape[1] // rule.stride)
        step = (0 if noisy else 1) if step is None else step
        self.items.append(ImageItem(kind, pixels, grid, noisy, t if noisy else 0.0, group, step))
        self.cfg.append(None if noisy else kind)

    def new_group(self) -> int:
        self.groups += 1
        return self.groups - 1


def _kept_frames(n: int, options: PlanOptions) -> list[int]:
    """Indices of the frames kept: all, or max_video_frames spread evenly."""
    if n <= options.max_video_frames:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, options.max_video_frames).round().astype(int)))


def _frame_deltas(seg, keep: list[int]) -> list[int]:
    """Per kept frame but the last, the frame-index distance to the next kept frame (>= 1).

    A frame's index is its timestamp on the record's sampling grid, round(t * fps): BAGEL's
    `frame_indexes` (positions in the sampled video), whose differences are its `frame_delta`.
    """
    index = [round(seg["timestamps"][k] * seg["fps"]) for k in keep]
    return [max(1, b - a) for a, b in zip(index, index[1:])]


def _decode_frames(seg, keep: list[int], settings: ImageSettings) -> list[np.ndarray]:
    try:
        return [images_lib.decode_image(seg["frames"][i], settings.max_pixels) for i in keep]
    except RecordError as e:
        raise RecordError(f"video frame: {e}", "video_decode") from e


def _frame_captions(seg, keep: list[int], options: PlanOptions) -> list[str] | None:
    """Per kept frame, what changed since the previous kept frame (skipped frames' captions
    are joined into the next kept one)."""
    caps = seg.get("captions")
    if not options.video_captions or not caps or not any(caps):
        return None
    out, prev = [], -1
    for k in keep:
        out.append(" ".join(c for c in caps[prev + 1:k + 1] if c))
        prev = k
    return out


def _plan_video(b: _Builder, seg, tokenizer, options: PlanOptions) -> None:
    keep = _kept_frames(len(seg["frames"]), options)
    frames = _decode_frames(seg, keep, b.settings)
    caps = _frame_captions(seg, keep, options)
    rule = b.settings.video
    if seg["role"] == "input":
        for i, frame in enumerate(frames):
            b.image(frame, "vit")
            if caps and caps[i]:
                b.text(tokenizer.encode(caps[i]), loss=True)
        return
    n_ctx = min(options.video_context_frames, len(frames) - 1)
    shared_t = flow_time(b.rng)
    t_of = (lambda: shared_t) if options.video_noise == "shared" else (lambda: flow_time(b.rng))
    if caps:
        for i, frame in enumerate(frames):
            if caps[i]:
                b.text(tokenizer.encode(caps[i]), loss=options.video_caption_loss)
            pixels = images_lib.resize_uint8(frame, rule)
            if i >= n_ctx:
                b.image(pixels, "vae", noisy=True, t=t_of(), rule=rule, fit=False)
            if i < n_ctx or i < len(frames) - 1:
                # A context frame, or the clean copy later frames condition on.
                b.image(pixels, "vae", rule=rule, fit=False)
        return
    steps = [*_frame_deltas(seg, keep), 0]  # the clip's last frame is noisy: no advance
    if n_ctx:
        ctx = b.new_group()
        for frame, step in zip(frames[:n_ctx], steps):
            b.image(frame, "vae", group=ctx, step=step, rule=rule)
    gen = b.new_group()
    for frame, step in zip(frames[n_ctx:], steps[n_ctx:]):
        b.image(frame, "vae", noisy=True, t=t_of(), group=gen, step=step, rule=rule)


def _drop_conditions(b: _Builder, options: PlanOptions) -> list[TextItem | ImageItem]:
    """CFG dropout of items before the last noisy target (groups are dropped whole).

    A dropped image leaves one RoPE position unused (the next kept item's `gap`), as BAGEL's
    `pack_sequence` advances its counter for a dropped ViT/VAE image but not for dropped text.
    """
    noisy = [i for i, it in enumerate(b.items) if isinstance(it, ImageItem) and it.noisy]
    if not noisy:
        return b.items
    prob = {"text": options.text_cond_dropout, "vit": options.vit_cond_dropout,
            "vae": options.vae_cond_dropout}
    keep, group_kept, gap = [], {}, 0
    for i, (item, tag) in enumerate(zip(b.items, b.cfg)):
        if i < noisy[-1] and tag is not None:
            group = item.group if isinstance(item, ImageItem) else -1
            if group >= 0 and group in group_kept:
                drop = not group_kept[group]
            else:
                drop = bool(b.rng.random() < prob[tag])
                if group >= 0:
                    group_kept[group] = not drop
            if drop:
                gap += isinstance(item, ImageItem)
                continue
        if gap:
            item = dataclasses.replace(item, gap=item.gap + gap)
            gap = 0
        keep.append(item)
    return keep


def plan_record(record: dict, tokenizer, options: PlanOptions, settings: ImageSettings,
                rng: np.random.Generator, key: DocKey | None = None) -> SequencePlan:
    """Turns a validated record into a sequence plan.

    Args:
      record: a record as `records.decode_record` returns it.
      tokenizer: `unijax.data.tokenizer` ByteTokenizer or HFTokenizer.
      options: the dataset's planning options.
      settings: the resolution rules.
      rng: the only source of randomness (flow times, CFG dropout).
      key: the document's origin, stored on the plan.

    Raises:
      RecordError: an image or video frame that does not decode or is too large.
    """
    b = _Builder(settings, options, rng)
    segments = record["segments"]
    for i, seg in enumerate(segments):
        more_follows = i < len(segments) - 1
        if seg["type"] == "text":
            role = seg["role"]
            loss = role == "response" or (role == "context" and options.context_text_loss)
            b.text(tokenizer.encode(seg["text"]), loss)
        elif seg["type"] == "video":
            _plan_video(b, seg, tokenizer, options)
        else:
            image = images_lib.decode_image(seg["bytes"], settings.max_pixels)
            role = seg["role"]
            if role == "input" or (role == "context" and
                                   options.interleaved_images == "understand"):
                b.image(image, "vit")
            elif role == "source":
                b.image(image, "vae")
                if settings.vit is not None:
                    b.image(image, "vit")
            else:  # target, or context generated the BAGEL way
                pixels = images_lib.resize_uint8(image, settings.vae)
                b.image(pixels, "vae", noisy=True, t=flow_time(rng), fit=False)
                if more_follows:
                    b.image(pixels, "vae", fit=False)
                    if settings.vit is not None:
                        b.image(image, "vit")
    key = key or DocKey("", "", -1, record.get("id", ""))
    return SequencePlan(_drop_conditions(b, options), key)
