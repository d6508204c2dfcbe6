"""Logical axis names of the model's parameters and their mapping to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded), `model` (tensor parallel). Every logical name the model uses appears here;
None means replicated.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),  # activations and inputs
    ("vocab", ("model", "fsdp")),  # hash-table rows
    ("table_embed", None),
    ("embed", "fsdp"),  # the model width of dense weights
    ("proj_in", None),  # concatenated inputs of the input projections
    ("mlp", "model"),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("actions", None),
    ("surfaces", None),
    ("norm", None),
)

MESH_AXES = ("data", "fsdp", "model")


def logical_sharding(mesh: jax.sharding.Mesh, names: tuple[str | None, ...], rules: LogicalRules = DEFAULT_RULES):
    """The `NamedSharding` of an array whose axes have logical `names`, under `rules`."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes in MESH_AXES order, -1 filled with what the others leave."""
    shape = [sizes[a] for a in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh {sizes}: each axis is a positive size, and at most one is -1")
    known = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh {sizes}: {num_devices} devices do not divide by {known}")
        shape[free[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(shape)} devices, but there are {num_devices}")
    return tuple(shape)


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: all), sharding propagated by XLA."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_divisible(state, mesh: jax.sharding.Mesh) -> None:
    """Every sharded dimension divides evenly over its mesh axes; names the parameter otherwise."""
    specs = nnx.get_partition_spec(state)
    problems = []
    for (path, spec), leaf in zip(
        jax.tree_util.tree_leaves_with_path(specs), jax.tree_util.tree_leaves(state), strict=True
    ):
        for dim, axes in zip(leaf.shape, spec or (), strict=False):  # a spec may name fewer axes than the shape
            if axes is None:
                continue
            n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % n:
                problems.append(f"{jax.tree_util.keystr(path)}: dimension {dim} over {axes} ({n} shards)")
    if problems:
        raise ValueError("parameters do not divide evenly over the mesh: " + "; ".join(problems))
