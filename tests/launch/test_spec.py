"""Launch specs: TPU types and topologies, field checks, overrides and sweeps, and the config
check that parses a config exactly as the main job will."""

import dataclasses

import pytest

from launch import spec as spec_lib
from launch.spec import LaunchError, LaunchSpec
from tests.launch.specs import SPECS


@pytest.mark.parametrize("name, topology, chips, hosts, accelerator", [
    ("v5e-256", "16x16", 256, 64, "v5litepod-256"),
    ("v5litepod-16", "4x4", 16, 4, "v5litepod-16"),
    ("v5p-1024", "8x8x8", 512, 128, "v5p-1024"),
    ("v5p-8", "2x2x1", 4, 1, "v5p-8"),
    ("v5p-2048", "8x8x16", 1024, 256, "v5p-2048"),
    ("v4-32", "2x2x4", 16, 4, "v4-32"),
    ("v6e-64", "8x8", 64, 16, "v6e-64"),
])
def test_tpu_types_and_default_topologies(name, topology, chips, hosts, accelerator):
    tpu = spec_lib.parse_tpu(name)
    assert (tpu.topology, tpu.chips, tpu.hosts, tpu.accelerator_type) == (
        topology, chips, hosts, accelerator)


@pytest.mark.parametrize("name, topology, message", [
    ("v9x-8", "", "tpu='v9x-8' is not a TPU type"),
    ("v5p-7", "", "v5p counts TensorCores, 2 per chip"),
    ("v5p-96", "", "has 48 chips, not a power of two: give topology (--topology)"),
    ("v5e-256", "8x16", "topology='8x16' does not fit tpu='v5e-256': v5e needs 2 dimensions "
                        "multiplying to 256 chips"),
    ("v5p-1024", "16x32", "v5p needs 3 dimensions"),
])
def test_bad_tpu_types_name_the_field(name, topology, message):
    with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec_lib.parse_tpu(name, topology)


def test_explicit_topology_reaches_xpk_by_name():
    from launch import xpk

    launch = dataclasses.replace(SPECS["v5p_1024"], tpu="v5p-96", topology="2x4x6")
    assert launch.num_devices == 48
    assert "--tpu-type=v5p-2x4x6" in xpk.workload_create_argv(launch)


@pytest.mark.parametrize("changes, message", [
    ({"name": "Bagel_7B"}, "name='Bagel_7B' must match"),
    ({"workdir": "runs/bagel"}, "workdir='runs/bagel' must be gs://... or an absolute path"),
    ({"gpu": "h100"}, "give exactly one of tpu (--tpu) and gpu (--gpu)"),
    ({"tpu": "", "gpu": "k80"}, "gpu='k80' must be one of"),
    ({"tpu": "", "gpu": "h100", "num_slices": 2}, "num_slices=2: slices are TPU slices"),
    ({"num_slices": 0}, "num_slices=0 must be >= 1"),
    ({"overrides": {"config.train.lr": "1"}}, "override 'config.train.lr' must be a config path"),
    ({"env": {"BAD-NAME": "1"}}, "env 'BAD-NAME' is not an environment variable name"),
    ({"venv": "/opt/venv"}, "give image (--image) or venv (--venv), not both"),
])
def test_bad_specs_name_the_field(changes, message):
    with pytest.raises(LaunchError) as e:
        dataclasses.replace(SPECS["v5e_256"], **changes)
    assert message in str(e.value)


def test_main_flags_of_tpu_and_gpu_runs():
    tpu = SPECS["two_slices"]
    assert tpu.main_argv() == [
        "python3", "-m", "unijax.main", "--config=configs/bagel_7b_mot.py",
        "--workdir=gs://my-bucket/bagel-2x", "--config.mesh.data=2",
        "--config.data.batch_size=512", "--config.mesh.num_slices=2", "--distributed"]
    gpu = LaunchSpec(name="g", config="configs/tiny.py", workdir="/shared/run", gpu="h100",
                     env={"A": "x y"}, venv="~/venv")
    assert gpu.main_flags() == ["--config=configs/tiny.py", "--workdir=/shared/run"]
    assert dataclasses.replace(gpu, num_hosts=2).main_flags()[-1] == "--distributed"
    assert gpu.shell_command(gpu.env) == ("source ~/venv/bin/activate && A='x y' python3 -m "
                                          "unijax.main --config=configs/tiny.py "
                                          "--workdir=/shared/run")


def test_overrides_and_sweeps():
    assert spec_lib.parse_overrides(["--config.train.lr=3e-4", "--config.seed=1"]) == {
        "train.lr": "3e-4", "seed": "1"}
    with pytest.raises(LaunchError, match="after '--' give config overrides"):
        spec_lib.parse_overrides(["--workdir=/x"])
    points = spec_lib.parse_sweep(["train.lr=1e-4,3e-4", "seed=0,1"])
    assert points == [{"train.lr": "1e-4", "seed": "0"}, {"train.lr": "1e-4", "seed": "1"},
                      {"train.lr": "3e-4", "seed": "0"}, {"train.lr": "3e-4", "seed": "1"}]
    assert spec_lib.parse_sweep([]) == [{}]
    with pytest.raises(LaunchError, match="sweep 'train.lr' must be KEY=V1,V2"):
        spec_lib.parse_sweep(["train.lr"])
    specs = spec_lib.sweep_specs(SPECS["v5p_1024"], points[:2])
    assert [(s.name, s.workdir) for s in specs] == [
        ("bagel-v5p-1", "gs://my-bucket/bagel-v5p/1"), ("bagel-v5p-2", "gs://my-bucket/bagel-v5p/2")]
    assert specs[1].overrides == {"data.batch_size": "512", "train.lr": "1e-4", "seed": "1"}
    assert spec_lib.sweep_specs(SPECS["v5p_1024"], [{}]) == [SPECS["v5p_1024"]]


@pytest.mark.parametrize("changes, message", [
    ({"overrides": {}}, "config.data.batch_size=256 is not divisible by the 512 batch shards"),
    ({"overrides": {"data.batch_size": "512", "train.lrr": "1"}},
     'Did you mean "lr" instead of "lrr"?'),
    ({"overrides": {"data.batch_size": "big"}}, "flag --config.data.batch_size=big"),
    ({"config": "configs/missing.py"}, "configs/missing.py"),
    ({"tpu": "v5e-256", "num_slices": 2},
     "config.mesh.num_slices=2 does not divide the mesh axis it spans "
     "(config.mesh.slice_axis='data' has size 1 over 512 devices)"),
])
def test_check_config_fails_with_the_field(changes, message):
    launch = dataclasses.replace(SPECS["v5p_1024"], **changes)
    with pytest.raises(LaunchError) as e:
        spec_lib.check_config(launch)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{launch.config} (launch 'bagel-v5p')")


def test_check_config_checks_the_pods_attention_backend():
    """impl="auto" is checked as the pod will resolve it (Pallas on TPU), not as this CPU."""
    launch = LaunchSpec(name="tiny", config="configs/tiny.py", workdir="/shared/tiny",
                        tpu="v5e-8", overrides={"attention.impl": "auto"})
    with pytest.raises(LaunchError, match="impl='pallas_tpu'.*not a multiple of block_q_bwd"):
        spec_lib.check_config(launch)
    assert spec_lib.check_config(dataclasses.replace(launch, overrides={})).data.batch_size == 8
