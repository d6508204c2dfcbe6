"""Training losses: multi-action BCE for ranking, in-batch sampled softmaxes for retrieval and
for what a user was shown."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phoenix_flax.attention import MASKED_LOGIT


def ranking_bce(
    logits: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    action_weights: jax.Array | None = None,
) -> jax.Array:
    """Binary cross-entropy per action, averaged over actions and valid candidates.

    Args:
      logits: [B, C, A].
      labels: [B, C, A] in {0, 1}.
      valid: [B, C] bool, the candidates that count.
      action_weights: optional [A]; the average over actions is weighted by it.

    Returns:
      scalar: sum(valid * w_a * bce) / (max(#valid, 1) * sum(w)).
    """
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    per_action = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))  # [B, C, A]
    w = jnp.ones(x.shape[-1], jnp.float32) if action_weights is None else jnp.asarray(action_weights, jnp.float32)
    per_candidate = jnp.sum(per_action * w, axis=-1) / jnp.sum(w)  # [B, C]
    total = jnp.sum(jnp.where(valid, per_candidate, 0.0))
    return total / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def sampled_softmax_loss(
    users: jax.Array,
    positives: jax.Array,
    positive_ids: jax.Array,
    positive_valid: jax.Array,
    temperature: jax.Array | float,
    positive_log_q: jax.Array | None = None,
    negatives: jax.Array | None = None,
    negative_ids: jax.Array | None = None,
    negative_log_q: jax.Array | None = None,
) -> jax.Array:
    """In-batch sampled softmax with logQ correction and accidental-hit removal.

    Row i's positive competes with every other row's positive and the optional extra
    negatives. logits_ij = u_i . c_j / temperature - log q_j. A candidate with the same ID as
    row i's positive (other than row i's own column) is removed from row i. Rows without a
    positive contribute nothing, and their column is no negative for anyone.

    Args:
      users: [B, D] user vectors.
      positives: [B, D] each row's positive candidate vector.
      positive_ids: [B] integer post IDs (or fingerprints) for accidental-hit removal.
      positive_valid: [B] bool, whether the row has a positive.
      temperature: scalar.
      positive_log_q: optional [B] log sampling probability of each positive.
      negatives: optional [N, D] extra negatives sampled from the corpus.
      negative_ids: [N] their IDs (required with negatives).
      negative_log_q: optional [N] their log sampling probabilities.

    Returns:
      scalar: mean over rows with a positive of -log softmax(logits_i)[i].
    """
    b = users.shape[0]
    cands, ids, col_valid = positives, positive_ids, positive_valid.astype(bool)
    log_q = jnp.zeros((b,), jnp.float32) if positive_log_q is None else positive_log_q
    if negatives is not None:
        if negative_ids is None:
            raise ValueError("negative_ids are required with negatives (for accidental-hit removal)")
        n = negatives.shape[0]
        cands = jnp.concatenate([cands, negatives.astype(cands.dtype)], axis=0)
        ids = jnp.concatenate([ids, negative_ids.astype(ids.dtype)])
        col_valid = jnp.concatenate([col_valid, jnp.ones((n,), bool)])
        neg_log_q = jnp.zeros((n,), jnp.float32) if negative_log_q is None else negative_log_q
        log_q = jnp.concatenate([log_q.astype(jnp.float32), neg_log_q.astype(jnp.float32)])

    logits = (users.astype(jnp.float32) @ cands.astype(jnp.float32).T) / temperature  # [B, B+N]
    logits = logits - log_q.astype(jnp.float32)[None, :]
    own = jnp.arange(cands.shape[0])[None, :] == jnp.arange(b)[:, None]
    accidental = (ids[None, :] == positive_ids[:, None]) & ~own
    logits = jnp.where(col_valid[None, :] & ~accidental, logits, MASKED_LOGIT)

    per_row = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(own, logits, 0.0), axis=-1)
    rows = positive_valid.astype(bool)
    return jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(jnp.sum(rows.astype(jnp.float32)), 1.0)


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


class FrequencyState(nnx.Variable):
    """Streaming statistics: not trained by the optimizer, saved with the model."""


class FrequencyEstimator(nnx.Module):
    """Streaming estimate of how often each item appears in a batch, for the logQ correction.

    IDs are hashed into buckets. Each step adds the batch's count of every bucket to an
    exponential moving average, `rate = (1 - alpha) * rate + alpha * count`, read with Adam's
    bias correction (divided by `1 - (1 - alpha)**step`), so the estimate is unbiased from the
    first step. An item's logQ is the log of its expected count per batch: several sightings in
    one batch count, and popular items are not capped at one (the interval estimator of Yi et
    al., RecSys 2019, caps the probability of appearing at 1 and needs about 1/alpha sightings
    before it corrects at all, so in-batch training under it demotes popular items). Rates are
    floored at `alpha`, one sighting in the average's window, so that an item never seen in
    training (at evaluation) gets the correction of the rarest item that was.
    """

    def __init__(self, num_buckets: int, alpha: float = 0.01):
        if num_buckets < 1 or not 0 < alpha <= 1:
            raise ValueError(f"need num_buckets >= 1 and 0 < alpha <= 1, got {num_buckets}, {alpha}")
        self.num_buckets = num_buckets
        self.alpha = alpha
        self.step = FrequencyState(jnp.zeros((), jnp.int32))
        self.rate = FrequencyState(jnp.zeros((num_buckets,), jnp.float32))

    def _buckets(self, ids: jax.Array) -> jax.Array:
        return jnp.mod(ids, self.num_buckets).astype(jnp.int32)

    def log_q(self, ids: jax.Array) -> jax.Array:
        """[...] IDs -> [...] log expected count per batch."""
        seen = 1.0 - (1.0 - self.alpha) ** jnp.maximum(self.step[...], 1).astype(jnp.float32)
        rate = self.rate[...][self._buckets(ids)] / seen
        return jnp.log(jnp.maximum(rate, self.alpha))

    def update(self, ids: jax.Array, valid: jax.Array) -> None:
        """Records one batch's sightings of `ids [N]` where `valid [N]`."""
        buckets = jnp.where(valid, self._buckets(ids), self.num_buckets)  # invalid -> dropped
        count = jnp.zeros((self.num_buckets,), jnp.float32).at[buckets].add(1.0, mode="drop")
        self.rate[...] = (1.0 - self.alpha) * self.rate[...] + self.alpha * count
        self.step[...] = self.step[...] + 1
