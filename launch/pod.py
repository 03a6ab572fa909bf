r"""Prints (or, with --submit, runs) the commands that train a config on a TPU pod.

GKE through xpk (what MaxText uses; builds a JobSet, one pod per TPU VM):

  python -m launch.pod --backend=xpk --name=bagel --config=configs/bagel_7b_mot.py \
      --workdir=gs://my-bucket/bagel --tpu=v5p-1024 --cluster=my-gke --project=my-project \
      --zone=us-east5-a --image=us-docker.pkg.dev/my-project/unijax/unijax:latest \
      -- --config.data.batch_size=512

Plain TPU VMs (the same command on every worker over ssh), two v5e-256 slices:

  python -m launch.pod --backend=tpu_vm --name=bagel --config=configs/bagel_7b_mot.py \
      --workdir=gs://my-bucket/bagel --tpu=v5e-256 --num_slices=2 --zone=us-east5-b \
      --code_dir='~/unijax' --venv='~/venv' --create \
      -- --config.mesh.data=2 --config.data.batch_size=512

The config is parsed with the overrides and validated for the hardware first (mesh, batch,
slices), so a launch that cannot run fails here. `--sweep=train.lr=1e-4,3e-4` renders one run per
point (name-1, name-2, ...; workdir/1, workdir/2, ...).
"""

from __future__ import annotations

from absl import app, flags

from launch import cli
from launch.spec import LaunchError

cli.define_flags()
_BACKEND = flags.DEFINE_enum("backend", "xpk", ["xpk", "tpu_vm"],
                             "xpk: a GKE workload; tpu_vm: gcloud ssh to existing TPU VMs.")
_CREATE = flags.DEFINE_bool("create", False, "tpu_vm: also print the commands that create "
                            "the TPUs (a queued resource for several slices).")
_XPK_DRY_RUN = flags.DEFINE_bool("xpk_dry_run", False, "xpk: add xpk's own --dry-run (with "
                                 "--submit, xpk prints the JobSet it would create).")


def main(argv) -> None:
    try:
        specs = cli.specs_from_flags(argv)
        lines = cli.render_pod(specs, _BACKEND.value, create=_CREATE.value,
                               xpk_dry_run=_XPK_DRY_RUN.value)
    except LaunchError as e:
        cli.fail(e)
    raise SystemExit(cli.print_or_run(lines, flags.FLAGS.submit))


if __name__ == "__main__":
    app.run(main)
