r"""Capacity planner: row budgets that the configured mixture fills.

  python -m unijax.data.capacity --config=configs/tiny.py [--row_length=384] [--sample=2000]

The experts' matmuls run over every slot of a row, padding included, so a row whose gen slice
binds while its und slice stays nearly empty (or the reverse) spends FLOPs on nothing. The
planner reads a sample of the configured mixture (`config.data.datasets`, each dataset's share
by its weight), plans every record exactly as the pipeline does (tokenizer, resize rules, CFG
dropout), and packs the sample with the pipeline's own packer (`packing.RowPacker`: first-fit
with the `pack_buffer` look-ahead). It then proposes, for a target row length (und + gen
tokens):

  und / gen split   the split that maximises the fill of the less-filled slice, searched
                    around the mixture's ratio of und to gen tokens (multiples of --multiple);
  ViT / VAE slots   the fewest ViT patches and VAE images per row that keep the slices'
                    fill within --tolerance of their fill with unbounded slots;
  rows per batch    the config's tokens per step divided by the row length (multiples of
                    --rows_multiple), or --tokens_per_step / row length.

and reports the fill of each budget for the proposal (and for the config as it is): the
fraction of und slots holding a token, of gen slots, of ViT patch slots and of VAE image
slots, over complete batches. Documents are drawn with replacement from the sample, so a
small sample still fills many batches. The sample is planned with budgets as large as the
config's resize rules allow, so the demand is measured before any row shrinks an image.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from unijax.data import packing, records
from unijax.data import plan as plan_lib
from unijax.data import tokenizer as tokenizer_lib

BUDGETS = ("und", "gen", "vit", "vae")
_UNBOUNDED = 1 << 30


@dataclasses.dataclass(frozen=True)
class Demand:
    """The planned cost of each sampled document: [n, 4] (und, gen, ViT patches, VAE images)."""

    costs: np.ndarray
    datasets: tuple[str, ...]  # per document, the mixture component it came from
    largest_vit_image: int = 0  # patches of the largest single ViT image

    def summary(self) -> dict:
        """Mean, median, 99th percentile and maximum of every budget, per document."""
        out = {}
        for j, name in enumerate(BUDGETS):
            c = self.costs[:, j]
            out[name] = {"mean": float(c.mean()), "p50": float(np.percentile(c, 50)),
                         "p99": float(np.percentile(c, 99)), "max": int(c.max())}
        return out


def _uncapped(config):
    """A copy of the config whose row budgets do not shrink images (only the resize rules'
    own sizes and the latent position table bound them)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.und_capacity = _UNBOUNDED
        config.data.gen_capacity = _UNBOUNDED
        config.data.max_vit_patches = _UNBOUNDED
    return config


def sample_plans(config, num_documents: int = 2000, seed: int = 0):
    """Yields (dataset name, SequencePlan) for `num_documents` records of the mixture, each
    dataset's share by its weight, planned as the pipeline plans them (tokenizer, resize
    rules, CFG dropout) but with row budgets that shrink no image.

    Records are read at random indices of each dataset's shards (with replacement when a
    dataset holds fewer). Records the pipeline would skip (bad bytes, images too large) are
    left out.
    """
    from unijax.data import pipeline, sources  # the mixture's sources and decoding

    specs = pipeline.resolve_datasets(config)
    tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer)
    uncapped = _uncapped(config)
    total = sum(s.weight for s in specs)
    rng = np.random.default_rng(seed)
    for spec in specs:
        share = max(1, round(num_documents * spec.weight / total))
        source = sources.RecordSource(spec.shards)
        settings = plan_lib.ImageSettings.from_config(uncapped, spec.options)
        picks = rng.choice(len(source), size=share, replace=share > len(source))
        for index in picks:
            data, path, local = source[int(index)]
            try:
                record = pipeline.decode(data, path, local, spec.adapter)
                key = plan_lib.DocKey(spec.name, path, local, record["id"])
                yield spec.name, plan_lib.plan_record(
                    record, tokenizer, spec.options, settings,
                    np.random.default_rng([seed, int(index)]), key)
            except records.RecordError:
                continue


def sample_demand(config, num_documents: int = 2000, seed: int = 0) -> Demand:
    """The planned costs of `sample_plans(config, num_documents, seed)` (pixels not kept)."""
    costs, names, largest = [], [], 0
    for name, plan in sample_plans(config, num_documents, seed):
        costs.append(plan.cost())
        names.append(name)
        largest = max([largest] + [i.grid[0] * i.grid[1] for i in plan.items
                                   if isinstance(i, plan_lib.ImageItem) and i.kind == "vit"])
    if not costs:
        raise ValueError("capacity: no record of config.data.datasets could be planned")
    return Demand(np.asarray(costs, np.int64), tuple(names), largest)


