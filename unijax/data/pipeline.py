"""The Grain input pipeline: ArrayRecord shards -> fixed-shape PackedBatches, per host.

  per dataset:  sources.RecordSource (its readable shards) -> this host's shard
                (ShardByJaxProcess) -> shuffle ->
                repeat -> decode + plan (tokenize, images, flow times, CFG dropout; seeded per
                element, so the stream is a function of the seed)
  mixture:      MapDataset.mix by the config weights (finite epochs: `FiniteMixture`, which
                reads every record of every dataset, where `mix` stops at the first that ends)
  per worker:   read threads -> first-fit assignment of documents to `batch_size` rows, with
                a look-ahead buffer of `config.data.pack_buffer` documents that fit no open row
                (`stream.PackIterDataset`)
  workers:      mp_prefetch (spawn; every stage is a picklable top-level class)
  main process: `stream.HostBatchIterator`: lays the rows out as a PackedBatch, skip counters,
                logs, the skip-fraction stop

Rows travel between processes as plans (uint8 pixels of the actual images), and the fixed-shape
arrays are only built in the main process: the padded canvases of BAGEL-sized rows (8 VAE
slots of 1024^2 pixels: 25 MB a row as uint8) would otherwise be copied through shared memory.
Batches keep the pixels uint8 up to the device (`batch.normalize_pixels` runs in the model).

A record that fails (msgpack garbage, unknown schema version, missing field, truncated image,
corrupt video frame, image over `config.data.max_image_pixels`, document too long for a row, a
damaged chunk of its shard: "unreadable") becomes a `Skip` that travels with the next batch; the
main-process iterator logs it with its file and index and counts it per reason
(`iterator.skipped`). Good records are never dropped: every record is either packed (documents
are listed in `iterator.last_documents`) or counted. Records skipped after a stream's last
document (the end of a finite stream, or of one worker's share) travel without a batch: they
are counted before the iterator stops, and no all-padding batch is yielded for them.

Bad storage (`unijax.data.sources`): a shard that does not open is found at start-up and left
out (`config.data.on_bad_shard="skip"`, the default: a pod that restarts into the same bad
file would otherwise crash-loop; each one is logged with its path and counted as
`skipped["bad_shard"]`, in shards) or fatal ("fail"); a dataset without any readable shard is
an error. When skipped records exceed `config.data.max_skip_fraction` of the records read (once
`config.data.skip_fraction_min_records` have been read, so one early bad record does not stop
a run), the iterator raises `DataError` naming the counts and the top reasons: past that point
the data, not the run, needs fixing.

Sources: `config.data.datasets.<name>` holds either `paths` (unijax ArrayRecord shards,
`configs.base.data_source`) or `tfds` (a TFDS dataset prepared in ArrayRecord format, mapped
to records by an adapter: `configs.base.tfds_source`, `unijax.data.tfds_sources`).

Checkpointing: the iterator is a `grain.DatasetIterator`; save and restore it with
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(fresh_it)` under an Orbax
CheckpointManager item handled by `grain.checkpoint.CheckpointHandler()`. The packer's state is
the read position plus the stream indices of the documents its look-ahead buffer holds (re-read
on restore: a document is a function of its index), so a restored iterator yields exactly the
batches the saved one would have.
"""

from __future__ import annotations

import bisect
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
from unijax.data import packing, records, sources, stream
from unijax.data import plan as plan_lib
from unijax.data import tokenizer as tokenizer_lib

# Where other modules have always found them.
RecordSource = sources.RecordSource
Skip, DataError, SkipPolicy = stream.Skip, stream.DataError, stream.SkipPolicy
PackIterDataset, HostBatchIterDataset = stream.PackIterDataset, stream.HostBatchIterDataset
HostBatchIterator, with_index = stream.HostBatchIterator, stream.with_index


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One mixture component, resolved from `config.data.datasets.<name>`.

    `paths` are the files of its readable `shards`; `bad_shards` the (path, why) of those
    left out at start-up; `adapter` maps a TFDS example's bytes to a record (None: the bytes
    are unijax msgpack records).
    """

    name: str
    paths: tuple[str, ...]
    weight: float
    options: plan_lib.PlanOptions
    shards: tuple[sources.Shard, ...] = ()
    bad_shards: tuple[tuple[str, str], ...] = ()
    adapter: object | None = None


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

    Every shard is opened once here (`sources.check_shards`): bad ones are reported with
    their path and left out, or fatal, as `config.data.on_bad_shard` says.

    Raises:
      ValueError / FileNotFoundError: naming `config.data.datasets.<name>.<field>`.
      sources.BadShardError: a bad shard under on_bad_shard="fail", or a dataset without any
        readable shard (naming the dataset).
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
        adapter = None
        if entry.get("tfds"):
            from unijax.data import tfds_sources  # imports tensorflow_datasets: only if used

            shards, adapter = tfds_sources.resolve(entry, field)
        else:
            shards = resolve_paths(entry.paths, f"{field}.paths")
        good, bad = sources.check_shards(
            shards, on_bad_shard=config.data.get("on_bad_shard", "skip"), dataset=field)
        out.append(DatasetSpec(name, tuple(s.path for s in good),
                               float(entry.get("weight", 1.0)), options, good, bad, adapter))
    return out


def decode(data, path: str, index: int, adapter=None) -> dict:
    """A `RecordSource` element -> a validated record (`adapter`: `DatasetSpec.adapter`).

    Raises:
      records.RecordError: reason "unreadable" when the shard could not give the record's
        bytes (`sources.Unreadable`), else as `records.decode_record` or the adapter.
    """
    if isinstance(data, sources.Unreadable):
        raise records.RecordError(data.message, "unreadable")
    return records.decode_record(data) if adapter is None else adapter(data, path, index)


class RecordToPlan:
    """(bytes, path, index), rng -> SequencePlan, or Skip when the record is unusable.

    `adapter(bytes, path, index) -> record` decodes other formats (TFDS examples); by default
    the bytes are a unijax msgpack record.
    """

    def __init__(self, dataset: str, options: plan_lib.PlanOptions,
                 settings: plan_lib.ImageSettings, tokenizer_spec: str, adapter=None):
        self.dataset, self.options, self.settings = dataset, options, settings
        self.tokenizer_spec, self.adapter = tokenizer_spec, adapter
        self._tokenizer = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # re-loaded in the worker process
        return state

    def __call__(self, element, rng: np.random.Generator):
        data, path, index = element
        if self._tokenizer is None:  # loaded once per process, safely under read threads
            self._tokenizer = tokenizer_lib.load_tokenizer(self.tokenizer_spec)
        try:
            record = decode(data, path, index, self.adapter)
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
    specs = resolve_datasets(config)
    for k, ds_spec in enumerate(specs):
        settings = plan_lib.ImageSettings.from_config(config, ds_spec.options)
        ds = grain.MapDataset.source(sources.RecordSource(ds_spec.shards))
        ds = ds[shard.shard_index::shard.shard_count]
        ds = ds.seed(seed * 1009 + k)
        if data.shuffle:
            ds = ds.shuffle()
        ds = ds.repeat(num_epochs)
        ds = ds.random_map(RecordToPlan(ds_spec.name, ds_spec.options, settings, data.tokenizer,
                                        ds_spec.adapter))
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
    bad_shards = sum(len(ds_spec.bad_shards) for ds_spec in specs)
    return HostBatchIterDataset(packed, spec, SkipPolicy.from_config(config, bad_shards))


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
