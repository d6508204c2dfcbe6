"""Logical axis names of parameters and activations, and their mapping to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded), `model` (tensor parallel). Parameters name their axes when created
(`layers.param`); activations are constrained to logical names at the embedding lookups and at
every layer boundary (`constrain`). The rules mapping names to mesh axes are data in the
experiment config (`mesh.rules`), these by default; None means replicated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx.spmd import get_var_pspec
from jax.sharding import AxisType, NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    # Activations and inputs.
    ("batch", ("data", "fsdp")),
    ("length", None),  # sequence positions
    ("act_embed", None),  # the model width of activations
    ("act_heads", "model"),
    ("act_kv_heads", "model"),
    ("act_mlp", "model"),
    # Parameters.
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
    ("layers", None),  # the stacked axis of scanned layers
)

MESH_AXES = ("data", "fsdp", "model")


def rules_to_text(rules: LogicalRules) -> tuple[str, ...]:
    """`(("batch", ("data", "fsdp")), ("norm", None))` -> `("batch:data+fsdp", "norm:")` (config data)."""
    out = []
    for name, axes in rules:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        out.append(f"{name}:{'+'.join(axes)}")
    return tuple(out)


def parse_rules(texts: Sequence[str]) -> LogicalRules:
    """The inverse of `rules_to_text`; ValueError names a malformed rule or an unknown mesh axis."""
    rules, seen = [], set()
    for text in texts:
        name, colon, axes_text = text.partition(":")
        axes = tuple(a for a in axes_text.split("+") if a)
        unknown = [a for a in axes if a not in MESH_AXES]
        if not colon or not name or unknown or name in seen:
            why = (
                "a repeated name"
                if name in seen
                else f"unknown mesh axes {unknown}"
                if unknown
                else "expected name:axis+axis"
            )
            raise ValueError(f"rule {text!r}: {why} (mesh axes: {', '.join(MESH_AXES)})")
        seen.add(name)
        rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(rules)


DEFAULT_RULE_TEXT = rules_to_text(DEFAULT_RULES)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: LogicalRules):
    """Parameters created, and jitted steps traced, in this context are sharded by `rules` over
    `mesh`; outside it the logical names are metadata only."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """`x` constrained to the sharding its logical axis `names` have under the current rules (no-op
    outside `use_mesh`): XLA then never has to guess an activation's layout."""
    return nn.with_logical_constraint(x, names)


def constrain_rows(x: jax.Array, last: str | None = "act_embed") -> jax.Array:
    """`x [B, ..., F]` constrained by batch over its first axis and `last` over its last."""
    return constrain(x, "batch", *([None] * (x.ndim - 2)), last)


def mesh_axes(name: str, rules: LogicalRules) -> tuple[str, ...]:
    """The mesh axes a logical name is placed on by `rules` (() when replicated)."""
    axes = dict(rules).get(name)
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def abstract_sharded(state, mesh: jax.sharding.Mesh, rules: LogicalRules):
    """An NNX state of shapes (e.g. from `nnx.eval_shape`) with every array an abstract
    `ShapeDtypeStruct` sharded by its variable's logical names (replicated where it has none)."""

    def to_abstract(var):
        value = var.get_value()
        if not hasattr(value, "shape"):  # optax's MaskedNode: no array here
            return var
        spec = get_var_pspec(var) or PartitionSpec()
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))

    with nn.logical_axis_rules(rules):
        return jax.tree.map(to_abstract, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
