"""Per-action logit shifts, and the count blend's weights, fit on validation.

A ranker that memorizes its training positives (through post and user rows) meets the training
rate partly with them, and gives sessions it has not memorized less: on held-out sessions it
under-predicts (bench/quality.py's sparse world: favorite 0.89 of the observed rate, dwell 0.91).
The final score multiplies probabilities by weights, so this skews it. One shift per action, fit on
the validation batches each time training evaluates (`trainer.evaluate_during_training`) and saved
with the checkpoint, is added to the logits by evaluation and serving (`PhoenixRanker.probabilities`);
the loss never sees it.

With `model.count_blend` the fit weighs, per action, the logits' parts and the candidate post's
counted log-odds (phoenix_flax/counting.py; `PhoenixRanker.calibrated_logits`): held-out data
decides how much of the post's knowledge to take from counting and how much of the user's from
the model, which the training split cannot (its counts hold each label they predict). The shifts
then set the mean prediction on those batches to the action's rate in the training split and the
batches together: reweighted parts no longer carry the training fit's calibration, and the
validation batches' own rate of a rare action strays by chance (bench/quality.py's sparse world:
follow_author's 100 test positives at 0.91 of the validation rate, 0.93 of the training one)."""

from __future__ import annotations

import numpy as np


def fit_logit_shifts(logits: np.ndarray, labels: np.ndarray, prior_std: float) -> np.ndarray:
    """Logits `[N, A]` (without shifts) and 0/1 labels `[N, A]` -> shifts `[A]` (float32): per
    action the most probable shift b of `logits + b` under a Gaussian prior N(0, prior_std^2).

    The prior keeps an action with few positives near 0 (and one with none finite); with many
    it hardly matters and the mean prediction equals the observed rate.
    """
    empty = np.zeros((0, *np.shape(logits)))
    return fit_logit_blend(logits, labels, empty, prior_std, prior_std)[1]


def fit_logit_blend(
    logits: np.ndarray, labels: np.ndarray, features: np.ndarray, prior_std: float, shift_prior_std: float
) -> tuple[np.ndarray, np.ndarray]:
    """Logits `[N, A]`, 0/1 labels `[N, A]` and features `[K, N, A]` -> (weights `[K, A]`, shifts
    `[A]`), float32: per action the most probable w and b of `logits + sum_k w_k features_k + b`
    under Gaussian priors N(0, prior_std^2) on each w_k and N(0, shift_prior_std^2) on b.

    Newton's method on the penalized log loss (convex), every action at once; each coordinate's
    step at most 1, so that a far start (a rare action) does not overshoot.
    """
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    k = len(features)
    x = np.concatenate(
        [np.moveaxis(np.asarray(features, np.float64), 0, -1), np.ones((*z.shape, 1))], -1
    )  # [N, A, K+1]
    precision = np.array([1.0 / prior_std**2] * k + [1.0 / shift_prior_std**2])
    theta = np.zeros((z.shape[1], k + 1))  # [A, K+1]: the weights, then the shift
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(z + np.einsum("nak,ak->na", x, theta))))
        gradient = np.einsum("nak,na->ak", x, p - y) + precision * theta
        hessian = np.einsum("nak,nal,na->akl", x, x, p * (1.0 - p)) + np.diag(precision)
        step = np.clip(np.linalg.solve(hessian, gradient[..., None])[..., 0], -1.0, 1.0)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return theta[:, :k].T.astype(np.float32), theta[:, k].astype(np.float32)


def shifts_to_rates(logits: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Logits `[N, A]` and rates `[A]` in (0, 1) -> shifts `[A]` (float32): per action the b with
    `mean_n sigmoid(logits_n + b) = rate`, by Newton's method (the mean rises with b)."""
    z, target = np.asarray(logits, np.float64), np.asarray(rates, np.float64).clip(1e-6, 1 - 1e-6)  # finite
    shift = np.zeros(z.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(z + shift)))
        step = np.clip((p.mean(0) - target) / (p * (1.0 - p)).mean(0), -1.0, 1.0)
        shift -= step
        if np.abs(step).max() < 1e-9:
            break
    return shift.astype(np.float32)
