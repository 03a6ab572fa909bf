r"""Peak host RSS of converting a BAGEL-layout checkpoint, both ways, against its size.

  PYTHONPATH=. python benchmarks/convert_memory.py --dims=released --dir=/data/bagel_rss
  PYTHONPATH=. python benchmarks/convert_memory.py --dims=big,half --dir=/tmp/rss

Writes a random checkpoint in the official layout (`tests/convert/official_layout.py`, random
bf16 bit patterns; `released` has BAGEL-7B-MoT's dims: 14.61 B values, 29 GB), then runs the
command line a user runs (`python -m unijax.convert.bagel`) to unijax and back, each a fresh
process that reports its own peak (VmHWM: the parent's memory does not count). --free_source
deletes the source before the way back (the 7B then needs ~60 GB of disk instead of ~90).
Prints one markdown row per size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from tests.convert import official_layout  # noqa: E402

DIMS = {
    "released": official_layout.RELEASED,
    "big": official_layout.BIG,  # the slow test's (tests/convert/test_bagel_memory.py)
    "half": {**official_layout.BIG, "layers": 15},
    "tiny": official_layout.TINY,  # seconds: the smoke test's
}


def _convert(*args: str) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of one conversion by the command line."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "unijax.convert.bagel", *args], cwd=_ROOT,
                          capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    match = re.search(r"peak RSS: (\d+) MiB", done.stdout)
    return float(match.group(1)), time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="big", help=f"comma-separated, of {sorted(DIMS)}")
    parser.add_argument("--dir", required=True, help="scratch directory (emptied per size)")
    parser.add_argument("--free_source", action="store_true")
    args = parser.parse_args(argv)
    print("| dims | checkpoint MiB | write s | to unijax: peak RSS MiB (x size), s | "
          "to official: peak RSS MiB (x size), s |")
    print("|---|---|---|---|---|")
    for name in args.dims.split(","):
        root = os.path.join(args.dir, name)
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        src = official_layout.write_official(os.path.join(root, "official"), DIMS[name],
                                             tokenizer=False, value=official_layout.fast_value)
        write_s = time.perf_counter() - start
        size = official_layout.weight_mib(src)
        dst = os.path.join(root, "unijax")
        peak, seconds = _convert(f"--src={src}", f"--dst={dst}")
        if args.free_source:
            shutil.rmtree(src)
        peak_back, seconds_back = _convert("--to_official", f"--src={dst}",
                                           f"--dst={os.path.join(root, 'back')}")
        print(f"| {name} | {size:.0f} | {write_s:.0f} | {peak:.0f} ({peak / size:.2f}x), "
              f"{seconds:.0f} | {peak_back:.0f} ({peak_back / size:.2f}x), {seconds_back:.0f} |",
              flush=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
