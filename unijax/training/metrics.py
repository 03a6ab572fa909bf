"""What a run tells its user: a progress bar, scalars on disk, the parameter overview, a report.

  writer = MetricWriter(workdir, start_step)      # WORKDIR/metrics.jsonl + WORKDIR/tensorboard
  writer.write(step, {"train/loss": 1.2, ...})
  bar = Progress(total=steps, initial=start_step)  # step, loss, steps/s, ETA on the console
  text = parameter_overview(params)               # clu's table of names, shapes, sizes
  scalars = dataset_scalars(names, step_rows)     # per-dataset CE / MSE / tokens over steps
  timer.add(steps, tokens, model_flops)           # then rates() and per_device(devices, peak):
                                                  # tokens/s, TFLOP/s and MFU per device

Only process 0 writes files and draws the bar; every process may call these. On a restart from
step K, `metrics.jsonl` keeps the lines up to K and TensorBoard purges later events, so a resumed
run's curves have no doubled steps.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import logging
from clu import parameter_overview as clu_overview


def _is_writer() -> bool:
    return jax.process_index() == 0


class MetricWriter:
    """Scalars to `metrics.jsonl` (one JSON object per write: {"step": k, name: value, ...})
    and to TensorBoard event files under `tensorboard/` (tensorboardX: no TensorFlow)."""

    def __init__(self, workdir: str, start_step: int = 0, *, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not _is_writer():
            return
        _truncate_after(self.path, start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not _is_writer():
            return
        clean = {k: float(v) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for name, value in clean.items():
                self._tb.add_scalar(name, value, int(step))

    def images(self, step: int, name: str, images) -> None:
        """A row of uint8 [H, W, 3] images as one TensorBoard image (nothing without TB)."""
        if not _is_writer() or self._tb is None or not len(images):
            return
        strip = np.concatenate([np.asarray(im, np.uint8) for im in images], axis=1)
        self._tb.add_image(name, strip, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _truncate_after(path: str, step: int) -> None:
    """Drops the lines of a metrics file beyond `step` (a run that resumes from `step`)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by a crash
    with open(path, "w") as f:
        f.writelines(kept)


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `WORKDIR/metrics.jsonl`."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def dataset_scalars(names, rows) -> dict[str, float]:
    """Per-dataset scalars of the steps since the last log, keyed "<name>/<metric>".

    Args:
      names: the dataset names; name k reads bucket k.
      rows: per step {"ce", "mse", "text_weight", "flow_weight", "text_tokens", "flow_tokens",
        "tokens"}, each [K] (`train.make_train_step`'s "per_dataset").

    Returns:
      "<name>/ce" and "<name>/mse": means over the steps weighted by the text / flow weight
      (so the ratio of the summed losses to the summed weights), only for a dataset with
      such weight in those steps; "<name>/text_weight", "/flow_weight", "/text_tokens",
      "/flow_tokens", "/tokens": means per step.
    """
    if not rows or not names:
        return {}
    stack = {k: np.stack([np.asarray(r[k], np.float64) for r in rows]) for k in rows[0]}
    out = {}
    for k, name in enumerate(names):
        for loss, weight in (("ce", "text_weight"), ("mse", "flow_weight")):
            w = stack[weight][:, k]
            if w.sum() > 0:
                out[f"{name}/{loss}"] = float(np.sum(stack[loss][:, k] * w) / w.sum())
        for key in ("text_weight", "flow_weight", "text_tokens", "flow_tokens", "tokens"):
            out[f"{name}/{key}"] = float(stack[key][:, k].mean())
    return out


def read_tensorboard(workdir: str) -> dict[str, dict[int, float]]:
    """The scalars of `WORKDIR/tensorboard`'s event files: {tag: {step: value}}.

    Reads the TFRecord framing (u64 length, u32 crc, payload, u32 crc) and the Event protos
    with tensorboardX's own protobuf classes (no TensorFlow); the crcs are not checked.
    """
    import struct

    from tensorboardX.proto import event_pb2

    directory = os.path.join(workdir, "tensorboard")
    scalars: dict[str, dict[int, float]] = {}
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for name in (n for n in names if n.startswith("events.out.tfevents")):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[int(event.step)] = value.simple_value
    return scalars


