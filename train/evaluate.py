"""`phoenix-eval`: restore a checkpoint and measure it on a split.

    phoenix-eval --workdir DIR [--step N|latest|best] [--split test] --output metrics.json
                 [--protocol next-item --corpus corpus.jsonl]

Prints a table per action (AUC, normalized entropy, calibration, the popularity baseline's and,
with true probabilities, the oracle's AUC) and retrieval recall, writes every figure as JSON and
draws the reliability diagrams and ROC curves (two figures, a panel per action) as PNG files
(`--plots`, default: a `plots` folder beside --output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from phoenix_flax.cli import (
    ArgumentParser,
    add_checkpoint_args,
    add_debug_arg,
    check_writable,
    check_writable_dir,
    positive_int,
    run,
)
from phoenix_flax.files import replaced


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="phoenix-eval", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--output", required=True, help="metrics JSON file")
    p.add_argument("--data-dir", help="default: the checkpoint's config")
    p.add_argument("--truth", help="true probabilities (phoenix-synth's test_truth.npz); default: the config's")
    p.add_argument("--corpus", help="posts for corpus retrieval (JSON Lines of post_id, author_id)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--plots", help="folder for the PNG files (default: plots/ beside --output; '' for none)")
    p.add_argument(
        "--protocol",
        choices=("sessions", "next-item"),
        default="sessions",
        help="next-item: also HR@k, NDCG@k and MRR of each positive in a full ranking of the corpus",
    )
    add_debug_arg(p)
    args = p.parse_args(argv)
    return run(p.prog, lambda: evaluate_checkpoint(args), args.debug)


def evaluate_checkpoint(args: argparse.Namespace) -> int:
    check_writable(args.output)
    plots = os.path.join(os.path.dirname(os.path.abspath(args.output)), "plots") if args.plots is None else args.plots
    if plots:
        check_writable_dir(plots, "--plots")

    from phoenix_flax.evaluation.evaluate import evaluate, format_table  # JAX starts here

    result = evaluate(
        args.workdir,
        step=args.step,
        split=args.split,
        data_dir=args.data_dir,
        truth_file=args.truth,
        corpus_file=args.corpus,
        batch_size=args.batch_size,
        protocol=args.protocol,
        plots_dir=plots or None,
    )
    with replaced(args.output) as f:
        json.dump(result, f, indent=2, allow_nan=False)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
