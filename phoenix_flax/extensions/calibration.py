"""Per-action logit shifts, and the count blend's weights, fit on validation.

A ranker that memorizes its training positives (through post and user rows) meets the training
rate partly with them, and gives sessions it has not memorized less: on held-out sessions it
under-predicts (bench/quality.py's sparse world: favorite 0.89 of the observed rate, dwell 0.91).
The final score multiplies probabilities by weights, so this skews it. One shift per action, fit on
the validation batches each time training evaluates (`ExtendedRanker.fit_post_hoc`) and saved
with the checkpoint, is added to the logits by evaluation and serving (`ExtendedRanker.probabilities`);
the loss never sees it.

With `model.count_blend` the fit weighs, per action, the logits' parts and the candidate post's
counted log-odds (phoenix_flax/data/counting.py), and with `model.count_gate` each part times their
sigmoid (`ExtendedRanker.blend_features`, `calibrated_logits`): held-out data
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

    Newton's method on the penalized log loss (convex), every action at once, each action's step
    halved until its loss falls by a share of what the step promises (Armijo): a full Newton step
    from a far start overshoots, and with correlated features (the gated parts) it can cycle.
    """
    z, y = np.asarray(logits, np.float64).T, np.asarray(labels, np.float64).T  # [A, N]
    k = len(features)
    x = np.concatenate([np.asarray(features, np.float64).transpose(2, 1, 0), np.ones((*z.shape, 1))], -1)  # [A, N, K+1]
    precision = np.array([1.0 / prior_std**2] * k + [1.0 / shift_prior_std**2])

    def penalized_loss(scores, theta):  # [A]
        return (np.logaddexp(0.0, scores) - y * scores).sum(-1) + 0.5 * (precision * theta**2).sum(-1)

    theta = np.zeros((z.shape[0], k + 1))  # [A, K+1]: the weights, then the shift
    for _ in range(100):
        scores = z + (x @ theta[..., None])[..., 0]
        p = 1.0 / (1.0 + np.exp(-scores))
        gradient = (x.swapaxes(1, 2) @ (p - y)[..., None])[..., 0] + precision * theta
        hessian = x.swapaxes(1, 2) @ (x * (p * (1.0 - p))[..., None]) + np.diag(precision)
        direction = np.linalg.solve(hessian, gradient[..., None])[..., 0]  # [A, K+1]
        if np.abs(direction).max() < 1e-9:
            break
        promised = (gradient * direction).sum(-1)  # [A] >= 0: the hessian is positive definite
        moved = (x @ direction[..., None])[..., 0]
        loss, t = penalized_loss(scores, theta), np.ones(len(theta))
        slack = 1e-12 * np.abs(loss)  # rounding, where the step is already tiny
        for _ in range(40):
            trial = penalized_loss(scores - t[:, None] * moved, theta - t[:, None] * direction)
            short = trial > loss - 1e-4 * t * promised + slack
            if not short.any():
                break
            t = np.where(short, t / 2, t)
        theta -= t[:, None] * direction
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
