"""`phoenix-train`: sharded training with Orbax checkpoints, resumable and preemption-safe.

    phoenix-train --config configs/demo.py --workdir runs/demo [--data-dir DATA] [--config.k=v ...]

Metrics go to `WORKDIR/metrics.jsonl` and TensorBoard files in `WORKDIR/tensorboard`;
checkpoints to `WORKDIR/checkpoints`. Started again on the same workdir, a run continues from
its latest checkpoint exactly as if it had not stopped. SIGTERM saves a checkpoint and exits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from phoenix_flax.cli import (
    ArgumentParser,
    add_debug_arg,
    add_distributed_args,
    experiment_from_args,
    initialize_distributed,
    positive_int,
    run,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="phoenix-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a file in configs/ defining get_config()")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data-dir", help="a directory written by phoenix-prepare (default: the config's)")
    parser.add_argument("--stop-after", type=positive_int, help="stop after this many steps (checkpointed)")
    add_distributed_args(parser)
    add_debug_arg(parser)
    args, overrides = parser.parse_known_args(argv)
    return run(parser.prog, lambda: train_from_args(args, overrides), args.debug)


def train_from_args(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = experiment_from_args(args.config, overrides, args.data_dir)  # all config problems, before JAX starts
    initialize_distributed(args)

    from phoenix_flax.training.loop import train  # JAX starts here

    train(cfg, args.workdir, stop_after=args.stop_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
