"""Run as a program: one of two jax processes reading its shard of the data.

  python -m tests.data.shard_worker PROCESS_ID PORT PATTERN OUT_JSON

Writes the documents this host packed and, for its first batch, the local and global
(`jax.make_array_from_process_local_data`) token counts.
"""

import json
import sys


def main(argv) -> None:
    process_id, port, pattern, out = int(argv[1]), argv[2], argv[3], argv[4]
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from tests.data.synth import data_config
    from unijax.data import pipeline

    config = data_config(pattern, batch_size=4)  # global rows: 2 per host
    it = pipeline.make_iterator(config)
    first = next(it)
    docs = [d for row in it.last_documents for d in row]
    for _ in it:
        docs += [d for row in it.last_documents for d in row]
    mesh = Mesh(np.array(jax.devices()).reshape(4, 1, 1), ("data", "fsdp", "tensor"))
    glob = pipeline.global_batch(first, mesh)
    live = int(jax.jit(lambda d: jnp.sum(d > 0))(glob.doc_id))
    with open(out, "w") as f:
        json.dump({"process_count": jax.process_count(), "docs": docs,
                   "local_rows": first.batch_size, "global_shape": list(glob.doc_id.shape),
                   "local_live": int((first.doc_id > 0).sum()), "global_live": live}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main(sys.argv)
