"""Placing converted numpy weights where a module's parameter lives."""

from __future__ import annotations

import jax
import numpy as np


def place(value: np.ndarray, ref) -> jax.Array:
    """`value` cast to `ref`'s dtype and put on `ref`'s sharding.

    `ref` is a parameter value of the target module: a concrete array, or a
    `jax.ShapeDtypeStruct` of a module built with `nnx.eval_shape`. Built under
    `jax.set_mesh(mesh)`, an abstract module's shardings name the abstract mesh, which cannot
    place data; they are rebuilt on the concrete mesh in context.

    Raises:
      ValueError: for a sharding over an abstract mesh with no concrete mesh set.
    """
    value = np.asarray(value).astype(ref.dtype)
    sharding = getattr(ref, "sharding", None)
    if sharding is None:
        return jax.numpy.asarray(value)
    if isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
        mesh = jax.sharding.get_mesh()
        if mesh is None or mesh.empty:
            raise ValueError("loading into a module built under an abstract mesh needs the "
                             "concrete mesh: call inside `with jax.set_mesh(mesh):`")
        sharding = jax.sharding.NamedSharding(mesh, sharding.spec)
    return jax.device_put(value, sharding)
