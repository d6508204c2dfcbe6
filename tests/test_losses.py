"""Losses and the scorer against direct numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phoenix_flax.config import DEFAULT_ACTIONS, ModelConfig
from phoenix_flax.model.ranker import PhoenixRanker
from phoenix_flax.model.scoring import DEFAULT_ACTION_WEIGHTS, action_weights, weighted_score
from phoenix_flax.step.losses import FrequencyEstimator, ranking_bce, sampled_softmax_loss
from phoenix_flax.testing import model_inputs, random_batch


def numpy_bce(logits, labels, valid, weights):
    x, y = logits.astype(np.float64), labels.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    total = sum(per[b, c] @ weights / weights.sum() for b, c in zip(*np.nonzero(valid), strict=True))
    return total / max(valid.sum(), 1)


def test_ranking_bce_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 5, 6)).astype(np.float32)
    labels = (rng.random((4, 5, 6)) < 0.3).astype(np.int32)
    valid = rng.random((4, 5)) < 0.6
    weights = rng.uniform(0.1, 2.0, 6).astype(np.float32)
    got = ranking_bce(logits, labels, valid, weights)
    np.testing.assert_allclose(got, numpy_bce(logits, labels, valid, weights), rtol=1e-5)
    unweighted = ranking_bce(logits, labels, valid)
    np.testing.assert_allclose(unweighted, numpy_bce(logits, labels, valid, np.ones(6)), rtol=1e-5)


def test_ranking_bce_is_stable_for_large_logits():
    logits = np.array([[[100.0, -100.0]]], np.float32)
    labels = np.array([[[0, 1]]])
    np.testing.assert_allclose(ranking_bce(logits, labels, np.ones((1, 1), bool)), 100.0, rtol=1e-6)


def numpy_sampled_softmax(users, cands, ids, col_valid, pos_valid, log_q, temperature, remove_hits=True):
    losses = []
    for i in np.nonzero(pos_valid)[0]:
        logits = {}
        for j in range(len(cands)):
            if not col_valid[j] or (remove_hits and j != i and ids[j] == ids[i]):
                continue
            logits[j] = float(users[i] @ cands[j]) / temperature - log_q[j]
        vals = np.array(list(logits.values()), np.float64)
        losses.append(np.log(np.exp(vals - vals.max()).sum()) + vals.max() - logits[i])
    return np.mean(losses)


def test_sampled_softmax_matches_numpy_with_logq_hits_negatives_and_empty_rows():
    rng = np.random.default_rng(1)
    b, n, d, t = 8, 5, 6, 0.2
    users = rng.standard_normal((b, d)).astype(np.float32)
    pos = rng.standard_normal((b, d)).astype(np.float32)
    negs = rng.standard_normal((n, d)).astype(np.float32)
    pos_ids = np.array([10, 11, 12, 10, 13, 14, 12, 15])  # rows 0 and 3, 2 and 6 share a post
    neg_ids = np.array([20, 11, 21, 22, 15])  # two sampled negatives are rows' positives
    pos_valid = np.array([1, 1, 1, 1, 0, 1, 1, 0], bool)
    pos_log_q = np.log(rng.uniform(0.01, 0.5, b)).astype(np.float32)
    neg_log_q = np.log(rng.uniform(0.01, 0.5, n)).astype(np.float32)

    got = sampled_softmax_loss(users, pos, pos_ids, pos_valid, t, pos_log_q, negs, neg_ids, neg_log_q)
    cands = np.concatenate([pos, negs])
    ids = np.concatenate([pos_ids, neg_ids])
    col_valid = np.concatenate([pos_valid, np.ones(n, bool)])
    log_q = np.concatenate([pos_log_q, neg_log_q])
    want = numpy_sampled_softmax(users, cands, ids, col_valid, pos_valid, log_q, t)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Each ingredient changes the answer, so the comparison above tests all of them.
    with_hits = numpy_sampled_softmax(users, cands, ids, col_valid, pos_valid, log_q, t, remove_hits=False)
    without_logq = numpy_sampled_softmax(users, cands, ids, col_valid, pos_valid, 0 * log_q, t)
    assert abs(with_hits - want) > 1e-3 and abs(without_logq - want) > 1e-3


def test_sampled_softmax_without_extras_matches_numpy():
    rng = np.random.default_rng(2)
    users = rng.standard_normal((5, 4)).astype(np.float32)
    pos = rng.standard_normal((5, 4)).astype(np.float32)
    ids = np.arange(5)
    valid = np.ones(5, bool)
    got = sampled_softmax_loss(users, pos, ids, valid, 0.5)
    np.testing.assert_allclose(got, numpy_sampled_softmax(users, pos, ids, valid, valid, np.zeros(5), 0.5), rtol=1e-5)


@pytest.mark.slow
def test_gradients_are_finite_on_fully_padded_rows():
    cfg = ModelConfig(
        emb_size=16,
        key_size=4,
        num_q_heads=2,
        num_kv_heads=1,
        num_layers=1,
        user_vocab_rows=32,
        post_vocab_rows=64,
        author_vocab_rows=32,
    )
    model = PhoenixRanker(cfg, rngs=nnx.Rngs(0))
    batch = random_batch(cfg, 3, np.random.default_rng(3), history_len=4, num_candidates=3)
    for k in batch:  # row 1: no user, no history, no candidates
        batch[k][1] = 0
    inputs = model_inputs(batch)
    valid = batch["candidate_post_hashes"][..., 0] != 0

    def loss(m):
        return ranking_bce(m(inputs), batch["candidate_actions"], valid)

    grads = nnx.jit(nnx.grad(loss))(model)  # compiled once: eagerly, each attention loop compiles alone
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))

    users = jnp.zeros((4, 8)).at[0].set(1.0)
    empty = jnp.zeros(4, bool)
    g = jax.grad(lambda u: sampled_softmax_loss(u, u, jnp.arange(4), empty, 0.1))(users)
    assert np.isfinite(np.asarray(g)).all()
    assert float(sampled_softmax_loss(users, users, jnp.arange(4), empty, 0.1)) == 0.0


def test_frequency_estimator_is_a_bias_corrected_average_of_batch_counts():
    rng = np.random.default_rng(4)
    buckets, alpha = 16, 0.1
    est = FrequencyEstimator(buckets, alpha)
    update = nnx.jit(lambda e, ids, valid: e.update(ids, valid))
    rate, steps = np.zeros(buckets), 39
    for _ in range(steps):
        ids = rng.choice(40, size=8)  # with repeats: a bucket can count several times in a batch
        valid = rng.random(8) < 0.8
        update(est, jnp.asarray(ids), jnp.asarray(valid))
        count = np.bincount(ids[valid] % buckets, minlength=buckets)
        rate = (1 - alpha) * rate + alpha * count
    expected = np.log(np.maximum(rate / (1 - (1 - alpha) ** steps), alpha))
    np.testing.assert_allclose(est.log_q(jnp.arange(buckets)), expected, rtol=1e-5)


def test_frequency_estimator_converges_to_the_expected_count_per_batch():
    est = FrequencyEstimator(1000, alpha=0.05)
    update = nnx.jit(lambda e, ids: e.update(ids, ids > 0))
    for t in range(1, 801):
        ids = [7, 7, 7] + ([42] if t % 4 == 0 else [0])  # 7 three times a batch, 42 in one batch of 4
        update(est, jnp.asarray(ids))
    np.testing.assert_allclose(np.exp(est.log_q(jnp.array([7, 42]))), [3.0, 0.25], rtol=0.1)
    # bias-corrected from the first step; a bucket never seen gets the floor
    first = FrequencyEstimator(1000, alpha=0.05)
    update(first, jnp.array([5, 5, 9, 0]))
    np.testing.assert_allclose(np.exp(first.log_q(jnp.array([5, 9, 11]))), [2.0, 1.0, 0.05], rtol=1e-5)


def test_default_weights_and_score():
    w = action_weights(DEFAULT_ACTIONS)
    assert w.shape == (15,)
    assert w[DEFAULT_ACTIONS.index("favorite")] > w[DEFAULT_ACTIONS.index("click")] > 0
    for negative in ("not_interested", "block_author", "mute_author", "report"):
        assert w[DEFAULT_ACTIONS.index(negative)] < 0
    w2 = action_weights(DEFAULT_ACTIONS, {"report": -100.0})
    assert w2[-1] == -100.0 and np.array_equal(w2[:-1], w[:-1])
    probs = np.random.default_rng(5).random((3, 4, 15))
    np.testing.assert_allclose(weighted_score(probs, w), probs @ w.astype(np.float64), rtol=1e-5)


def test_bad_weights_are_named():
    with pytest.raises(ValueError, match="repost_typo"):
        action_weights(DEFAULT_ACTIONS, {"repost_typo": 1.0})
    with pytest.raises(ValueError, match="custom_action"):
        action_weights(("favorite", "custom_action"))
    assert set(DEFAULT_ACTION_WEIGHTS) == set(DEFAULT_ACTIONS)
