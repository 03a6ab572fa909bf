"""Tokenizers: the byte-level default's fixed ids and HF tokenizers built locally."""

import pickle

import pytest

from configs import tiny
from unijax.batch_builder import SpecialTokens
from unijax.data import tokenizer as tok_lib


def test_byte_tokenizer_ids():
    tok = tok_lib.ByteTokenizer()
    assert tok.encode("Az é") == list("Az é".encode())
    assert tok.special == SpecialTokens()  # batch_builder defaults: 256..259
    assert (tok.special.im_start, tok.special.im_end, tok.special.vision_start,
            tok.special.vision_end) == (256, 257, 258, 259)
    assert tok.vocab_size <= tiny.get_config().model.llm.vocab_size
    ids = [256, *tok.encode("héllo"), 257]
    assert tok.decode(ids) == "<|im_start|>héllo<|im_end|>"
    assert tok_lib.load_tokenizer("byte").encode("x") == [120]


def _train_bpe():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red circle", "a blue square above a green circle"] * 20,
                            trainer)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_hf_tokenizer_from_json_adds_missing_specials(tmp_path):
    bpe = _train_bpe()
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))
    tok = tok_lib.load_tokenizer(str(path))
    assert tok.special.im_start == bpe.token_to_id("<|im_start|>")  # kept
    new = {tok.special.im_end, tok.special.vision_start, tok.special.vision_end}
    assert len(new) == 3 and min(new) >= bpe.get_vocab_size()  # appended
    ids = tok.encode("a red circle")
    assert ids == bpe.encode("a red circle").ids and tok.decode(ids) == "a red circle"
    again = pickle.loads(pickle.dumps(tok))  # reloads from its path in a worker process
    assert again.special == tok.special and again.encode("a red circle") == ids


def test_hf_tokenizer_from_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe = _train_bpe()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": list(tok_lib.BAGEL_SPECIAL_TOKENS)})
    fast.save_pretrained(tmp_path)
    tok = tok_lib.load_tokenizer(str(tmp_path))
    assert tok.special.vision_end == fast.convert_tokens_to_ids("<|vision_end|>")
    assert tok.decode(tok.encode("a green square")) == "a green square"


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        tok_lib.load_tokenizer(str(tmp_path / "nope"))
