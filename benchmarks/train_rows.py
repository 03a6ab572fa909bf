"""BAGEL-like packed rows for the train-step benchmark (benchmarks/train_step.py).

`packed_rows(rng, config, num_rows)` fills expert-major rows at `config.data`'s capacities
with documents of benchmarks/attention.py's mix (text-to-image, edit, VQA, interleaved text
with noisy + clean VAE and ViT copies of each generated image, plain text), built through
`unijax.batch_builder` so every field of the PackedBatch is the real thing: CE targets on
answers and document text (not on prompts and instructions), flow times t = sigmoid(randn)
(BAGEL's), ViT patches and VAE canvases as uint8 pixels (what the data pipeline emits; random,
so the copies of an image hold different pixels, which costs the same).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from unijax import batch as batch_lib
from unijax import batch_builder as bb
from unijax import config as config_lib

IMAGE_SIDES = (16, 24, 32)  # image sides in ViT patches / latent tokens (attention.py's)


def _document(rng, sides: list[int], und_cap: int) -> list:
    """One BAGEL-like document as batch_builder segments (benchmarks/attention.py's mix)."""
    def text(lo, hi, loss):
        n = int(rng.integers(lo, max(lo + 1, min(hi, und_cap))))
        return bb.text(rng.integers(0, 256, n - 2).tolist(), loss)  # + <im_start>, <im_end>

    side = lambda: int(rng.choice(sides))
    t = lambda: float(1 / (1 + np.exp(-rng.standard_normal())))  # BAGEL: sigmoid(randn)
    kind = rng.choice(["t2i", "edit", "vqa", "interleaved", "text"], p=[.3, .2, .2, .2, .1])
    if kind == "t2i":
        s = side()
        return [text(16, 96, False), bb.vae_image(s, s, noisy=True, t=t())]
    if kind == "edit":
        s = side()
        return [bb.vae_image(s, s), bb.vit_image(s, s), text(8, 48, False),
                bb.vae_image(s, s, noisy=True, t=t())]
    if kind == "vqa":
        # A question about an image of any aspect ratio, then its answer (the CE target).
        return [bb.vit_image(side(), side()), text(8, 48, False), text(16, 256, True)]
    if kind == "interleaved":  # generated images: noisy VAE, its clean copy, its ViT copy
        segs = [text(32, 256, True)]
        for _ in range(int(rng.integers(1, 3))):
            s = min(side(), 24)
            segs += [bb.vae_image(s, s, noisy=True, t=t()), bb.vae_image(s, s), bb.vit_image(s, s),
                     text(32, 256, True)]
        return segs
    return [text(256, 2048, True)]


def _needs(segments: list) -> np.ndarray:
    """[und tokens, gen tokens, ViT patches, VAE slots] a document takes."""
    need = np.zeros(4, np.int64)
    for seg in segments:
        if isinstance(seg, bb.Text):
            need[0] += len(seg.ids) + 2
        elif isinstance(seg, bb.VitImage):
            need += (seg.grid[0] * seg.grid[1] + 2, 0, seg.grid[0] * seg.grid[1], 0)
        else:
            need += (2, seg.grid[0] * seg.grid[1], 0, 1)
    return need


def packed_rows(rng, config: ml_collections.ConfigDict, num_rows: int) -> batch_lib.PackedBatch:
    """`num_rows` rows of BAGEL-like documents at `config.data`'s capacities (first-fit,
    until 8 documents in a row did not fit), uint8 pixels as the data pipeline emits them."""
    data, model = config.data, config.model
    cell = config_lib.latent_cell(model)
    side = data.vae_image_size // cell
    capacity = np.array([data.und_capacity, data.gen_capacity, data.max_vit_patches,
                         data.max_vae_images])
    sides = [s for s in IMAGE_SIDES if s <= side]
    rows = []
    for _ in range(num_rows):
        used, docs, misses = np.zeros(4, np.int64), [], 0
        while misses < 8:
            doc = _document(rng, sides, int(data.und_capacity))
            if np.any(used + _needs(doc) > capacity):
                misses += 1
                continue
            used += _needs(doc)
            docs.append(doc)
        rows.append(docs)
    batch = bb.build(rows, num_und=int(data.und_capacity), num_gen=int(data.gen_capacity),
                     latent_grid=(side, side), latent_cell=cell,
                     vit_patch_size=int(model.vit.patch_size),
                     vit_max_grid=int(model.vit.max_grid),
                     max_latent_size=int(model.max_latent_size),
                     max_vit_patches=int(data.max_vit_patches),
                     max_vae_images=int(data.max_vae_images), seed=int(rng.integers(1 << 30)))
    to_u8 = lambda x: np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
    batch = batch.replace(vit_patches=to_u8(batch.vit_patches), vae_images=to_u8(batch.vae_images))
    batch_lib.validate(batch, latent_tokens_per_image=side * side)
    return batch
