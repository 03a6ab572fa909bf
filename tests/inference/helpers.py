"""A small random unified model and its context engine, for the inference tests.

Every weight is perturbed away from its initial value (llm2vae starts at zero, norms at one), so
velocities and logits depend on everything the tests compare.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from tests.training import small_config
from unijax.data import packing
from unijax.data.plan import DocKey, ImageItem, SequencePlan, TextItem
from unijax.data.tokenizer import ByteTokenizer
from unijax.inference.cache import Engine
from unijax.models.unified import UnifiedModel

TOKENIZER = ByteTokenizer()


def config():
    c = small_config.get_config()
    c.model.dtype = "float32"
    return c


def random_model(cfg, seed: int = 0) -> UnifiedModel:
    model = UnifiedModel(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


def engine(cfg=None, model=None, **kwargs) -> Engine:
    cfg = cfg or config()
    model = model or random_model(cfg)
    return Engine(model, cfg, TOKENIZER.special, **kwargs)


def text(s: str, loss: bool = False) -> TextItem:
    return TextItem(np.asarray(TOKENIZER.encode(s), np.int32), loss)


def pixels(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def vit_image(side: int = 16, seed: int = 0, patch: int = 4) -> ImageItem:
    return ImageItem("vit", pixels(side, seed), (side // patch, side // patch))


def vae_image(side: int = 32, seed: int = 0, cell: int = 4, noisy: bool = False,
              t: float = 0.0) -> ImageItem:
    return ImageItem("vae", pixels(side, seed), (side // cell, side // cell), noisy=noisy,
                     t=t if noisy else 0.0, step=0 if noisy else 1)


def full_batch(cfg, rows: list[list]):
    """One document per row, laid out as training does (the config's row capacities)."""
    spec = packing.PackSpec.from_config(cfg, TOKENIZER.special)
    plans = [[SequencePlan(list(items), DocKey("", "", -1))] for items in rows]
    return packing.to_packed_batch(packing.layout(plans, spec), spec)
