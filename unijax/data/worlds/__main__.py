"""`python -m unijax.data.worlds --out=DIR`: writes both embedded worlds as ArrayRecord shards.

  DIR/shapes/train-00000-of-00002.array_record ...   DIR/shapes/eval-00000-of-00001.array_record
  DIR/digits/train-00000-of-00001.array_record ...   DIR/digits/eval-00000-of-00001.array_record
  DIR/manifest.json   the flags, and records per shard and per kind

Records are pure functions of (seed, split, kind, index), so rerunning with the same flags
writes byte-identical shards. Digits train records come from the training split only; the
held-out split feeds only the eval shards.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from collections.abc import Sequence

from unijax.data import records
from unijax.data.worlds import digits, shapes

_GENERATORS = {"shapes": shapes.generate, "digits": digits.generate}


def write_world(out_dir: str, world: str, split: str, count: int, *, seed: int,
                image_size: int, records_per_shard: int) -> dict:
    """Writes `count` records of one world's split as shards under out_dir/world/.

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
        batch = list(_GENERATORS[world](n, split=split, seed=seed, image_size=image_size,
                                        start=start))
        kinds.update(r["kind"] for r in batch)
        records.write_records(os.path.join(out_dir, world, name), batch)
        names.append(name)
    return {"shards": names, "records": count, "kinds": dict(sorted(kinds.items()))}


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses flags, writes the shards and the manifest; returns the manifest."""
    parser = argparse.ArgumentParser(
        prog="python -m unijax.data.worlds",
        description="Write the shapes and digits worlds as ArrayRecord shards.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--shapes_train", type=int, default=2000, help="shapes train records")
    parser.add_argument("--shapes_eval", type=int, default=260, help="shapes eval records")
    parser.add_argument("--digits_train", type=int, default=1000, help="digits train records")
    parser.add_argument("--digits_eval", type=int, default=300, help="digits eval records")
    parser.add_argument("--image_size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--records_per_shard", type=int, default=1000)
    args = parser.parse_args(argv)
    started = time.time()
    manifest = {"flags": vars(args), "worlds": {}}
    for world in ("shapes", "digits"):
        manifest["worlds"][world] = {
            split: write_world(args.out, world, split, getattr(args, f"{world}_{split}"),
                               seed=args.seed, image_size=args.image_size,
                               records_per_shard=args.records_per_shard)
            for split in ("train", "eval")}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    total = sum(s["records"] for w in manifest["worlds"].values() for s in w.values())
    print(f"wrote {total} records to {args.out} in {time.time() - started:.1f}s")
    return manifest


if __name__ == "__main__":
    main()
