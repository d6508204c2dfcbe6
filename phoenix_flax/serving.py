"""Serving a trained model: ranking with a cached user context, retrieval from a corpus index."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterator, Sequence

import numpy as np
from flax import nnx

from phoenix_flax.batch import pad_batch, pad_rows
from phoenix_flax.config import ModelConfig
from phoenix_flax.counting import PostCounts
from phoenix_flax.data.pipeline import hash_prefix, recent_histories
from phoenix_flax.data.raw import Session, read_corpus
from phoenix_flax.hashing import hash_ids
from phoenix_flax.model import PhoenixModel
from phoenix_flax.retrieval import top_k
from phoenix_flax.scoring import FeedScoring, feed_scores


def prefix_batch(
    sessions: Sequence[Session], cfg: ModelConfig, batch_size: int, bits: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """User and history inputs of `sessions`, padded with empty rows to `batch_size`. `bits`: the
    bit of each model action in the sessions' masks (default: parsed with the model's vocabulary)."""
    bits = np.arange(cfg.num_actions) if bits is None else bits
    ex = recent_histories([vars(s) for s in sessions], cfg.history_len, bits)
    ex["user_id"] = np.array([s.user_id for s in sessions], np.int64)
    return pad_batch(hash_prefix(ex, cfg), batch_size)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class CachedRanker:
    """Action probabilities for any number of candidates per session.

    Per batch of sessions, the user context (every layer's keys and values of [user, history])
    is computed once; candidates are then scored in fixed-size chunks against it.
    """

    def __init__(
        self,
        model: PhoenixModel,
        cfg: ModelConfig,
        batch_size: int = 64,
        chunk_size: int = 512,
        counts: PostCounts | None = None,
    ):
        """`counts`: the run's post counts (`Restored.counts`), which a ranker with
        `model.count_blend` scores with."""
        if model.ranker is None:
            raise ValueError("this checkpoint has no ranker (its loss.ranking_weight was 0)")
        if getattr(model.ranker, "blend", None) is not None and counts is None:
            raise ValueError("this ranker blends in post counts (model.count_blend): pass the run's (Restored.counts)")
        self.model, self.cfg, self.counts = model, cfg, counts
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self._context = nnx.jit(lambda m, b: m.ranker.user_context(b))
        self._score = nnx.jit(lambda m, ctx, counted, *cands: m.ranker.probabilities(
            m.ranker.candidate_parts(ctx, *cands), **({} if counted is None else {"count_logits": counted})
        ))  # fmt: skip

    def probabilities(self, sessions: Sequence[Session]) -> list[np.ndarray]:
        """-> one `[m_i, A]` array per session, in input order."""
        cfg, out = self.cfg, []
        for group in _batches(sessions, self.batch_size):
            context = self._context(self.model, prefix_batch(group, cfg, self.batch_size))
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
                    np.asarray(self._score(self.model, context, count_chunk, *chunk))[: min(self.chunk_size, n - start)]
                )
            probs = np.concatenate(probs)
            bounds = np.cumsum([0] + [len(s.candidate_post_id) for s in group])
            out.extend(probs[bounds[i] : bounds[i + 1]] for i in range(len(group)))
        return out


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CorpusIndex:
    """Candidate-tower vectors of a corpus, saved beside the checkpoint as `index/step_<N>.npz`.

    Keyed by what the vectors depend on: the checkpoint's content (its integrity record's
    digest, not only its step number, which a retrained run reuses) and the corpus file's
    content. Reused while both are unchanged; rebuilt otherwise.
    """

    def __init__(self, post_ids: np.ndarray, author_ids: np.ndarray, vectors: np.ndarray):
        self.post_ids, self.author_ids, self.vectors = post_ids, author_ids, vectors

    @classmethod
    def build(cls, model: PhoenixModel, cfg: ModelConfig, post_ids, author_ids, chunk: int = 8192) -> CorpusIndex:
        if model.retrieval is None:
            raise ValueError("this checkpoint has no retrieval model (its loss.retrieval_weight was 0)")
        encode = nnx.jit(lambda m, p, a: m.retrieval.candidates(p, a))
        vectors = []
        for start in range(0, len(post_ids), chunk):
            p, a = post_ids[start : start + chunk], author_ids[start : start + chunk]
            ph = pad_rows(hash_ids(p, cfg.num_post_hashes, cfg.post_vocab_rows), chunk)
            ah = pad_rows(hash_ids(a, cfg.num_author_hashes, cfg.author_vocab_rows), chunk)
            vectors.append(np.asarray(encode(model, ph, ah))[: len(p)])
        return cls(post_ids, author_ids, np.concatenate(vectors))

    def search(
        self,
        users: np.ndarray,
        k: int,
        exclude: Sequence[Collection[int]] | None = None,
        chunk_size: int = 65536,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of the corpus by dot product with `users [B, D]`.

        Posts whose ID is in `exclude[i]` are skipped for user i. Returns corpus positions
        `[B, k]` (-1 where fewer than k remain) and their scores `[B, k]`.
        """
        n = len(self.post_ids)
        extra = max((len(x) for x in exclude), default=0) if exclude is not None else 0
        kk = min(n, k + extra)  # room for excluded posts to be dropped
        scores, idx = top_k(users, self.vectors, kk, chunk_size=min(chunk_size, n))
        scores, idx = np.asarray(scores), np.asarray(idx)
        out_idx, out_scores = np.full((len(users), k), -1), np.full((len(users), k), -np.inf, np.float32)
        for i in range(len(users)):
            keep = idx[i] >= 0
            if exclude is not None and exclude[i]:
                keep &= ~np.isin(self.post_ids[idx[i]], list(exclude[i]))
            kept = np.nonzero(keep)[0][:k]
            out_idx[i, : len(kept)], out_scores[i, : len(kept)] = idx[i, kept], scores[i, kept]
        return out_idx, out_scores

    @staticmethod
    def path(workdir: str, step: int) -> str:
        return os.path.join(workdir, "index", f"step_{step}.npz")

    @classmethod
    def load_or_build(cls, workdir: str, restored, corpus_path: str) -> tuple[CorpusIndex, bool]:
        """The index of `corpus_path` for a restored checkpoint (`checkpoint.Restored`) ->
        (index, whether it was built now)."""
        path = cls.path(workdir, restored.step)
        meta = {"step": restored.step, "checkpoint": restored.digest, "corpus_sha256": file_sha256(corpus_path)}
        if restored.digest is not None and os.path.exists(path):
            with np.load(path) as z:
                if json.loads(str(z["meta"])) == meta:
                    return cls(z["post_ids"], z["author_ids"], z["vectors"]), False
        index = cls.build(restored.model, restored.cfg.model, *read_corpus(corpus_path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(
            tmp, post_ids=index.post_ids, author_ids=index.author_ids, vectors=index.vectors, meta=json.dumps(meta)
        )
        os.replace(tmp, path)  # never a half-written index
        return index, True


def retrieve(
    model: PhoenixModel,
    cfg: ModelConfig,
    index: CorpusIndex,
    sessions: Sequence[Session],
    k: int,
    *,
    include_seen: bool = False,
    batch_size: int = 64,
    chunk_size: int = 65536,
) -> list[list[tuple[int, float]]]:
    """Exact top-k corpus positions and scores per session; posts in the session's history are
    excluded unless `include_seen`."""
    if model.retrieval is None:
        raise ValueError("this checkpoint has no retrieval model (its loss.retrieval_weight was 0)")
    users_fn = nnx.jit(lambda m, b: m.retrieval.user(b))
    results = []
    for group in _batches(sessions, batch_size):
        users = np.asarray(users_fn(model, prefix_batch(group, cfg, batch_size)))[: len(group)]
        seen = None if include_seen else [set(s.history_post_id.tolist()) for s in group]
        idx, scores = index.search(users, k, seen, chunk_size)
        results.extend(
            [(int(j), float(s)) for j, s in zip(row_idx, row_scores, strict=True) if j >= 0]
            for row_idx, row_scores in zip(idx, scores, strict=True)
        )
    return results


def ranked_candidates(
    session: Session, probs: np.ndarray, actions: Sequence[str], weights: np.ndarray, feed: FeedScoring | None = None
) -> list[dict]:
    """A session's candidates with their probabilities and score, best first (the programs' output).
    With feed-scorer options, `weighted_score` is the plain weighted sum and `score` the final one."""
    feed = feed or FeedScoring()
    scores = feed_scores(probs, weights, session.candidate_author_id, session.in_network(), feed)
    weighted = None if feed.is_plain else probs.astype(np.float64) @ weights
    order = np.argsort(-scores, kind="stable")
    return [
        {
            "post_id": int(session.candidate_post_id[j]),
            "probs": {a: round(float(p), 6) for a, p in zip(actions, probs[j], strict=True)},
            **({} if weighted is None else {"weighted_score": round(float(weighted[j]), 6)}),
            "score": round(float(scores[j]), 6),
        }
        for j in order
    ]
