"""The Grain input pipeline: ArrayRecord shards -> fixed-shape PackedBatches, per host.

  per dataset:  ArrayRecordDataSource -> this host's shard (ShardByJaxProcess) -> shuffle ->
                repeat -> decode + plan (tokenize, images, flow times, CFG dropout; seeded per
                element, so the stream is a function of the seed)
  mixture:      MapDataset.mix by the config weights (finite epochs: `FiniteMixture`, which
                reads every record of every dataset, where `mix` stops at the first that ends)
  per worker:   read threads -> first-fit assignment of documents to `batch_size` rows, with
                a look-ahead buffer of `config.data.pack_buffer` documents that fit no open row
  workers:      mp_prefetch (spawn; every stage here is a picklable top-level class)
  main process: HostBatchIterator: lays the rows out as a PackedBatch, skip counters, logs

Rows travel between processes as plans (uint8 pixels of the actual images), and the fixed-shape
arrays are only built in the main process: the padded canvases of BAGEL-sized rows (8 VAE
slots of 1024^2 pixels: 25 MB a row as uint8) would otherwise be copied through shared memory.
Batches keep the pixels uint8 up to the device (`batch.normalize_pixels` runs in the model).

A record that fails (msgpack garbage, unknown schema version, missing field, truncated image,
corrupt video frame, image over `config.data.max_image_pixels`, document too long for a row)
becomes a `Skip` that travels with the next batch; the main-process iterator logs it with its
file and index and counts it per reason (`iterator.skipped`). Good records are never dropped:
every record is either packed (documents are listed in `iterator.last_documents`) or counted.
Records skipped after a stream's last document (the end of a finite stream, or of one worker's
share) travel without a batch: they are counted before the iterator stops, and no all-padding
batch is yielded for them.

Checkpointing: the iterator is a `grain.DatasetIterator`; save and restore it with
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(fresh_it)` under an Orbax
CheckpointManager item handled by `grain.checkpoint.CheckpointHandler()`. The packer's state is
the read position plus the stream indices of the documents its look-ahead buffer holds (re-read
on restore: a document is a function of its index), so a restored iterator yields exactly the
batches the saved one would have.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import fractions
import glob
import math
import os
import traceback

import grain
import numpy as np
from absl import logging

from unijax import batch as batch_lib
from unijax.data import packing, records
from unijax.data import plan as plan_lib
from unijax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One mixture component, resolved from `config.data.datasets.<name>`."""

    name: str
    paths: tuple[str, ...]
    weight: float
    options: plan_lib.PlanOptions


@dataclasses.dataclass(frozen=True)
class Skip:
    """A record that was not packed: why, and where it came from."""

    reason: str
    dataset: str
    path: str
    index: int
    message: str = ""


def resolve_paths(pattern: str, field: str = "paths") -> tuple[str, ...]:
    """Expands a glob or comma-separated globs into a sorted list of files.

    Raises:
      FileNotFoundError: naming the field and the pattern when nothing matches.
    """
    files = []
    for part in (p.strip() for p in pattern.split(",")):
        if part:
            files.extend(sorted(glob.glob(os.path.expanduser(part))) or [])
    if not files:
        raise FileNotFoundError(f"{field}={pattern!r} matches no file")
    return tuple(files)


def resolve_datasets(config) -> list[DatasetSpec]:
    """The mixture of `config.data.datasets`, in sorted name order.

    Raises:
      ValueError / FileNotFoundError: naming `config.data.datasets.<name>.<field>`.
    """
    entries = config.data.get("datasets")
    if not entries:
        raise ValueError("config.data.datasets is empty: add entries built with "
                         "configs.base.data_source(paths, weight, ...)")
    out = []
    for name in sorted(entries.keys()):
        entry = entries[name]
        field = f"config.data.datasets.{name}"
        try:
            options = plan_lib.PlanOptions.from_config(entry)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from e
        paths = resolve_paths(entry.paths, f"{field}.paths")
        out.append(DatasetSpec(name, paths, float(entry.get("weight", 1.0)), options))
    return out


class RecordSource:
    """Random access over the records of several shards: index -> (bytes, path, local index)."""

    def __init__(self, paths):
        self._paths = tuple(os.fspath(p) for p in paths)
        self._source = grain.sources.ArrayRecordDataSource(list(self._paths))
        counts = [records.num_records(p) for p in self._paths]
        self._starts = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int):
        file = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._source[index], self._paths[file], int(index - self._starts[file])

    def __repr__(self) -> str:
        return f"RecordSource({len(self._paths)} files, {len(self)} records)"


