"""The streaming stages of the input pipeline, after the mixture (`unijax.data.pipeline`).

  PackIterDataset       per worker: (stream index, SequencePlan | Skip) -> rows of plans, with
                        the look-ahead buffer saved as stream indices (exact resume)
  HostBatchIterDataset  main process: rows -> PackedBatch, skip counters and logs, and the
                        `config.data.max_skip_fraction` stop (`SkipPolicy`)

Every class here is a picklable top-level class (Grain's mp_prefetch spawns its workers).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

import grain
from absl import logging

from unijax import batch as batch_lib
from unijax.data import packing
from unijax.data import plan as plan_lib


class DataError(RuntimeError):
    """The data are too broken to train on (`config.data.max_skip_fraction`)."""


@dataclasses.dataclass(frozen=True)
class Skip:
    """A record that was not packed: why, and where it came from."""

    reason: str
    dataset: str
    path: str
    index: int
    message: str = ""


def with_index(index: int, element):
    """(stream index, element): lets the packer name a held-back document in its state."""
    return int(index), element


class PackIterDataset(grain.IterDataset):
    """Assigns a stream of (index, SequencePlan | Skip) to `batch_size` rows.

    `source[index]` must give the stream's element at `index` again (the MapDataset the stream
    was made from, `with_index` applied): held-back documents are saved as indices and re-read
    on restore. Yields {"rows": per row its SequencePlans, "skips": Skip tuples,
    "truncated": int}.
    """

    def __init__(self, parent: grain.IterDataset, source: grain.MapDataset,
                 spec: packing.PackSpec, batch_size: int):
        super().__init__(parent)
        self._source, self._spec, self._batch_size = source, spec, batch_size

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._source, self._spec,
                             self._batch_size)

    def __str__(self) -> str:
        return (f"PackIterDataset(batch_size={self._batch_size}, "
                f"pack_buffer={self._spec.pack_buffer})")


class _PackIterator(grain.DatasetIterator):
    """First-fit packing with a look-ahead buffer (`packing.RowPacker`) and exact state.

    Between calls the rows are empty and the buffer holds the documents read but not yet
    packed; the state is the parent's state plus the stream indices of those documents, which
    `set_state` reads and fits again (plans are functions of the index), so a restored iterator
    yields exactly the batches the saved one would have.
    """

    def __init__(self, parent: grain.DatasetIterator, source: grain.MapDataset,
                 spec: packing.PackSpec, batch_size: int):
        super().__init__(parent)
        self._packer = packing.RowPacker(spec, batch_size)
        self._source, self._spec = source, spec
        self._exhausted = False

    def _fit(self, index: int, plan: plan_lib.SequencePlan, skips: list):
        """The document as a `packing.Pending`, or None (with a Skip) when it cannot be packed."""
        fitted, status = packing.fit_document(plan, self._spec)
        if fitted is None:
            k = plan.key
            skips.append(Skip(status, k.dataset, k.path, k.index,
                              f"cost {plan.cost()} exceeds the row {tuple(self._spec.capacity)}"))
            return None
        return packing.Pending(fitted, status, index)

    def __next__(self):
        self._packer.refill()  # documents held back by the previous batch come first
        skips = []
        while not self._exhausted:
            try:
                index, element = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if isinstance(element, Skip):
                skips.append(element)
                continue
            doc = self._fit(index, element, skips)
            if doc is not None and self._packer.offer(doc):
                break  # a document fit no row with the buffer full: the batch is complete
        if self._packer.empty and not skips:
            raise StopIteration
        rows, truncated = self._packer.take()
        return {"rows": rows, "truncated": truncated,
                "skips": [dataclasses.astuple(s) for s in skips]}

    def get_state(self):
        return {"parent": self._parent.get_state(), "exhausted": self._exhausted,
                "held": [doc.ref for doc in self._packer.held]}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._packer.reset()
        self._exhausted = bool(state["exhausted"])
        for index in state.get("held", []):
            _, plan = self._source[index]
            skipped = isinstance(plan, Skip)
            doc = None if skipped else self._fit(index, plan, [])
            if doc is None:  # only when the data or the config changed since the save
                raise ValueError(f"restored pack state: the held document at stream index "
                                 f"{index} no longer packs: {plan if skipped else plan.key}")
            self._packer.held.append(doc)


@dataclasses.dataclass(frozen=True)
class SkipPolicy:
    """When skipped records stop a run, and the shards already left out at start-up.

    The run stops once `skipped > max_fraction * read` with `read >= min_records`, where
    `read` counts the records packed and skipped (bad shards are not records: they are
    reported apart). max_fraction 1.0 never stops.
    """

    max_fraction: float = 1.0
    min_records: int = 0
    bad_shards: int = 0

    @classmethod
    def from_config(cls, config, bad_shards: int = 0) -> SkipPolicy:
        data = config.data
        return cls(float(data.get("max_skip_fraction", 1.0)),
                   int(data.get("skip_fraction_min_records", 0)), bad_shards)

    def check(self, skipped: Mapping[str, int], documents: int) -> None:
        """Raises DataError when the skipped records (per reason; "bad_shard" counts shards
        and is left out) exceed the allowed fraction of `documents` + skipped records."""
        counts = sorted(((n, reason) for reason, n in skipped.items() if reason != "bad_shard"),
                        reverse=True)
        bad = sum(n for n, _ in counts)
        read = bad + documents
        if read < max(self.min_records, 1) or bad <= self.max_fraction * read:
            return
        top = ", ".join(f"{reason} {n}" for n, reason in counts[:5])
        shards = f"; {self.bad_shards} bad shards were left out at start-up" * bool(
            self.bad_shards)
        raise DataError(
            f"{bad} of the {read} records read were skipped ({bad / read:.1%}), more than "
            f"config.data.max_skip_fraction={self.max_fraction:g} (checked after "
            f"config.data.skip_fraction_min_records={self.min_records}); top reasons: "
            f"{top}{shards}. The log names every skipped record's file and index.")


class HostBatchIterDataset(grain.IterDataset):
    """Rows of plans -> PackedBatch, with skip counters (runs in the main process)."""

    def __init__(self, parent: grain.IterDataset, spec: packing.PackSpec,
                 policy: SkipPolicy | None = None):
        super().__init__(parent)
        self._spec, self._policy = spec, policy or SkipPolicy()

    def __iter__(self) -> HostBatchIterator:
        return HostBatchIterator(self._parent.__iter__(), self._spec, self._policy)


class HostBatchIterator(grain.DatasetIterator):
    """Yields this host's PackedBatches (numpy).

    Attributes:
      skipped: {reason: count} of records that were not packed, since the start of training
        (saved and restored with the iterator state), plus "bad_shard": the shards left out
        at start-up by this process (counted again at every start, not saved).
      documents: how many documents were packed; truncated: how many of them were truncated.
      last_documents: per row of the last batch, the (dataset, path, index, record id) of
        its documents in document-id order.

    Raises (from `__next__`):
      DataError: when the skipped records exceed `config.data.max_skip_fraction`.
    """

    def __init__(self, parent: grain.DatasetIterator, spec: packing.PackSpec,
                 policy: SkipPolicy | None = None):
        super().__init__(parent)
        self._spec, self._policy = spec, policy or SkipPolicy()
        self.skipped: collections.Counter = collections.Counter()
        self._count_bad_shards()
        self.documents = 0
        self.truncated = 0
        self.last_documents: list[list[tuple]] = []

    def _count_bad_shards(self) -> None:
        if self._policy.bad_shards:
            self.skipped["bad_shard"] = self._policy.bad_shards

    def __next__(self) -> batch_lib.PackedBatch:
        while True:
            element = next(self._parent)  # its StopIteration ends the stream, skips counted
            for reason, dataset, path, index, message in element["skips"]:
                self.skipped[reason] += 1
                logging.warning("skipped record %s:%d (dataset %s, %s): %s", path, index,
                                dataset, reason, message)
            rows = element["rows"]
            self.documents += sum(len(row) for row in rows)
            self.truncated += int(element["truncated"])
            self._policy.check(self.skipped, self.documents)
            if any(rows):
                break
            # Only skipped records (after the last document of a stream or of a worker's
            # share): counted above, no all-padding batch for them.
        self.last_documents = packing.document_keys(rows)
        return packing.to_packed_batch(packing.layout(rows, self._spec), self._spec)

    def get_state(self):
        skipped = {k: v for k, v in self.skipped.items() if k != "bad_shard"}
        return {"parent": self._parent.get_state(), "skipped": skipped,
                "documents": self.documents, "truncated": self.truncated}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.skipped = collections.Counter(state["skipped"])
        self.skipped.pop("bad_shard", None)
        self._count_bad_shards()
        self.documents, self.truncated = int(state["documents"]), int(state["truncated"])
