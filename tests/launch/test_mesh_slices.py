"""The slice (DCN) axis of `config.mesh`: how the slices split the mesh, its errors, and that one
slice leaves the mesh exactly as before. The hybrid device layout itself runs in the two-process
launch test (tests/launch/test_local.py), where each process is one slice."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from unijax import config as config_lib
from unijax.training import sharding


def _mesh(data, fsdp=1, tensor=1, **slices):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, **slices))


@pytest.mark.parametrize("mesh, ici, dcn", [
    (_mesh(-1), (8, 1, 1), (1, 1, 1)),
    (_mesh(-1, num_slices=2), (4, 1, 1), (2, 1, 1)),
    (_mesh(2, 2, 2, num_slices=2), (1, 2, 2), (2, 1, 1)),
    (_mesh(2, -1, 1, num_slices=2, slice_axis="fsdp"), (2, 2, 1), (1, 2, 1)),
])
def test_slices_split_their_axis(mesh, ici, dcn):
    assert sharding.slice_shapes(mesh, 8) == (ici, dcn)


@pytest.mark.parametrize("mesh, message", [
    (_mesh(-1, num_slices=3), "config.mesh.num_slices=3 does not divide the mesh axis it spans "
                              "(config.mesh.slice_axis='data' has size 8 over 8 devices); make "
                              "config.mesh.data a multiple of 3"),
    (_mesh(1, -1, num_slices=2), "config.mesh.slice_axis='data' has size 1"),
    (_mesh(-1, num_slices=0), "config.mesh.num_slices must be an int >= 1, got 0"),
    (_mesh(-1, num_slices=2, slice_axis="model"), "config.mesh.slice_axis must be one of"),
])
def test_bad_slices_name_the_field(mesh, message):
    with pytest.raises(config_lib.ConfigError) as e:
        sharding.slice_shapes(mesh, 8)
    assert message in str(e.value)


def test_one_slice_leaves_the_mesh_unchanged(cpu_devices, tiny_config):
    assert (tiny_config.mesh.num_slices, tiny_config.mesh.slice_axis) == (1, "data")
    tiny_config.mesh.data, tiny_config.mesh.fsdp, tiny_config.mesh.tensor = -1, 2, 2
    mesh = sharding.make_mesh(tiny_config.mesh)
    plain = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert np.array_equal(mesh.device_ids, plain.device_ids)
    assert sharding.make_mesh(_mesh(2, 2, 2)).device_ids.tolist() == mesh.device_ids.tolist()


def test_slices_must_match_the_processes_off_tpu(cpu_devices):
    """On CPU and GPU a process is one slice: one process cannot hold two."""
    with pytest.raises(config_lib.ConfigError,
                       match="config.mesh.num_slices=2 but the 8 devices span 1 processes"):
        sharding.make_mesh(_mesh(-1, num_slices=2))
