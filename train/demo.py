"""The main job: synthesize a world, prepare it, train `configs/demo.py` on the CPU, evaluate.

    python -m train.demo [--workdir runs/demo] [--fresh]

Stages already done in the workdir are reused (training resumes from its checkpoint); --fresh
starts over. Ends with a table per action: the model's AUC beside the oracle's (the true
probabilities) and a popularity baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from phoenix_flax.cli import ArgumentParser, add_debug_arg, run
from phoenix_flax.config import load, replace_fields
from phoenix_flax.data import prepare, synth
from phoenix_flax.data.prepare import dataset_dir
from phoenix_flax.files import replaced

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
WORLD = synth.WorldConfig(
    seed=0, users=2000, authors=200, posts=5000, sessions=80000, candidates=8, history=32, test_share=0.3
)


def stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main(argv=None) -> int:
    p = ArgumentParser(prog="phoenix-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    add_debug_arg(p)
    args = p.parse_args(argv)
    return run(p.prog, lambda: demo(args), args.debug)


def make_world(world_cfg: synth.WorldConfig, root: str, timings: dict) -> dict[str, str]:
    """Synthesizes the world and prepares its dataset under `root`, reusing what is there ->
    the config's data section (data_dir, truth_file, corpus_file)."""
    world_dir, data_dir = os.path.join(root, "world"), os.path.join(root, "prepared")
    start = stage(
        f"synthesize a world: {world_cfg.users} users, {world_cfg.posts} posts, {world_cfg.sessions} sessions"
    )
    # What is reused must be what was asked for: a workdir from an earlier WORLD would otherwise
    # train and be judged on the old world under the new one's name.
    again = f"delete {root} (phoenix-demo's --fresh does) or use another --workdir"
    if not os.path.exists(os.path.join(world_dir, "world.json")) and os.path.exists(data_dir):
        raise synth.WorldMismatchError(f"{data_dir} was prepared from a world no longer in {world_dir}; {again}")
    try:
        if not synth.reuse_or_write(synth.World(world_cfg), world_dir):
            print(f"reusing {world_dir}")
    except synth.WorldMismatchError as e:
        raise synth.WorldMismatchError(f"{e}; {again}") from None
    timings["synthesize"] = time.perf_counter() - start

    start = stage("prepare the TFDS ArrayRecord dataset")
    if not os.path.exists(dataset_dir(data_dir)):
        sources = {
            s: prepare.SplitSource((os.path.join(world_dir, f"{s}.parquet"),)) for s in ("train", "validation", "test")
        }
        stats, _ = prepare.prepare(data_dir, sources)
        prepare.print_statistics(stats)
    else:
        print(f"reusing {dataset_dir(data_dir)}")
    timings["prepare"] = time.perf_counter() - start
    return {
        "data_dir": data_dir,
        "truth_file": os.path.join(world_dir, "test_truth.npz"),
        "corpus_file": os.path.join(world_dir, "corpus.jsonl"),
    }


def train_and_evaluate(cfg, root: str, timings: dict) -> dict | None:
    """Trains `cfg` in `root/train` (resuming) and evaluates its best checkpoint on the test split,
    plots in `root/plots` -> the evaluation, or None when training was preempted."""
    from phoenix_flax.checkpoint.manager import Checkpointer  # JAX starts here, not before
    from phoenix_flax.evaluation.evaluate import evaluate
    from phoenix_flax.training.loop import train

    train_dir = os.path.join(root, "train")
    start = stage(f"train for {cfg.train.steps} steps of {cfg.data.batch_size} sessions")
    train(cfg, train_dir)
    timings["train"] = time.perf_counter() - start
    # From the checkpoints, not the steps logged now: a finished run resumes at its last step
    # and logs none.
    with Checkpointer(train_dir, read_only=True) as checkpoints:
        saved = checkpoints.latest_step()
        if saved is None or saved < checkpoints.config(saved).train.steps:
            print("training stopped before its last step (preempted); run again to resume it")
            return None

    start = stage(f"evaluate the best checkpoint (by {cfg.checkpoint.best_metric}) on the test split")
    result = evaluate(train_dir, step="best", split="test", plots_dir=os.path.join(root, "plots"))
    timings["evaluate"] = time.perf_counter() - start
    return result


def demo(args: argparse.Namespace) -> int:
    root = args.workdir
    if args.fresh and os.path.exists(root):
        shutil.rmtree(root)
    timings: dict[str, float] = {}
    data = make_world(WORLD, root, timings)
    cfg = replace_fields(load(DEMO_CONFIG), data=data)
    result = train_and_evaluate(cfg, root, timings)
    if result is None:
        return 1
    with replaced(os.path.join(root, "metrics.json")) as f:
        json.dump(result, f, indent=2)

    from phoenix_flax.evaluation.evaluate import CALIBRATION_BAND, MIN_POSITIVES, format_table, quality_summary

    print(format_table(result))
    q = quality_summary(result)
    print(
        f"\nbeats the popularity baseline on {q['beats_popularity']}/{q['judged']} actions with >= {MIN_POSITIVES} "
        f"test positives; closes {q['mean_gap_closed']:.1%} of the gap from AUC 0.5 to the oracle on average; "
        f"calibration ratio within [{CALIBRATION_BAND[0]}, {CALIBRATION_BAND[1]}] on {q['calibrated']}/{q['judged']} "
        f"({q['calibrated_vs_truth']}/{q['judged']} against the true probabilities' mean)"
    )
    print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(
        f"metrics: {os.path.join(root, 'metrics.json')}; reliability and ROC plots: {os.path.join(root, 'plots')}; "
        f"TensorBoard: {os.path.join(root, 'train', 'tensorboard')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
