"""PackSpec: the shapes of a packed row and the constants of its token layout, from the config.

  spec = PackSpec.from_config(config, special=tokenizer.special)

Four budgets per row (und tokens, gen tokens, ViT patch slots, VAE image slots), the sides of
the 2D position tables, the VAE canvas in latent tokens, what to do with an overlong document,
the look-ahead buffer, and the dataset names whose positions are the rows' `dataset_id`s.
`data/packing.py` places documents into rows of these shapes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unijax.batch_builder import SpecialTokens

OVERLONG_MODES = ("truncate", "drop")
DEFAULT_PACK_BUFFER = 16  # documents held back for a later batch (BAGEL: 50 samples)
DEFAULT_MAX_DATASETS = 16  # per-dataset metric buckets (a static shape of the train step)


def dataset_names(config) -> tuple[str, ...]:
    """The names of `config.data.datasets`, sorted: position k is `dataset_id` k."""
    return tuple(sorted(config.data.datasets.keys()))


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Row shapes and token-layout constants.

    Attributes:
      num_und, num_gen: per-row und / gen token capacities.
      max_vit_patches, max_vae_images: per-row ViT patch and VAE image slots.
      vit_patch: ViT patch side in pixels.
      vit_max_grid, max_latent_size: sides of the 2D position tables (patch_pos).
      latent_cell: pixels per latent-token side.
      latent_grid: (gh, gw) latent tokens of the VAE canvas (the largest VAE image).
      overlong: "truncate" or "drop" for a document larger than an empty row.
      special: ids of BAGEL's marker tokens.
      pack_buffer: documents that fit no open row held back for a later batch (`RowPacker`);
        0: first-fit without look-ahead.
      datasets: sorted dataset names (`dataset_names`); a document's `dataset_id` is the index
        of its `DocKey.dataset` here (0 without names, or for a document of no dataset, "").
      max_datasets: the bound on len(datasets) (`config.data.max_datasets`).
    """

    num_und: int
    num_gen: int
    max_vit_patches: int
    max_vae_images: int
    vit_patch: int
    vit_max_grid: int
    max_latent_size: int
    latent_cell: int
    latent_grid: tuple[int, int]
    overlong: str = "truncate"
    special: SpecialTokens = SpecialTokens()
    pack_buffer: int = DEFAULT_PACK_BUFFER
    datasets: tuple[str, ...] = ()
    max_datasets: int = DEFAULT_MAX_DATASETS

    def __post_init__(self):
        if self.overlong not in OVERLONG_MODES:
            raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {self.overlong!r}")
        if self.pack_buffer < 0:
            raise ValueError(f"pack_buffer must be >= 0, got {self.pack_buffer}")
        if self.max_datasets < max(len(self.datasets), 1):
            raise ValueError(f"config.data.max_datasets={self.max_datasets} is below the "
                             f"{len(self.datasets)} datasets {self.datasets} (or 1)")

    def dataset_index(self, name: str) -> int:
        """The `dataset_id` of a document of dataset `name` (ValueError for an unknown one)."""
        if name and self.datasets and name not in self.datasets:
            raise ValueError(f"document of dataset {name!r}: not one of the packed datasets "
                             f"{self.datasets} (config.data.datasets)")
        return self.datasets.index(name) if name and self.datasets else 0

    @classmethod
    def from_config(cls, config, special: SpecialTokens = SpecialTokens()) -> PackSpec:  # noqa: B008
        """Shapes from `config.data` and `config.model`."""
        data, model = config.data, config.model
        cell = (8 if model.vae is not None else 1) * model.latent_patch_size
        side = data.vae_image_size // cell
        vit_patch = model.vit.patch_size if model.vit is not None else 1
        vit_grid = model.vit.max_grid if model.vit is not None else 1
        return cls(data.und_capacity, data.gen_capacity, data.max_vit_patches,
                   data.max_vae_images, vit_patch, vit_grid, model.max_latent_size, cell,
                   (side, side), data.get("overlong", "truncate"), special,
                   data.get("pack_buffer", DEFAULT_PACK_BUFFER), dataset_names(config),
                   data.get("max_datasets", DEFAULT_MAX_DATASETS))

    @property
    def capacity(self) -> np.ndarray:
        """[und, gen, vit patches, vae images] of one row."""
        return np.array([self.num_und, self.num_gen, self.max_vit_patches, self.max_vae_images])