@dataclasses.dataclass(frozen=True)
class Budgets:
    """One row's budgets and the rows per (host) batch."""

    und: int
    gen: int
    vit: int
    vae: int
    rows: int

    @property
    def capacity(self) -> np.ndarray:
        return np.array([self.und, self.gen, self.vit, self.vae], np.int64)


def simulate(demand: Demand, budgets: Budgets, *, pack_buffer: int = packing.DEFAULT_PACK_BUFFER,
             overlong: str = "truncate", num_batches: int = 20, seed: int = 0) -> dict:
    """Packs documents drawn from the sample into complete batches with the pipeline's packer.

    A document larger than an empty row is dropped (`overlong="drop"`) or, as the pipeline
    truncates it, counted as filling at most an empty row (its cost clipped to the row: the
    truncated document keeps a prefix that fits, so this slightly overstates its use).

    Returns:
      {"fill": {budget: mean fraction of its slots used}, "fill_p10": {budget: 10th
      percentile over batches}, "row_use": [batches * rows, 4] used slots per row,
      "docs_per_row": mean, "too_large": fraction of drawn documents that exceed an empty row}.
    """
    cap = budgets.capacity
    packer = _CostPacker(cap, budgets.rows, pack_buffer)
    rng = np.random.default_rng(seed)
    fills, rows_used, too_large, drawn, docs = [], [], 0, 0, 0
    while len(fills) < num_batches:
        for index in rng.integers(0, len(demand.costs), size=1024):
            cost = demand.costs[index]
            drawn += 1
            if np.any(cost > cap):
                too_large += 1
                if overlong == "drop":
                    continue
                cost = np.minimum(cost, cap)
            if packer.offer(cost):
                used, count = packer.take()
                slots = cap * budgets.rows
                fills.append(np.divide(used.sum(0), slots, out=np.zeros(4),
                                       where=slots > 0))
                rows_used.append(used)
                docs += count
                if len(fills) == num_batches:
                    break
        if drawn > 1000 and too_large == drawn:
            raise ValueError(f"capacity: no sampled document fits a row of {budgets}")
    fills = np.asarray(fills)
    return {"fill": dict(zip(BUDGETS, fills.mean(0).round(4).tolist())),
            "fill_p10": dict(zip(BUDGETS, np.percentile(fills, 10, axis=0).round(4).tolist())),
            "row_use": np.concatenate(rows_used),
            "docs_per_row": docs / (num_batches * budgets.rows),
            "too_large": too_large / max(drawn, 1)}


class _CostPacker:
    """`packing.RowPacker`'s first-fit with look-ahead, over cost vectors alone (no layout)."""

    def __init__(self, capacity: np.ndarray, rows: int, pack_buffer: int):
        self.capacity, self.pack_buffer = capacity, pack_buffer
        self.used = np.zeros((rows, 4), np.int64)
        self.count = 0
        self.held: list[np.ndarray] = []

    def _place(self, cost) -> bool:
        fits = np.all(self.used + cost <= self.capacity, axis=1)
        if not fits.any():
            return False
        self.used[int(np.argmax(fits))] += cost
        self.count += 1
        return True

    def offer(self, cost) -> bool:
        if self._place(cost):
            return False
        self.held.append(cost)
        return len(self.held) > self.pack_buffer

    def take(self):
        used, count = self.used, self.count
        self.used, self.count = np.zeros_like(used), 0
        self.held = [c for c in self.held if not self._place(c)]
        return used, count


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(max(x, 1) / multiple) * multiple)


