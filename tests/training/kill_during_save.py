"""Run as a program: save step 1, then die by SIGKILL inside step 2's save, after every file
of step 2 is written but before Orbax renames its temporary directory into place (the last
moment a crash can hit a save).

  python -m tests.training.kill_during_save CKPT_DIR
"""

import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(directory: str) -> None:
    import jax.numpy as jnp
    import ml_collections
    from orbax.checkpoint._src.path import atomicity

    from unijax.training import checkpoint

    ckpt = checkpoint.Checkpointer(directory, every_steps=1, max_to_keep=5)
    config = ml_collections.ConfigDict({"note": "kill test"})
    ckpt.save(1, {"w": jnp.full((64, 64), 1.0)}, None, config)
    ckpt.wait()

    async def die(self):
        del self
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, {"w": jnp.full((64, 64), 2.0)}, None, config)
    ckpt.wait()
    raise SystemExit("the save of step 2 finished: the kill did not happen")


if __name__ == "__main__":
    main(sys.argv[1])
