"""The Phoenix ranker: a transformer over [user, history, candidates] with isolated candidates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phoenix_flax.batch import Batch, is_valid, prefix_valid
from phoenix_flax.config import ModelConfig
from phoenix_flax.embeddings import (
    Embeddings,
    HashEmbeddings,
    HashTable,
    UserHistoryBlocks,
    concat_dense,
    flatten_hashes,
)
from phoenix_flax.layers import RMSNorm, Transformer, dense_init, param
from phoenix_flax.sharding import constrain_rows


class UserContext(NamedTuple):
    """Every layer's keys and values of [user, history], `[L, B, P, Hkv, K]` each; `valid [B, P]`;
    the sessions' `user_hashes [B, Hu]` (for the action bias's affinity)."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    user_hashes: jax.Array


def sequence_positions(prefix_len: int, num_candidates: int, candidate_positions: str) -> jax.Array:
    """Rotary positions [T]: the prefix takes 0..P-1; candidates P..P+C-1 ("sequential") or all P ("shared")."""
    prefix = jnp.arange(prefix_len)
    if candidate_positions == "sequential":
        candidates = prefix_len + jnp.arange(num_candidates)
    else:
        candidates = jnp.full((num_candidates,), prefix_len)
    return jnp.concatenate([prefix, candidates])


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


class CalibrationShift(nnx.Variable):
    """Per-action logit shifts `[A]` fit on validation (phoenix_flax/calibration.py): not trained
    by the optimizer, saved with the model."""


class LogitBlend(nnx.Variable):
    """Per-action weights `[F, A]` of the count blend's F features (`PhoenixRanker.blend_features`), fit on
    validation with the calibration shifts (phoenix_flax/calibration.py): not trained by the
    optimizer, saved with the model. `blend_start`'s weights give the logits themselves."""


def blend_start(cfg: ModelConfig) -> np.ndarray:
    """`LogitBlend`'s weights before any fit `[F, A]`: ones for the parts, zero for the counts and
    the gated parts (the logits themselves); the blend's prior is centred on them."""
    k = len(logit_part_names(cfg))
    extra = 1 + (k if cfg.count_gate else 0)
    return np.concatenate([np.ones((k, cfg.num_actions)), np.zeros((extra, cfg.num_actions))]).astype(np.float32)


