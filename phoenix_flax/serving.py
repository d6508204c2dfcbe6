"""Serving a trained model: ranking with a cached user context, retrieval from a corpus index."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from phoenix_flax.checkpoint import Checkpointer
from phoenix_flax.config import ModelConfig
from phoenix_flax.data.pipeline import hash_prefix, recent_history
from phoenix_flax.data.raw import Session, read_corpus
from phoenix_flax.experiment import ExperimentConfig
from phoenix_flax.hashing import hash_ids
from phoenix_flax.model import PhoenixModel
from phoenix_flax.retrieval import top_k
from phoenix_flax.sharding import make_mesh
from phoenix_flax.training import create_model


def restore(
    workdir: str, step: int | str | None = "latest", mesh: jax.sharding.Mesh | None = None
) -> tuple[ExperimentConfig, int, PhoenixModel]:
    """The config, step and model of a checkpoint, restored onto `mesh` (default: this machine's
    devices, data-parallel), whatever mesh it was trained on."""
    checkpoints = Checkpointer.open_run(workdir)
    step = checkpoints.resolve(step)
    cfg = checkpoints.config(step)
    model = create_model(cfg, mesh or make_mesh({"data": -1, "fsdp": 1, "model": 1}))
    checkpoints.restore(step, model)
    return cfg, step, model


def prefix_batch(sessions: Sequence[Session], cfg: ModelConfig, batch_size: int) -> dict[str, np.ndarray]:
    """User and history inputs of `sessions`, padded with empty rows to `batch_size`."""
    bits = np.arange(cfg.num_actions)  # sessions were parsed with the model's vocabulary
    rows = [recent_history(vars(s), cfg.history_len, bits) for s in sessions]
    ex = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    ex["user_id"] = np.array([s.user_id for s in sessions], np.int64)
    out = hash_prefix(ex, cfg)
    pad = batch_size - len(sessions)
    return {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in out.items()}


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class CachedRanker:
    """Action probabilities for any number of candidates per session.

    Per batch of sessions, the user context (every layer's keys and values of [user, history])
    is computed once; candidates are then scored in fixed-size chunks against it.
    """

    def __init__(self, model: PhoenixModel, cfg: ModelConfig, batch_size: int = 64, chunk_size: int = 512):
        if model.ranker is None:
            raise ValueError("this checkpoint has no ranker (its loss.ranking_weight was 0)")
        self.model, self.cfg = model, cfg
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self._context = nnx.jit(lambda m, b: m.ranker.user_context(b))
        self._score = nnx.jit(lambda m, ctx, *cands: jax.nn.sigmoid(m.ranker.score_candidates(ctx, *cands)))

    def probabilities(self, sessions: Sequence[Session]) -> list[np.ndarray]:
        """-> one `[m_i, A]` array per session, in input order."""
        cfg, out = self.cfg, []
        for group in _batches(sessions, self.batch_size):
            context = self._context(self.model, prefix_batch(group, cfg, self.batch_size))
            rows = np.concatenate([np.full(len(s.candidate_post_id), i, np.int32) for i, s in enumerate(group)])
            posts = np.concatenate([s.candidate_post_id for s in group])
            authors = np.concatenate([s.candidate_author_id for s in group])
            surfaces = np.concatenate([s.candidate_product_surface for s in group])
            probs = []
            for start in range(0, len(rows), self.chunk_size):
                n = min(self.chunk_size, len(rows) - start)
                pad = self.chunk_size - n

                def chunk(x, fill=0):
                    return np.concatenate([x[start : start + n], np.full(pad, fill, x.dtype)])

                p = self._score(
                    self.model, context, chunk(rows),
                    hash_ids(chunk(posts), cfg.num_post_hashes, cfg.post_vocab_rows),
                    hash_ids(chunk(authors), cfg.num_author_hashes, cfg.author_vocab_rows),
                    chunk(surfaces),
                )  # fmt: skip
                probs.append(np.asarray(p)[:n])
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

    Reused while the checkpoint step and the corpus file's content are unchanged; rebuilt
    otherwise.
    """

    def __init__(self, post_ids: np.ndarray, author_ids: np.ndarray, vectors: np.ndarray):
        self.post_ids, self.author_ids, self.vectors = post_ids, author_ids, vectors

    @classmethod
    def build(cls, model: PhoenixModel, cfg: ModelConfig, post_ids, author_ids, chunk: int = 8192) -> CorpusIndex:
        encode = nnx.jit(lambda m, p, a: m.retrieval.candidates(p, a))
        vectors = []
        for start in range(0, len(post_ids), chunk):
            p, a = post_ids[start : start + chunk], author_ids[start : start + chunk]
            pad = chunk - len(p)
            ph = np.pad(hash_ids(p, cfg.num_post_hashes, cfg.post_vocab_rows), ((0, pad), (0, 0)))
            ah = np.pad(hash_ids(a, cfg.num_author_hashes, cfg.author_vocab_rows), ((0, pad), (0, 0)))
            vectors.append(np.asarray(encode(model, ph, ah))[: len(p)])
        return cls(post_ids, author_ids, np.concatenate(vectors))

    @staticmethod
    def path(workdir: str, step: int) -> str:
        return os.path.join(workdir, "index", f"step_{step}.npz")

    @classmethod
    def load_or_build(cls, workdir, step, model, cfg, corpus_path) -> tuple[CorpusIndex, bool]:
        """-> (index, whether it was (re)built)."""
        path, digest = cls.path(workdir, step), file_sha256(corpus_path)
        if os.path.exists(path):
            with np.load(path) as z:
                meta = json.loads(str(z["meta"]))
                if meta == {"step": step, "corpus_sha256": digest}:
                    return cls(z["post_ids"], z["author_ids"], z["vectors"]), False
        index = cls.build(model, cfg, *read_corpus(corpus_path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        meta = json.dumps({"step": step, "corpus_sha256": digest})
        np.savez(tmp, post_ids=index.post_ids, author_ids=index.author_ids, vectors=index.vectors, meta=meta)
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
    n = len(index.post_ids)
    results = []
    for group in _batches(sessions, batch_size):
        users = np.asarray(users_fn(model, prefix_batch(group, cfg, batch_size)))[: len(group)]
        seen = [set() if include_seen else set(s.history_post_id.tolist()) for s in group]
        extra = max((len(x) for x in seen), default=0)  # room for seen posts to be dropped
        kk = min(n, k + extra)
        scores, idx = top_k(users, index.vectors, kk, chunk_size=min(chunk_size, n))
        scores, idx = np.asarray(scores), np.asarray(idx)
        for i in range(len(group)):
            keep = [(int(j), float(s)) for j, s in zip(idx[i], scores[i]) if j >= 0 and index.post_ids[j] not in seen[i]]
            results.append(keep[:k])
    return results
