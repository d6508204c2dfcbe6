"""The Phoenix ranker: a transformer over [user, history, candidates] with isolated candidates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.data.batch import Batch, is_packed, is_valid, of_candidates
from phoenix_flax.model.attention import Segments
from phoenix_flax.model.embeddings import Embeddings, HashEmbeddings, UserHistoryBlocks, concat_dense, flatten_hashes
from phoenix_flax.model.layers import RMSNorm, Transformer, dense_init, param
from phoenix_flax.sharding import constrain_rows


class UserContext(NamedTuple):
    """Every layer's keys and values of [user, history], `[L, B, P, Hkv, K]` each; `valid [B, P]`;
    the sessions' `user_hashes [B, Hu]` (for the logit paths of extensions that read the user)."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    user_hashes: jax.Array


def sequence_positions(prefix_len: int, num_candidates: int, candidate_positions: str) -> jax.Array:
    """Rotary positions [T]: the prefix takes 0..P-1; candidates P..P+C-1 ("sequential") or all P ("shared")."""
    prefix = jnp.arange(prefix_len)
    return jnp.concatenate([prefix, prefix_len + _candidate_offsets(jnp.arange(num_candidates), candidate_positions)])


def _candidate_offsets(places: jax.Array, candidate_positions: str) -> jax.Array:
    """A candidate's position past the prefix from its place among its session's candidates."""
    return places if candidate_positions == "sequential" else jnp.zeros_like(places)


