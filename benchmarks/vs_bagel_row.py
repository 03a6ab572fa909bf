"""The model shapes and the packed row of `benchmarks/vs_bagel.py`, built once as a unijax
PackedBatch with its flow inputs (`vs_bagel_torch.py` expresses it as BAGEL's packed dict).

  row = build_row(2048, documents=4, shape=MODELS["issue"])
  row.batch, row.x0, row.noise, row.image_times      # what unijax's loss takes
  row.padded_latent(), row.grid_index()              # BAGEL's latent layout
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from einops import rearrange

from unijax import batch as batch_lib
from unijax import batch_builder as bb

# Model shapes: the issue's, and a tiny one for smoke tests. `vit_grid` is the side of the ViT
# position tables (BAGEL's vit_max_num_patch_per_side), `latent_grid` BAGEL's max_latent_size.
MODELS = {
    "issue": dict(vocab_size=4096, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
                  head_dim=64, intermediate_size=1536, vit_hidden=128, vit_layers=2,
                  vit_heads=2, vit_mlp=512, vit_grid=32, latent_grid=32),
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, vit_hidden=32, vit_layers=1, vit_heads=2,
                 vit_mlp=64, vit_grid=16, latent_grid=16),
}
ROPE_THETA, RMS_EPS, VIT_PATCH, LATENT_CHANNELS, LATENT_PATCH = 1e6, 1e-6, 14, 16, 2
KINDS = ("vqa", "t2i", "edit", "text")


def special_tokens(vocab_size: int) -> bb.SpecialTokens:
    """BAGEL's four special tokens as the last ids of the vocabulary."""
    return bb.SpecialTokens(im_start=vocab_size - 4, im_end=vocab_size - 3,
                            vision_start=vocab_size - 2, vision_end=vocab_size - 1)


@dataclasses.dataclass
class Row:
    """One packed row and its flow inputs (unijax layout; `vs_bagel_torch` derives BAGEL's).

    batch: PackedBatch [1, L] (expert-major). x0, noise: [1, N*gh*gw, p*p*C] clean latent
    tokens and noise on the latent grid (zero outside each image). image_times: [1, N] t of
    each VAE image (0 = clean). kinds: the document kinds, in row order.
    """

    batch: batch_lib.PackedBatch
    x0: np.ndarray
    noise: np.ndarray
    image_times: np.ndarray
    latent_grid: tuple[int, int]
    kinds: tuple[str, ...]

    def grid_index(self) -> np.ndarray:
        """Latent-grid index of each VAE token in sequence (BAGEL's packed) order."""
        b = self.batch
        vae = np.nonzero(b.modality[0] == batch_lib.VAE)[0]
        return b.payload_index[0, vae[np.argsort(b.order[0, vae])]]

    def padded_latent(self) -> np.ndarray:
        """[N, C, p*gh, p*gw] clean latents per image (BAGEL's `padded_latent`)."""
        gh, gw = self.latent_grid
        return rearrange(self.x0[0], "(n gh gw) (p q c) -> n c (gh p) (gw q)", gh=gh, gw=gw,
                         p=LATENT_PATCH, q=LATENT_PATCH)

    def with_draws(self, packed_noise: np.ndarray, image_times: np.ndarray) -> Row:
        """The row with noise given per VAE token in sequence order ([T_vae, F]) and [N] times."""
        noise = np.zeros_like(self.noise)
        noise[0, self.grid_index()] = packed_noise
        times = np.asarray(image_times, np.float32)[None]
        return dataclasses.replace(self, batch=self.batch.replace(vae_timestep=times),
                                   noise=noise, image_times=times)


