"""`python -m unijax.data.worlds --out=DIR`: writes both embedded worlds as ArrayRecord shards.

  DIR/shapes/train-00000-of-00002.array_record ...   DIR/shapes/eval-00000-of-00001.array_record
  DIR/digits/train-00000-of-00001.array_record ...   DIR/digits/eval-00000-of-00001.array_record
  DIR/manifest.json   the flags, and records per shard and per kind

Records are pure functions of (seed, split, kind, index), so rerunning with the same flags
writes byte-identical shards (`shards.py` does the writing; the main job calls it itself when
a config's datasets name "{worlds}").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from unijax.data.worlds import shards


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses flags, writes the shards and the manifest; returns the manifest."""
    parser = argparse.ArgumentParser(
        prog="python -m unijax.data.worlds",
        description="Write the shapes and digits worlds as ArrayRecord shards.")
    parser.add_argument("--out", required=True, help="output directory")
    defaults = shards.WorldSettings()
    helps = {"image_size": "image side in pixels", "seed": "dataset seed",
             "records_per_shard": "records per shard",
             "shapes_mix": 'shapes train kinds per cycle, e.g. "t2i=8,vqa=3" ("": default)'}
    for name, kind in shards.WorldSettings.field_types().items():
        parser.add_argument(f"--{name}", type=kind, default=getattr(defaults, name),
                            help=helps.get(name, name.replace("_", " ") + " records"))
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    manifest = shards.write_worlds(out, shards.WorldSettings(**args))
    total = sum(s["records"] for w in manifest["worlds"].values() for s in w.values())
    print(f"wrote {total} records to {out} in {manifest['seconds']:.1f}s")
    return manifest


if __name__ == "__main__":
    main()
