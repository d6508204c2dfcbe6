"""Ranker forward throughput at the default shapes: float32 against bfloat16 compute.

Prints sessions/s for each and their ratio, measured side by side in one run.
    python bench/forward.py [--batch 256] [--iters 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.model.ranker import PhoenixRanker
from phoenix_flax.testing import model_inputs, random_batch


def sessions_per_second(cfg: ModelConfig, batch: dict, iters: int) -> float:
    model = PhoenixRanker(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))
    jax.block_until_ready(forward(state, batch))  # compile
    best = float("inf")
    for _ in range(3):  # best of three rounds, against noise on shared machines
        start = time.perf_counter()
        for _ in range(iters):
            out = forward(state, batch)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
    return iters * len(batch["user_hashes"]) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    cfg = ModelConfig()
    batch = model_inputs(random_batch(cfg, args.batch, np.random.default_rng(0)))
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch}, S={cfg.history_len}, C={cfg.num_candidates}")
    f32 = sessions_per_second(cfg, batch, args.iters)
    bf16 = sessions_per_second(dataclasses.replace(cfg, dtype="bfloat16"), batch, args.iters)
    print(f"float32:  {f32:12,.0f} sessions/s")
    print(f"bfloat16: {bf16:12,.0f} sessions/s")
    print(f"bfloat16 / float32: {bf16 / f32:.2f}")


if __name__ == "__main__":
    main()
