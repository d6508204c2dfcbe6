"""Counting: each post's impressions and positives per action in the training split.

Their smoothed rates are the popularity baseline evaluation compares the model with, and, with
`model.count_blend`, an input of the ranker's final logits (`ExtendedRanker.calibrated_logits`):
with few impressions per post, a hashed table learns a post's rates less well than counting does
(bench/memorization.py). Training saves the counts in every checkpoint step (the `counts` item),
so evaluation and serving score with the counts the blend was fit with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from phoenix_flax.config import ExperimentConfig
from phoenix_flax.data.pipeline import bit_positions, dataset_actions, open_source

SMOOTHING = 10.0  # impressions of smoothing toward the split's rate


def split_labels(cfg: ExperimentConfig, actions: Sequence[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Post IDs `[n]` and labels `[n, A]` (for `actions`) of every labeled candidate of `split`."""
    bits = bit_positions(actions, dataset_actions(cfg.data.data_dir), "actions")
    source = open_source(cfg.data.data_dir, split, fields=("labeled", "candidate_post_id", "candidate_actions"))
    posts, masks = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, len(source), 1024):
        for record in source.__getitems__(range(start, min(start + 1024, len(source)))):
            if record["labeled"]:
                posts.append(record["candidate_post_id"])
                masks.append(record["candidate_actions"])
    posts, masks = np.concatenate(posts), np.concatenate(masks)
    return posts, ((masks[:, None] >> bits) & 1).astype(np.float64)


class PostCounts:
    """Impressions `shown [P]` and positives `positives [P, A]` of the posts `post_ids [P]`
    (sorted), for `actions`."""

    def __init__(self, post_ids: np.ndarray, shown: np.ndarray, positives: np.ndarray, actions: Sequence[str]):
        self.post_ids, self.shown, self.positives = post_ids, shown, positives
        self.actions = tuple(actions)
        # The rate of a post never shown: the split's. 0.5 for an empty split, so logits stay finite.
        total = shown.sum()
        self.overall = positives.sum(0) / total if total else np.full(len(self.actions), 0.5)

    @classmethod
    def of(cls, posts: np.ndarray, labels: np.ndarray, actions: Sequence[str]) -> PostCounts:
        """From candidates: post IDs `[n]` and 0/1 labels `[n, A]`."""
        unique, inverse = np.unique(posts, return_inverse=True)
        positives = np.zeros((len(unique), labels.shape[1]))
        np.add.at(positives, inverse, labels)
        return cls(unique, np.bincount(inverse, minlength=len(unique)).astype(np.float64), positives, actions)

    @classmethod
    def of_split(cls, cfg: ExperimentConfig, actions: Sequence[str], split: str | None = None) -> PostCounts:
        """Of `split` (default: the training split) of the config's dataset."""
        return cls.of(*split_labels(cfg, actions, split or cfg.data.train_split), actions)

    def rates(self, post_ids: np.ndarray) -> np.ndarray:
        """Smoothed action rates `[..., A]` of `post_ids [...]`: (positives + s r) / (shown + s),
        r the split's rate and s `SMOOTHING`; a post never shown gets r."""
        ids = np.asarray(post_ids)
        if not len(self.post_ids):
            return np.broadcast_to(self.overall, (*ids.shape, len(self.actions))).copy()
        at = np.searchsorted(self.post_ids, ids).clip(0, len(self.post_ids) - 1)
        known = self.post_ids[at] == ids
        shown = np.where(known, self.shown[at], 0.0)[..., None]
        positives = np.where(known[..., None], self.positives[at], 0.0)
        return (positives + SMOOTHING * self.overall) / (shown + SMOOTHING)

    def log_odds(self, post_ids: np.ndarray) -> np.ndarray:
        """float32 `[..., A]`: logit of `rates` minus the logit of the split's rate (0 for a post
        never shown), what `model.count_blend` weighs."""
        rate, overall = self.rates(post_ids).clip(1e-7, 1 - 1e-7), self.overall.clip(1e-7, 1 - 1e-7)
        return (np.log(rate / (1 - rate)) - np.log(overall / (1 - overall))).astype(np.float32)

    def with_log_odds(self, batch: dict) -> dict:
        """A pipeline batch with `candidate_count_logits [B, C, A]` (`log_odds` of its candidates)."""
        return batch | {"candidate_count_logits": self.log_odds(batch["candidate_post_id"])}

    def arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint saves of the counts (`from_arrays` reads it back)."""
        return {"post_ids": self.post_ids, "shown": self.shown, "positives": self.positives}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], actions: Sequence[str]) -> PostCounts:
        """`arrays()` of counts of `actions` (positives' columns in their order)."""
        positives = arrays["positives"].reshape(len(arrays["post_ids"]), len(actions))
        return cls(arrays["post_ids"], arrays["shown"], positives, actions)
