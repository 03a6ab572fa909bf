"""TFDS datasets prepared in ArrayRecord format as mixture components: caption and VQA
adapters, configurable feature names, skips, exact resume, and a short training run."""

import json

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base
from tests.data import synth
from tests.data.restore_worker import digest
from tests.data.synth import data_config
from unijax import batch as batch_lib
from unijax import config as config_lib
from unijax.data import pipeline

tfds = pytest.importorskip("tensorflow_datasets")

NAME = "unijax_test_pictures"
NUM = 12
BROKEN = 5  # this example's image bytes are not an image


class UnijaxTestPictures(tfds.core.GeneratorBasedBuilder):
    """Pictures with a caption and one question each; `file_format="array_record"`."""

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file beside the code: finding one needs `importlib_resources` for a class
    # defined inside a package (as test modules are).
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(8)
        for i in range(NUM):
            image = b"\x89PNG not really" if i == BROKEN else synth.png(rng)
            yield i, {"picture": image, "caption": f"a picture number {i}",
                      "question": f"which number is picture {i}?", "answer": f"number {i}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    UnijaxTestPictures(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def _examples(data_dir) -> dict[int, dict]:
    """Index in the split's file -> the example as TFDS reads it (one shard: same order)."""
    source = tfds.data_source(NAME, split="train", data_dir=data_dir, download=False,
                              decoders={"picture": tfds.decode.SkipDecoding()})
    return {i: source[i] for i in range(len(source))}


def _tfds_config(data_dir, **kwargs):
    config = data_config("unused", batch_size=2)
    config.data.datasets = ml_collections.ConfigDict()
    config.data.datasets.captions = base.tfds_source(NAME, "train", data_dir, "caption",
                                                     image_feature="picture", **kwargs)
    config.data.datasets.vqa = base.tfds_source(NAME, "train[:50%]", data_dir, "vqa",
                                                image_feature="picture", weight=0.5)
    return config


def _doc_texts(batch, documents) -> dict[tuple, str]:
    """(dataset, path, index) -> the text tokens of that document in the batch (byte
    tokenizer)."""
    out = {}
    for r, row in enumerate(documents):
        for j, key in enumerate(row):
            mask = (batch.doc_id[r] == j + 1) & (batch.modality[r] == batch_lib.TEXT)
            ids = batch.text_ids[r][mask][np.argsort(batch.order[r][mask])]
            out[key[:3]] = bytes(int(i) for i in ids if i < 256).decode("utf-8", "replace")
    return out


def test_tfds_examples_become_documents_of_both_adapters(data_dir):
    config = _tfds_config(data_dir)
    config_lib.validate(config)
    examples = _examples(data_dir)
    it = pipeline.make_iterator(config)
    texts, docs = {}, []
    for batch in it:
        batch_lib.validate(batch, latent_tokens_per_image=64)
        docs += [d for row in it.last_documents for d in row]
        texts.update(_doc_texts(batch, it.last_documents))
    it.close()
    captions = [d for d in docs if d[0] == "captions"]
    vqa = [d for d in docs if d[0] == "vqa"]
    broken = [i for i in examples if examples[i]["picture"].startswith(b"\x89PNG not")]
    assert len(broken) == 1
    assert sorted(d[2] for d in captions) == sorted(set(range(NUM)) - set(broken))
    assert sorted(d[2] for d in vqa) == sorted(set(range(NUM // 2)) - set(broken))
    assert it.skipped == {"image_decode": 1 + (broken[0] < NUM // 2)}
    for dataset, path, index, record_id in captions + vqa:
        example = examples[index]
        assert record_id == f"{NAME}/{path.rsplit('/', 1)[1]}/{index}"
        text = texts[dataset, path, index]
        if dataset == "captions":
            assert example["caption"].decode() in text
        else:
            assert example["question"].decode() in text and example["answer"].decode() in text


def test_tfds_resume_is_exact(data_dir, tmp_path):
    config = _tfds_config(data_dir)
    config.data.num_epochs = 0  # repeat: the state also crosses epochs
    it = pipeline.make_iterator(config)
    for _ in range(3):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={
        "data_iter": grain.checkpoint.CheckpointHandler()})
    mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [(digest(next(it)), it.last_documents) for _ in range(8)]
    fresh = pipeline.make_iterator(config)
    mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert [(digest(next(fresh)), fresh.last_documents) for _ in range(8)] == expected
    assert fresh.skipped == it.skipped and "image_decode" in it.skipped
    it.close()
    fresh.close()
    mngr.close()


def test_tfds_errors_name_the_field(data_dir):
    config = _tfds_config(data_dir)
    config.data.datasets.vqa.tfds.adapter = "ocr"
    config.data.datasets.captions.paths = "x-*.array_record"
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(config)
    assert "config.data.datasets.vqa.tfds.adapter" in str(err.value)
    assert "config.data.datasets.captions: give either paths or tfds" in str(err.value)

    config = _tfds_config(data_dir, text_feature="title")
    with pytest.raises(ValueError, match=r"captions\.tfds\.text_feature='title' is not a "
                                         r"feature.*'caption'"):
        pipeline.make_iterator(config)
    config = _tfds_config(data_dir)
    config.data.datasets.vqa.tfds.name = "unijax_never_prepared"
    with pytest.raises(ValueError, match=r"config\.data\.datasets\.vqa\.tfds: dataset "
                                         r"'unijax_never_prepared' split 'train\[:50%\]' is "
                                         r"not prepared"):
        pipeline.make_iterator(config)


def test_training_runs_on_tfds_datasets(data_dir, tmp_path):
    """`train.train` on the small model with config.data.datasets made of the two TFDS
    entries: finite losses on their text, the broken example counted in the log. The run is
    tests/inference/trained.py's (same steps, frozen ViT, no warmup; the mixture does not
    enter the compiled step), so its programs come from the session's compilation cache."""
    from tests.inference import trained as trained_lib
    from tests.training import helpers
    from unijax.training import train

    config = helpers.small_config(str(tmp_path / "unused_worlds"), **{
        "train.steps": trained_lib.STEPS, "checkpoint.every_steps": 1,
        "checkpoint.max_to_keep": trained_lib.STEPS, "train.freeze": ("vit/.*",),
        "train.warmup_steps": 0})
    config.data.datasets = _tfds_config(data_dir).data.datasets
    config.data.eval_datasets = ml_collections.ConfigDict()
    config_lib.validate(config)
    report = train.train(config, str(tmp_path))
    assert report["status"] == "done" and report["steps"] == trained_lib.STEPS
    assert report["skipped_records"]["image_decode"] >= 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in logged] == list(range(1, trained_lib.STEPS + 1))
    assert all(np.isfinite(r["train/loss"]) and r["train/text_tokens"] > 0 for r in logged)
    assert logged[-1]["data/skipped_image_decode"] >= 1