def logit_part_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The keys of `PhoenixRanker.logit_parts`, in order."""
    if not cfg.action_bias:
        return ("transformer",)
    return ("transformer", "post", "author") + (("affinity",) if cfg.affinity_rank > 0 else ())


class PhoenixRanker(nnx.Module):
    """Predicts one logit per engagement action for every candidate: `[B, C, A]`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, embeddings: HashEmbeddings | None = None):
        d = cfg.emb_size
        candidate_in = (cfg.num_post_hashes + cfg.num_author_hashes + 1) * d
        self.candidate_positions = cfg.candidate_positions
        self.dtype = cfg.compute_dtype
        self.embeddings = embeddings if embeddings is not None else HashEmbeddings(cfg, rngs=rngs)
        self.blocks = UserHistoryBlocks(cfg, rngs=rngs)
        self.candidate_proj = param(rngs, dense_init, (candidate_in, d), ("proj_in", "embed"))
        self.transformer = Transformer(cfg, rngs=rngs)
        self.final_norm = RMSNorm(d, rngs=rngs)
        self.unembed = param(rngs, dense_init, (d, cfg.num_actions), ("embed", "actions"))
        self.action_bias = ActionBias(cfg, rngs=rngs) if cfg.action_bias else None
        self.calibration = CalibrationShift(jnp.zeros((cfg.num_actions,), jnp.float32)) if cfg.calibration else None
        self.part_names = logit_part_names(cfg)
        self.count_gate = cfg.count_gate
        self.blend = LogitBlend(jnp.asarray(blend_start(cfg))) if cfg.count_blend else None

    def __call__(self, batch: Batch) -> jax.Array:
        """Hashes in, logits `[B, C, A]` (float32) out."""
        return self.logits_from_embeddings(batch, self.embeddings(batch))

    def logit_parts(self, batch: Batch) -> dict[str, jax.Array]:
        """What each path adds to the logits, `[B, C, A]` each, summing to them: the "transformer"'s
        unembedding and, with the action bias, its "post", "author" and "affinity" parts."""
        return self.parts_from_embeddings(batch, self.embeddings(batch))

    def blend_features(self, parts: Mapping[str, jax.Array], count_logits: jax.Array) -> list[jax.Array]:
        """The logits' parts (`logit_parts`) and the candidates' counted log-odds, `[..., A]` each ->
        what the count blend weighs, `[..., A]` each: the parts (`part_names` order), the counts
        and, with `model.count_gate`, each part times sigmoid(counts).

        The gated parts let held-out data decide per action how much the user's parts move a post
        that counting says rarely gets the action: where a post's media decides an action
        (video_view), a linear blend can only add the user's parts to every post alike, which blurs
        the media's separation (bench/quality.py's sparse world)."""
        named = [parts[name] for name in self.part_names]
        features = [*named, count_logits]
        if self.count_gate:
            gate = jax.nn.sigmoid(count_logits)
            features += [p * gate for p in named]
        return features

    def calibrated_logits(self, parts: dict[str, jax.Array], count_logits: jax.Array | None = None) -> jax.Array:
        """The logits' parts `[..., A]` each (`logit_parts`) and, with `model.count_blend`, the
        candidates' counted log-odds `[..., A]` -> the logits evaluation and serving report: the
        parts summed (with the blend, `blend_features` weighted per action), plus the calibration
        shifts."""
        if self.blend is None:
            logits = sum(parts.values())
        else:
            if count_logits is None:
                raise ValueError("a ranker with model.count_blend scores with the candidates' counts (PostCounts)")
            features = self.blend_features(parts, count_logits)
            w = self.blend[...]  # [F, A]
            logits = sum(w[f] * feature for f, feature in enumerate(features))
        if self.calibration is not None:
            logits = logits + self.calibration[...]
        return logits

    def probabilities(self, parts: dict[str, jax.Array], count_logits: jax.Array | None = None) -> jax.Array:
        """sigmoid(`calibrated_logits`): what evaluation and serving report."""
        return jax.nn.sigmoid(self.calibrated_logits(parts, count_logits))

    def candidate_block(self, post_emb: jax.Array, author_emb: jax.Array, surface: jax.Array) -> jax.Array:
        """[post, author, surface emb] @ candidate_proj: [..., Hp, D], [..., Ha, D], [...] -> [..., D]."""
        parts = [flatten_hashes(post_emb), flatten_hashes(author_emb), self.blocks.surface(surface)]
        return constrain_rows(concat_dense(parts, self.candidate_proj[...], self.dtype))

    def _head_parts(
        self, h: jax.Array, post_hashes: jax.Array, author_hashes: jax.Array, user_hashes: jax.Array
    ) -> dict[str, jax.Array]:
        """Final norm and unembedding, and the action bias: [..., D] -> the logits' float32 parts [..., A]."""
        h = self.final_norm(h)
        parts = {"transformer": (h @ self.unembed[...].astype(h.dtype)).astype(jnp.float32)}
        if self.action_bias is not None:
            parts |= self.action_bias.parts(post_hashes, author_hashes, user_hashes)
        return parts

    def logits_from_embeddings(self, batch: Batch, emb: Embeddings) -> jax.Array:
        """Already looked-up embeddings in (as the original took them), logits `[B, C, A]` out."""
        return sum(self.parts_from_embeddings(batch, emb).values())

    def parts_from_embeddings(self, batch: Batch, emb: Embeddings) -> dict[str, jax.Array]:
        """Looked-up embeddings in, the logits' parts `[B, C, A]` (see `logit_parts`) out."""
        user = self.blocks.user(emb)  # [B, 1, D]
        history = self.blocks.history(batch, emb)  # [B, S, D]
        candidates = self.candidate_block(
            emb["candidate_post_embeddings"], emb["candidate_author_embeddings"], batch["candidate_product_surface"]
        )  # [B, C, D]
        prefix_len = 1 + history.shape[1]
        positions = sequence_positions(prefix_len, candidates.shape[1], self.candidate_positions)
        h = self.transformer(
            jnp.concatenate([user, history, candidates], axis=1),
            positions,
            prefix_valid(batch),
            is_valid(batch["candidate_post_hashes"]),
        )
        return self._head_parts(
            h[:, prefix_len:],
            batch["candidate_post_hashes"],
            batch["candidate_author_hashes"],
            batch["user_hashes"][:, None],  # [B, 1, Hu]: every candidate of the session
        )

    def user_context(self, batch: Batch) -> UserContext:
        """The [user, history] part of the sequence, computed once: every layer's keys and values.

        It is the same for every candidate of a session: candidates never attend to each other
        and, with shared positions, not one depends on its slot.
        """
        if self.candidate_positions != "shared":
            raise ValueError("a cached user context needs candidate_positions='shared'")
        emb = self.embeddings({k: batch[k] for k in ("user_hashes", "history_post_hashes", "history_author_hashes")})
        x = jnp.concatenate([self.blocks.user(emb), self.blocks.history(batch, emb)], axis=1)  # [B, P, D]
        valid = prefix_valid(batch)
        _, (keys, values) = self.transformer(x, jnp.arange(x.shape[1]), valid, keys_values=True)
        return UserContext(keys, values, valid, batch["user_hashes"])

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
