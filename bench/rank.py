"""Ranking throughput: cached user context against the full sequence.

History 128 and 512 candidates per session (configs/demo.py's model otherwise). The full
sequence puts all 512 candidates in one isolated-candidate sequence; the cached path computes
the [user, history] keys and values once and scores candidates in chunks. Prints candidates
scored per second of each and their ratio, measured side by side in one run; checks that both
give the same probabilities.
    python bench/rank.py [--sessions 8] [--candidates 512] [--history 128] [--chunk 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx

from phoenix_flax.config import load
from phoenix_flax.model.ranker import PhoenixRanker
from phoenix_flax.testing import model_inputs, random_batch


def best_time(fn, rounds: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--candidates", type=int, default=512)
    p.add_argument("--history", type=int, default=128)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    demo = load(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
    cfg = dataclasses.replace(demo.model, history_len=args.history, num_candidates=args.candidates)
    model = PhoenixRanker(cfg, rngs=nnx.Rngs(0))
    batch = model_inputs(random_batch(cfg, args.sessions, np.random.default_rng(0)))
    batch["history_post_hashes"][:, :, 0] = np.maximum(batch["history_post_hashes"][:, :, 0], 1)  # full history
    batch["candidate_post_hashes"][:, :, 0] = np.maximum(batch["candidate_post_hashes"][:, :, 0], 1)
    b, c = args.sessions, args.candidates

    full = nnx.jit(lambda m, x: jax.nn.sigmoid(m(x)))
    context = nnx.jit(lambda m, x: m.user_context(x))
    score = nnx.jit(lambda m, ctx, *cands: jax.nn.sigmoid(m.score_candidates(ctx, *cands)))
    rows = np.repeat(np.arange(b, dtype=np.int32), c)
    posts = batch["candidate_post_hashes"].reshape(b * c, -1)
    authors = batch["candidate_author_hashes"].reshape(b * c, -1)
    surfaces = batch["candidate_product_surface"].reshape(-1)

    def cached():
        ctx = context(model, batch)
        return [
            score(
                model,
                ctx,
                rows[i : i + args.chunk],
                posts[i : i + args.chunk],
                authors[i : i + args.chunk],
                surfaces[i : i + args.chunk],
            )
            for i in range(0, b * c, args.chunk)
        ]

    np.testing.assert_allclose(np.concatenate(cached()).reshape(b, c, -1), full(model, batch), atol=1e-5)
    t_full, t_cached = best_time(lambda: full(model, batch), args.rounds), best_time(cached, args.rounds)
    n = b * c
    print(
        f"{jax.devices()[0].platform}: {b} sessions x {c} candidates, history {args.history}, "
        f"D={cfg.emb_size}, {cfg.num_layers} layers; cached chunks of {args.chunk}"
    )
    print(f"full sequence: {n / t_full:12,.0f} candidates/s")
    print(f"cached context: {n / t_cached:11,.0f} candidates/s")
    print(f"cached / full: {t_full / t_cached:.2f}x (same probabilities within 1e-5)")


if __name__ == "__main__":
    main()
