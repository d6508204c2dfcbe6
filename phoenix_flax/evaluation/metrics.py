"""Evaluation metrics in numpy: AUC, normalized entropy, calibration, recall@k."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); NaN without both classes."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def normalized_entropy(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean log loss divided by the entropy of the base rate (1.0 = no better than the rate).

    NaN without both classes: the base rate's entropy is 0 and the ratio is undefined.
    """
    y = np.asarray(labels, np.float64)
    if not 0 < y.sum() < len(y):
        return float("nan")
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    rate = y.mean()
    log_loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    base = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    return float(log_loss / base)


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """AUC of the weighted score `scores [N, A] @ weights` against "the weighted engagement value
    `labels @ weights` is positive"."""
    w = np.asarray(weights, np.float64)
    return auc(np.asarray(scores, np.float64) @ w, np.asarray(labels, np.float64) @ w > 0)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by predicted probability into `bins` bins of equal count (equal counts, not
    equal widths: a rare action's predictions crowd near 0) -> per bin (mean prediction,
    observed rate, rows)."""
    p, y = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    parts = np.array_split(np.argsort(p, kind="stable"), min(bins, len(p)))
    return (
        np.array([p[b].mean() for b in parts]),
        np.array([y[b].mean() for b in parts]),
        np.array([len(b) for b in parts]),
    )


def calibration_ratio(probs: np.ndarray, labels: np.ndarray) -> float:
    """The mean predicted probability over the observed rate (1.0 = calibrated on average; NaN
    without positives)."""
    p, y = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    return float(p.mean() / y.mean()) if y.sum() > 0 else float("nan")


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> tuple[float, float]:
    """(`calibration_ratio`, ECE): the expected calibration error over the `reliability` bins is
    the sum over bins of (share of rows) x |mean prediction - observed rate|."""
    p, y = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    if not len(p):
        return float("nan"), float("nan")
    predicted, observed, rows = reliability(p, y, bins)
    return calibration_ratio(p, y), float((rows * np.abs(predicted - observed)).sum() / len(p))


def recall_at_k(rank_of_positive: np.ndarray, ks=(1, 10, 100)) -> dict[str, float]:
    """rank_of_positive: [N] 0-based rank of each row's positive (inf where not retrieved)."""
    r = np.asarray(rank_of_positive, np.float64)
    return {f"recall@{k}": float(np.mean(r < k)) if len(r) else float("nan") for k in ks}


def ranking_metrics(rank: np.ndarray, ks=(10, 20)) -> dict[str, float]:
    """rank: [N] 1-based rank of each target in a full ranking (inf where it cannot be ranked).
    HR@k: the share ranked in the top k; NDCG@k: mean 1/log2(1 + rank) within the top k (one
    relevant item per target); MRR: mean 1/rank."""
    r = np.asarray(rank, np.float64)
    if not len(r):
        return {**{f"hr@{k}": float("nan") for k in ks}, **{f"ndcg@{k}": float("nan") for k in ks}, "mrr": float("nan")}
    out = {f"hr@{k}": float(np.mean(r <= k)) for k in ks}
    out |= {f"ndcg@{k}": float(np.mean(np.where(r <= k, 1.0 / np.log2(1.0 + r), 0.0))) for k in ks}
    out["mrr"] = float(np.mean(1.0 / r))
    return out
