"""The launches the golden tests render: BAGEL-7B-MoT on a v5e-256, on a v5p-1024 and on two
v5e-256 slices."""

from launch.spec import LaunchSpec

COMMON = dict(config="configs/bagel_7b_mot.py", project="my-project", cluster="my-gke",
              image="us-docker.pkg.dev/my-project/unijax/unijax:latest", code_dir="/app",
              env={"TF_CPP_MIN_LOG_LEVEL": "2"})

SPECS = {
    "v5e_256": LaunchSpec(name="bagel-v5e", workdir="gs://my-bucket/bagel-v5e", tpu="v5e-256",
                          zone="us-east5-b", **COMMON),
    "v5p_1024": LaunchSpec(name="bagel-v5p", workdir="gs://my-bucket/bagel-v5p",
                           tpu="v5p-1024", zone="us-east5-a", max_restarts=3,
                           overrides={"data.batch_size": "512"}, **COMMON),
    "two_slices": LaunchSpec(name="bagel-2x", workdir="gs://my-bucket/bagel-2x", tpu="v5e-256",
                             num_slices=2, zone="us-east5-b",
                             overrides={"mesh.data": "2", "data.batch_size": "512"}, **COMMON),
}


def tpu_vm_spec(spec: LaunchSpec) -> LaunchSpec:
    """The same launch on plain TPU VMs: a checkout and a venv in the home directory."""
    import dataclasses

    return dataclasses.replace(spec, image="", cluster="", code_dir="~/unijax", venv="~/venv")
