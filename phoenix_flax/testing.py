"""Random batches with every field a training step reads, and numpy references, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from phoenix_flax.config import ModelConfig
from phoenix_flax.data.batch import INPUT_FIELDS
from phoenix_flax.data.hashing import fingerprint


def random_batch(
    cfg: ModelConfig,
    batch_size: int,
    rng: np.random.Generator,
    *,
    history_len: int | None = None,
    num_candidates: int | None = None,
    action_rate: float = 0.2,
) -> dict[str, np.ndarray]:
    """A batch of hashed rows in range, with padding at the end of histories and candidate lists.

    Holds every field of `phoenix_flax.data.batch.STEP_FIELDS`. Every row has at least one history
    item and one candidate, is labeled, and takes its first candidate as the retrieval positive.
    """
    s = cfg.history_len if history_len is None else history_len
    c = cfg.num_candidates if num_candidates is None else num_candidates
    b, a = batch_size, cfg.num_actions

    def hashes(rows, *shape):
        return rng.integers(1, rows, size=shape, dtype=np.int32)

    batch = {
        "user_hashes": hashes(cfg.user_vocab_rows, b, cfg.num_user_hashes),
        "history_post_hashes": hashes(cfg.post_vocab_rows, b, s, cfg.num_post_hashes),
        "history_author_hashes": hashes(cfg.author_vocab_rows, b, s, cfg.num_author_hashes),
        "history_actions": (rng.random((b, s, a)) < action_rate).astype(np.int32),
        "history_product_surface": rng.integers(0, cfg.product_surface_vocab_size, size=(b, s), dtype=np.int32),
        "candidate_post_hashes": hashes(cfg.post_vocab_rows, b, c, cfg.num_post_hashes),
        "candidate_author_hashes": hashes(cfg.author_vocab_rows, b, c, cfg.num_author_hashes),
        "candidate_product_surface": rng.integers(0, cfg.product_surface_vocab_size, size=(b, c), dtype=np.int32),
        "candidate_actions": (rng.random((b, c, a)) < action_rate).astype(np.int32),
    }
    history_len_per_row = rng.integers(1, s + 1, size=b)
    candidates_per_row = rng.integers(1, c + 1, size=b)
    for i in range(b):
        for key in ("history_post_hashes", "history_author_hashes", "history_actions", "history_product_surface"):
            batch[key][i, history_len_per_row[i] :] = 0
        for key in (
            "candidate_post_hashes",
            "candidate_author_hashes",
            "candidate_actions",
            "candidate_product_surface",
        ):
            batch[key][i, candidates_per_row[i] :] = 0
    batch["labeled"] = np.ones(b, bool)
    batch["positive_post_hashes"] = batch["candidate_post_hashes"][:, 0].copy()
    batch["positive_author_hashes"] = batch["candidate_author_hashes"][:, 0].copy()
    batch["positive_id"] = fingerprint(rng.integers(0, 1 << 40, b))
    batch["positive_valid"] = np.ones(b, bool)
    batch["candidate_author_fingerprint"] = batch["candidate_author_hashes"][..., 0].copy()  # same hashes: same author
    return batch


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields the model itself reads (`INPUT_FIELDS`)."""
    return {k: batch[k] for k in INPUT_FIELDS}


def gated_blend_features(parts: list[np.ndarray], counts: np.ndarray) -> list[np.ndarray]:
    """The count blend's features in numpy, apart from `ExtendedRanker.blend_features` to check it:
    the parts `[..., A]` each, the counted log-odds, and each part times their sigmoid."""
    gate = 1 / (1 + np.exp(-np.asarray(counts, np.float64)))
    return [*parts, counts, *(p * gate for p in parts)]
