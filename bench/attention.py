"""Ranker attention: the dense form against the blockwise one, forward and backward.

For histories of 128 to 2048 items and 64 candidates, times one forward and backward pass of
the ranker's attention (`[user, history, candidates]`, candidates isolated) in each form, and
reads the compiled program's temporary memory; prints both and their ratios, measured side by
side in one run.
    python bench/attention.py [--batch 4] [--kv-heads 2] [--group 2] [--head 32] [--rounds 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from phoenix_flax.model.attention import sequence_attention

CANDIDATES = 64


def loss_fn(impl: str, block: int):
    def loss(q, k, v, prefix_valid, candidate_valid):
        out = sequence_attention(q, k, v, prefix_valid, candidate_valid, multiplier=0.125, impl=impl, block=block)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def measure(fn, args, rounds: int) -> tuple[float, int]:
    compiled = fn.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return best, temp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--group", type=int, default=2, help="query heads per key/value head")
    p.add_argument("--head", type=int, default=32)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--histories", default="128,256,512,1024,2048")
    args = p.parse_args()
    b, n, g, k = args.batch, args.kv_heads, args.group, args.head
    print(f"{jax.devices()[0].platform}: batch {b}, {n * g} query / {n} key-value heads of {k}, {CANDIDATES} candidates, "
          f"blocks of {args.block}; forward + backward, best of {args.rounds}")  # fmt: skip
    print(
        f"{'history':>8} {'dense ms':>10} {'blockwise ms':>13} {'speed-up':>9} {'dense MiB':>10} {'blockwise MiB':>14} {'memory':>8}"
    )
    rng = np.random.default_rng(0)
    dense, blockwise = loss_fn("dense", args.block), loss_fn("blockwise", args.block)
    for s in map(int, args.histories.split(",")):
        p_len, t = 1 + s, 1 + s + CANDIDATES
        q = jnp.asarray(rng.normal(size=(b, t, n, g, k)), jnp.float32)
        keys = jnp.asarray(rng.normal(size=(b, t, n, k)), jnp.float32)
        values = jnp.asarray(rng.normal(size=(b, t, n, k)), jnp.float32)
        prefix_valid = jnp.asarray(np.arange(p_len)[None] < rng.integers(p_len // 2, p_len + 1, size=(b, 1)))
        candidate_valid = jnp.ones((b, CANDIDATES), bool)
        inputs = (q, keys, values, prefix_valid, candidate_valid)
        t_dense, m_dense = measure(dense, inputs, args.rounds)
        t_block, m_block = measure(blockwise, inputs, args.rounds)
        print(f"{s:>8} {t_dense * 1e3:>10.1f} {t_block * 1e3:>13.1f} {t_dense / t_block:>8.2f}x "
              f"{m_dense / 2**20:>10.1f} {m_block / 2**20:>14.1f} {m_block / m_dense:>7.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
