"""Two-tower retrieval: a transformer user tower, an MLP candidate tower, chunked top-K."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.data.batch import Batch
from phoenix_flax.model.attention import Segments
from phoenix_flax.model.embeddings import Embeddings, HashEmbeddings, UserHistoryBlocks, concat_dense, flatten_hashes
from phoenix_flax.model.layers import Transformer, dense_init, param
from phoenix_flax.sharding import constrain_rows

L2_EPS = 1e-12
# Bounds of a learned temperature, so the logits' scale cannot run away.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1.0


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / sqrt(max(sum(x^2), 1e-12)) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), L2_EPS))


class CandidateTower(nnx.Module):
    """`l2norm(silu(flatten([post, author]) @ proj_1) @ proj_2)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.emb_size
        self.dtype = cfg.compute_dtype
        tower_in = (cfg.num_post_hashes + cfg.num_author_hashes) * d
        self.proj_1 = param(rngs, dense_init, (tower_in, 2 * d), ("proj_in", "mlp"))
        self.proj_2 = param(rngs, dense_init, (2 * d, d), ("mlp", "embed"))

    def __call__(self, post_emb: jax.Array, author_emb: jax.Array) -> jax.Array:
        """[..., Hp, D] and [..., Ha, D] -> [..., D] unit vectors (float32)."""
        x = concat_dense([flatten_hashes(post_emb), flatten_hashes(author_emb)], self.proj_1[...], self.dtype)
        x = constrain_rows(jax.nn.silu(x), "act_mlp")
        return l2_normalize(constrain_rows(x @ self.proj_2[...].astype(self.dtype)))


class PhoenixRetrieval(nnx.Module):
    """User tower and candidate tower; both return L2-normalised `[..., D]` float32 vectors."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, embeddings: HashEmbeddings | None = None):
        self.dtype = cfg.compute_dtype
        self.embeddings = embeddings if embeddings is not None else HashEmbeddings(cfg, rngs=rngs)
        self.blocks = UserHistoryBlocks(cfg, rngs=rngs)
        self.transformer = Transformer(cfg, rngs=rngs)
        self.candidate_tower = CandidateTower(cfg, rngs=rngs)
        self.log_temperature = (
            param(rngs, nnx.initializers.constant(jnp.log(cfg.retrieval_temperature)), (), ())
            if cfg.learn_temperature
            else None
        )
        self.fixed_temperature = cfg.retrieval_temperature

    def temperature(self) -> jax.Array:
        """The softmax temperature: a scalar, learned (within bounds) when the config says so."""
        if self.log_temperature is None:
            return jnp.float32(self.fixed_temperature)
        log_t = jnp.clip(self.log_temperature[...], jnp.log(MIN_TEMPERATURE), jnp.log(MAX_TEMPERATURE))
        return jnp.exp(log_t)

    def user(self, batch: Batch) -> jax.Array:
        """Hashes in, user vectors `[B, D]` out."""
        return self.user_from_embeddings(batch, self.embeddings(batch))

    def candidates(self, post_hashes: jax.Array, author_hashes: jax.Array) -> jax.Array:
        """`[..., Hp]` and `[..., Ha]` hashes -> candidate vectors `[..., D]`."""
        return self.candidate_tower(self.embeddings.post(post_hashes), self.embeddings.author(author_hashes))

    def user_from_embeddings(self, batch: Batch, emb: Embeddings) -> jax.Array:
        """Mean of the transformer's outputs over valid [user, history] positions, L2-normalised:
        `[B, D]`, or a packed batch's `[B, G, D]` (a mean a session)."""
        prefix = self.blocks.prefix(batch, emb)
        segments = None if prefix.segments is None else Segments(prefix.segments)
        h = self.transformer(prefix.x, prefix.positions, prefix.valid, segments=segments).astype(jnp.float32)
        if segments is None:
            w = prefix.valid.astype(jnp.float32)[..., None]  # [B, P, 1]
            return l2_normalize(jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0))
        sessions = batch["user_hashes"].shape[1]
        w = jax.nn.one_hot(prefix.segments - 1, sessions, dtype=jnp.float32)  # [B, P, G]; padding (-1): none
        sums = jnp.einsum("bpg,bpd->bgd", w, h)
        return l2_normalize(sums / jnp.maximum(jnp.sum(w, axis=1), 1.0)[..., None])

    def candidates_from_embeddings(self, batch: Batch, emb: Embeddings) -> jax.Array:
        """The batch's candidates as vectors `[B, C, D]`."""
        del batch  # the candidate tower needs only the embeddings
        return self.candidate_tower(emb["candidate_post_embeddings"], emb["candidate_author_embeddings"])


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def top_k(
    users: jax.Array,
    corpus: jax.Array,
    k: int,
    corpus_valid: jax.Array | None = None,
    chunk_size: int = 65536,
) -> tuple[jax.Array, jax.Array]:
    """Exact top-K of `users [B, D] @ corpus [N, D].T`, a chunk of the corpus at a time.

    Memory is O(B * (chunk_size + k)) beside the corpus itself, whatever N is.

    Args:
      users: [B, D] query vectors.
      corpus: [N, D] candidate vectors.
      k: results per user, at most N.
      corpus_valid: optional [N] bool; invalid items are never returned.
      chunk_size: corpus rows scored at once.

    Returns:
      scores [B, k] (descending) and indices [B, k] into the corpus. Where fewer than k valid
      items exist, the remaining slots have score -inf and index -1.
    """
    n = corpus.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in [1, corpus size {n}]")
    chunk = min(chunk_size, n)
    num_chunks = -(-n // chunk)
    if corpus_valid is None:
        corpus_valid = jnp.ones((n,), dtype=bool)
    users = users.astype(jnp.float32)

    def step(carry, i):
        best_scores, best_idx = carry
        # The last chunk is shifted back to stay in bounds; rows already seen are masked.
        start = jnp.minimum(i * chunk, n - chunk)
        rows = jax.lax.dynamic_slice_in_dim(corpus, start, chunk).astype(jnp.float32)
        idx = start + jnp.arange(chunk)
        keep = (idx >= i * chunk) & jax.lax.dynamic_slice_in_dim(corpus_valid, start, chunk)
        scores = jnp.where(keep[None], users @ rows.T, -jnp.inf)  # [B, chunk]
        best_scores, pos = jax.lax.top_k(jnp.concatenate([best_scores, scores], axis=1), k)  # pos [B, k]
        # A position past the k kept is a row of this chunk. Indices are not concatenated like the
        # scores: a [B, chunk] index array would double the step's memory, and with one chunk XLA
        # folds it into a constant of the program ([B, N] int32 built at compile time).
        kept = jnp.take_along_axis(best_idx, jnp.minimum(pos, k - 1), axis=1)
        return (best_scores, jnp.where(pos >= k, start + pos - k, kept)), None

    b = users.shape[0]
    init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), -1, jnp.int32))
    (scores, indices), _ = jax.lax.scan(step, init, jnp.arange(num_chunks))
    return scores, jnp.where(jnp.isneginf(scores), -1, indices)