class RecordToPlan:
    """(bytes, path, index), rng -> SequencePlan, or Skip when the record is unusable."""

    def __init__(self, dataset: str, options: plan_lib.PlanOptions,
                 settings: plan_lib.ImageSettings, tokenizer_spec: str):
        self.dataset, self.options, self.settings = dataset, options, settings
        self.tokenizer_spec = tokenizer_spec
        self._tokenizer = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # re-loaded in the worker process
        return state

    def __call__(self, element, rng: np.random.Generator):
        data, path, index = element
        if self._tokenizer is None:
            self._tokenizer = tokenizer_lib.load_tokenizer(self.tokenizer_spec)
        try:
            record = records.decode_record(data)
            key = plan_lib.DocKey(self.dataset, path, index, record["id"])
            return plan_lib.plan_record(record, self._tokenizer, self.options, self.settings,
                                        rng, key)
        except records.RecordError as e:
            return Skip(e.reason, self.dataset, path, index, str(e))
        except Exception as e:  # never crash on data; the reason names the exception type
            logging.error("unexpected error on %s:%d\n%s", path, index, traceback.format_exc())
            return Skip(f"error_{type(e).__name__}", self.dataset, path, index, str(e))


class FiniteMixture(grain.transforms.DatasetSelectionMap):
    """Interleaves finite datasets by weight until every one of them is exhausted.

    `MapDataset.mix` ends the mixture when its first component runs out, so a finite pass
    over datasets of other sizes would never read the tail of the others (neither packed nor
    counted as skipped). Here the weights become small integer proportions p_i (within 1%);
    the mixture is a sequence of cycles that take p_i elements of dataset i each, in a smooth
    order (element j of dataset i at (j + 1) / p_i); when a dataset runs out, the cycles go
    on over the others. Every element of every dataset appears exactly once, in a fixed
    order (stateless and picklable, as grain requires).
    """

    def __init__(self, lengths, weights):
        if len(lengths) != len(weights) or min(weights) <= 0:
            raise ValueError(f"FiniteMixture: need one positive weight per dataset, got "
                             f"lengths {list(lengths)}, weights {list(weights)}")
        ratios = [fractions.Fraction(w / max(weights)).limit_denominator(100) for w in weights]
        scale = math.lcm(*(r.denominator for r in ratios))
        proportions = [int(r * scale) or 1 for r in ratios]
        divisor = math.gcd(*proportions)
        proportions = [p // divisor for p in proportions]
        # A phase runs whole cycles until a dataset has fewer elements left than a cycle
        # takes; its entry: per cycle position (dataset, rank in the cycle), elements taken
        # before the phase and per cycle, per dataset. `_starts`: each phase's first index.
        self._starts, self._phases = [], []
        remaining, taken, start = [int(n) for n in lengths], [0] * len(lengths), 0
        while any(remaining):
            take = [min(p, r) for p, r in zip(proportions, remaining)]
            cycles = min(r // t for r, t in zip(remaining, take) if t)
            slots = sorted(((j + 1) / t, i, j) for i, t in enumerate(take) for j in range(t))
            order = tuple((i, j) for _, i, j in slots)
            self._starts.append(start)
            self._phases.append((order, tuple(taken), tuple(take)))
            for i, t in enumerate(take):
                taken[i] += cycles * t
                remaining[i] -= cycles * t
            start += cycles * len(order)
        self._length = start

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self._length:
            raise IndexError(f"FiniteMixture: index {index} outside [0, {self._length})")
        phase = bisect.bisect_right(self._starts, index) - 1
        order, taken, take = self._phases[phase]
        cycle, position = divmod(index - self._starts[phase], len(order))
        dataset, rank = order[position]
        return dataset, taken[dataset] + cycle * take[dataset] + rank


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


class HostBatchIterDataset(grain.IterDataset):
    """Rows of plans -> PackedBatch, with skip counters (runs in the main process)."""

    def __init__(self, parent: grain.IterDataset, spec: packing.PackSpec):
        super().__init__(parent)
        self._spec = spec

    def __iter__(self) -> HostBatchIterator:
        return HostBatchIterator(self._parent.__iter__(), self._spec)


class HostBatchIterator(grain.DatasetIterator):
    """Yields this host's PackedBatches (numpy).

    Attributes:
      skipped: {reason: count} of records that were not packed, since the start of training
        (saved and restored with the iterator state).
      documents: how many documents were packed; truncated: how many of them were truncated.
      last_documents: per row of the last batch, the (dataset, path, index, record id) of
        its documents in document-id order.
    """

    def __init__(self, parent: grain.DatasetIterator, spec: packing.PackSpec):
        super().__init__(parent)
        self._spec = spec
        self.skipped: collections.Counter = collections.Counter()
        self.documents = 0
        self.truncated = 0
        self.last_documents: list[list[tuple]] = []

    def __next__(self) -> batch_lib.PackedBatch:
        while True:
            element = next(self._parent)  # its StopIteration ends the stream, skips counted
            for reason, dataset, path, index, message in element["skips"]:
                self.skipped[reason] += 1
                logging.warning("skipped record %s:%d (dataset %s, %s): %s", path, index,
                                dataset, reason, message)
            rows = element["rows"]
            if any(rows):
                break
            # Only skipped records (after the last document of a stream or of a worker's
            # share): counted above, no all-padding batch for them.
        self.last_documents = packing.document_keys(rows)
        self.documents += sum(len(row) for row in rows)
        self.truncated += int(element["truncated"])
        return packing.to_packed_batch(packing.layout(rows, self._spec), self._spec)

    def get_state(self):
        return {"parent": self._parent.get_state(), "skipped": dict(self.skipped),
                "documents": self.documents, "truncated": self.truncated}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.skipped = collections.Counter(state["skipped"])
        self.documents, self.truncated = int(state["documents"]), int(state["truncated"])


def host_batch_size(config, shard_count: int) -> int:
    """Rows per host: config.data.batch_size split evenly over the hosts.

    Raises:
      ValueError: when config.data.batch_size is not divisible by the host count.
    """
    if config.data.batch_size % shard_count:
        raise ValueError(f"config.data.batch_size={config.data.batch_size} is not divisible "
                         f"by the {shard_count} hosts reading data")
    return config.data.batch_size // shard_count


def make_dataset(config, *, shard: grain.sharding.ShardOptions | None = None,
                 batch_size: int | None = None, num_workers: int | None = None,
                 seed: int | None = None) -> grain.IterDataset:
    """The whole per-host pipeline as a Grain IterDataset of PackedBatches.

    Args:
      config: a unijax config (`config.data`, `config.model`, `config.seed`).
      shard: this host's shard; default ShardByJaxProcess (one shard per jax process).
      batch_size: rows per host batch; default config.data.batch_size / shard count.
      num_workers: Grain worker processes; default config.data.num_workers (0: in-process).
      seed: default config.seed; the stream is a function of it.
    """
    data = config.data
    shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=False)
    batch_size = batch_size or host_batch_size(config, shard.shard_count)
    num_workers = data.num_workers if num_workers is None else num_workers
    seed = config.seed if seed is None else seed
    tokenizer = tokenizer_lib.load_tokenizer(data.tokenizer)
    spec = packing.PackSpec.from_config(config, special=tokenizer.special)
    num_epochs = data.num_epochs or None

    components, weights = [], []
    for k, ds_spec in enumerate(resolve_datasets(config)):
        settings = plan_lib.ImageSettings.from_config(config, ds_spec.options)
        ds = grain.MapDataset.source(RecordSource(ds_spec.paths))
        ds = ds[shard.shard_index::shard.shard_count]
        ds = ds.seed(seed * 1009 + k)
        if data.shuffle:
            ds = ds.shuffle()
        ds = ds.repeat(num_epochs)
        ds = ds.random_map(RecordToPlan(ds_spec.name, ds_spec.options, settings, data.tokenizer))
        components.append(ds)
        weights.append(ds_spec.weight)
    if len(components) == 1:
        mixed = components[0]
    elif num_epochs is None:
        mixed = grain.MapDataset.mix(components, weights)
    else:  # a finite pass reads every record of every dataset
        mixed = grain.MapDataset.select_from_datasets(
            components, FiniteMixture([len(c) for c in components], weights))
    indexed = mixed.map_with_index(with_index)
    stream = indexed.to_iter_dataset(grain.ReadOptions(
        num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer_size))
    packed = PackIterDataset(stream, indexed, spec, batch_size)
    if num_workers > 0:
        packed = packed.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=data.worker_buffer_size))
    return HostBatchIterDataset(packed, spec)


def make_iterator(config, **kwargs) -> HostBatchIterator:
    """`iter(make_dataset(config, **kwargs))`: this host's checkpointable batch iterator."""
    return iter(make_dataset(config, **kwargs))


def global_batch(batch: batch_lib.PackedBatch, mesh, batch_axes=("data", "fsdp")):
    """Per-host numpy PackedBatch -> PackedBatch of global jax.Arrays sharded on the batch axis.

    Every host passes its own rows; the global batch has process_count x as many
    (`jax.make_array_from_process_local_data`).
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
