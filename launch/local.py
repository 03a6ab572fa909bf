r"""N local processes of the main job joined by `jax.distributed` on localhost: a pod's code path
(one process per host, per-host data shards, per-host checkpoint shards) on a workstation.

  python -m launch.local --num_processes=2 -- --config=configs/tiny.py --workdir=/tmp/tiny2
  python -m launch.local --num_processes=2 --devices_per_process=2 -- \
      --config=configs/tiny.py --workdir=/tmp/tiny4 --config.mesh.num_slices=2

Process i runs `python -m unijax.main <flags> --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i`: on CPU with `--devices_per_process` devices each (collectives
over gloo), or with --platform=gpu on GPU i alone. Their output is streamed line by line, each
line prefixed with `[i]`. When a process fails the others are stopped (SIGTERM, then SIGKILL
after --grace_seconds) and the launcher exits with the failed process's code; it exits 0 when
all do. A second launch on the same workdir resumes from its newest checkpoint, as on a pod.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: Mapping[str, str], index: int, platform: str,
                devices_per_process: int) -> dict[str, str]:
    """The environment of process `index`: CPU with its fake devices, or GPU `index` only."""
    env = dict(base, PYTHONUNBUFFERED="1")
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                            f"{devices_per_process}").strip()
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return env


def main_job_argv(main_flags: Sequence[str], index: int, num_processes: int,
                  port: int) -> list[str]:
    """The command line of process `index` of the main job."""
    return [sys.executable, "-m", "unijax.main", *main_flags,
            f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
            f"--process_id={index}"]


def _stream(index: int, pipe, out: TextIO, lock: threading.Lock) -> None:
    for line in pipe:
        with lock:
            out.write(f"[{index}] {line}")
            out.flush()


def _stop(procs: Sequence[subprocess.Popen], grace_seconds: float) -> None:
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + grace_seconds
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_processes(argvs: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], *,
                  cwd: str = ROOT, out: TextIO | None = None,
                  grace_seconds: float = 10.0) -> int:
    """Runs the commands side by side, streaming their merged stdout/stderr to `out` with a
    `[i] ` prefix per line. Returns 0 when all exit 0; otherwise stops the rest as soon as one
    fails and returns that one's exit code."""
    out = out or sys.stdout
    lock = threading.Lock()
    procs, threads = [], []
    try:
        for i, (argv, env) in enumerate(zip(argvs, envs)):
            procs.append(subprocess.Popen(list(argv), cwd=cwd, env=dict(env), text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            threads.append(threading.Thread(target=_stream, args=(i, procs[-1].stdout, out, lock),
                                            daemon=True))
            threads[-1].start()
        while True:
            codes = [p.poll() for p in procs]
            failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    finally:
        _stop(procs, grace_seconds)  # on failure, or if this launcher is interrupted
        for t in threads:
            t.join(timeout=5)
    if failed is None:
        return 0
    code = procs[failed].returncode
    with lock:
        out.write(f"launch.local: process {failed} exited with code {code}; stopped the "
                  "others\n")
        out.flush()
    return code if code > 0 else 1


def launch(main_flags: Sequence[str], num_processes: int, *, devices_per_process: int = 1,
           platform: str = "cpu", port: int = 0, out: TextIO | None = None,
           grace_seconds: float = 10.0) -> int:
    """Runs the main job with `main_flags` as `num_processes` local processes; returns the exit
    code (see `run_processes`)."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"--num_processes={num_processes} and --devices_per_process="
                         f"{devices_per_process} must be >= 1")
    if platform not in ("cpu", "gpu"):
        raise ValueError(f"--platform must be cpu or gpu, got {platform!r}")
    bad = [f for f in main_flags if re.match(r"--(coordinator_address|num_processes|"
                                             r"process_id|distributed)\b", f)]
    if bad:
        raise ValueError(f"{bad}: the launcher sets the distributed flags itself")
    port = port or free_port()
    argvs = [main_job_argv(main_flags, i, num_processes, port) for i in range(num_processes)]
    envs = [process_env(os.environ, i, platform, devices_per_process)
            for i in range(num_processes)]
    return run_processes(argvs, envs, out=out, grace_seconds=grace_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m launch.local --num_processes=N [...] -- <main job flags>`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, main_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="fake CPU devices of each process (--platform=cpu)")
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--grace_seconds", type=float, default=10.0,
                        help="after a failure, how long the others get to stop before SIGKILL")
    args = parser.parse_args(ours)
    if not main_flags:
        parser.error("give the main job's flags after '--', e.g. -- --config=configs/tiny.py "
                     "--workdir=/tmp/tiny")
    try:
        return launch(main_flags, args.num_processes, devices_per_process=args.devices_per_process,
                      platform=args.platform, port=args.port, grace_seconds=args.grace_seconds)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