def propose(demand: Demand, row_length: int, rows: int, *, min_und: int = 1, min_gen: int = 1,
            min_vit: int = 0, multiple: int = 128, pack_buffer: int = packing.DEFAULT_PACK_BUFFER,
            overlong: str = "truncate", tolerance: float = 0.01, num_batches: int = 20,
            seed: int = 0) -> tuple[Budgets, dict]:
    """The und / gen split, ViT / VAE slots for `row_length` tokens and `rows` rows.

    `min_und` / `min_gen` / `min_vit`: the smallest budgets the config accepts (one image at
    the resize rules' minimum size; `unijax.config` checks the same). Documents larger than a
    row are truncated, as in training (`too_large` in the result says how many).

    Returns (budgets, the simulation of them).
    """
    costs = demand.costs
    biggest = costs.max(0)
    lo = _round_up(min_und, multiple)
    hi = row_length - _round_up(min_gen, multiple) if biggest[1] else row_length
    if lo > hi:
        raise ValueError(f"capacity: a row of {row_length} tokens cannot hold the smallest "
                         f"image of each slice (und {min_und}, gen {min_gen} tokens)")
    def row(und: int, vit: int = _UNBOUNDED, vae: int = _UNBOUNDED) -> Budgets:
        return Budgets(und, row_length - und, vit, vae, rows)

    def score(budgets: Budgets) -> tuple[float, dict]:
        """(fill of the less-filled slice, the simulation)."""
        sim = simulate(demand, budgets, pack_buffer=pack_buffer, overlong=overlong,
                       num_batches=num_batches, seed=seed)
        return min(sim["fill"]["und"], sim["fill"]["gen"] if budgets.gen else 1.0), sim

    # The split, with unbounded ViT / VAE slots: a coarse grid around the mixture's ratio of
    # und to gen tokens, then the neighbours of the best point.
    centre = costs[:, 0].sum() / max(costs[:, :2].sum(), 1) * row_length
    scored = {und: score(row(und)) for und in sorted(
        {min(max(_round_up(centre * f, multiple), lo), hi) for f in np.linspace(0.6, 1.4, 9)})}
    best = max(scored, key=lambda u: scored[u][0])
    for und in (best - 2 * multiple, best - multiple, best + multiple, best + 2 * multiple):
        if lo <= und <= hi and und not in scored:
            scored[und] = score(row(und))
    und = max(scored, key=lambda u: scored[u][0])
    target, use = scored[und][0] - tolerance, scored[und][1]["row_use"]

    # Slots: the fewest ViT patches, then VAE images, per row that keep the slices' fill
    # within `tolerance` of the unbounded fill (padding slots cost ViT FLOPs and canvas
    # memory), never fewer than the largest single image or the config's minimum needs.
    def fewest(column: int, rounding, floor: int, budgets_with) -> int:
        options = sorted({max(floor, rounding(np.quantile(use[:, column], q)))
                          for q in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)})
        return next((o for o in options if score(budgets_with(o))[0] >= target), options[-1])

    needs_vit = bool(min_vit or biggest[2])
    vit = vit_floor = _round_up(max(demand.largest_vit_image, min_vit), multiple) * needs_vit
    if biggest[2]:
        vit = fewest(2, lambda x: _round_up(x, multiple), vit_floor, lambda v: row(und, vit=v))
    vae = 1
    if biggest[3]:
        vae = fewest(3, lambda x: max(1, math.ceil(x)), 1, lambda n: row(und, vit=vit, vae=n))
    budgets = row(und, vit, vae)
    return budgets, score(budgets)[1]


def smallest_slices(config) -> tuple[int, int, int]:
    """(und tokens, gen tokens, ViT patches) of one image at the short-side minimum of the
    ViT / VAE resize rules: the smallest budgets `unijax.config.validate` accepts (larger
    images shrink to fit)."""
    data, model = config.data, config.model
    und = vit = 1
    if model.vit is not None:
        side = min(data.vit_min_image_size, data.vit_image_size) // model.vit.patch_size
        und, vit = side * side + 2, side * side
    cell = (8 if model.vae is not None else 1) * model.latent_patch_size
    side = min(data.vae_min_image_size, data.vae_image_size) // cell
    return und, side * side, vit


def config_budgets(config, rows: int | None = None) -> Budgets:
    """The budgets `config.data` sets now (rows: per host batch, default the global batch)."""
    data = config.data
    return Budgets(int(data.und_capacity), int(data.gen_capacity), int(data.max_vit_patches),
                   int(data.max_vae_images), int(rows or data.batch_size))


