"""Per-action pictures of an evaluation, for a person to look at: reliability diagrams and ROC
curves as PNG files (matplotlib, drawn off-screen)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from phoenix_flax.metrics import reliability


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) from the highest threshold down, tied scores
    taken together; both start at 0 and end at 1. Needs both classes."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores, np.float64)[order], np.asarray(labels, bool)[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def _file_name(kind: str, action: str) -> str:
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_.-]', '_', action)}.png"


def write_plots(
    directory: str,
    actions: Sequence[str],
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    bins: int = 10,
) -> list[str]:
    """For each action with both classes: `reliability_<action>.png` (the model's mean predicted
    probability against the observed rate in `bins` bins of equal count, as `calibration`'s ECE
    uses) and `roc_<action>.png` (a curve per entry of `scores`, `[N, A]` each; the first, "model",
    holds probabilities). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    probs = scores["model"]
    for i, action in enumerate(actions):
        y = labels[:, i].astype(bool)
        if y.all() or not y.any():
            continue
        predicted, observed, _ = reliability(probs[:, i], y, bins)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        top = max(predicted.max(), observed.max()) * 1.05
        ax.plot([0, top], [0, top], color="0.7", linewidth=1, label="calibrated")
        ax.plot(predicted, observed, marker="o", label="model")
        ax.set(xlabel="mean predicted probability", ylabel="observed rate", title=f"{action}: reliability")
        ax.legend(loc="upper left")
        written.append(_save(fig, os.path.join(directory, _file_name("reliability", action)), plt))

        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=1)
        for name, s in scores.items():
            fpr, tpr = roc_curve(s[:, i], y)
            ax.plot(fpr, tpr, label=name)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{action}: ROC")
        ax.legend(loc="lower right")
        written.append(_save(fig, os.path.join(directory, _file_name("roc", action)), plt))
    return written


def _save(fig, path: str, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
