"""The feed scorer's steps against hand-computed cases."""

import numpy as np
import pytest

from phoenix_flax.model.scoring import (
    FeedScoring,
    WeightsError,
    author_diversity,
    feed_scores,
    offset_negatives,
    out_of_network,
    weighted_parts,
)

# Two positive actions (weights 2 and 1) and one negative (weight -4).
WEIGHTS = np.array([2.0, 1.0, -4.0])


def test_weighted_parts_split_terms_by_sign():
    probs = np.array([[0.5, 0.2, 0.1], [0.0, 0.0, 0.5]])
    pos, neg = weighted_parts(probs, WEIGHTS)
    np.testing.assert_allclose(pos, [1.2, 0.0])  # 2*0.5 + 1*0.2
    np.testing.assert_allclose(neg, [0.4, 2.0])  # 4*0.1, 4*0.5
    np.testing.assert_allclose(pos - neg, probs @ WEIGHTS)


def test_offset_puts_every_negative_below_every_positive():
    # negative_sum = 4, total_sum = 2 + 1 + 4 = 7, offset 0.1:
    # -2.0 -> (-2 + 4) / 7 * 0.1 = 0.0285714...; -4 (the lowest possible) -> 0; 0.0 -> 0.1; 1.5 -> 1.6
    out = offset_negatives(np.array([-2.0, -4.0, 0.0, 1.5, -0.001]), WEIGHTS, 0.1)
    np.testing.assert_allclose(out, [2 / 7 * 0.1, 0.0, 0.1, 1.6, 3.999 / 7 * 0.1])
    assert out[[0, 1, 4]].max() < out[[2, 3]].min()
    # order among negatives and among positives is kept
    assert out[1] < out[0] < out[4]


def test_offset_with_all_weights_zero_clips_at_zero():
    np.testing.assert_allclose(offset_negatives(np.array([-1.0, 0.5]), np.zeros(3), 0.1), [0.0, 0.5])


def test_author_diversity_decays_an_authors_later_posts_in_score_order():
    scores = np.array([1.0, 3.0, 2.0, 4.0, 0.5])
    authors = np.array([7, 7, 8, 7, 8])
    out = author_diversity(scores, authors, decay=0.5, floor=0.25)
    # Author 7 in score order: 4.0 (k=0), 3.0 (k=1), 1.0 (k=2); author 8: 2.0 (k=0), 0.5 (k=1).
    # multiplier(k) = 0.75 * 0.5**k + 0.25: 1, 0.625, 0.4375
    np.testing.assert_allclose(out, [1.0 * 0.4375, 3.0 * 0.625, 2.0, 4.0, 0.5 * 0.625])


def test_author_diversity_ties_follow_input_order():
    out = author_diversity(np.array([1.0, 1.0]), np.array([3, 3]), decay=0.5, floor=0.0)
    np.testing.assert_allclose(out, [1.0, 0.5])


def test_out_of_network_scales_only_out_of_network_non_negative_scores():
    out = out_of_network(np.array([2.0, 2.0, -1.0]), np.array([True, False, False]), 0.7)
    np.testing.assert_allclose(out, [2.0, 1.4, -1.0])


def test_feed_scores_apply_the_steps_in_order():
    probs = np.array([[0.5, 0.0, 0.0], [0.4, 0.0, 0.0], [0.0, 0.0, 0.25], [0.3, 0.0, 0.0]])
    authors = np.array([1, 1, 2, 3])
    in_network = np.array([True, True, True, False])
    plain = feed_scores(probs, WEIGHTS, authors, in_network)
    np.testing.assert_allclose(plain, probs @ WEIGHTS)
    options = FeedScoring(negative_offset=0.1, author_decay=0.5, author_floor=0.0, out_of_network_factor=0.5)
    out = feed_scores(probs, WEIGHTS, authors, in_network, options)
    # weighted: 1.0, 0.8, -1.0, 0.6 -> offset: 1.1, 0.9, (3/7)*0.1, 0.7
    # diversity: author 1's second post x0.5 -> 0.45; out of network: 0.7 x 0.5 -> 0.35
    np.testing.assert_allclose(out, [1.1, 0.45, 3 / 7 * 0.1, 0.35])
    assert FeedScoring().is_plain and not options.is_plain


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"negative_offset": 0.0}, "negative offset"),
        ({"author_decay": 1.5}, "decay"),
        ({"author_decay": 0.5, "author_floor": -0.1}, "floor"),
        ({"out_of_network_factor": float("nan")}, "out-of-network"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(WeightsError, match=message):
        FeedScoring(**kwargs)
