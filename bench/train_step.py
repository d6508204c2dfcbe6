"""Training-step throughput at the demo shapes, and the framework's overhead.

Times the project's step (`nnx.jit` through `nnx.cached_partial`, as `phoenix-train` runs it)
against a plain functional `jax.jit` step over the same split state, side by side in one run,
on a fixed batch (no input pipeline). Prints sessions/s of each and their ratio.

With --malloc, times the project's step instead in child processes, alternately with glibc's
default malloc and with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (what the Makefile sets), and
prints each one's sessions/s, and its minor page faults and system CPU seconds per step.
    python bench/train_step.py [--config configs/demo.py] [--steps 30] [--rounds 5] [--malloc] [--config.k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from phoenix_flax.config import apply_overrides, load
from phoenix_flax.data.pipeline import global_batch
from phoenix_flax.sharding import make_mesh
from phoenix_flax.step.step import create_train_state, make_train_step, train_step_fn
from phoenix_flax.testing import random_batch

# The demo's config with its extensions off: the original architecture.
ORIGINAL = [
    "--config.model.action_bias=false",
    "--config.model.calibration=false",
    "--config.model.count_blend=false",
    "--config.model.count_gate=false",
    "--config.loss.exposure_weight=0",
]
STEPS_PER_EPOCH = 190.0  # the demo's world (its prior's weight per step; the step's cost does not depend on it)


def timed(step, steps: int) -> float:
    jax.block_until_ready(step())  # compile, warm up
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    return time.perf_counter() - start


def project_step(cfg):
    """The project's training step (as `phoenix-train` runs it) on a fixed batch: a callable."""
    mesh = make_mesh(cfg.mesh.axis_sizes())
    batch = global_batch(random_batch(cfg.model, cfg.data.batch_size, np.random.default_rng(0)), mesh)
    model, optimizer = create_train_state(cfg, mesh, STEPS_PER_EPOCH)
    step = nnx.cached_partial(make_train_step(cfg.loss), model, optimizer)
    return lambda: step(batch)


def project_step_rate(cfg, steps: int = 20, rounds: int = 3) -> float:
    """Sessions/s of the project's training step on a fixed batch (no input pipeline)."""
    step = project_step(cfg)
    return steps * cfg.data.batch_size / min(timed(step, steps) for _ in range(rounds))


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def child_measurement(cfg, steps: int) -> dict:
    """One timed run of the project's step in this process: sessions/s, and minor page faults and
    system CPU seconds per step."""
    step = project_step(cfg)
    jax.block_until_ready(step())  # compile, warm up
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = timed(step, steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "sessions_per_second": steps * cfg.data.batch_size / seconds,
        "faults_per_step": (after.ru_minflt - before.ru_minflt) / (steps + 1),  # + timed's warm-up step
        "system_seconds_per_step": (after.ru_stime - before.ru_stime) / (steps + 1),
    }


def compare_malloc(argv: list[str], rounds: int) -> None:
    """The step in child processes, alternately without and with huge pages for malloc."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    runs = {"glibc default": [], HUGE_PAGES: []}
    for _ in range(rounds):
        for name, extra in (("glibc default", {}), (HUGE_PAGES, {"GLIBC_TUNABLES": HUGE_PAGES})):
            out = subprocess.run(
                [sys.executable, __file__, "--child", *argv],
                env=env | extra,
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {name: max(results, key=lambda r: r["sessions_per_second"]) for name, results in runs.items()}
    print(f"{'malloc':<26} {'sessions/s':>11} {'page faults/step':>17} {'system s/step':>14}   (best of {rounds} runs)")
    for name, b in best.items():
        print(
            f"{name:<26} {b['sessions_per_second']:11,.0f} {b['faults_per_step']:17,.0f} {b['system_seconds_per_step']:14.4f}"
        )
    ratio = best[HUGE_PAGES]["sessions_per_second"] / best["glibc default"]["sessions_per_second"]
    print(f"huge pages: {ratio:.2f}x the sessions/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--malloc", action="store_true", help="glibc's default malloc against huge pages")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    cfg = apply_overrides(load(args.config), overrides)
    if args.malloc:
        return compare_malloc(["--config", args.config, "--steps", str(args.steps), *overrides], args.rounds)
    if args.child:
        return print(json.dumps(child_measurement(cfg, args.steps)))
    mesh = make_mesh(cfg.mesh.axis_sizes())
    batch = global_batch(random_batch(cfg.model, cfg.data.batch_size, np.random.default_rng(0)), mesh)

    model, optimizer = create_train_state(cfg, mesh, STEPS_PER_EPOCH)
    project = nnx.cached_partial(make_train_step(cfg.loss), model, optimizer)

    # Its own copy of the state: each path donates its buffers.
    graphdef, state = nnx.split(create_train_state(cfg, mesh, STEPS_PER_EPOCH))
    body = train_step_fn(cfg.loss)

    def functional(state, batch):
        m, o = nnx.merge(graphdef, state)
        metrics = body(m, o, batch)
        return nnx.state((m, o)), metrics

    functional = jax.jit(functional, donate_argnums=0)
    holder = {"state": state}

    def functional_step():
        holder["state"], metrics = functional(holder["state"], batch)
        return metrics

    print(
        f"{args.config}: batch {cfg.data.batch_size}, S={cfg.model.history_len}, C={cfg.model.num_candidates}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
    )
    ours, plain = [], []
    for _ in range(args.rounds):  # interleaved rounds: both see the same machine load
        ours.append(timed(lambda: project(batch), args.steps))
        plain.append(timed(functional_step, args.steps))
    sessions = args.steps * cfg.data.batch_size
    best_ours, best_plain = min(ours), min(plain)
    print(f"project step (nnx.jit, cached_partial): {sessions / best_ours:10,.0f} sessions/s")
    print(f"plain functional jax.jit step:          {sessions / best_plain:10,.0f} sessions/s")
    print(f"overhead: {best_ours / best_plain - 1:+.1%} (best of {args.rounds} rounds of {args.steps} steps)")


if __name__ == "__main__":
    main()
