"""Tokenizers: a built-in byte-level one (no download) and HF tokenizers from a local path.

Both expose the same small interface the sequence planner needs: `encode(text) -> list[int]`,
`decode(ids) -> str`, `vocab_size` and `special` (BAGEL's marker ids as
`batch_builder.SpecialTokens`). Both pickle cheaply (a HF tokenizer re-loads from its path), so
they can travel into Grain worker processes.

A HF tokenizer is loaded once per process and path (`load_tokenizer` caches it) under a lock:
Grain's read threads ask for it at the same moment, and transformers' lazily imported module
then races (`module 'transformers' has no attribute 'AutoTokenizer'`).

Byte-level ids: byte b -> b (0..255), then `<|im_start|>`=256, `<|im_end|>`=257,
`<|vision_start|>`=258, `<|vision_end|>`=259, `<|endoftext|>`=260, `<|pad|>`=261; the
vocabulary (262) fits the tiny config's 320 embedding rows.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from unijax.batch_builder import SpecialTokens

BAGEL_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
BYTE_SPECIAL_TOKENS = (*BAGEL_SPECIAL_TOKENS, "<|endoftext|>", "<|pad|>")

# Re-entrant: loading runs under it, and `load_tokenizer` holds it around the cache.
_LOAD_LOCK = threading.RLock()
_LOADED: dict[str, HFTokenizer] = {}


class Tokenizer(Protocol):
    """What the planner uses of a tokenizer."""

    vocab_size: int
    special: SpecialTokens

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the special tokens (see the module docstring)."""

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(BYTE_SPECIAL_TOKENS)
        s = self.special_ids
        self.special = SpecialTokens(im_start=s["<|im_start|>"], im_end=s["<|im_end|>"],
                                     vision_start=s["<|vision_start|>"],
                                     vision_end=s["<|vision_end|>"])

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` (special-token strings are not parsed: they are plain text)."""
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Bytes back to text; special ids are rendered by name, invalid UTF-8 replaced."""
        names = {v: k for k, v in self.special_ids.items()}
        out, run = [], bytearray()
        for i in (int(x) for x in ids):
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(names.get(i, f"<|unk_{i}|>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A HF tokenizer from a local path, with BAGEL's special tokens added when missing.

    `path` is a `tokenizer.json` file (loaded with the `tokenizers` library) or a directory
    (loaded with `transformers.AutoTokenizer(local_files_only=True)`, e.g. Qwen2's). Qwen2.5
    already holds all four special tokens, so its ids are unchanged.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"tokenizer path {self.path!r} does not exist")
        with _LOAD_LOCK:  # imports and file reads are not thread-safe (module docstring)
            self._load()

    def _load(self) -> None:
        if os.path.isdir(self.path):
            import transformers

            hf = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            missing = [t for t in BAGEL_SPECIAL_TOKENS if hf.convert_tokens_to_ids(t) in
                       (None, hf.unk_token_id)]
            if missing:
                hf.add_special_tokens({"additional_special_tokens": missing})
            self._encode = lambda text: hf.encode(text, add_special_tokens=False)
            self._decode = lambda ids: hf.decode(list(ids), skip_special_tokens=False)
            token_id = hf.convert_tokens_to_ids
            self.vocab_size = len(hf)
        else:
            import tokenizers

            tok = tokenizers.Tokenizer.from_file(self.path)
            missing = [t for t in BAGEL_SPECIAL_TOKENS if tok.token_to_id(t) is None]
            if missing:
                tok.add_special_tokens(missing)
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)
            token_id = tok.token_to_id
            self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = [int(token_id(t)) for t in BAGEL_SPECIAL_TOKENS]
        self.special = SpecialTokens(*ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (the planner adds BAGEL's markers)."""
        return list(self._encode(text))

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens included."""
        return self._decode([int(i) for i in ids])

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        # In a worker process: share the process's loaded tokenizer instead of loading again.
        self.__dict__.update(load_tokenizer(state["path"]).__dict__)


def load_tokenizer(spec: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """`"byte"` / None / "" -> ByteTokenizer; anything else is a local HF tokenizer path
    (a `tokenizer.json` file or a transformers tokenizer folder).

    Thread-safe; a HF tokenizer is loaded once per process and path, then shared.
    """
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    key = os.path.abspath(os.fspath(spec))
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = HFTokenizer(spec)
        return _LOADED[key]
