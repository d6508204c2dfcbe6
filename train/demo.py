"""The main job. Until training lands: score a synthetic batch with the default models."""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from phoenix_flax.batch import random_batch
from phoenix_flax.config import ModelConfig
from phoenix_flax.embeddings import BATCH_SHAPES, HashEmbeddings
from phoenix_flax.ranker import PhoenixRanker
from phoenix_flax.retrieval import PhoenixRetrieval, top_k
from phoenix_flax.scoring import action_weights, weighted_score


def main() -> None:
    cfg = ModelConfig()
    rngs = nnx.Rngs(0)
    tables = HashEmbeddings(cfg, rngs=rngs)
    ranker = PhoenixRanker(cfg, rngs=rngs, embeddings=tables)
    retrieval = PhoenixRetrieval(cfg, rngs=rngs, embeddings=tables)
    params = nnx.state(nnx.List([ranker, retrieval]), nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"devices: {jax.devices()}")
    print(f"default config: D={cfg.emb_size}, {cfg.num_layers} layers, {cfg.num_actions} actions, "
          f"S={cfg.history_len}, C={cfg.num_candidates}; {n_params:,} parameters (ranker + retrieval)")  # fmt: skip

    batch = {k: v for k, v in random_batch(cfg, 64, np.random.default_rng(0)).items() if k in BATCH_SHAPES}
    rank = nnx.jit(lambda m, b: jax.nn.sigmoid(m(b)))
    start = time.perf_counter()
    probs = jax.block_until_ready(rank(ranker, batch))
    print(f"ranker: probabilities {probs.shape} in {time.perf_counter() - start:.2f}s (compile included)")
    scores = np.asarray(weighted_score(probs, action_weights(cfg.actions)))
    valid = batch["candidate_post_hashes"][..., 0] != 0
    order = np.argsort(-np.where(valid[0], scores[0], -np.inf))[: valid[0].sum()]
    print(f"session 0: candidates ranked {order.tolist()}, scores " + " ".join(f"{s:.3f}" for s in scores[0][order]))

    corpus_hashes = random_batch(cfg, 4096, np.random.default_rng(1), num_candidates=1)
    corpus = nnx.jit(lambda m, p, a: m.candidates(p, a))(
        retrieval, corpus_hashes["candidate_post_hashes"][:, 0], corpus_hashes["candidate_author_hashes"][:, 0]
    )
    users = nnx.jit(lambda m, b: m.user(b))(retrieval, batch)
    best, idx = top_k(users, corpus, 5, chunk_size=1024)
    similarity = " ".join(f"{s:.3f}" for s in np.asarray(best[0]))
    print(f"retrieval: corpus {corpus.shape}, top-5 for session 0: {np.asarray(idx[0]).tolist()} ({similarity})")


if __name__ == "__main__":
    main()
