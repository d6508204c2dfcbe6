"""`phoenix-prepare`: raw session files -> a TFDS dataset in ArrayRecord format.

    phoenix-prepare --data-dir DIR --train FILES [--validation FILES] [--test FILES]
    phoenix-prepare --data-dir DIR --input FILES [--fractions train=0.8,validation=0.1,test=0.1] [--seed 0]

The dataset keeps raw int64 IDs and variable lengths; a bad record stops it with the file, line
and field (`--skip-invalid` skips and counts them). Statistics per split are printed and saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from phoenix_flax.cli import ArgumentParser, add_beam_args, add_debug_arg, check_beam_args, run
from phoenix_flax.config import DEFAULT_ACTIONS
from phoenix_flax.data.prepare import SplitSource, dataset_dir, prepare, print_statistics
from phoenix_flax.data.raw import expand_paths


def _parse_fractions(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad fraction {part!r}: expected name=number") from None
    if abs(sum(out.values()) - 1.0) > 1e-6 or min(out.values()) <= 0:
        raise argparse.ArgumentTypeError(f"fractions must be positive and sum to 1, got {text!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="phoenix-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="output directory (the dataset goes in a subfolder)")
    p.add_argument("--train", nargs="+", metavar="FILE", help="raw files or globs (.jsonl, .parquet)")
    p.add_argument("--validation", nargs="+", metavar="FILE")
    p.add_argument("--test", nargs="+", metavar="FILE")
    p.add_argument("--input", nargs="+", metavar="FILE", help="one input, split by --fractions")
    p.add_argument("--fractions", type=_parse_fractions, default="train=0.8,validation=0.1,test=0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the split by fractions")
    p.add_argument("--actions", default=",".join(DEFAULT_ACTIONS), help="the action vocabulary, comma-separated")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records and report them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    add_beam_args(p)
    add_debug_arg(p)
    args, beam_args = p.parse_known_args(argv)
    check_beam_args(p, args, beam_args)
    if args.input and (args.train or args.validation or args.test):
        p.error("give either --input or --train/--validation/--test")
    if not (args.input or args.train):
        p.error("give --train FILES (with optional --validation/--test) or --input FILES")
    return run(p.prog, lambda: prepare_from_args(args, beam_args), args.debug)


def prepare_from_args(args: argparse.Namespace, beam_args: Sequence[str] = ()) -> int:
    options, expand = None, expand_paths
    if args.runner is not None:
        from phoenix_flax.data import beam

        options, expand = beam.pipeline_options([f"--runner={args.runner}", *beam_args]), beam.expand
    if args.input:
        paths = tuple(expand(args.input))
        sources, lo = {}, 0.0
        for name, fraction in args.fractions.items():
            sources[name] = SplitSource(paths, lo, lo + fraction, args.seed)
            lo += fraction
        sources[name] = dataclasses.replace(sources[name], hi=1.0)  # no gap from rounding
    else:
        sources = {
            name: SplitSource(tuple(expand(files)))
            for name, files in (("train", args.train), ("validation", args.validation), ("test", args.test))
            if files
        }
    actions = tuple(a.strip() for a in args.actions.split(",") if a.strip())
    stats, report = prepare(
        args.data_dir,
        sources,
        actions=actions,
        skip_invalid=args.skip_invalid,
        overwrite=args.overwrite,
        beam_options=options,
    )
    print_statistics(stats)
    print(report.summary())
    print(f"dataset written to {dataset_dir(args.data_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