class PhoenixRanker(nnx.Module):
    """Predicts one logit per engagement action for every candidate: `[B, C, A]`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, embeddings: HashEmbeddings | None = None):
        d = cfg.emb_size
        candidate_in = (cfg.num_post_hashes + cfg.num_author_hashes + 1) * d
        self.candidate_positions = cfg.candidate_positions
        self.history_len = cfg.history_len
        self.dtype = cfg.compute_dtype
        self.embeddings = embeddings if embeddings is not None else HashEmbeddings(cfg, rngs=rngs)
        self.blocks = UserHistoryBlocks(cfg, rngs=rngs)
        self.candidate_proj = param(rngs, dense_init, (candidate_in, d), ("proj_in", "embed"))
        self.transformer = Transformer(cfg, rngs=rngs)
        self.final_norm = RMSNorm(d, rngs=rngs)
        self.unembed = param(rngs, dense_init, (d, cfg.num_actions), ("embed", "actions"))

    def __call__(self, batch: Batch) -> jax.Array:
        """Hashes in, logits `[B, C, A]` (float32) out."""
        return self.logits_from_embeddings(batch, self.embeddings(batch))

    def logit_parts(self, batch: Batch) -> dict[str, jax.Array]:
        """What each path adds to the logits, `[B, C, A]` each, summing to them: the original has
        one, the "transformer"'s unembedding; an extended ranker adds its own (`extra_parts`)."""
        return self.parts_from_embeddings(batch, self.embeddings(batch))

    def extra_parts(
        self, post_hashes: jax.Array, author_hashes: jax.Array, user_hashes: jax.Array
    ) -> dict[str, jax.Array]:
        """The seam for logit paths beside the transformer's, `[..., A]` each from the candidates'
        post and author hashes and their sessions' user hashes: the original has none
        (phoenix_flax/extensions adds some)."""
        del post_hashes, author_hashes, user_hashes
        return {}

    def probabilities(self, parts: Mapping[str, jax.Array], **inputs: jax.Array) -> jax.Array:
        """The logits' parts `[..., A]` each (`logit_parts`) -> the probabilities evaluation and
        serving report: sigmoid of their sum. `inputs`: per-candidate inputs an extended ranker's
        head reads beside the parts (phoenix_flax/extensions); the original reads none."""
        if inputs:
            raise TypeError(f"{type(self).__name__} reads no {sorted(inputs)}: they belong to an extended ranker")
        return jax.nn.sigmoid(sum(parts.values()))

    def candidate_block(self, post_emb: jax.Array, author_emb: jax.Array, surface: jax.Array) -> jax.Array:
        """[post, author, surface emb] @ candidate_proj: [..., Hp, D], [..., Ha, D], [...] -> [..., D]."""
        parts = [flatten_hashes(post_emb), flatten_hashes(author_emb), self.blocks.surface(surface)]
        return constrain_rows(concat_dense(parts, self.candidate_proj[...], self.dtype))

    def _head_parts(
        self, h: jax.Array, post_hashes: jax.Array, author_hashes: jax.Array, user_hashes: jax.Array
    ) -> dict[str, jax.Array]:
        """Final norm and unembedding, and any `extra_parts`: [..., D] -> the logits' float32 parts [..., A]."""
        h = self.final_norm(h)
        parts = {"transformer": (h @ self.unembed[...].astype(h.dtype)).astype(jnp.float32)}
        return parts | self.extra_parts(post_hashes, author_hashes, user_hashes)

    def logits_from_embeddings(self, batch: Batch, emb: Embeddings) -> jax.Array:
        """Already looked-up embeddings in (as the original took them), logits `[B, C, A]` out."""
        return sum(self.parts_from_embeddings(batch, emb).values())

    def parts_from_embeddings(self, batch: Batch, emb: Embeddings) -> dict[str, jax.Array]:
        """Looked-up embeddings in, the logits' parts `[B, C, A]` (see `logit_parts`) out."""
        prefix = self.blocks.prefix(batch, emb)  # [B, P, D]
        candidates = self.candidate_block(
            emb["candidate_post_embeddings"], emb["candidate_author_embeddings"], batch["candidate_product_surface"]
        )  # [B, C, D]
        prefix_len = prefix.x.shape[1]
        segments = None
        if is_packed(batch):  # a candidate is where it is in its session: right after a full history
            offsets = _candidate_offsets(batch["candidate_position"], self.candidate_positions)
            positions = jnp.concatenate([prefix.positions, 1 + self.history_len + offsets], axis=1)  # [B, T]
            segments = Segments(prefix.segments, batch["candidate_segment"])
        else:
            positions = sequence_positions(prefix_len, candidates.shape[1], self.candidate_positions)
        h = self.transformer(
            jnp.concatenate([prefix.x, candidates], axis=1),
            positions,
            prefix.valid,
            is_valid(batch["candidate_post_hashes"]),
            segments=segments,
        )
        return self._head_parts(
            h[:, prefix_len:],
            batch["candidate_post_hashes"],
            batch["candidate_author_hashes"],
            of_candidates(batch, batch["user_hashes"]),  # [B, 1 or C, Hu]: each candidate's session's
        )

    def user_context(self, batch: Batch) -> UserContext:
        """The [user, history] part of the sequence, computed once: every layer's keys and values.

        It is the same for every candidate of a session: candidates never attend to each other
        and, with shared positions, not one depends on its slot.
        """
        if self.candidate_positions != "shared":
            raise ValueError("a cached user context needs candidate_positions='shared'")
        emb = self.embeddings({k: batch[k] for k in ("user_hashes", "history_post_hashes", "history_author_hashes")})
        prefix = self.blocks.prefix(batch, emb)
        _, (keys, values) = self.transformer(prefix.x, prefix.positions, prefix.valid, keys_values=True)
        return UserContext(keys, values, prefix.valid, batch["user_hashes"])

    def score_candidates(self, context: UserContext, *candidates: jax.Array) -> jax.Array:
        """Logits `[N, A]` of N candidates (`candidate_parts`' arguments), candidate n scored against
        session `rows[n]` of `context`. Equals the full-sequence model's logits for the same
        candidates; any N, in any chunks."""
        return sum(self.candidate_parts(context, *candidates).values())

    def candidate_parts(
        self,
        context: UserContext,
        rows: jax.Array,
        post_hashes: jax.Array,
        author_hashes: jax.Array,
        surface: jax.Array,
    ) -> dict[str, jax.Array]:
        """The logits of N candidates in parts, `[N, A]` each (see `logit_parts`), candidate n
        scored against session `rows[n]` of `context`. post_hashes [N, Hp], author_hashes [N, Ha],
        surface [N]."""
        h = self.candidate_block(self.embeddings.post(post_hashes), self.embeddings.author(author_hashes), surface)
        position = context.valid.shape[1]  # shared: right after the history
        keys, values = context.keys[:, rows], context.values[:, rows]  # [L, N, P, Hkv, K]
        h = self.transformer.isolated(h, position, keys, values, context.valid[rows])
        return self._head_parts(h, post_hashes, author_hashes, context.user_hashes[rows])
