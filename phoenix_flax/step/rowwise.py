"""Row-wise Adagrad with sparse row updates for the hash tables (`optimizer.table_optimizer=
"rowwise_adagrad"`), as X's production training updates its tables.

A step looks up a few rows per session of tables of millions of rows. With this optimizer the
step builds nothing of a table's size: the loss is differentiated by the looked-up rows (the
lookups' cotangents, `[B, n, D]`), not by the tables, and then

1. `row_gradients`: each device collects the lookups of the rows it holds, from every batch
   shard (the hashes gathered, the cotangents passed around a ring one block at a time, as the
   lookup's own ring), de-duplicates the rows and sums each one's cotangents: `[U, D]`, U at
   most the global batch's lookups of the table, and at most the shard's rows;
2. `apply_rowwise_adagrad`: for each touched row r, its summed gradient g [D] scaled by the
   clipping factor,
       a_r += mean(g^2);    w_r -= lr * g / sqrt(a_r + eps)  +  lr * weight_decay * w_r
   read from and written back to the rows' own shard. One accumulator per row ([rows] floats of
   state, where element-wise Adagrad keeps [rows, D]); rows the batch does not touch, or whose
   summed gradient is 0, stay exactly as they are (as under element-wise Adagrad).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from phoenix_flax.model.embeddings import TABLES
from phoenix_flax.sharding import mesh_axes

UPDATE_CHUNK = 16384  # rows updated at a time: the update's working set is [UPDATE_CHUNK, D], not [U, D]
EPS = 1e-20  # far below a row's mean squared gradient (~1e-10): it does not take the accumulator's place


class RowGradients(NamedTuple):
    """A table's gradient, by the rows a batch touched; sharded by table rows over the mesh."""

    rows: jax.Array  # [U] int32 per table shard: the shard's rows, ascending; the shard's row count pads
    sums: jax.Array  # [U, D] float32 per table shard: each row's summed gradient (0 where padded)


def is_embedding_table(path, _) -> bool:
    """An nnx filter: the HashEmbeddings tables (which this optimizer updates, not optax)."""
    return len(path) == 3 and path[0] == "embeddings" and path[1] in TABLES and path[2] == "table"


class RowwiseAdagrad(nnx.Pytree):
    """The row-wise accumulators of the HashEmbeddings tables: `[rows]` float32 each, sharded by rows."""

    def __init__(self, rows: dict[str, int], initial_accumulator: float):
        eager = not jax.sharding.get_abstract_mesh().empty
        for name, n in rows.items():
            value = jnp.full([n], initial_accumulator, jnp.float32)
            setattr(self, name, nnx.OptState(value, out_sharding=("vocab",), eager_sharding=eager))


def _axes():
    """(mesh, table axes, batch axes) under the current mesh and rules; None outside one."""
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    return mesh, mesh_axes("vocab", rules), mesh_axes("batch", rules)


