"""The device mesh and the one table mapping logical axis names to mesh axes.

Every parameter and activation is annotated with logical names (`embed`, `mlp`, `heads`, ...);
`LOGICAL_RULES` maps them to the mesh axes `("data", "fsdp", "tensor")`. A new parallelism
layout is a change of this table or of the mesh sizes in the config, never of model code.

Multi-slice runs (several TPU slices joined by the data-centre network, DCN) keep the same three
axes: `config.mesh.num_slices` slices split one of them (`config.mesh.slice_axis`, "data" by
default) into slices x per-slice part, and the devices are laid out so that only that axis
crosses the DCN. The logical rules are unchanged; on one slice nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from unijax import config as config_lib

MESH_AXES = config_lib.MESH_AXES

# Logical axis -> mesh axis (or tuple of axes, or None = replicated). First match wins.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("experts", None),
    ("norm", None),
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("patch", None),
    ("conv_in", None),
    ("conv_out", None),
)


def make_mesh(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds the ("data", "fsdp", "tensor") mesh from `config.mesh`.

    Axes are `Auto` (GSPMD-style propagation from annotated inputs and constraints); new jax
    defaults to `Explicit`, under which FSDP-style weights would need manual all-gathers. With
    `num_slices > 1` the devices come from `mesh_utils.create_hybrid_device_mesh`: a TPU's
    slices (`device.slice_index`) or, on platforms without slices, one process per slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    ici, dcn = slice_shapes(mesh_config, len(devices))
    if math.prod(dcn) > 1:
        # Only TPUs number their slices; elsewhere (GPU hosts, CPU tests) a process is one.
        by_process = devices[0].platform != "tpu" or not hasattr(devices[0], "slice_index")
        granules = {d.process_index if by_process else d.slice_index for d in devices}
        if len(granules) != math.prod(dcn):
            kind = "processes" if by_process else "TPU slices"
            raise config_lib.ConfigError(
                f"config.mesh.num_slices={math.prod(dcn)} but the {len(devices)} devices "
                f"span {len(granules)} {kind}")
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                    process_is_granule=by_process)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    shape = tuple(i * d for i, d in zip(ici, dcn))
    if len(devices) == len(jax.devices()) and jax.process_count() == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def slice_shapes(mesh_config: ml_collections.ConfigDict,
                 num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(per-slice ICI shape, DCN shape) of the mesh, each over MESH_AXES: the DCN shape is
    `num_slices` on `slice_axis` and 1 elsewhere; their product is the mesh shape.

    Raises:
      ConfigError: naming `config.mesh.num_slices` / `slice_axis` when the slices cannot split
        the devices or that axis evenly.
    """
    sizes = config_lib.mesh_shape(mesh_config, num_devices)
    slices = mesh_config.get("num_slices", 1)
    axis = mesh_config.get("slice_axis", "data")
    if not isinstance(slices, int) or isinstance(slices, bool) or slices < 1:
        raise config_lib.ConfigError(f"config.mesh.num_slices must be an int >= 1, got "
                                     f"{slices!r}")
    if axis not in MESH_AXES:
        raise config_lib.ConfigError(f"config.mesh.slice_axis must be one of {MESH_AXES}, got "
                                     f"{axis!r}")
    if sizes[axis] % slices:
        raise config_lib.ConfigError(
            f"config.mesh.num_slices={slices} does not divide the mesh axis it spans "
            f"(config.mesh.slice_axis={axis!r} has size {sizes[axis]} over {num_devices} "
            f"devices); make config.mesh.{axis} a multiple of {slices}")
    dcn = tuple(slices if a == axis else 1 for a in MESH_AXES)
    ici = tuple(sizes[a] // d for a, d in zip(MESH_AXES, dcn))
    return ici, dcn


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None],
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec, never using a mesh axis twice.

    Raises:
      KeyError: for a logical name that no rule mentions (a typo in a model annotation).
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(
                f"logical axis {name!r} has no sharding rule; known: {sorted(table)}"
            )
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    """The NamedSharding of an array with these logical axes on `mesh`."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes))


def fitted_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` without the mesh axes that do not divide their dimension of `shape` (such a
    dimension is then replicated over them: e.g. 2 KV heads on a tensor axis of 4)."""
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, size = [], 1
        for axis in axes:
            if shape[i] % (size * mesh.shape[axis]) == 0:
                kept.append(axis)
                size *= mesh.shape[axis]
        out.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*out)


def tree_shardings(mesh: Mesh, logical_specs, shapes):
    """NamedShardings of a pytree of arrays from its logical specs (same structure; a leaf of
    `logical_specs` is a PartitionSpec of logical names, or None for replicated)."""
    def one(logical, shape):
        if logical is None:
            return NamedSharding(mesh, PartitionSpec())
        spec = logical_to_mesh_spec(tuple(logical))
        return NamedSharding(mesh, fitted_spec(spec, shape.shape, mesh))
    return jax.tree.map(one, logical_specs, shapes,
                        is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps the whole array on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the `batch` rule's mesh axes (data x fsdp), everything else whole."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",)))
