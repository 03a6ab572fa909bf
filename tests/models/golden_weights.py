"""Golden references: deterministic weights, the tiny configs, and reading the fixtures.

`tests/models/make_golden.py` (run once with PyTorch) builds HF transformers / diffusers
modules of the tiny configs below, fills every parameter with `weight(name, ...)`, runs them and
stores the inputs, the outputs and a manifest of the parameters (name, shape, offset, scale) in
`tests/models/golden/*.npz`. The weights themselves are not stored: `state_dict(manifest)`
rebuilds them bit for bit from the names on any machine (an integer hash, no random generator
whose stream could change between numpy versions), so the fixtures stay a few kilobytes and the
tests need no PyTorch. Norm scales lie in [0.5, 1.5] and biases in [-0.2, 0.2]: with the init
values 1 and 0 some operation orders (a norm before or after RoPE, a bias before or after a
norm) give the same numbers, with these they do not.
"""

from __future__ import annotations

import json
import pathlib
import zlib

import numpy as np

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"

# HF Qwen2 / Qwen3 decoder (per expert) and unijax DecoderConfig fields.
DECODER = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=8, intermediate_size=48, rope_theta=10_000.0, rms_norm_eps=1e-6)
# HF SiglipVisionConfig-like fields.
VIT = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, patch_size=4,
           max_grid=6, layer_norm_eps=1e-6)
# diffusers AutoencoderKL (FLUX layout, 2 levels: 2x downsample).
VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=16,
           norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159)
# The unified model: a two-expert decoder over the byte-level vocabulary, a small ViT, the VAE.
UNIFIED = dict(
    llm=dict(DECODER, vocab_size=264),
    vit=dict(VIT, hidden_size=16, intermediate_size=32, num_heads=2, max_grid=4),
    vae=VAE, latent_patch_size=2, max_latent_size=8, latent_grid=(2, 2),
)
NUM_UND = 40  # und slice of the decoder and unified golden batches


def uniform(name: str, shape) -> np.ndarray:
    """Values in [-1, 1) that depend only on `name` and the element index (splitmix64 of
    `crc32(name) << 32 + index`, top 24 bits; exact in float32), float64 of `shape`."""
    n = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(zlib.crc32(name.encode()) << 32)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float64) / 2.0**23 - 1.0).reshape(tuple(shape))


def weight(name: str, shape, offset: float, scale: float) -> np.ndarray:
    """The float32 parameter `offset + scale * uniform(name, shape)`."""
    return (offset + scale * uniform(name, shape)).astype(np.float32)


def state_dict(manifest: dict) -> dict[str, np.ndarray]:
    """{name: [shape, offset, scale]} -> {name: float32 array}, the HF-named weights."""
    return {name: weight(name, shape, offset, scale)
            for name, (shape, offset, scale) in manifest.items()}


def load(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Reads `golden/<name>.npz`: (arrays, HF-named weights rebuilt from its manifest)."""
    with np.load(GOLDEN_DIR / f"{name}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    manifest = json.loads(str(arrays.pop("manifest")))
    return arrays, state_dict(manifest)