def row_gradients(rows: int, hashes: jax.Array, cotangents: jax.Array) -> RowGradients:
    """A table of `rows` rows: its looked-up `hashes [B, n]` and their `cotangents [B, n, D]` ->
    the touched rows and their summed gradients, on the devices that hold them. Hash 0 (padding)
    is never touched."""
    axes = _axes()
    if axes is None:
        return _row_sums(rows, hashes, cotangents, (), (), 1)
    mesh, table_axes, batch_axes = axes
    shards = math.prod(mesh.shape[a] for a in table_axes)
    peers = math.prod(mesh.shape[a] for a in batch_axes)
    local = jax.shard_map(
        lambda h, c: _row_sums(rows // shards, h, c, table_axes, batch_axes, peers, ring=shards > 1),
        mesh=mesh,
        in_specs=(PartitionSpec(batch_axes or None, None), PartitionSpec(batch_axes or None, None, None)),
        out_specs=RowGradients(PartitionSpec(table_axes or None), PartitionSpec(table_axes or None, None)),
        # The ring leaves every peer along the batch axes with the same sums of its rows; the
        # type system cannot see that a full ring makes them invariant.
        check_vma=False,
    )
    return local(hashes, cotangents)


def _row_sums(own_rows: int, hashes, cotangents, table_axes, batch_axes, k: int, ring: bool = True) -> RowGradients:
    """On one device: the rows of its table shard (`own_rows` of them) that the global batch
    looks up, and their summed cotangents. `hashes [b, n]` and `cotangents [b, n, D]`: this
    device's batch shard; the others' (`k` shards in all) arrive over `batch_axes`, around a ring
    (one block in flight), or, for a table held whole on every device (`ring` False: a table small
    enough to replicate), in one all-gather (k blocks: one collective, not k - 1)."""
    dim = cotangents.shape[-1]
    start = jax.lax.axis_index(table_axes) * own_rows if table_axes else 0  # the shard's first row

    def offsets(h):  # [b, n] -> [b * n]: rows within the shard, own_rows where not this shard's
        offset = h.reshape(-1) - start
        mine = (offset >= 0) & (offset < own_rows) & (h.reshape(-1) != 0)
        return jnp.where(mine, offset, own_rows)

    everyone = jax.lax.all_gather(hashes, batch_axes, tiled=True) if batch_axes else hashes  # ints: small
    size = min(everyone.size, own_rows)  # no more rows than lookups, nor than the shard holds
    # Sorted, padded with own_rows (past every row); with all rows touched, the padding is cut.
    touched = jnp.unique(offsets(everyone), size=size, fill_value=own_rows)

    def add(sums, h, c):
        o = offsets(h)
        at = jnp.where(o < own_rows, jnp.searchsorted(touched, o), size)  # size: dropped
        return sums.at[at].add(c.reshape(-1, dim).astype(jnp.float32), mode="drop")

    # A zero computed from the cotangents: a constant one XLA allocated at the start of the step,
    # so the sums were live through the whole backward pass (phoenix-plan: +1.5 GiB at long_history).
    first = cotangents.reshape(-1)[0].astype(jnp.float32)
    zero = jnp.where(jnp.isfinite(first), first, 0.0) * 0.0
    zeros = jnp.broadcast_to(zero, (size, dim))
    if k > 1 and not ring:  # a replicated table: every batch shard's block at once
        everything = jax.lax.all_gather(cotangents, batch_axes, tiled=True)
        return RowGradients(touched.astype(jnp.int32), add(zeros, everyone, everything))
    sums = add(zeros, hashes, cotangents)
    if k > 1:  # the other batch shards' blocks, one in flight at a time
        ring = [(j, (j + 1) % k) for j in range(k)]

        def step(carry, _):
            sums, h, c = carry
            h, c = jax.lax.ppermute(h, batch_axes, ring), jax.lax.ppermute(c, batch_axes, ring)
            return (add(sums, h, c), h, c), None

        (sums, _, _), _ = jax.lax.scan(step, (sums, hashes, cotangents), length=k - 1)
    return RowGradients(touched.astype(jnp.int32), sums)


def apply_rowwise_adagrad(
    table: jax.Array,
    accumulator: jax.Array,
    grads: RowGradients,
    *,
    learning_rate: float,
    weight_decay: float,
    scale: jax.Array,
    keep: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """`table [rows, D]` and its `accumulator [rows]` after one row-wise Adagrad step on the
    touched rows, their gradients times `scale` (the clipping factor); unchanged where `keep` is
    False (a skipped step)."""

    def local(table, accumulator, rows, sums, scale, keep):
        own_rows, touched = table.shape[0], rows.shape[0]
        chunk = min(touched, UPDATE_CHUNK)

        def update(i, state):  # rows [i * chunk, (i + 1) * chunk) of the touched ones
            table, accumulator = state
            start = jnp.minimum(i * chunk, touched - chunk)  # the last chunk ends at the end ...
            fresh = start + jnp.arange(chunk) >= i * chunk  # ... and leaves the rows done before
            at = jax.lax.dynamic_slice_in_dim(rows, start, chunk)
            g = jax.lax.dynamic_slice_in_dim(sums, start, chunk) * scale
            acc = accumulator.at[at].get(mode="fill", fill_value=0) + jnp.mean(g * g, axis=-1)
            w = table.at[at].get(mode="fill", fill_value=0)
            updated = w - learning_rate * (g * jax.lax.rsqrt(acc + EPS)[:, None] + weight_decay * w)
            at = jnp.where(jnp.any(g != 0, axis=-1) & fresh & keep, at, own_rows)  # own_rows: dropped
            return table.at[at].set(updated, mode="drop"), accumulator.at[at].set(acc, mode="drop")

        return jax.lax.fori_loop(0, -(-touched // chunk), update, (table, accumulator))

    axes = _axes()
    if axes is None:
        return local(table, accumulator, grads.rows, grads.sums, scale, keep)
    mesh, table_axes, _ = axes
    rows, by_row = PartitionSpec(table_axes or None), PartitionSpec(table_axes or None, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(by_row, rows, rows, by_row, PartitionSpec(), PartitionSpec()),
        out_specs=(by_row, rows),
    )(table, accumulator, grads.rows, grads.sums, scale, keep)
