"""Training losses: multi-action BCE for ranking, the in-batch sampled softmax for retrieval."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phoenix_flax.model.attention import MASKED_LOGIT


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
