"""Per-dataset losses and slice fill in the train step, the held-out evaluation, metrics.jsonl
and TensorBoard: the datasets' losses recombine into the step's, each is the loss of its own
documents, and the mixture never changes the compiled step.

One short `train()` run (three steps on the 8 fake devices, one held-out time) serves every
test; the step and eval programs built again here are the run's, read from the persistent
cache. The run trains what `tests/inference/trained.py` trains (same steps, frozen ViT, no
warmup: the same step program), so in a whole session it compiles no train step of its own.
"""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from tests.inference import trained as trained_lib
from tests.training import helpers
from unijax import batch as batch_lib
from unijax import config as config_lib
from unijax.data import packing, pipeline
from unijax.training import evaluate, metrics
from unijax.training import train as train_lib

STEPS = trained_lib.STEPS
NAMES = ("digits", "shapes")  # the small config's mixture, sorted: dataset_id 0 and 1


def _config(worlds_dir):
    return helpers.small_config(worlds_dir, **{
        "train.steps": STEPS, "train.freeze": ("vit/.*",), "train.warmup_steps": 0,
        "train.eval_timesteps": (0.5,), "checkpoint.every_steps": 100})


@pytest.fixture(scope="module")
def run(worlds_dir, tmp_path_factory):
    """(config, workdir, report) of the short run."""
    config = _config(worlds_dir)
    assert packing.dataset_names(config) == NAMES
    workdir = str(tmp_path_factory.mktemp("dataset_metrics"))
    report = train_lib.train(config, workdir)
    assert report["status"] == "done"
    return config, workdir, report


def _only(batch, k):
    """The batch with the loss weights of every document outside dataset k set to 0."""
    mine = batch.dataset_id == k
    return dataclasses.replace(batch, text_weight=np.where(mine, batch.text_weight, 0.0),
                               flow_weight=np.where(mine, batch.flow_weight, 0.0))


