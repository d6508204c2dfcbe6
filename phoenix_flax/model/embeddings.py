"""Hash-embedding tables and the original's input blocks.

The hash tables turn a batch (`phoenix_flax.data.batch`) into an embeddings dict (`EMBEDDING_KEYS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from phoenix_flax.config import ModelConfig
from phoenix_flax.data.batch import Batch, is_packed, prefix_valid
from phoenix_flax.model.layers import dense_init, param
from phoenix_flax.sharding import constrain_rows, mesh_axes

# Embeddings dict key -> (batch field, table).
EMBEDDING_KEYS = {
    "user_embeddings": ("user_hashes", "user"),
    "history_post_embeddings": ("history_post_hashes", "post"),
    "history_author_embeddings": ("history_author_hashes", "author"),
    "candidate_post_embeddings": ("candidate_post_hashes", "post"),
    "candidate_author_embeddings": ("candidate_author_hashes", "author"),
    "positive_post_embeddings": ("positive_post_hashes", "post"),  # the retrieval positive (training)
    "positive_author_embeddings": ("positive_author_hashes", "author"),
}

TABLES = ("user", "post", "author")  # the HashEmbeddings tables, in lookup order

Embeddings = Mapping[str, jax.Array]


class HashTable(nnx.Module):
    """One learned table `[rows, D]`; row 0 is padding and always looks up as zeros."""

    def __init__(
        self,
        rows: int,
        dim: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        init: nnx.Initializer | None = None,  # default: normal(1.0)
        columns: str = "table_embed",
    ):
        init = nnx.initializers.normal(1.0) if init is None else init
        self.table = param(rngs, init, (rows, dim), ("vocab", columns))
        self.dtype = dtype

    def __call__(self, hashes: jax.Array, looked_up: jax.Array | None = None) -> jax.Array:
        """[B, ...] int rows -> [B, ..., D] in the compute dtype, sharded like the batch, padding
        zeroed; `looked_up`: their `lookup` (as computed outside a differentiated function)."""
        rows = self.lookup(hashes) if looked_up is None else looked_up
        return rows * (hashes != 0)[..., None].astype(self.dtype)

    def lookup(self, hashes: jax.Array) -> jax.Array:
        """The rows of `hashes [B, ...]` as stored (row 0 too): `[B, ..., D]` in the compute dtype."""
        return constrain_rows(sharded_lookup(self.table[...], hashes, self.dtype))


def sharded_lookup(table: jax.Array, hashes: jax.Array, dtype) -> jax.Array:
    """`table[hashes]` in `dtype` for a table sharded by rows and hashes sharded by batch.

    Under a mesh whose rules shard `vocab` (table rows) and `batch`, each device looks up only
    the rows it owns: the hash blocks of the peers that hold other batch rows travel around a
    ring, collecting each device's rows, and peers that hold the same batch rows sum theirs.
    Autodiff of that is row-sparse: the cotangents travel back around the ring and each device
    scatter-adds into its own rows, so no table-sized gradient is built beyond the shard, and
    the lookup's working set is one block, O(local lookups x D), whatever the table's size.
    """
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return jnp.take(table, hashes, axis=0).astype(dtype)
    table_axes = mesh_axes("vocab", rules)
    batch_axes = mesh_axes("batch", rules)
    if not any(mesh.shape[a] > 1 for a in table_axes):
        return jnp.take(table, hashes, axis=0).astype(dtype)
    shape = hashes.shape
    flat = hashes.reshape(shape[0], -1)  # [B, n]
    gathered = tuple(a for a in table_axes if a in batch_axes)  # peers holding other batch rows
    summed = tuple(a for a in table_axes if a not in batch_axes)  # peers holding the same batch rows
    replicated = tuple(a for a in batch_axes if a not in table_axes)  # peers holding the same table rows

    def local(table_shard, hashes_shard):  # [R/k, D], [b, n] -> [b, n, D]
        if replicated:
            # The shard is the same on every batch-only peer (e.g. along `data`), so its gradient
            # sums over them: marked varying here, the backward's psum happens once, after the
            # ring, not at every step of it.
            table_shard = jax.lax.pcast(table_shard, replicated, to="varying")
        own_rows = table_shard.shape[0]
        start = jax.lax.axis_index(table_axes) * own_rows

        def mine(hashes):  # the rows of `hashes` this device owns; zeros for the others
            offset = hashes - start
            owned = (offset >= 0) & (offset < own_rows)
            return (jnp.take(table_shard, jnp.where(owned, offset, 0), axis=0) * owned[..., None]).astype(dtype)

        if gathered:
            # A ring over the peers that hold other batch rows: each adds its rows to the block
            # it holds and passes block and hashes on; after k steps every block is whole and
            # home. One block in flight per device, never all k.
            k = math.prod(mesh.shape[a] for a in gathered)
            ring = [(j, (j + 1) % k) for j in range(k)]

            def step(carry, _):
                rows, hashes = carry
                rows = rows + mine(hashes)
                return (jax.lax.ppermute(rows, gathered, ring), jax.lax.ppermute(hashes, gathered, ring)), None

            varying = tuple(dict.fromkeys(table_axes + batch_axes))  # what rows depend on
            zeros = jax.lax.pcast(jnp.zeros((*hashes_shard.shape, table_shard.shape[1]), dtype), varying, to="varying")
            (rows, _), _ = jax.lax.scan(step, (zeros, hashes_shard), length=k)
        else:
            rows = mine(hashes_shard)
        return jax.lax.psum(rows, summed) if summed else rows

    lookup = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(table_axes, None), PartitionSpec(batch_axes or None, None)),
        out_specs=PartitionSpec(batch_axes or None, None, None),
    )
    return lookup(table, flat).reshape(*shape, table.shape[-1])


class HashEmbeddings(nnx.Module):
    """The user, post and author tables. Ranker and retrieval may share one instance."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.emb_size, cfg.compute_dtype
        self.user = HashTable(cfg.user_vocab_rows, d, rngs=rngs, dtype=dtype)
        self.post = HashTable(cfg.post_vocab_rows, d, rngs=rngs, dtype=dtype)
        self.author = HashTable(cfg.author_vocab_rows, d, rngs=rngs, dtype=dtype)

    def __call__(self, batch: Batch, looked_up: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        """Looks up every hash field present in `batch`: `[B, ..., H]` -> `[B, ..., H, D]`.
        `looked_up`: each table's `lookup` of its `table_hashes`, computed beforehand (the
        row-wise optimizer differentiates the loss by them, not by the tables).

        The fields of one table are looked up together, in one gather: its backward pass then
        builds one gradient per table, not one per field.
        """
        out = {}
        for table, keys in _keys_by_table(batch).items():
            flat = _side_by_side(batch, keys)
            rows = getattr(self, table)(flat, None if looked_up is None else looked_up[table])  # [B, n, D]
            sizes = [math.prod(batch[EMBEDDING_KEYS[k][0]].shape[1:]) for k in keys]
            bounds = np.cumsum([0, *sizes])
            for k, start, stop in zip(keys, bounds[:-1], bounds[1:], strict=True):
                shape = batch[EMBEDDING_KEYS[k][0]].shape
                out[k] = rows[:, start:stop].reshape(*shape, rows.shape[-1])
        return out

    def table_hashes(self, batch: Batch) -> dict[str, jax.Array]:
        """Table name -> every row of it `batch` looks up, `[B, n]` (its fields' hashes side by side)."""
        return {table: _side_by_side(batch, keys) for table, keys in _keys_by_table(batch).items()}


def _keys_by_table(batch: Batch) -> dict[str, list[str]]:
    """Table name -> the embeddings keys whose fields `batch` has (tables without any left out)."""
    keys = {t: [k for k, (field, table) in EMBEDDING_KEYS.items() if table == t and field in batch] for t in TABLES}
    return {t: k for t, k in keys.items() if k}


def _side_by_side(batch: Batch, keys: list[str]) -> jax.Array:
    """The hashes of `keys`' fields, each flattened to `[B, -1]`, concatenated: `[B, n]`."""
    fields = [batch[EMBEDDING_KEYS[k][0]] for k in keys]
    return jnp.concatenate([f.reshape(f.shape[0], -1) for f in fields], axis=1)


def flatten_hashes(x: jax.Array) -> jax.Array:
    """[..., H, D] -> [..., H*D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def concat_dense(parts: Sequence[jax.Array], w: jax.Array, dtype) -> jax.Array:
    """`concatenate(parts, axis=-1) @ w`, as the sum of each part's product with its rows of `w`.

    The original concatenates its inputs before projecting them; the concatenation is the widest
    activation of the input blocks ([B, S, (Hp + Ha + 2) * D] for the history), so it is never
    materialised.
    """
    out, start = None, 0
    for x in parts:
        width = x.shape[-1]
        x = constrain_rows(x.astype(dtype), None)  # and so its cotangent: XLA never gathers the batch
        y = x @ w[start : start + width].astype(dtype)
        out, start = y if out is None else out + y, start + width
    if start != w.shape[0]:
        raise ValueError(f"parts of total width {start} do not match the projection's {w.shape[0]} rows")
    return out


class Prefix(NamedTuple):
    """The [user, history] part of the sequence, as the transformer takes it."""

    x: jax.Array  # [B, P, D]
    positions: jax.Array  # [P], or [B, P] packed: each position's in its session
    valid: jax.Array  # [B, P]
    segments: jax.Array | None  # [B, P] packed (`data.batch.PACKED_FIELDS`); None a session a row


class UserHistoryBlocks(nnx.Module):
    """The user and history input blocks, and the product-surface embedding.

    user:    flatten(user hashes) @ user_proj                                  -> [B, 1, D]
    history: [post, author, action emb, surface emb] @ history_proj            -> [B, S, D]
    prefix:  [user, history]                                                   -> [B, 1 + S, D]
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.emb_size
        history_in = (cfg.num_post_hashes + cfg.num_author_hashes + 2) * d
        self.dtype = cfg.compute_dtype
        self.user_proj = param(rngs, dense_init, (cfg.num_user_hashes * d, d), ("proj_in", "embed"))
        self.history_proj = param(rngs, dense_init, (history_in, d), ("proj_in", "embed"))
        self.action_proj = param(rngs, dense_init, (cfg.num_actions, d), ("actions", "embed"))
        self.surface_table = param(
            rngs, nnx.initializers.normal(1.0), (cfg.product_surface_vocab_size, d), ("surfaces", "embed")
        )

    def surface(self, surface: jax.Array) -> jax.Array:
        """[...] ids -> [..., D]: `one_hot(surface) @ table`, as the original computes it (a matmul
        shards where a gather from a tiny table would be replicated); an id outside the
        vocabulary embeds as zeros."""
        table = self.surface_table[...].astype(self.dtype)
        return jax.nn.one_hot(surface, table.shape[0], dtype=self.dtype) @ table

    def user(self, emb: Embeddings) -> jax.Array:
        """-> [B, 1, D] (packed: [B, G, D], a user a session)."""
        x = flatten_hashes(emb["user_embeddings"].astype(self.dtype))
        x = x if x.ndim == 3 else x[:, None, :]
        return constrain_rows(x @ self.user_proj[...].astype(self.dtype))

    def history(self, batch: Batch, emb: Embeddings) -> jax.Array:
        """-> [B, S, D]."""
        actions = batch["history_actions"].astype(self.dtype)  # [B, S, A] multi-hot
        action_emb = (2 * actions - 1) @ self.action_proj[...].astype(self.dtype)
        action_emb = action_emb * jnp.any(actions != 0, axis=-1, keepdims=True).astype(self.dtype)
        parts = [
            flatten_hashes(emb["history_post_embeddings"]),
            flatten_hashes(emb["history_author_embeddings"]),
            action_emb,
            self.surface(batch["history_product_surface"]),
        ]
        return constrain_rows(concat_dense(parts, self.history_proj[...], self.dtype))

    def prefix(self, batch: Batch, emb: Embeddings) -> Prefix:
        """The sequence's [user, history] positions: `[user, history]` of a session a row, or a
        packed row's (each session's user at its segment's position 0)."""
        history = self.history(batch, emb)  # [B, S, D], packed [B, P, D]
        if not is_packed(batch):
            x = jnp.concatenate([self.user(emb), history], axis=1)
            return Prefix(x, jnp.arange(x.shape[1]), prefix_valid(batch), None)
        segment, position = batch["prefix_segment"], batch["prefix_position"]
        session = jnp.maximum(segment - 1, 0)[..., None]  # [B, P, 1]
        users = jnp.take_along_axis(self.user(emb), session, axis=1)  # [B, P, D]
        x = jnp.where(((segment > 0) & (position == 0))[..., None], users, history)
        return Prefix(constrain_rows(x), position, segment > 0, segment)
