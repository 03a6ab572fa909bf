"""unijax: JAX/TPU pretraining of unified multimodal (understanding + generation) models."""

import setuptools

_CORE = [
    "absl-py>=2.1",
    "array-record>=0.7",
    "chex>=0.1.88",
    "clu>=0.0.12",
    "einops>=0.8",
    "flax>=0.12.8",
    "grain>=0.2.12",
    "jax>=0.10.2",
    "ml_collections>=1.0",
    "msgpack>=1.0",
    "numpy>=1.26",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.20",
    "pillow>=10.0",
    "pyarrow>=15.0",
    "qwix>=0.1.8",  # int8 weight-only sampling (unijax.inference.quantize)
    "scikit-learn>=1.5",
    "scipy>=1.11",
    "tensorboardX>=2.6",
    "tensorflow-datasets>=4.9.7",
    "tokenizers>=0.20",
]

_TEST = [
    "pytest>=8.0",
    "pytest-xdist>=3.6",
    "hypothesis>=6.100",
    "ruff>=0.6",
    "nbmake>=1.5",
    "ipykernel>=6.29",
    "matplotlib>=3.8",  # the notebooks' figures (tests/notebooks executes them)
    "scikit-image>=0.24",
    "safetensors>=0.4",
    "filelock>=3.12",  # jax's compilation-cache lock, shared by the test workers (conftest.py)
]

# The PyTorch reference stack for numerical parity tests. torch is pinned exactly: on Python 3.11
# this resolves to the CPU wheel; any other version pulls a multi-GB CUDA build.
_PARITY = [
    "torch==2.13.0",
    "transformers>=4.56",
    "diffusers>=0.35",
]

setuptools.setup(
    name="unijax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["unijax", "unijax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=_CORE,
    extras_require={
        "test": _TEST + _PARITY,
        "test-noparity": _TEST,
        "video": ["av>=14.0"],
    },
)