def plan(config, *, row_length: int | None = None, tokens_per_step: int | None = None,
         hosts: int = 1, sample: int = 2000, multiple: int = 128, rows_multiple: int = 8,
         tolerance: float = 0.01, num_batches: int = 20, seed: int = 0) -> dict:
    """Samples the mixture, measures the config's fill and proposes budgets (see the module
    docstring). Rows are simulated per host: the global batch split over `hosts`."""
    data = config.data
    current = config_budgets(config, max(1, data.batch_size // hosts))
    row_length = row_length or current.und + current.gen
    tokens_per_step = tokens_per_step or data.batch_size * (current.und + current.gen)
    global_rows = max(rows_multiple, round(tokens_per_step / row_length / rows_multiple)
                      * rows_multiple)
    demand = sample_demand(config, sample, seed)
    pack_buffer = int(data.get("pack_buffer", packing.DEFAULT_PACK_BUFFER))
    kwargs = dict(pack_buffer=pack_buffer, overlong=data.get("overlong", "truncate"),
                  num_batches=num_batches, seed=seed)
    now = simulate(demand, current, **kwargs)
    min_und, min_gen, min_vit = smallest_slices(config)
    budgets, proposed = propose(demand, row_length, max(1, global_rows // hosts),
                                min_und=min_und, min_gen=min_gen, min_vit=min_vit,
                                multiple=multiple,
                                tolerance=tolerance, **kwargs)
    strip = lambda sim: {k: v for k, v in sim.items() if k != "row_use"}
    return {"sample": len(demand.costs), "demand": demand.summary(),
            "current": {"budgets": dataclasses.asdict(current), **strip(now)},
            "proposal": {"budgets": dataclasses.asdict(budgets), "batch_size": global_rows,
                         **strip(proposed)},
            "flags": {"config.data.und_capacity": budgets.und,
                      "config.data.gen_capacity": budgets.gen,
                      "config.data.max_vit_patches": budgets.vit,
                      "config.data.max_vae_images": budgets.vae,
                      "config.data.batch_size": global_rows}}


def format_plan(result: dict) -> str:
    """The planner's result as a short table."""
    lines = [f"sampled documents: {result['sample']}",
             "per document      " + "".join(f"{b:>12}" for b in BUDGETS)]
    for stat in ("mean", "p99", "max"):
        lines.append(f"  {stat:<16}" + "".join(
            f"{result['demand'][b][stat]:>12.1f}" for b in BUDGETS))
    for name in ("current", "proposal"):
        entry = result[name]
        b = entry["budgets"]
        lines.append(f"{name:<18}" + "".join(f"{b[k]:>12}" for k in BUDGETS)
                     + f"   rows/host {b['rows']}")
        lines.append("  fill (mean)     " + "".join(
            f"{entry['fill'][k]:>12.1%}" for k in BUDGETS))
        lines.append("  fill (p10)      " + "".join(
            f"{entry['fill_p10'][k]:>12.1%}" for k in BUDGETS))
        lines.append(f"  documents/row {entry['docs_per_row']:.1f}, over an empty row "
                     f"{entry['too_large']:.1%}")
    lines.append("flags: " + " ".join(f"--{k}={v}" for k, v in result["flags"].items()))
    return "\n".join(lines)


def _cli() -> None:
    """`python -m unijax.data.capacity`: flags are defined here, not at import, so importing
    this module next to `unijax.main` (which defines --config too) is safe."""
    from absl import app, flags
    from ml_collections import config_flags

    from unijax.data.worlds import shards as worlds

    config_flag = config_flags.DEFINE_config_file("config", None, "config file (path.py:arg)")
    f = {
        "worlds": flags.DEFINE_string(
            "worlds", None, "directory of the embedded worlds, written there if absent (for "
            "configs whose paths name {worlds})"),
        "row_length": flags.DEFINE_integer(
            "row_length", None, "und + gen tokens per row (default: the config's)"),
        "tokens_per_step": flags.DEFINE_integer(
            "tokens_per_step", None, "global tokens per step (default: the config's)"),
        "hosts": flags.DEFINE_integer("hosts", 1, "hosts the global batch is split over"),
        "sample": flags.DEFINE_integer("sample", 2000, "documents to plan"),
        "multiple": flags.DEFINE_integer("multiple", 128, "und / gen / ViT budgets are "
                                         "multiples of this"),
        "rows_multiple": flags.DEFINE_integer("rows_multiple", 8, "global rows are multiples "
                                              "of this"),
        "tolerance": flags.DEFINE_float("tolerance", 0.01, "fill of the slices the ViT / VAE "
                                        "slots may cost"),
        "num_batches": flags.DEFINE_integer("batches", 20, "complete batches simulated"),
        "seed": flags.DEFINE_integer("seed", 0, "sampling seed"),
    }
    output = flags.DEFINE_string("output", None, "also write the result as JSON here")

    def main(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if config_flag.value is None:
            raise app.UsageError("--config is required")
        config = config_flag.value
        kwargs = {k: v.value for k, v in f.items() if k != "worlds"}
        if worlds.uses_worlds(config):
            if not f["worlds"].value:
                raise app.UsageError("the config reads the embedded worlds: pass --worlds=DIR")
            worlds.ensure_worlds(f["worlds"].value,
                                 worlds.WorldSettings.from_config(config.data.worlds))
            config = worlds.resolve_world_paths(config, f["worlds"].value)
        result = plan(config, **kwargs)
        print(format_plan(result), flush=True)
        if output.value:
            with open(output.value, "w") as fh:
                json.dump(result, fh, indent=2)

    app.run(main)


if __name__ == "__main__":
    _cli()
