"""Does the training step's time grow with the hash tables' rows? Side by side in one run.

Times the project's training step (as `phoenix-train` runs it, on a fixed batch) at the demo's
shapes with every hash table of `--rows` rows (default 65,536 and 4,194,304), the rounds
interleaved so both see the same machine load, and prints each one's sessions/s and the ratio of
the largest table's step time to the smallest's. The model is the original architecture (the
demo's extensions off: the action bias's tables are sized by the vocabulary too and keep their own
dense optimizer). Each `--optimizer` (default: both) is measured in its own child process.
    python bench/tables.py [--rows 65536 4194304] [--optimizer adagrad rowwise_adagrad] [--steps 10] [--rounds 3] [--config.k=v ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
from flax import nnx

from phoenix_flax.config import apply_overrides, load
from phoenix_flax.data.pipeline import global_batch
from phoenix_flax.sharding import make_mesh
from phoenix_flax.step.step import create_train_state, make_train_step
from phoenix_flax.testing import random_batch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from train_step import ORIGINAL, STEPS_PER_EPOCH, timed


def measure(overrides: list[str], rows: list[int], steps: int, rounds: int) -> dict[int, float]:
    """Best seconds per step for each table size, in this process."""
    steps_of = {}
    for n in rows:
        sized = [f"--config.model.{t}_vocab_rows={n}" for t in ("user", "post", "author")]
        cfg = apply_overrides(load("configs/demo.py"), ORIGINAL + sized + overrides)
        mesh = make_mesh(cfg.mesh.axis_sizes())
        batch = global_batch(random_batch(cfg.model, cfg.data.batch_size, np.random.default_rng(0)), mesh)
        model, optimizer = create_train_state(cfg, mesh, STEPS_PER_EPOCH)
        step = nnx.cached_partial(make_train_step(cfg.loss), model, optimizer)
        steps_of[n] = (lambda step=step, batch=batch: step(batch), cfg.data.batch_size)
    times = {n: [] for n in rows}
    for _ in range(rounds):
        for n, (step, _) in steps_of.items():
            times[n].append(timed(step, steps) / steps)
    return {n: min(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[65536, 4194304])
    parser.add_argument("--optimizer", nargs="+", default=["adagrad", "rowwise_adagrad"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child:
        return print(json.dumps(measure(overrides, args.rows, args.steps, args.rounds)))
    batch = load("configs/demo.py").data.batch_size
    print(f"demo shapes, original architecture, batch {batch}; best of {args.rounds} rounds of {args.steps} steps")
    print(f"{'table optimizer':<18}" + "".join(f"{f'{n:,} rows':>22}" for n in args.rows) + f"{'ratio':>8}")
    for name in args.optimizer:
        command = [sys.executable, __file__, "--child", "--rows", *map(str, args.rows)]
        command += ["--steps", str(args.steps), "--rounds", str(args.rounds)]
        out = subprocess.run(
            [*command, f"--config.optimizer.table_optimizer={name}", *overrides],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            print(f"{name:<18} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        seconds = {int(n): s for n, s in json.loads(out.stdout.strip().splitlines()[-1]).items()}
        cells = "".join(f"{f'{s * 1e3:,.0f} ms ({batch / s:,.0f}/s)':>22}" for s in seconds.values())
        print(f"{name:<18}{cells}{seconds[max(seconds)] / seconds[min(seconds)]:>7.2f}x")


if __name__ == "__main__":
    main()
