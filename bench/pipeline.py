"""Input pipeline throughput: sessions per second with 0, 1 and 2 worker processes, against the
training step's consumption.

Synthesizes and prepares a world (or reuses --data-dir), then times the grain pipeline and the
training step (configs/demo.py shapes), side by side in one run. A ratio above 1 means the
pipeline alone produces sessions faster than the step alone consumes them.
    python bench/pipeline.py [--sessions 20000] [--batch 256] [--batches 60]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from train_step import project_step_rate  # bench/train_step.py

from phoenix_flax.config import DataConfig, ModelConfig, load
from phoenix_flax.data import prepare, synth
from phoenix_flax.data.pipeline import make_dataset


def sessions_per_second(cfg: ModelConfig, data: DataConfig, batches: int) -> float:
    it = iter(make_dataset(cfg, data, "train"))
    for _ in range(5):  # warm-up: worker start-up and first reads
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * data.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", help="a prepared dataset to reuse")
    parser.add_argument("--sessions", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args()
    experiment = load(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
    cfg = experiment.model
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="phoenix-bench-")
        world = synth.World(synth.WorldConfig(sessions=args.sessions))
        files = synth.write_world(world, synth.simulate(world, progress=False), os.path.join(tmp, "raw"))
        data_dir = os.path.join(tmp, "prepared")
        prepare.prepare(data_dir, {"train": prepare.SplitSource((files["train"],))})
    print(f"batch {args.batch}, S={cfg.history_len}, C={cfg.num_candidates}, {os.cpu_count()} CPUs")
    step_rate = project_step_rate(experiment)
    print(f"training step (demo config): {step_rate:10,.0f} sessions/s")
    rates = {}
    for workers in (0, 1, 2):
        data = DataConfig(data_dir, batch_size=args.batch, worker_count=workers)
        rates[workers] = sessions_per_second(cfg, data, args.batches)
        print(
            f"pipeline, workers={workers}: {rates[workers]:10,.0f} sessions/s "
            f"({rates[workers] / rates[0]:.2f}x of 0 workers; {rates[workers] / step_rate:.2f}x the step's consumption)"
        )


if __name__ == "__main__":
    main()
