"""Two jax processes on localhost (CPU, gloo) read disjoint shards that cover the data."""

import json
import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_hosts_read_disjoint_covering_shards(record_files, tmp_path):
    root, ids = record_files
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.data.shard_worker", str(i),
                               str(port), str(root / "*.array_record"),
                               str(tmp_path / f"host{i}.json")], env=env)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=150) == 0
    hosts = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]
    assert all(h["process_count"] == 2 and h["local_rows"] == 2 for h in hosts)
    keys = [{(d[1], d[2]) for d in h["docs"]} for h in hosts]
    assert keys[0] and keys[1] and not keys[0] & keys[1]  # disjoint
    assert sorted(d[3] for h in hosts for d in h["docs"]) == sorted(ids)  # covering
    assert hosts[0]["global_shape"][0] == 4
    assert hosts[0]["global_live"] == hosts[1]["global_live"] == sum(
        h["local_live"] for h in hosts)
