"""Retrieval throughput: exact top-100 over a 1M-item corpus, D=128, in corpus chunks.

Prints users per second and memory: the process's peak resident memory, the corpus itself, and
the top-K working set (the compiled program's temporary buffers: about two users x chunk score
arrays), which stays bounded whatever the corpus size.
    python bench/retrieve.py [--corpus 1000000] [--dim 128] [--k 100] [--users 256] [--chunk 65536]
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from phoenix_flax.model.retrieval import l2_normalize, top_k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--corpus", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--users", type=int, default=256)
    p.add_argument("--chunk", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    key_c, key_u = jax.random.split(jax.random.key(0))
    corpus = l2_normalize(jax.random.normal(key_c, (args.corpus, args.dim), jnp.float32))
    users = l2_normalize(jax.random.normal(key_u, (args.users, args.dim), jnp.float32))
    compiled = top_k.lower(users, corpus, args.k, chunk_size=args.chunk).compile()
    working = compiled.memory_analysis().temp_size_in_bytes / 2**20
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        _, idx = jax.block_until_ready(compiled(users, corpus))
        times.append(time.perf_counter() - start)
    check = np.argsort(-(np.asarray(corpus) @ np.asarray(users[0])))[: args.k]
    assert (np.asarray(idx[0]) == check).all(), "top-k differs from brute force"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    print(
        f"{jax.devices()[0].platform}: corpus {args.corpus:,} x {args.dim}, top-{args.k}, "
        f"{args.users} users per call, chunks of {args.chunk:,}"
    )
    print(f"users/s: {args.users / min(times):,.0f} (best of {args.rounds})")
    print(
        f"memory: peak resident {peak:.2f} GiB; corpus {args.corpus * args.dim * 4 / 2**30:.2f} GiB; "
        f"top-k working set {working:.0f} MiB"
    )


if __name__ == "__main__":
    main()
