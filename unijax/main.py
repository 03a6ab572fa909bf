r"""The unijax main job.

  python -m unijax.main --config=configs/tiny.py --workdir=/tmp/tiny [--config.train.steps=5]

Loads and validates the config (before anything compiles), logs to the console and to
`WORKDIR/log.*`, builds the device mesh, prints the resolved config and trains
(`unijax.training.train`): checkpoints in WORKDIR/checkpoints (a second run on the same workdir
resumes), scalars in WORKDIR/metrics.jsonl and WORKDIR/tensorboard, and a closing report of the
held-out losses before and after in WORKDIR/report.json. SIGTERM saves and exits 0.

With `--config.dry_run=True` it builds the model from abstract shapes only (`nnx.eval_shape`,
nothing is allocated), prints `parameters: N` with a per-module breakdown and exits.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from unijax import config as config_lib
from unijax.models import mot, param_count, unified
from unijax.training import sharding
from unijax.training import train as train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file under configs/ (`path.py:arg` passes arg).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs and checkpoints.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for a multi-process run (`jax.distributed`); with "
    "--num_processes and --process_id. On TPU pods and SLURM use --distributed instead.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes of the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with the addresses the platform "
    "provides (TPU pods, SLURM)")


def initialize_distributed() -> None:
    """Joins a multi-process run when the flags ask for one (before any other jax call)."""
    if not (_COORDINATOR.value or _DISTRIBUTED.value):
        return
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU processes exchange collectives over gloo (TCP), e.g. on a workstation.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    else:
        jax.distributed.initialize()


def run(config, workdir: str) -> int:
    """Runs the job described by `config` in `workdir`; returns a process exit code."""
    os.makedirs(workdir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file("log", workdir)
    logging.info("unijax main: workdir=%s, %d devices (%s), %d process(es)", workdir,
                 jax.device_count(), jax.devices()[0].platform, jax.process_count())
    config_lib.validate(config, num_devices=jax.device_count())
    if config.get("compilation_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    mesh = sharding.make_mesh(config.mesh)
    print("resolved config:\n" + str(config), flush=True)
    print(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} "
          "device(s)", flush=True)
    if config.dry_run:
        return dry_run(config)
    report = train_lib.train(config, workdir)
    return 0 if report["status"] in ("done", "preempted") else 1


def dry_run(config) -> int:
    """Prints the exact parameter counts from abstract shapes, the MoT decoder's breakdown then
    the whole unified model's (the frozen VAE counted apart); returns 0."""
    decoder_config = mot.DecoderConfig.from_config(config)
    state = param_count.abstract_params(
        lambda: mot.MoTDecoder(decoder_config, rngs=nnx.Rngs(config.seed)))
    rows = param_count.count_by_group(state, mot.param_groups(decoder_config))
    print("MoT decoder (config.model.llm):", flush=True)
    print(param_count.format_breakdown(rows), flush=True)
    groups, frozen_vae = unified.parameter_breakdown(config)
    decoder = sum(n for label, n in groups if label in dict(rows))
    towers = [(label, n) for label, n in groups if label not in dict(rows)]
    print("unified model (trained parameters; the fixed sin-cos tables are not parameters):",
          flush=True)
    print(param_count.format_breakdown([("llm (MoT decoder)", decoder), *towers]), flush=True)
    print(f"frozen VAE weights (not trained, not counted above): {frozen_vae:,}", flush=True)
    if decoder_config.lora_rank:
        adapters = sum(int(x.size) for x in jax.tree.leaves(param_count.abstract_params(
            lambda: mot.MoTDecoder(decoder_config, rngs=nnx.Rngs(0)), nnx.LoRAParam)))
        print(f"LoRA adapters (rank {decoder_config.lora_rank} on "
              f"{'+'.join(decoder_config.lora_experts)}; what trains, counted above): "
              f"{adapters:,}", flush=True)
    return 0


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (e.g. --config=configs/tiny.py)")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    initialize_distributed()
    try:
        code = run(_CONFIG.value, _WORKDIR.value)
    except (config_lib.ConfigError, train_lib.TrainingError) as e:
        logging.error("%s", e)
        raise SystemExit(f"error: {e}") from None
    raise SystemExit(code)


if __name__ == "__main__":
    app.run(main)
