"""Pictures of an evaluation, for a person to look at: reliability diagrams and ROC curves, a
figure each with a panel per action, as PNG files (matplotlib, drawn off-screen)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from phoenix_flax.evaluation.metrics import reliability
from phoenix_flax.files import replaced


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) from the highest threshold down, tied scores
    taken together; both start at 0 and end at 1. Needs both classes."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores, np.float64)[order], np.asarray(labels, bool)[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def write_plots(
    directory: str,
    actions: Sequence[str],
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    bins: int = 10,
) -> list[str]:
    """Two figures, a panel per action with both classes: `reliability.png` (the model's mean
    predicted probability against the observed rate in `bins` bins of equal count, as
    `calibration`'s ECE uses) and `roc.png` (a curve per entry of `scores`, `[N, A]` each; the
    first, "model", holds probabilities). Returns the paths written (none without such an action)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [i for i in range(len(actions)) if 0 < labels[:, i].sum() < len(labels)]
    if not drawn:
        return []
    os.makedirs(directory, exist_ok=True)
    cols = min(5, len(drawn))
    rows = -(-len(drawn) // cols)
    probs = scores["model"]
    reliability_fig, reliability_axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    roc_fig, roc_axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for panel, i in enumerate(drawn):
        y = labels[:, i].astype(bool)
        ax = reliability_axes.flat[panel]
        predicted, observed, _ = reliability(probs[:, i], y, bins)
        top = max(predicted.max(), observed.max()) * 1.05
        ax.plot([0, top], [0, top], color="0.7", linewidth=1, label="calibrated")
        ax.plot(predicted, observed, marker="o", markersize=3, label="model")
        ax.set_title(actions[i], fontsize=9)
        ax = roc_axes.flat[panel]
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=1)
        for name, s in scores.items():
            fpr, tpr = roc_curve(s[:, i], y)
            ax.plot(fpr, tpr, linewidth=1, label=name)
        ax.set_title(actions[i], fontsize=9)
    for axes in (reliability_axes, roc_axes):
        for ax in axes.flat[len(drawn) :]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=7)
    reliability_fig.supxlabel("mean predicted probability")
    reliability_fig.supylabel("observed rate")
    reliability_fig.suptitle("reliability per action")
    roc_fig.supxlabel("false positive rate")
    roc_fig.supylabel("true positive rate")
    roc_fig.suptitle("ROC per action")
    return [
        _save(reliability_fig, os.path.join(directory, "reliability.png"), plt),
        _save(roc_fig, os.path.join(directory, "roc.png"), plt),
    ]


def _save(fig, path: str, plt) -> str:
    fig.tight_layout()
    with replaced(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return path
