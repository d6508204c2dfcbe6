"""Per-action logit shifts fit on validation, so that mean predictions match observed rates.

A ranker that memorizes its training positives (through post and user rows) meets the training
rate partly with them, and gives sessions it has not memorized less: on held-out sessions it
under-predicts (bench/quality.py's sparse world: favorite 0.89 of the observed rate, dwell 0.91).
The final score multiplies probabilities by weights, so this skews it. One shift per action, fit on
the validation batches each time training evaluates (`trainer.evaluate_during_training`) and saved
with the checkpoint, is added to the logits by evaluation and serving (`PhoenixRanker.probabilities`);
the loss never sees it.
"""

from __future__ import annotations

import numpy as np


def fit_logit_shifts(logits: np.ndarray, labels: np.ndarray, prior_std: float) -> np.ndarray:
    """Logits `[N, A]` (without shifts) and 0/1 labels `[N, A]` -> shifts `[A]` (float32).

    Per action, the most probable shift b under a Gaussian prior N(0, prior_std^2): the root of
    `sum_n (sigmoid(z_n + b) - y_n) + b / prior_std^2`, by Newton's method (the objective is convex).
    The prior keeps an action with few positives near 0 (and one with none finite); with many
    it hardly matters and the mean prediction equals the observed rate.
    """
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    precision = 1.0 / prior_std**2
    shift = np.zeros(z.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(z + shift)))
        gradient = (p - y).sum(0) + precision * shift
        step = gradient / ((p * (1.0 - p)).sum(0) + precision)
        shift -= np.clip(step, -1.0, 1.0)  # a far start (a rare action) must not overshoot
        if np.abs(step).max() < 1e-9:
            break
    return shift.astype(np.float32)
