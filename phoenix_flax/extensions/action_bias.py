"""The action bias: per-action logit offsets and a user x candidate affinity, beside the transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.model.embeddings import HashTable
from phoenix_flax.model.layers import param

# The affinity factors start small: a row's random start is noise the few updates of a rare
# user or post must overcome (measured: 0.1 beside the embeddings' 1.0).
AFFINITY_INIT_STD = 0.1


class ActionBias(nnx.Module):
    """Per-action logit offsets of a candidate: the sum over its post's and its author's hashes
    of rows of two tables `[rows, A + r]`, whose first A columns are the offsets (zero at the
    start; row 0, padding, adds nothing); with `affinity_rank` r > 0, plus the user's affinity for
    it: `(u * c) @ mix`, c the sum's last r columns, u the sum of the user's rows of a table
    `[rows, r]`, `mix [r, A]` (zero at the start). One lookup per hash serves both.

    What counting learns, learned directly: a post's own rates (its media type, its quality) and,
    as matrix factorization learns it, a user's taste for a kind of post reach the logits without
    passing through the projection and the transformer, which have to share their width with
    everything else. The user's rows learn from all of the user's training sessions, the
    transformer's view of a taste from one session's history.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        a, r, zeros = cfg.num_actions, cfg.affinity_rank, nnx.initializers.zeros_init()
        small = nnx.initializers.normal(AFFINITY_INIT_STD)

        def offsets_and_factors(key, shape, dtype=jnp.float32):  # [rows, A] zeros, [rows, r] small
            return jnp.concatenate([zeros(key, (shape[0], a), dtype), small(key, (shape[0], r), dtype)], axis=1)

        self.post = HashTable(cfg.post_vocab_rows, a + r, rngs=rngs, init=offsets_and_factors, columns="actions")
        self.author = HashTable(cfg.author_vocab_rows, a + r, rngs=rngs, init=offsets_and_factors, columns="actions")
        if r:
            self.user = HashTable(cfg.user_vocab_rows, r, rngs=rngs, init=small)
            self.mix = param(rngs, zeros, (r, a), ("table_embed", "actions"))  # rows: the factors

    def exposure_factors(self, author_hashes: jax.Array, user_hashes: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[..., Ha], [..., Hu] -> the author's and the user's affinity factors, [..., r] each (what
        the exposure softmax scores against each other)."""
        a = self.mix.shape[-1]
        return self.author(author_hashes).sum(-2)[..., a:], self.user(user_hashes).sum(-2)

    def parts(self, post_hashes: jax.Array, author_hashes: jax.Array, user_hashes: jax.Array) -> dict[str, jax.Array]:
        """[..., Hp], [..., Ha], [..., Hu] (broadcasting with the others) -> what each path adds to the
        logits, float32 [..., A] each: "post" and "author" offsets, and with affinity_rank > 0 the
        user's "affinity"."""
        post, author = self.post(post_hashes).sum(-2), self.author(author_hashes).sum(-2)  # [..., A + r]
        if not hasattr(self, "mix"):  # affinity_rank 0: the rows are the offsets
            return {"post": post, "author": author}
        a = self.mix.shape[-1]
        u = self.user(user_hashes).sum(-2)  # [..., r]
        affinity = (u * (post[..., a:] + author[..., a:])) @ self.mix[...]
        return {"post": post[..., :a], "author": author[..., :a], "affinity": affinity}