def test_train_rows_recombine_into_the_step_loss_in_jsonl_and_tensorboard(run):
    config, workdir, _ = run
    assert (config.train.ce_weight, config.train.mse_weight, config.train.z_loss_weight) == \
        (1.0, 1.0, 0.0)
    rows = [r for r in metrics.read_metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    tensorboard = metrics.read_tensorboard(workdir)
    spec = packing.PackSpec.from_config(config)
    host = helpers.host_batches(config, STEPS)  # the batches the run trained on
    for row, batch in zip(rows, host):
        weight = {(n, w): row[f"train/{n}/{w}_weight"] for n in NAMES for w in ("text", "flow")}
        assert all(w > 0 for w in weight.values()), weight  # both datasets in every step
        ce = sum(row[f"train/{n}/ce"] * weight[n, "text"] for n in NAMES) / sum(
            weight[n, "text"] for n in NAMES)
        mse = sum(row[f"train/{n}/mse"] * weight[n, "flow"] for n in NAMES) / sum(
            weight[n, "flow"] for n in NAMES)
        assert ce == pytest.approx(row["train/ce"], rel=1e-5)
        assert mse == pytest.approx(row["train/mse"], rel=1e-5)
        assert ce + mse == pytest.approx(row["train/loss"], rel=1e-5)
        for key in ("tokens", "text_tokens", "flow_tokens"):
            assert sum(row[f"train/{n}/{key}"] for n in NAMES) == row[f"train/{key}"]
        for k, name in enumerate(NAMES):
            assert row[f"train/{name}/tokens"] == np.sum(batch.dataset_id == k)
        fill = batch_lib.slice_fill(batch, spec.latent_grid)
        for key, value in fill.items():
            assert row[f"data/{key}"] == pytest.approx(float(value), rel=1e-6), key
        for tag, value in row.items():
            if tag.startswith(("train/", "data/")):
                assert tensorboard[tag][row["step"]] == pytest.approx(value, rel=1e-6), tag


def test_eval_splits_are_logged_and_each_is_its_own_documents(run):
    """Per eval split CE and flow MSE at step 0 and at the end; a split's numbers equal the
    evaluation of the same batch with the other split's weights zeroed (same initial
    parameters, noise and program)."""
    config, workdir, report = run
    assert evaluate.split_names(config) == NAMES
    rows = [r for r in metrics.read_metrics(workdir) if "eval/ce" in r]
    assert [r["step"] for r in rows] == [0, STEPS]
    tensorboard = metrics.read_tensorboard(workdir)
    for row in rows:
        for name in NAMES:
            for key in ("ce", "mse_t0.5", "text_tokens", "flow_tokens"):
                tag = f"eval/{name}/{key}"
                assert tensorboard[tag][row["step"]] == pytest.approx(row[tag], rel=1e-6)
        assert sum(row[f"eval/{n}/text_tokens"] for n in NAMES) == row["eval/text_tokens"]

    trainer = helpers.Trainer(config, jax.devices())
    state = trainer.init()  # the run's step-0 parameters (same seed)
    host = next(pipeline.make_iterator(evaluate.eval_data_config(config),
                                       seed=int(config.train.eval_seed)))
    eval_step = evaluate.make_eval_step(config, trainer.spec)
    with train_lib._MeshContext(trainer.mesh):
        for k, name in enumerate(NAMES):
            alone = pipeline.global_batch(_only(host, k), trainer.mesh)
            scores = evaluate.evaluate(eval_step, state.params, state.frozen, [alone])
            assert scores["ce"] == pytest.approx(report["initial"][f"{name}/ce"], rel=1e-5)
            assert scores["mse_t0.5"] == pytest.approx(report["initial"][f"{name}/mse_t0.5"],
                                                       rel=1e-5)


def test_step_per_dataset_losses_are_their_own_documents_and_never_recompile(run, worlds_dir):
    """The first step's per-dataset CE / MSE equal the step's CE / MSE on the batch with only
    that dataset's weights; batches of a 1-, 2- or 3-dataset mixture run one compiled step,
    and a step built from either config lowers to the same program."""
    config, workdir, _ = run
    trainer = helpers.Trainer(config, jax.devices())
    batch = helpers.host_batches(config, 1)[0]
    first = next(r for r in metrics.read_metrics(workdir) if "train/loss" in r)
    # Steps built from a 1- and a 3-dataset mixture (made outside the mesh context: the
    # abstract state must see logical axis names), with a first batch of each.
    others = {}
    for count, names in {1: ("shapes",), 3: ("digits", "shapes", "shapes_too")}.items():
        c = _config(worlds_dir)
        c.data.datasets = ml_collections.ConfigDict({
            name: config.data.datasets[name.removesuffix("_too")].copy_and_resolve_references()
            for name in names})
        host = helpers.host_batches(c, 1)[0]
        batch_lib.validate(host, max_datasets=c.data.max_datasets)
        assert set(np.unique(host.dataset_id)) == {-1, *range(count)}
        others[count] = (helpers.Trainer(c, jax.devices()), host)

    global_batch = lambda b: pipeline.global_batch(b, trainer.mesh)
    with train_lib._MeshContext(trainer.mesh):
        _, full = trainer.step(trainer.init(), global_batch(batch))
        full = jax.device_get(full)
        assert float(full["loss"]) == pytest.approx(first["train/loss"], rel=1e-6)
        per = full["per_dataset"]
        assert per["ce"].shape == (config.data.max_datasets,)
        for k in range(len(NAMES)):
            _, alone = trainer.step(trainer.init(), global_batch(_only(batch, k)))
            assert float(alone["ce"]) == pytest.approx(float(per["ce"][k]), rel=1e-5)
            assert float(alone["mse"]) == pytest.approx(float(per["mse"][k]), rel=1e-5)

        lowered = {2: trainer.step.lower(trainer.init(), global_batch(batch)).as_text()}
        state = trainer.init()
        for count, (other, host) in others.items():
            state, m = trainer.step(state, global_batch(host))
            assert np.count_nonzero(jax.device_get(m["per_dataset"]["tokens"])) == count
            lowered[count] = other.step.lower(other.init(), global_batch(host)).as_text()
    assert trainer.step._cache_size() == 1
    assert lowered[1] == lowered[2] == lowered[3]


def test_metric_scalars_average_by_weight_and_skip_absent_datasets():
    rows = [{"ce": np.array([2.0, 0.0, 9.0]), "mse": np.array([1.0, 0.0, 0.0]),
             "text_weight": np.array([1.0, 0.0, 3.0]), "flow_weight": np.array([4.0, 0.0, 0.0]),
             "text_tokens": np.array([1.0, 0.0, 3.0]), "flow_tokens": np.array([4.0, 0.0, 0.0]),
             "tokens": np.array([10.0, 0.0, 5.0])},
            {"ce": np.array([4.0, 0.0, 0.0]), "mse": np.array([3.0, 0.0, 0.0]),
             "text_weight": np.array([3.0, 0.0, 0.0]), "flow_weight": np.array([4.0, 0.0, 0.0]),
             "text_tokens": np.array([3.0, 0.0, 0.0]), "flow_tokens": np.array([4.0, 0.0, 0.0]),
             "tokens": np.array([20.0, 0.0, 0.0])}]
    got = metrics.dataset_scalars(("a", "b"), rows)  # bucket 2 has no name: not logged
    assert got["a/ce"] == pytest.approx((2 * 1 + 4 * 3) / 4)
    assert got["a/mse"] == pytest.approx(2.0) and got["a/tokens"] == 15.0
    assert "b/ce" not in got and "b/mse" not in got and got["b/tokens"] == 0.0
    assert not any(key.startswith("c") for key in got)


def test_more_datasets_than_the_bound_is_a_config_error(tiny_config):
    tiny_config.data.max_datasets = 1
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.data.datasets has 2 datasets, more than "
                             r"config.data.max_datasets=1"):
        config_lib.validate(tiny_config, num_devices=8)
