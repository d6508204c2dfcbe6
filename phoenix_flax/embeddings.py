"""Hash-embedding tables and the original's input blocks.

The hash tables turn a batch (`phoenix_flax.batch`) into an embeddings dict (`EMBEDDING_KEYS`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from phoenix_flax.batch import Batch
from phoenix_flax.config import ModelConfig
from phoenix_flax.layers import dense_init, param

# Embeddings dict key -> (batch field, table).
EMBEDDING_KEYS = {
    "user_embeddings": ("user_hashes", "user"),
    "history_post_embeddings": ("history_post_hashes", "post"),
    "history_author_embeddings": ("history_author_hashes", "author"),
    "candidate_post_embeddings": ("candidate_post_hashes", "post"),
    "candidate_author_embeddings": ("candidate_author_hashes", "author"),
}

Embeddings = Mapping[str, jax.Array]


class HashTable(nnx.Module):
    """One learned table `[rows, D]`; row 0 is padding and always looks up as zeros."""

    def __init__(self, rows: int, dim: int, *, rngs: nnx.Rngs):
        self.table = param(rngs, nnx.initializers.normal(1.0), (rows, dim), ("vocab", "table_embed"))

    def __call__(self, hashes: jax.Array) -> jax.Array:
        """[...] int rows -> [..., D] float32."""
        rows = jnp.take(self.table[...], hashes, axis=0)
        return rows * (hashes != 0)[..., None]


class HashEmbeddings(nnx.Module):
    """The user, post and author tables. Ranker and retrieval may share one instance."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.emb_size
        self.user = HashTable(cfg.user_vocab_rows, d, rngs=rngs)
        self.post = HashTable(cfg.post_vocab_rows, d, rngs=rngs)
        self.author = HashTable(cfg.author_vocab_rows, d, rngs=rngs)

    def __call__(self, batch: Batch) -> dict[str, jax.Array]:
        """Looks up every hash field present in `batch`: `[..., H]` -> `[..., H, D]`."""
        return {
            key: getattr(self, table)(batch[field]) for key, (field, table) in EMBEDDING_KEYS.items() if field in batch
        }


def flatten_hashes(x: jax.Array) -> jax.Array:
    """[..., H, D] -> [..., H*D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class UserHistoryBlocks(nnx.Module):
    """The user and history input blocks, and the product-surface embedding.

    user:    flatten(user hashes) @ user_proj                                  -> [B, 1, D]
    history: [post, author, action emb, surface emb] @ history_proj            -> [B, S, D]
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
        """[...] ids -> [..., D]; an id outside the vocabulary embeds as zeros (as one_hot does)."""
        table = self.surface_table[...]
        return jnp.take(table, surface, axis=0, mode="fill", fill_value=0).astype(self.dtype)

    def user(self, emb: Embeddings) -> jax.Array:
        """-> [B, 1, D]."""
        x = flatten_hashes(emb["user_embeddings"].astype(self.dtype))[:, None, :]
        return x @ self.user_proj[...].astype(self.dtype)

    def history(self, batch: Batch, emb: Embeddings) -> jax.Array:
        """-> [B, S, D]."""
        actions = batch["history_actions"].astype(self.dtype)  # [B, S, A] multi-hot
        action_emb = (2 * actions - 1) @ self.action_proj[...].astype(self.dtype)
        action_emb = action_emb * jnp.any(actions != 0, axis=-1, keepdims=True).astype(self.dtype)
        x = jnp.concatenate(
            [
                flatten_hashes(emb["history_post_embeddings"].astype(self.dtype)),
                flatten_hashes(emb["history_author_embeddings"].astype(self.dtype)),
                action_emb,
                self.surface(batch["history_product_surface"]),
            ],
            axis=-1,
        )
        return x @ self.history_proj[...].astype(self.dtype)
