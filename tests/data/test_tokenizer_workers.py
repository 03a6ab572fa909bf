"""A local HF tokenizer folder under Grain workers and read threads: loaded once per process,
safely, and tokenizing exactly as the single-threaded path does."""

import shutil
import threading

import numpy as np
import pytest

from tests.data import synth
from tests.data.synth import data_config
from unijax import batch as batch_lib
from unijax.data import pipeline, records
from unijax.data import tokenizer as tok_lib

transformers = pytest.importorskip("transformers")  # only in the parity environment


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A tiny byte-level BPE saved as a transformers tokenizer folder (no tokenizer.json
    path is given to the pipeline: the folder goes through AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["plain text number one", "plain text number two"] * 20, trainer)
    bpe.decoder = decoders.ByteLevel()
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe,
                                         unk_token="<unk>").save_pretrained(folder)
    return str(folder)


def _token_ids(config, **kwargs) -> dict[tuple, list[int]]:
    """(path, index) -> the text token ids of that document, over one pass."""
    it = pipeline.make_iterator(config, **kwargs)
    out = {}
    for batch in it:
        for r, row in enumerate(it.last_documents):
            for j, (_, path, index, _) in enumerate(row):
                mask = (batch.doc_id[r] == j + 1) & (batch.modality[r] == batch_lib.TEXT)
                out[path, index] = batch.text_ids[r][mask][np.argsort(batch.order[r][mask])]
    it.close()
    assert it.skipped == {}
    return {k: v.tolist() for k, v in out.items()}


def test_tokenizer_folder_with_workers_and_threads_matches_one_thread(tokenizer_folder,
                                                                      tmp_path):
    rng = np.random.default_rng(9)
    records.write_records(tmp_path / "text.array_record",
                          [synth.make("text", i, rng) for i in range(16)])
    config = data_config(tmp_path / "text.array_record")
    config.data.tokenizer = tokenizer_folder
    config.data.read_threads = 1
    reference = _token_ids(config)
    config.data.read_threads = 4
    threaded = _token_ids(config, num_workers=2)
    assert len(reference) == 16 and threaded == reference
    # The ids are the folder's BPE, not bytes: record 3's text is in its document.
    ids = tok_lib.load_tokenizer(tokenizer_folder).encode(synth.make("text", 3, rng)
                                                          ["segments"][0]["text"])
    doc = reference[str(tmp_path / "text.array_record"), 3]
    assert len(ids) < len(synth.make("text", 3, rng)["segments"][0]["text"]) // 2
    assert any(doc[k:k + len(ids)] == ids for k in range(len(doc)))


def test_concurrent_loads_share_one_tokenizer(tokenizer_folder, tmp_path):
    """Threads asking at the same moment for a folder not loaded yet all get the process's
    one instance."""
    folder = shutil.copytree(tokenizer_folder, tmp_path / "copy")
    got, errors = [], []
    start = threading.Barrier(8)

    def load():
        start.wait()
        try:
            got.append(tok_lib.load_tokenizer(str(folder)))
        except Exception as e:  # the race this guards against raised AttributeError
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 8 and all(t is got[0] for t in got)
    assert got[0].decode(got[0].encode("plain text")) == "plain text"
