"""Writing the embedded worlds as ArrayRecord shards, once, and pointing a config at them.

  manifest = write_worlds("/tmp/worlds", WorldSettings())      # always writes
  manifest = ensure_worlds("/tmp/worlds", WorldSettings())     # writes only when absent/stale
  config = resolve_world_paths(config, "/tmp/worlds")          # "{worlds}/..." -> real paths

Layout under the directory:
  shapes/train-00000-of-00002.array_record ...   shapes/eval-00000-of-00001.array_record
  digits/train-00000-of-00001.array_record ...   digits/eval-00000-of-00001.array_record
  manifest.json   the settings, and records per shard and per kind (written last: a directory
                  without it, or with other settings, is rewritten)

Records are pure functions of (seed, split, kind, index), so the same settings write
byte-identical shards. Digits train records come from the training split only; the held-out
split feeds only the eval shards.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time

import ml_collections

from unijax.data import records
from unijax.data.worlds import digits, shapes

GENERATORS = {"shapes": shapes.generate, "digits": digits.generate}
MANIFEST = "manifest.json"
PLACEHOLDER = "{worlds}"


@dataclasses.dataclass(frozen=True)
class WorldSettings:
    """Records per world and split, image side in pixels, dataset seed, and the shapes train
    split's kinds per cycle (`shapes.parse_mix`; "" is shapes.DEFAULT_MIX, the eval split
    always uses DEFAULT_MIX so held-out metrics cover every kind)."""

    shapes_train: int = 2000
    shapes_eval: int = 260
    digits_train: int = 1000
    digits_eval: int = 300
    image_size: int = 32
    seed: int = 0
    records_per_shard: int = 1000
    shapes_mix: str = ""

    def __post_init__(self):
        shapes.parse_mix(self.shapes_mix)  # a bad mix fails here, before anything is written

    @classmethod
    def field_types(cls) -> dict[str, type]:
        """{field name: str or int}, for parsing the settings from configs and flags."""
        return {f.name: (str if f.type in (str, "str") else int) for f in dataclasses.fields(cls)}

    @classmethod
    def from_config(cls, worlds: ml_collections.ConfigDict | None) -> WorldSettings:
        """From `config.data.worlds` (missing fields keep their defaults)."""
        if worlds is None:
            return cls()
        types = cls.field_types()
        return cls(**{k: types[k](v) for k, v in worlds.items() if k in types})


def write_world(out_dir: str, world: str, split: str, count: int, *, seed: int,
                image_size: int, records_per_shard: int, mix: dict | None = None) -> dict:
    """Writes `count` records of one world's split as shards under out_dir/world/, kinds
    cycling through `mix` (None: the world's DEFAULT_MIX).

    Returns {"shards": [file names], "records": count, "kinds": {kind: count}}.
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    num_shards = -(-count // records_per_shard)  # none for count == 0
    kinds: collections.Counter = collections.Counter()
    names = []
    for shard in range(num_shards):
        start = shard * records_per_shard
        n = min(records_per_shard, count - start)
        name = f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"
        batch = list(GENERATORS[world](n, split=split, seed=seed, image_size=image_size,
                                       start=start, mix=mix))
        kinds.update(r["kind"] for r in batch)
        records.write_records(os.path.join(out_dir, world, name), batch)
        names.append(name)
    return {"shards": names, "records": count, "kinds": dict(sorted(kinds.items()))}


def write_worlds(out_dir: str, settings: WorldSettings) -> dict:
    """Writes both worlds' train and eval shards, then the manifest; returns the manifest."""
    started = time.time()
    flags = dataclasses.asdict(settings)
    manifest = {"flags": flags, "worlds": {}}
    for world in GENERATORS:
        manifest["worlds"][world] = {
            split: write_world(out_dir, world, split, flags[f"{world}_{split}"],
                               seed=settings.seed, image_size=settings.image_size,
                               records_per_shard=settings.records_per_shard,
                               mix=(shapes.parse_mix(settings.shapes_mix)
                                    if (world, split) == ("shapes", "train") else None))
            for split in ("train", "eval")}
    manifest["seconds"] = round(time.time() - started, 2)
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))  # the manifest marks a complete write
    return manifest


def ensure_worlds(out_dir: str, settings: WorldSettings) -> tuple[dict, bool]:
    """The worlds under `out_dir`, written only when their manifest is absent or was written
    with other settings. Returns (manifest, whether it wrote them now)."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("flags") == dataclasses.asdict(settings):
            return manifest, False
    os.makedirs(out_dir, exist_ok=True)
    return write_worlds(out_dir, settings), True


def uses_worlds(config: ml_collections.ConfigDict) -> bool:
    """Whether any dataset path of `config.data` (train or eval) names "{worlds}"."""
    return any(PLACEHOLDER in entry.paths for entry in _entries(config))


def resolve_world_paths(config: ml_collections.ConfigDict,
                        directory: str) -> ml_collections.ConfigDict:
    """A copy of `config` with "{worlds}" in every dataset path replaced by `directory`."""
    config = config.copy_and_resolve_references()
    for entry in _entries(config):
        entry.paths = entry.paths.replace(PLACEHOLDER, directory)
    return config


def _entries(config):
    for field in ("datasets", "eval_datasets"):
        group = config.data.get(field)
        if group:
            yield from group.values()
