"""Ranking for serving: a session's [user, history] computed once, its candidates scored in chunks
against the cached keys and values, and the programs' output lines."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.data.batch import pad_batch, pad_rows
from phoenix_flax.data.counting import PostCounts
from phoenix_flax.data.hashing import hash_ids
from phoenix_flax.data.pipeline import hash_prefix, recent_histories
from phoenix_flax.data.raw import Session
from phoenix_flax.extensions import scores_with_counts
from phoenix_flax.model.scoring import FeedScoring, feed_scores
from phoenix_flax.step.model import PhoenixModel


def prefix_batch(
    sessions: Sequence[Session], cfg: ModelConfig, batch_size: int, bits: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """User and history inputs of `sessions`, padded with empty rows to `batch_size`. `bits`: the
    bit of each model action in the sessions' masks (default: parsed with the model's vocabulary)."""
    bits = np.arange(cfg.num_actions) if bits is None else bits
    ex = recent_histories([vars(s) for s in sessions], cfg.history_len, bits)
    ex["user_id"] = np.array([s.user_id for s in sessions], np.int64)
    return pad_batch(hash_prefix(ex, cfg), batch_size)


def batches_of(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def bucket(n: int, most: int) -> int:
    """The padded size of `n` rows: the next power of two, at most `most` (a server compiles each
    once, at warm-up)."""
    return min(most, 1 << max(n - 1, 0).bit_length())


# Compiled once per process (per model structure and shapes), shared by every ranker: a model
# restored again (a server's reload) reuses them.
_user_context = nnx.jit(lambda m, b: m.ranker.user_context(b))
_candidate_probabilities = nnx.jit(lambda m, ctx, counted, *cands: m.ranker.probabilities(
    m.ranker.candidate_parts(ctx, *cands), **({} if counted is None else {"count_logits": counted})
))  # fmt: skip


class CachedRanker:
    """Action probabilities for any number of candidates per session.

    Per batch of sessions, the user context (every layer's keys and values of [user, history])
    is computed once; candidates are then scored in fixed-size chunks against it. A batch is
    padded to `batch_size` sessions, or with `bucketed` to the next power of two (a few shapes,
    for a server's batches of any size).
    """

    def __init__(
        self,
        model: PhoenixModel,
        cfg: ModelConfig,
        batch_size: int = 64,
        chunk_size: int = 512,
        counts: PostCounts | None = None,
        bucketed: bool = False,
    ):
        """`counts`: the run's post counts (`Restored.counts`), which a ranker with
        `model.count_blend` scores with."""
        if model.ranker is None:
            raise ValueError("this checkpoint has no ranker (its loss.ranking_weight was 0)")
        if scores_with_counts(model.ranker) and counts is None:
            raise ValueError("this ranker blends in post counts (model.count_blend): pass the run's (Restored.counts)")
        self.model, self.cfg, self.counts = model, cfg, counts
        self.batch_size, self.chunk_size, self.bucketed = batch_size, chunk_size, bucketed

    def probabilities(self, sessions: Sequence[Session]) -> list[np.ndarray]:
        """-> one `[m_i, A]` array per session, in input order."""
        cfg, out = self.cfg, []
        for group in batches_of(sessions, self.batch_size):
            rows = bucket(len(group), self.batch_size) if self.bucketed else self.batch_size
            context = _user_context(self.model, prefix_batch(group, cfg, rows))
            post_ids = np.concatenate([s.candidate_post_id for s in group])
            counted = None if self.counts is None else self.counts.log_odds(post_ids)  # [N, A]
            candidates = (  # rows (the candidate's session in the group), hashes, surfaces: [N, ...]
                np.concatenate([np.full(len(s.candidate_post_id), i, np.int32) for i, s in enumerate(group)]),
                hash_ids(post_ids, cfg.num_post_hashes, cfg.post_vocab_rows),
                hash_ids(
                    np.concatenate([s.candidate_author_id for s in group]), cfg.num_author_hashes, cfg.author_vocab_rows
                ),
                np.concatenate([s.candidate_product_surface for s in group]),
            )
            n = len(candidates[0])
            probs = []
            for start in range(0, n, self.chunk_size):
                chunk = [pad_rows(x[start : start + self.chunk_size], self.chunk_size) for x in candidates]
                count_chunk = (
                    None if counted is None else pad_rows(counted[start : start + self.chunk_size], self.chunk_size)
                )
                probs.append(
                    np.asarray(_candidate_probabilities(self.model, context, count_chunk, *chunk))[
                        : min(self.chunk_size, n - start)
                    ]
                )
            probs = np.concatenate(probs)
            bounds = np.cumsum([0] + [len(s.candidate_post_id) for s in group])
            out.extend(probs[bounds[i] : bounds[i + 1]] for i in range(len(group)))
        return out


def ranked_candidates(
    session: Session, probs: np.ndarray, actions: Sequence[str], weights: np.ndarray, feed: FeedScoring | None = None
) -> list[dict]:
    """A session's candidates with their probabilities and score, best first (the programs' output).
    With feed-scorer options, `weighted_score` is the plain weighted sum and `score` the final one."""
    feed = feed or FeedScoring()
    scores = feed_scores(probs, weights, session.candidate_author_id, session.in_network(), feed)
    weighted = None if feed.is_plain else probs.astype(np.float64) @ weights
    order = np.argsort(-scores, kind="stable")

    def decimals(x: np.ndarray) -> list:  # to 6 decimals at once: a server's 500 candidates x 15 actions
        return np.round(np.asarray(x, np.float64)[order], 6).tolist()

    post_ids, rows, final = session.candidate_post_id[order].tolist(), decimals(probs), decimals(scores)
    plain = [None] * len(order) if weighted is None else decimals(weighted)
    return [
        {
            "post_id": post_id,
            "probs": dict(zip(actions, row, strict=True)),
            **({} if w is None else {"weighted_score": w}),
            "score": score,
        }
        for post_id, row, w, score in zip(post_ids, rows, plain, final, strict=True)
    ]


def ranking_line(
    session: Session, probs: np.ndarray, actions: Sequence[str], weights: np.ndarray, feed: FeedScoring | None = None
) -> dict:
    """phoenix-rank's output line: the session's user and its `ranked_candidates`."""
    return {"user_id": session.user_id, "candidates": ranked_candidates(session, probs, actions, weights, feed)}
