"""The capacity planner: its packing model is the pipeline's, and its proposals fill the rows."""

import json
import subprocess
import sys

import numpy as np
import pytest

from configs import base, tiny
from unijax import config as config_lib
from unijax.data import capacity, packing, records
from unijax.data.worlds import shapes
from unijax.data.worlds import shards as worlds

_WORLDS = dict(shapes_train=400, shapes_eval=0, digits_train=200, digits_eval=0)


@pytest.fixture(scope="module")
def worlds_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("capacity_worlds"))
    worlds.ensure_worlds(directory, worlds.WorldSettings(**_WORLDS))
    return directory


def _worlds_config(directory):
    return worlds.resolve_world_paths(tiny.get_config(), directory)


def _t2i_config(tmp_path):
    path = tmp_path / "t2i-00000-of-00001.array_record"
    records.write_records(path, shapes.generate(300, mix={"t2i": 1}))
    config = tiny.get_config()
    config.data.datasets = {"t2i": base.data_source(str(path))}
    return config


def test_cost_packer_is_the_pipeline_packer(worlds_dir):
    """The planner's cost-only packer places every document where `RowPacker` does."""
    config = _worlds_config(worlds_dir)
    spec = packing.PackSpec.from_config(config)
    plans = [plan for _, plan in capacity.sample_plans(config, 300)]
    plans = [fitted for fitted, _ in (packing.fit_document(p, spec) for p in plans)
             if fitted is not None]
    real = packing.RowPacker(spec, 4)
    model = capacity._CostPacker(spec.capacity, 4, spec.pack_buffer)
    batches = 0
    for plan in plans:
        done = real.offer(packing.Pending(plan))
        assert model.offer(np.array(plan.cost())) == done
        if done:
            used = np.array([np.sum([p.cost() for p in row], axis=0) if row else np.zeros(4)
                             for row in real.take()[0]])
            model_used, _ = model.take()
            np.testing.assert_array_equal(model_used, used)
            real.refill()
            batches += 1
    assert batches >= 5


def test_simulated_fill_of_identical_documents():
    """Documents of (40, 30, 8, 1) into rows of (80, 60, 16, 2): two per row, every slot full."""
    demand = capacity.Demand(np.tile([40, 30, 8, 1], (50, 1)), ("a",) * 50)
    sim = capacity.simulate(demand, capacity.Budgets(80, 60, 16, 2, rows=3), num_batches=4)
    assert sim["fill"] == {"und": 1.0, "gen": 1.0, "vit": 1.0, "vae": 1.0}
    assert sim["docs_per_row"] == 2.0 and sim["too_large"] == 0.0
    sim = capacity.simulate(demand, capacity.Budgets(100, 60, 16, 2, rows=3), num_batches=4)
    assert sim["fill"]["und"] == pytest.approx(0.8)  # the gen slice binds first


@pytest.mark.parametrize("mixture", ["worlds", "t2i"])
def test_proposal_fills_both_slices(mixture, worlds_dir, tmp_path):
    config = _worlds_config(worlds_dir) if mixture == "worlds" else _t2i_config(tmp_path)
    result = capacity.plan(config, row_length=512, sample=600, multiple=16, num_batches=12)
    fill = result["proposal"]["fill"]
    assert fill["und"] >= 0.85 and fill["gen"] >= 0.85, result
    # The proposal is a valid config whose pipeline fills its rows as simulated.
    proposed = config.copy_and_resolve_references()
    for field, value in result["flags"].items():
        proposed.data[field.split(".")[-1]] = value
    config_lib.validate(proposed, num_devices=8)
    assert sum(result["proposal"]["budgets"][k] for k in ("und", "gen")) == 512


def test_cli_writes_a_proposal(worlds_dir, tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "unijax.data.capacity", "--config=configs/tiny.py",
         f"--worlds={worlds_dir}", *(f"--config.data.worlds.{k}={v}" for k, v in _WORLDS.items()),
         "--sample=200", "--multiple=16", "--batches=4",
         f"--output={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fill (mean)" in proc.stdout and "--config.data.und_capacity=" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["flags"]) == {f"config.data.{k}" for k in (
        "und_capacity", "gen_capacity", "max_vit_patches", "max_vae_images", "batch_size")}
    assert 0 < result["current"]["fill"]["und"] <= 1