def _document(kind: str, share: int, rng, vit_cap: int, latent_cap: int, vocab: int):
    """Segments of one document of about `share` tokens; the text absorbs the rest exactly.
    (Noisy images get a placeholder t; `build_row` draws the real ones.)"""
    side = lambda frac, cap: max(1, min(math.isqrt(int(frac * share)), cap))
    ids = lambda n: [int(i) for i in rng.integers(0, vocab - 4, n)]
    images = {"vqa": [bb.vit_image(*(side(0.45, vit_cap),) * 2)],
              "t2i": [bb.vae_image(*(side(0.75, latent_cap),) * 2, noisy=True, t=0.5)],
              "edit": [bb.vae_image(*(side(0.25, latent_cap),) * 2),
                       bb.vit_image(*(side(0.25, vit_cap),) * 2),
                       bb.vae_image(*(side(0.25, latent_cap),) * 2, noisy=True, t=0.5)],
              "text": []}[kind]
    image_tokens = sum(s.grid[0] * s.grid[1] + 2 for s in images)
    texts = 2 if kind == "vqa" else 1
    free = share - image_tokens - 2 * texts  # ids left for the text segments
    if free < texts:
        raise ValueError(f"a {kind} document needs more than {share} tokens")
    if kind == "vqa":
        question = max(1, free // 5)
        return [*images, bb.text(ids(question)), bb.text(ids(free - question), loss=True)]
    if kind == "t2i":
        return [bb.text(ids(free)), *images]
    if kind == "edit":
        return [*images[:2], bb.text(ids(free)), images[2]]
    return [bb.text(ids(free), loss=True)]


def build_row(length: int, documents: int = 4, shape: dict | None = None,
              seed: int = 0) -> Row:
    """A packed row of exactly `length` tokens holding `documents` documents (kinds cycle
    through `KINDS`), no padding; flow times from a logit-normal and noise from numpy (the BAGEL
    half replaces both with its own draws, `Row.with_draws`)."""
    s = MODELS["issue"] if shape is None else shape
    rng = np.random.default_rng(seed)
    kinds = tuple(KINDS[i % len(KINDS)] for i in range(documents))
    shares = [length // documents] * documents
    shares[-1] += length - sum(shares)
    docs = [_document(k, n, rng, s["vit_grid"], s["latent_grid"], s["vocab_size"])
            for k, n in zip(kinds, shares)]
    vae = [seg for doc in docs for seg in doc if isinstance(seg, bb.VaeImage)]
    vit = [seg for doc in docs for seg in doc if isinstance(seg, bb.VitImage)]
    num_gen = sum(v.grid[0] * v.grid[1] for v in vae)
    grid = (max([v.grid[0] for v in vae], default=1), max([v.grid[1] for v in vae], default=1))
    patches = sum(v.grid[0] * v.grid[1] for v in vit)
    # latent_cell 4: the stand-in VAE of `vs_bagel.unijax_config` (2x down, 2x2 patches); its
    # canvas is never encoded, the latents are given.
    batch = bb.build([docs], num_und=length - num_gen, num_gen=num_gen, latent_grid=grid,
                     latent_cell=4, vit_patch_size=VIT_PATCH, vit_max_grid=s["vit_grid"],
                     max_latent_size=s["latent_grid"], max_vit_patches=max(patches, 1),
                     max_vae_images=max(len(vae), 1),
                     special=special_tokens(s["vocab_size"]), seed=seed)
    n, feat = batch.vae_grid_hw.shape[1], LATENT_PATCH ** 2 * LATENT_CHANNELS
    inside = (np.arange(grid[0])[None, :, None] < batch.vae_grid_hw[0, :, 0, None, None]) & \
             (np.arange(grid[1])[None, None, :] < batch.vae_grid_hw[0, :, 1, None, None])
    inside = inside.reshape(1, -1, 1)  # [1, N*gh*gw, 1]: grid tokens that belong to an image
    draw = lambda: np.where(inside, rng.standard_normal((1, inside.shape[1], feat)), 0.0)
    x0, noise = draw().astype(np.float32), draw().astype(np.float32)
    noisy = np.array([v.noisy for v in vae] or [False])
    t = np.where(noisy, 1 / (1 + np.exp(-rng.standard_normal(n))), 0.0).astype(np.float32)
    batch = batch.replace(vae_timestep=t[None])
    return Row(batch, x0, noise, t[None], grid, kinds)
