"""Retrieval for serving: the corpus's candidate-tower vectors built once (cached per checkpoint and
corpus content), and exact top-K over them in chunks."""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Callable, Collection, Sequence

import numpy as np
from flax import nnx

from phoenix_flax.checkpoint.integrity import file_sha256
from phoenix_flax.config import ModelConfig
from phoenix_flax.data.batch import pad_rows
from phoenix_flax.data.hashing import hash_ids
from phoenix_flax.data.raw import Session, read_corpus
from phoenix_flax.files import OutputError, replaced
from phoenix_flax.model.retrieval import top_k
from phoenix_flax.serving.ranking import batches_of, bucket, prefix_batch
from phoenix_flax.step.model import PhoenixModel


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
        searched: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of the corpus by dot product with `users [B, D]`.

        Posts whose ID is in `exclude[i]` are skipped for user i. Returns corpus positions
        `[B, k]` (-1 where fewer than k remain) and their scores `[B, k]`. `searched`: how many
        are taken before the exclusions (default: k plus the most excluded; a server fixes it,
        so that no request compiles another shape).
        """
        n = len(self.post_ids)
        extra = max((len(x) for x in exclude), default=0) if exclude is not None else 0
        kk = min(n, k + extra if searched is None else max(searched, k + extra))  # room for exclusions
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
    def load_or_build(
        cls, workdir: str, restored, corpus_path: str, report: Callable[[str], None]
    ) -> tuple[CorpusIndex, bool]:
        """The index of `corpus_path` for a restored checkpoint (`checkpoint.Restored`) ->
        (index, whether it was built now). The saved index is only a cache: a damaged one is
        rebuilt, and where it cannot be saved (a read-only workdir, a full disk) the index
        built is used from memory; `report` says so."""
        path = cls.path(workdir, restored.step)
        meta = {"step": restored.step, "checkpoint": restored.digest, "corpus_sha256": file_sha256(corpus_path)}
        if restored.digest is not None and os.path.exists(path):
            try:
                with np.load(path) as z:
                    if json.loads(str(z["meta"])) == meta:
                        return cls(z["post_ids"], z["author_ids"], z["vectors"]), False
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                report(f"note: the saved index {path} is damaged ({type(e).__name__}: {e}); rebuilding it")
        index = cls.build(restored.model, restored.cfg.model, *read_corpus(corpus_path))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with replaced(path, "wb") as f:  # never a half-written index
                np.savez(
                    f,
                    post_ids=index.post_ids,
                    author_ids=index.author_ids,
                    vectors=index.vectors,
                    meta=json.dumps(meta),
                )
        except (OSError, OutputError) as e:
            report(f"note: cannot save the index ({e}); using it from memory, built again next time")
        return index, True


_user_vectors = nnx.jit(lambda m, b: m.retrieval.user(b))  # compiled once per process, as the ranker's


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
    bucketed: bool = False,
    searched: int | None = None,
) -> list[list[tuple[int, float]]]:
    """Exact top-k corpus positions and scores per session; posts in the session's history are
    excluded unless `include_seen`. `bucketed` and `searched`: fixed shapes for a server
    (`CachedRanker`'s and `CorpusIndex.search`'s)."""
    if model.retrieval is None:
        raise ValueError("this checkpoint has no retrieval model (its loss.retrieval_weight was 0)")
    results = []
    for group in batches_of(sessions, batch_size):
        rows = bucket(len(group), batch_size) if bucketed else batch_size
        users = np.asarray(_user_vectors(model, prefix_batch(group, cfg, rows)))
        seen = None if include_seen else [set(s.history_post_id.tolist()) for s in group]
        seen = None if seen is None else seen + [set()] * (rows - len(group))
        idx, scores = index.search(users, k, seen, chunk_size, searched)
        idx, scores = idx[: len(group)], scores[: len(group)]
        results.extend(
            [(int(j), float(s)) for j, s in zip(row_idx, row_scores, strict=True) if j >= 0]
            for row_idx, row_scores in zip(idx, scores, strict=True)
        )
    return results


def retrieved_session(session: Session, index: CorpusIndex, hits: Sequence[tuple[int, float]]) -> Session:
    """`session` with its retrieved posts as (unlabeled) candidates, for ranking them."""
    rows = [j for j, _ in hits]
    return dataclasses.replace(
        session,
        candidate_post_id=index.post_ids[rows],
        candidate_author_id=index.author_ids[rows],
        candidate_product_surface=np.zeros(len(rows), np.int32),
        candidate_actions=np.zeros(len(rows), np.int64),
        labeled=False,
        candidate_in_network=None,
    )


def retrieval_line(
    session: Session, index: CorpusIndex, hits: Sequence[tuple[int, float]], ranked: list[dict] | None = None
) -> dict:
    """phoenix-retrieve's output line: the retrieved posts by retrieval score, or, with `ranked`
    (`ranked_candidates` of the `retrieved_session`), in its order with its probabilities and score."""
    candidates = [
        {"post_id": int(index.post_ids[j]), "author_id": int(index.author_ids[j]), "retrieval_score": round(s, 6)}
        for j, s in hits
    ]
    if ranked is not None:
        by_post = {c["post_id"]: c for c in candidates}
        candidates = [{**by_post[c["post_id"]], **c} for c in ranked]
    return {"user_id": session.user_id, "candidates": candidates}
