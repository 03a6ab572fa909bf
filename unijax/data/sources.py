"""Random access over ArrayRecord shards that survives bad storage.

Storage fails in two ways, and neither may stop a long run:

  a bad shard      truncated, no footer, not an ArrayRecord file, missing: it cannot be opened
                   at all. `check_shards` finds it at start-up (opening every shard reads its
                   footer), logs it with its path and leaves it out, or raises when
                   `config.data.on_bad_shard` is "fail". A dataset with no readable shard is
                   always an error.
  a bad chunk      bytes overwritten inside a shard that opens: reading a record of that chunk
                   raises (Riegeli's "chunk data hash mismatch"). `RecordSource` returns an
                   `Unreadable` in place of the record's bytes, which the pipeline turns into a
                   `Skip` (reason "unreadable", with the file and the index); every other record
                   of the shard is still read. Shards written with `group_size:1` (as
                   `records.write_records` does) lose one record per damaged chunk; shards with
                   larger groups lose every record of the chunk, each one counted.

A record that fails to read fails the same way every time, so a stream with unreadable records
is still a function of its seed and an iterator restored from a checkpoint yields the same
batches across a bad chunk.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging
from array_record.python import array_record_module

ON_BAD_SHARD = ("skip", "fail")


class BadShardError(RuntimeError):
    """A shard that cannot be opened, under `config.data.on_bad_shard="fail"`, or a dataset
    whose shards are all unreadable."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """The records [start, stop) of one ArrayRecord file (stop None: up to its end)."""

    path: str
    start: int = 0
    stop: int | None = None


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """Stands for the bytes of a record that could not be read from its shard."""

    message: str


def _describe(error: Exception) -> str:
    # Riegeli raises an empty RuntimeError for a file without a footer (e.g. truncated).
    text = str(error).strip() or "no ArrayRecord footer (truncated, or not an ArrayRecord file)"
    return f"{type(error).__name__}: {text}"


def open_shard(shard: Shard) -> Shard:
    """The shard with its record range checked against the file (stop filled in).

    Raises:
      BadShardError: naming the path, when the file does not open as an ArrayRecord file or
        holds fewer records than the range asks for.
    """
    path = os.fspath(shard.path)
    try:
        # The reader does not fail on a missing local file by itself; remote paths (gs://...)
        # are left to it.
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"no such file {path!r}")
        reader = array_record_module.ArrayRecordReader(path)
        try:
            count = reader.num_records()
        finally:
            reader.close()  # Riegeli reports some damage only when the reader closes
    except Exception as e:  # Riegeli raises RuntimeError, the file system OSError
        raise BadShardError(f"shard {path} is unreadable: {_describe(e)}") from e
    stop = count if shard.stop is None else shard.stop
    if not 0 <= shard.start <= stop <= count:
        raise BadShardError(f"shard {path} holds {count} records, fewer than the records "
                            f"[{shard.start}, {stop}) to read from it")
    return Shard(path, shard.start, stop)


def check_shards(shards: Sequence[Shard | str], *, on_bad_shard: str, dataset: str
                 ) -> tuple[tuple[Shard, ...], tuple[tuple[str, str], ...]]:
    """Opens every shard of `dataset` once, at start-up.

    Args:
      shards: Shards or plain file paths (whole files).
      on_bad_shard: "skip" (log the bad shard with its path and leave it out) or "fail".
      dataset: the name used in the errors, e.g. "config.data.datasets.web".

    Returns:
      (the readable shards with their ranges filled in, (path, why) of every bad one).

    Raises:
      BadShardError: on the first bad shard when on_bad_shard is "fail", and when no shard
        of the dataset is readable (naming the dataset and the first bad shard).
    """
    if on_bad_shard not in ON_BAD_SHARD:
        raise ValueError(f"config.data.on_bad_shard must be one of {ON_BAD_SHARD}, got "
                         f"{on_bad_shard!r}")
    good, bad = [], []
    for shard in shards:
        shard = shard if isinstance(shard, Shard) else Shard(os.fspath(shard))
        try:
            good.append(open_shard(shard))
        except BadShardError as e:
            if on_bad_shard == "fail":
                raise BadShardError(f"{dataset}: {e} (config.data.on_bad_shard='fail'; "
                                    f"'skip' leaves such shards out)") from e
            logging.error("%s: skipping a bad shard: %s", dataset, e)
            bad.append((shard.path, str(e)))
    if not good:
        first = f"; the first: {bad[0][1]}" if bad else ""
        raise BadShardError(f"{dataset}: none of its {len(bad)} shards is readable{first}")
    return tuple(good), tuple(bad)


class RecordSource:
    """Random access over the records of several shards: index -> (bytes, path, index in file).

    A record that cannot be read comes back as (`Unreadable`, path, index in file). Plain
    paths are opened (and must be readable); `check_shards` filters bad ones first.
    """

    def __init__(self, shards: Sequence[Shard | str]):
        self._shards = tuple(open_shard(s if isinstance(s, Shard) else Shard(os.fspath(s)))
                             for s in shards)
        # The "file[start:stop]" form lets Grain's source skip re-opening every file.
        self._source = grain.sources.ArrayRecordDataSource(
            [f"{s.path}[{s.start}:{s.stop}]" for s in self._shards])
        self._starts = np.cumsum([0, *(s.stop - s.start for s in self._shards)])

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(s.path for s in self._shards)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int):
        file = int(np.searchsorted(self._starts, index, side="right")) - 1
        shard = self._shards[file]
        local = int(index - self._starts[file]) + shard.start
        try:
            data = self._source[index]
        except Exception as e:  # a damaged chunk (RuntimeError), a vanished file (OSError)
            data = Unreadable(_describe(e))
        return data, shard.path, local

    def __repr__(self) -> str:
        return f"RecordSource({len(self._shards)} files, {len(self)} records)"
