"""Golden tests of the rendered launches: the xpk workload, the TPU-VM script and the XManager
work units of BAGEL-7B-MoT on a v5e-256, a v5p-1024 and two v5e-256 slices (tests/launch/specs.py),
each config parsed and validated for its hardware; and the two launcher scripts print the same.

UNIJAX_UPDATE_GOLDEN=1 rewrites tests/launch/golden/*.txt from the current renderers.
"""

import os
import subprocess
import sys

import pytest

from launch import cli, spec, tpu_vm, xm_jobs, xpk
from tests.launch.specs import SPECS, tpu_vm_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def render(name: str) -> str:
    """Every backend's rendering of one launch, as the golden file holds it."""
    launch = SPECS[name]
    vm = tpu_vm_spec(launch)
    unit = xm_jobs.work_unit(launch)
    sections = {
        "xpk": [spec.shell_join(xpk.workload_create_argv(launch))],
        "tpu_vm (create, then run)": tpu_vm.create_commands(vm) + tpu_vm.run_commands(vm),
        "xm work unit": xm_jobs.describe([unit]),
        "xm job args": xm_jobs.render_args(unit.args),
    }
    return "".join(f"# {title}\n" + "\n".join(lines) + "\n" for title, lines in sections.items())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_rendered_launch_matches_golden(name):
    text = render(name)
    path = os.path.join(GOLDEN, f"{name}.txt")
    if os.environ.get("UNIJAX_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"{path} differs; UNIJAX_UPDATE_GOLDEN=1 rewrites it"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_golden_launch_configs_are_valid_for_their_hardware(name):
    config = spec.check_config(SPECS[name])
    assert config.mesh.num_slices == SPECS[name].num_slices
    assert config.data.batch_size % SPECS[name].num_devices == 0


def test_facts_of_the_rendered_pods():
    """The numbers the golden files encode, spelled out."""
    v5e, v5p, two = (SPECS[k] for k in ("v5e_256", "v5p_1024", "two_slices"))
    assert (v5e.tpu_slice.topology, v5e.tpu_slice.hosts, v5e.num_devices) == ("16x16", 64, 256)
    assert (v5p.tpu_slice.topology, v5p.tpu_slice.hosts, v5p.num_devices) == ("8x8x8", 128, 512)
    assert (two.num_devices, two.num_processes) == (512, 128)
    argv = xpk.workload_create_argv(two)
    assert "--tpu-type=v5litepod-256" in argv and "--num-slices=2" in argv
    command = argv[-1]
    assert command.startswith("--command=cd /app && python3 -m unijax.main ")
    assert command.endswith("--config.mesh.num_slices=2 --distributed")
    lines = tpu_vm.run_commands(tpu_vm_spec(two))
    assert [line.split()[5] for line in lines[1:3]] == ["bagel-2x-0", "bagel-2x-1"]
    assert all(f"MEGASCALE_SLICE_ID={i} " in lines[1 + i] for i in range(2))
    assert lines[-1] == "wait $pid0 && wait $pid1"
    assert xm_jobs.work_unit(two).requirements == {"tpu_v5e": "16x16", "replicas": 2}


def test_tpu_vm_script_passes_the_coordinator_to_every_slice(tmp_path):
    """The script through bash, with `gcloud` a stub that prints its arguments: the
    coordinator address read from slice 0 reaches both slices' commands intact."""
    stub = tmp_path / "gcloud"
    stub.write_text("#!/bin/sh\n[ \"$4\" = describe ] && { echo 10.0.0.7; exit 0; }\n"
                    "for a in \"$@\"; do echo \"ARG:$a\"; done\n")
    stub.chmod(0o755)
    script = "\n".join(tpu_vm.run_commands(tpu_vm_spec(SPECS["two_slices"])))
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    out = subprocess.run(["bash", "-c", "set -e\n" + script], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    commands = [a[len("ARG:--command="):] for a in out.splitlines()
                if a.startswith("ARG:--command=")]
    assert len(commands) == 2
    for i, command in enumerate(sorted(commands, key=lambda c: "SLICE_ID=1" in c)):
        assert command.startswith("cd ~/unijax && source ~/venv/bin/activate && "
                                  "TF_CPP_MIN_LOG_LEVEL=2 MEGASCALE_COORDINATOR_ADDRESS="
                                  f"10.0.0.7:8080 MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID={i} ")


def _cli(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _flags(launch) -> list[str]:
    out = [f"--name={launch.name}", f"--config={launch.config}", f"--workdir={launch.workdir}",
           f"--tpu={launch.tpu}", f"--num_slices={launch.num_slices}",
           f"--project={launch.project}", f"--zone={launch.zone}",
           f"--cluster={launch.cluster}", f"--image={launch.image}",
           f"--code_dir={launch.code_dir}", f"--max_restarts={launch.max_restarts}"]
    out += [f"--env={k}={v}" for k, v in launch.env.items()]
    return out + ["--"] + [f"--config.{k}={v}" for k, v in launch.overrides.items()]


def test_launcher_scripts_print_the_golden_commands():
    launch = SPECS["two_slices"]
    golden = render("two_slices")
    pod = _cli("launch.pod", "--backend=xpk", *_flags(launch))
    assert pod.returncode == 0, pod.stderr[-3000:]
    assert pod.stdout == golden.split("\n")[1] + "\n"  # printed, not run: no xpk here
    xm = _cli("launch.xm_launch", "--nocheck_config", *_flags(launch))
    assert xm.returncode == 0, xm.stderr[-3000:]
    assert xm.stdout == xm_jobs.describe([xm_jobs.work_unit(launch)])[0] + "\n"


def test_launcher_fails_before_rendering_a_config_the_pod_cannot_run():
    launch = SPECS["v5p_1024"]
    flags = [f for f in _flags(launch) if not f.startswith("--config.data.batch_size")]
    result = _cli("launch.pod", "--backend=tpu_vm", *flags)
    assert result.returncode == 2 and result.stdout == ""
    assert ("configs/bagel_7b_mot.py (launch 'bagel-v5p') on 512 devices (v5p-1024 x 1): "
            "invalid config:") in result.stderr
    assert "config.data.batch_size=256 is not divisible by the 512 batch shards" in result.stderr


def test_render_pod_joins_every_sweep_point():
    points = spec.parse_sweep(["train.lr=1e-4,3e-4"])
    specs = spec.sweep_specs(tpu_vm_spec(SPECS["v5e_256"]), points)
    lines = cli.render_pod(specs, "tpu_vm")
    assert [line.split()[5] for line in lines] == ["bagel-v5e-1", "bagel-v5e-2"]
    assert "--workdir=gs://my-bucket/bagel-v5e/2 --config.train.lr=3e-4" in lines[1]
    with pytest.raises(spec.LaunchError, match="backend='slurm' must be 'xpk' or 'tpu_vm'"):
        cli.render_pod(specs, "slurm")
