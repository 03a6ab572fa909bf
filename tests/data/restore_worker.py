"""Run as a program: restore a pipeline iterator from an Orbax checkpoint, print next batches.

  python -m tests.data.restore_worker PATTERN CKPT_DIR STEP NUM_BATCHES NUM_WORKERS OUT_JSON

Used by test_checkpoint.py to check that a *new process* continues the exact stream.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def digest(batch) -> str:
    """sha256 of every array of a PackedBatch."""
    import hashlib

    import numpy as np

    from unijax import batch as batch_lib

    h = hashlib.sha256()
    for name in (*batch_lib.TOKEN_FIELDS, "vit_patches", "vae_images", "vae_timestep"):
        h.update(np.ascontiguousarray(getattr(batch, name)).tobytes())
    return h.hexdigest()


def config_for(pattern: str, workers: int):
    """The mixture both processes use: two weighted datasets, shuffled, repeated."""
    from configs import base
    from tests.data.synth import data_config

    config = data_config(pattern.replace("*", "a*"), epochs=0, weight=2.0)
    config.data.datasets.b = base.data_source(pattern.replace("*", "b*"), weight=1.0)
    config.data.num_workers = workers
    return config


def main(argv) -> None:
    import grain
    import orbax.checkpoint as ocp

    from unijax.data import pipeline

    pattern, ckpt, step, n, workers, out = argv[1:7]
    it = pipeline.make_iterator(config_for(pattern, int(workers)))
    mngr = ocp.CheckpointManager(ckpt, item_handlers={
        "data_iter": grain.checkpoint.CheckpointHandler()})
    mngr.restore(int(step), args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(it)))
    result = {"documents": it.documents, "skipped": dict(it.skipped), "batches": [],
              "docs": []}
    for _ in range(int(n)):
        batch = next(it)
        result["batches"].append(digest(batch))
        result["docs"].append(it.last_documents)
    it.close()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main(sys.argv)
