"""Exact parameter counts from abstract shapes, with a per-module breakdown.

  state = abstract_params(lambda: MoTDecoder(config, rngs=nnx.Rngs(0)))   # no allocation
  rows = count_by_group(state, mot.param_groups(cfg) + [("vit", ("vit",))])
  print(format_breakdown(rows))    # "parameters: 14,141,252,608" + one line per group

A group is a label and a path prefix (the attribute names from the model's root, e.g.
("layers", "gen")). Each parameter belongs to the first group whose prefix matches its path;
parameters no group claims are reported as "other", so nothing is silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from flax import nnx


def abstract_params(build: Callable[[], nnx.Module], kind=nnx.Param) -> nnx.State:
    """The `kind` (default `nnx.Param`) state of `build()` as ShapeDtypeStructs
    (`nnx.eval_shape`, no memory)."""
    return nnx.state(nnx.eval_shape(build), kind)


def _leaf_sizes(state) -> list[tuple[tuple[str, ...], int]]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)
                                                 if isinstance(state, nnx.State) else state)
    out = []
    for path, leaf in leaves:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                     for k in path)
        out.append((keys, math.prod(leaf.shape)))
    return out


def count(state) -> int:
    """Total number of scalars in a state / pytree of arrays or ShapeDtypeStructs."""
    return sum(size for _, size in _leaf_sizes(state))


def count_by_group(state, groups: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, int]]:
    """Per-group parameter counts, in the order of `groups` (+ "other" for unclaimed leaves).

    Args:
      state: a parameter state (e.g. from `abstract_params`) or a nested dict of arrays.
      groups: (label, path prefix) pairs; the first matching prefix claims a parameter.
    """
    totals = {label: 0 for label, _ in groups}
    other = 0
    for keys, size in _leaf_sizes(state):
        for label, prefix in groups:
            if keys[:len(prefix)] == tuple(prefix):
                totals[label] += size
                break
        else:
            other += size
    rows = list(totals.items())
    if other:
        rows.append(("other", other))
    return rows


def format_breakdown(rows: Sequence[tuple[str, int]]) -> str:
    """`parameters: N` (with thousands separators), then one indented line per group."""
    total = sum(n for _, n in rows)
    width = max((len(label) for label, _ in rows), default=0)
    lines = [f"parameters: {total:,}"]
    for label, n in rows:
        share = 100.0 * n / total if total else 0.0
        lines.append(f"  {label:<{width}}  {n:>16,}  ({share:5.2f}%)")
    return "\n".join(lines)
