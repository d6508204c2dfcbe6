"""Post counts: smoothed rates and log-odds against a direct count, the training split's counts,
the file training writes."""

import numpy as np
import pyarrow.parquet as pq
from conftest import tiny_experiment

from phoenix_flax.data.counting import SMOOTHING, PostCounts


def direct_rates(posts, labels, queried):
    """Per queried post, (positives + s r) / (shown + s) counted in a Python loop."""
    overall = labels.sum(0) / len(labels)
    shown, positives = {}, {}
    for post, row in zip(posts.tolist(), labels, strict=True):
        shown[post] = shown.get(post, 0) + 1
        positives[post] = positives.get(post, 0) + row
    return np.array([(positives.get(q, 0) + SMOOTHING * overall) / (shown.get(q, 0) + SMOOTHING) for q in queried])


def test_rates_and_log_odds_equal_a_direct_count():
    rng = np.random.default_rng(0)
    posts = rng.integers(-(2**62), 2**62, 50)[rng.integers(0, 50, 3000)]  # 50 posts, any int64 IDs
    labels = (rng.random((3000, 3)) < [0.3, 0.02, 0.0]).astype(np.float64)  # one action never positive
    counts = PostCounts.of(posts, labels, ("a", "b", "c"))
    queried = np.concatenate([posts[:40], [0, 7, 2**62 + 1]])  # three posts never shown
    want = direct_rates(posts, labels, queried.tolist())
    np.testing.assert_allclose(counts.rates(queried), want, rtol=1e-12)
    np.testing.assert_allclose(counts.rates(queried.reshape(-1, 1)), want[:, None])  # any shape: [..., A]
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    overall = labels.mean(0).clip(1e-7, 1 - 1e-7)
    odds = counts.log_odds(queried)
    assert odds.dtype == np.float32
    np.testing.assert_allclose(odds, logit(want.clip(1e-7, 1 - 1e-7)) - logit(overall), atol=1e-5)
    assert not odds[-3:].any()  # a post never shown is the split's rate: log-odds 0
    empty = PostCounts.of(np.zeros(0, np.int64), np.zeros((0, 3)), ("a", "b", "c"))
    assert not empty.log_odds(queried).any()
    batch = {"candidate_post_id": queried[:6].reshape(2, 3)}
    np.testing.assert_array_equal(counts.with_log_odds(batch)["candidate_count_logits"], odds[:6].reshape(2, 3, 3))


def test_the_training_splits_counts(tiny_world):
    cfg = tiny_experiment(tiny_world["data_dir"])
    actions = cfg.model.actions
    counts = PostCounts.of_split(cfg, actions)
    posts, labels = [], []  # the raw training file, read directly
    for record in pq.read_table(tiny_world["raw"]["train"]).to_pylist():
        if record["candidates"] and record["candidates"][0].get("actions") is not None:
            for c in record["candidates"]:
                posts.append(c["post_id"])
                labels.append([a in c["actions"] for a in actions])
    posts, labels = np.array(posts), np.array(labels, np.float64)
    assert len(posts) > 1000
    np.testing.assert_array_equal(counts.post_ids, np.unique(posts))
    np.testing.assert_allclose(counts.rates(counts.post_ids), direct_rates(posts, labels, counts.post_ids.tolist()))

    loaded = PostCounts.from_arrays(counts.arrays(), actions)  # what a checkpoint step keeps
    np.testing.assert_allclose(loaded.rates(posts[:100]), counts.rates(posts[:100]))
