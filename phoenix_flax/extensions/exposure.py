"""The exposure softmax (`loss.exposure_weight`): what a user was shown tells their interests.

The feed chose every shown candidate by the user, so each one, engaged or not, is a positive of
a softmax of the action bias's user affinity factors against the shown authors' factors, beside
the ranking loss whose labels tell interests only for the few engaged candidates. Needs the
ranker's affinity (`model.action_bias`, `model.affinity_rank > 0`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phoenix_flax.data.batch import labeled_candidates
from phoenix_flax.model.attention import MASKED_LOGIT


def exposure_columns(x: jax.Array, valid: jax.Array) -> jax.Array:
    """`x [B, C, ...]` of every shown candidate -> `[B, ...]` of the one the exposure softmax's
    other rows take as a negative: session j's slot `j mod (its candidate count)`, so that every
    slot serves (a served order's top slot is not every column)."""
    count = jnp.sum(valid.astype(jnp.int32), axis=-1)
    slot = jnp.arange(valid.shape[0]) % jnp.maximum(count, 1)  # [B]
    return jnp.take_along_axis(x, slot.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]


def exposure_softmax_loss(
    users: jax.Array,
    candidates: jax.Array,
    ids: jax.Array,
    valid: jax.Array,
    log_q: jax.Array | None = None,
) -> jax.Array:
    """In-batch sampled softmax of what each session was shown: every shown candidate a positive.

    Row b's positive (b, c) competes with one shown candidate of every other session (the one
    `exposure_columns` picks), logits `u_b . c - log q`; a column that has the same ID as any
    of row b's shown candidates is no negative of row b (an accidental hit; so is row b's own
    column, one of its shown candidates). The logits are `[B, B]`, as the retrieval softmax's:
    C positives per row share them.

    Args:
      users: [B, D] each session's user vector.
      candidates: [B, C, D] its shown candidates' vectors.
      ids: [B, C] integer IDs (or fingerprints) of what the candidates are scored as.
      valid: [B, C] bool, the shown candidates.
      log_q: optional [B, C] log sampling probability of each candidate as a column.

    Returns:
      scalar: mean over the shown candidates of -log softmax over [positive, row's negatives].
    """
    users, candidates = users.astype(jnp.float32), candidates.astype(jnp.float32)
    log_q = jnp.zeros(ids.shape, jnp.float32) if log_q is None else log_q.astype(jnp.float32)
    pos = jnp.sum(users[:, None, :] * candidates, axis=-1) - log_q  # [B, C]
    col_ids, col_valid = exposure_columns(ids, valid), exposure_columns(valid, valid)  # [B]
    neg = users @ exposure_columns(candidates, valid).T - exposure_columns(log_q, valid)[None, :]  # [B, B]
    hit = jnp.any((ids[:, :, None] == col_ids[None, None, :]) & valid[:, :, None], axis=1)  # [B, B], diagonal too
    neg = jnp.where(col_valid[None, :] & ~hit, neg, MASKED_LOGIT)
    per_positive = jnp.logaddexp(jax.nn.logsumexp(neg, axis=-1)[:, None], pos) - pos  # [B, C]
    total = jnp.sum(jnp.where(valid, per_positive, 0.0))
    return total / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def exposure_loss(model, batch: dict, valid: jax.Array) -> jax.Array:
    """`exposure_softmax_loss` of a `PhoenixModel`'s action-bias user affinity factors against the
    shown candidates' author factors, `valid [B, C]` the shown candidates, authors told apart by
    fingerprint."""
    authors, users = model.ranker.action_bias.exposure_factors(batch["candidate_author_hashes"], batch["user_hashes"])
    ids = batch["candidate_author_fingerprint"]  # [B, C]
    log_q = None if model.exposure_frequency is None else model.exposure_frequency.log_q(ids)
    return exposure_softmax_loss(users, authors, ids, valid, log_q)


def record_exposure(model, batch: dict) -> None:
    """Before the loss: adds the authors this batch's exposure softmax samples as negatives (one
    column a session) to the model's streamed `exposure_frequency`, for their logQ."""
    valid = labeled_candidates(batch)
    columns = exposure_columns(batch["candidate_author_fingerprint"], valid)
    model.exposure_frequency.update(columns, exposure_columns(valid, valid))