class Progress:
    """A tqdm bar on stderr: step / total, steps/s, ETA and the latest loss."""

    def __init__(self, total: int, initial: int = 0):
        self._bar = None
        if _is_writer():
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def update(self, steps: int, **postfix) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()},
                                      refresh=False)
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def parameter_overview(params: dict) -> str:
    """clu's parameter table (names, shapes, dtypes, sizes) of a pure dict of (abstract)
    arrays; statistics are not computed (that would gather every shard)."""
    return clu_overview.get_parameter_overview(params, include_stats=False)


class StepTimer:
    """Steps, tokens and model FLOPs per second since the first measured step (compilation
    excluded)."""

    def __init__(self):
        self._start = None
        self._steps = 0
        self._tokens = 0.0
        self._flops = 0.0

    def start(self) -> None:
        self._start, self._steps, self._tokens = time.perf_counter(), 0, 0.0
        self._flops = 0.0

    def add(self, steps: int, tokens: float, model_flops: float = 0.0) -> None:
        """Counts `steps` finished steps of `tokens` non-padding tokens and `model_flops`
        (`models.flops.step_flops`'s "model" of their global batches) in total."""
        self._steps += steps
        self._tokens += tokens
        self._flops += model_flops

    def per_device(self, devices: int, peak_flops: float | None = None) -> dict[str, float]:
        """Per-device rates of the measured steps: {"tokens_per_s_per_device",
        "tflops_per_s_per_device" (model FLOPs, 1e12/s), and with a known `peak_flops` (FLOP/s
        per device) "mfu" = model FLOPs / time / devices / peak}; {} before any step."""
        if not self._steps:
            return {}
        seconds = max(self.seconds, 1e-9)
        flops = self._flops / seconds / devices
        out = {"tokens_per_s_per_device": self._tokens / seconds / devices,
               "tflops_per_s_per_device": flops / 1e12}
        if peak_flops:
            out["mfu"] = flops / peak_flops
        return out

    @property
    def seconds(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start

    def rates(self) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {"steps_per_s": self._steps / seconds, "tokens_per_s": self._tokens / seconds}


def format_report(report: dict) -> str:
    """The end-of-training report as a few console lines."""
    lines = [f"report: {report['steps']} steps in {report['wall_time_s']:.0f} s "
             f"({report['steps_per_s']:.2f} steps/s, {report['tokens_per_s']:.0f} tokens/s)"]
    initial, final = report.get("initial"), report.get("final")
    if initial and final:
        # Totals first, then each split's ("<split>/ce", ...), in a column wide enough for both.
        keys = sorted((k for k in initial if not k.endswith("_tokens") and k in final),
                      key=lambda k: ("/" in k, k))
        width = max([12] + [len(k) + 2 for k in keys])
        lines.append(f"  {'held-out':<{width}}{'step 0':>10}{'final':>10}{'ratio':>8}"
                     + (f"{'EMA':>10}" if report.get("final_ema") else ""))
        for key in keys:
            a, b = initial[key], final[key]
            row = f"  {key:<{width}}{a:>10.4f}{b:>10.4f}{b / a if a else np.nan:>8.3f}"
            if report.get("final_ema"):
                row += f"{report['final_ema'][key]:>10.4f}"
            lines.append(row)
    judges = report.get("judges")
    if judges:
        lines.append(format_judges(judges))
    for key in ("nonfinite_steps", "skipped_records"):
        if report.get(key):
            lines.append(f"  {key}: {report[key]}")
    logging.info("%s", "\n".join(lines))
    return "\n".join(lines)


def format_judges(judges: dict) -> str:
    """The judges' scores (`training/judges.py`) as a table: one row per category, columns
    step 0 / final / chance."""
    columns = [name for name in ("initial", "final", "chance") if judges.get(name)]
    lines = [f"  {'judged':<30}" + "".join(f"{c:>9}" for c in columns)]
    first = judges[columns[0]]
    for part in ("generation", "understanding"):
        for world, scores in first.get(part, {}).items():
            for category in scores:
                row = f"  {part[:3]} {world}/{category}"
                lines.append(f"{row:<32}" + "".join(
                    f"{judges[c][part][world][category]:>9.3f}" for c in columns))
    return "\n".join(lines)
