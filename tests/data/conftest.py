"""Shared record files for the pipeline tests (written once per session)."""

import numpy as np
import pytest

from tests.data import synth
from unijax.data import records


@pytest.fixture(scope="session")
def record_files(tmp_path_factory):
    """Two shards of 7 kinds x 6 records each (42 records), ids f"{kind}-{i}"."""
    root = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    recs = [synth.make(k, i, rng) for i in range(6) for k in synth.KINDS]
    records.write_records(root / "mix-00000.array_record", recs[:20])
    records.write_records(root / "mix-00001.array_record", recs[20:])
    return root, [r["id"] for r in recs]
