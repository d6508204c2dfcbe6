"""`phoenix-import`: interaction logs (one event per row) -> train/validation/test sessions and a corpus.

    phoenix-import --input ratings.csv --out DIR --user user_id --item item_id --timestamp ts
                   [--author COL] [--surface COL] [--action COL] [--rule favorite:rating>=4 ...]
                   [--implied 'favorite,reply,repost,quote => click,dwell' ...]
                   [--split leave-last-out | --split time --validation-from T --test-from T]
                   [--max-history 50] [--candidates-per-session 1] [--format csv|tsv|parquet] [--skip-invalid]
                   [--columns user,item,rating,ts] [--skip-rows N]

Writes DIR/train.parquet, validation.parquet, test.parquet (the raw session format, for
`phoenix-prepare`), DIR/corpus.jsonl (every item, for `phoenix-retrieve` and evaluation) and
DIR/import.json (what was done, with counts). See `phoenix_flax.data.importer` for the rules.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from phoenix_flax.cli import ArgumentParser, add_beam_args, add_debug_arg, check_beam_args, count, positive_int, run
from phoenix_flax.config import DEFAULT_ACTIONS
from phoenix_flax.data.importer import (
    ActionRule,
    Implication,
    ImportSpec,
    import_summary,
    prepare_events,
    read_events,
    write_corpus,
    write_sessions,
)
from phoenix_flax.data.raw import SkipReport, expand_paths
from phoenix_flax.files import replaced


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="phoenix-import", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, nargs="+", help="event files (.csv, .tsv, .parquet; globs allowed)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("csv", "tsv", "parquet"), help="the inputs' format (default: by extension)")
    p.add_argument("--columns", help="CSV/TSV without a header: the column names, comma-separated")
    p.add_argument("--skip-rows", type=count, default=0, help="CSV/TSV: lines to skip first (e.g. a header to rename)")
    p.add_argument("--user", required=True, help="the user ID column")
    p.add_argument("--item", required=True, help="the item (post) ID column")
    p.add_argument("--timestamp", required=True, help="the time column: numbers or ISO 8601 date-times")
    p.add_argument("--author", help="the author ID column (default: every author 0)")
    p.add_argument("--surface", help="the product surface column (default: 0)")
    p.add_argument("--action", help="a column of action names")
    p.add_argument(
        "--rule", action="append", default=[], help="ACTION:* or ACTION:COLUMN>=NUMBER (ops >= <= == != > <); repeat"
    )
    p.add_argument(
        "--implied", action="append", default=[], help="'a,b => c,d': events with a or b also get c and d; repeat"
    )
    p.add_argument("--actions", help="the action vocabulary, comma-separated (default: the model's)")
    p.add_argument("--split", choices=("leave-last-out", "time"), default="leave-last-out")
    p.add_argument("--validation-from", type=float, help="time split: events at or after this go to validation")
    p.add_argument("--test-from", type=float, help="time split: events at or after this go to test")
    p.add_argument("--max-history", type=positive_int, default=50, help="history items per session (the most recent)")
    p.add_argument("--candidates-per-session", type=positive_int, default=1, help="consecutive events per session")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows and report them")
    add_beam_args(p)
    add_debug_arg(p)
    args, beam_args = p.parse_known_args(argv)
    check_beam_args(p, args, beam_args)
    return run(p.prog, lambda: import_logs(args, beam_args), args.debug)


def import_logs(args: argparse.Namespace, beam_args: Sequence[str] = ()) -> int:
    spec = ImportSpec(
        user=args.user,
        item=args.item,
        timestamp=args.timestamp,
        actions=tuple(a.strip() for a in args.actions.split(",")) if args.actions else DEFAULT_ACTIONS,
        author=args.author,
        surface=args.surface,
        action=args.action,
        rules=tuple(ActionRule.parse(r) for r in args.rule),
        implications=tuple(Implication.parse(i) for i in args.implied),
        split=args.split,
        validation_from=args.validation_from,
        test_from=args.test_from,
        max_history=args.max_history,
        candidates_per_session=args.candidates_per_session,
    )
    start = time.time()
    if args.runner is not None:
        from phoenix_flax.data import beam

        paths = beam.expand(args.input)
        summary = beam.import_with_beam(
            paths,
            spec,
            args.out,
            beam.pipeline_options([f"--runner={args.runner}", *beam_args]),
            fmt=args.format,
            names=[c.strip() for c in args.columns.split(",")] if args.columns else None,
            skip_rows=args.skip_rows,
            skip_invalid=args.skip_invalid,
            args=summary_args(args),
        )
        counts = ", ".join(f"{k} {v:,}" for k, v in summary["sessions"].items())
        skipped = (
            f"; skipped {summary['rows_skipped']:,} invalid rows (invalid_rows.jsonl)"
            if summary["rows_skipped"]
            else ""
        )
        print(
            f"imported {summary['rows'] - summary['rows_skipped']:,} rows ({summary['events']:,} events of "
            f"{summary['users']:,} users on {summary['items']:,} items) into {counts} sessions in {args.out} "
            f"with {args.runner} in {time.time() - start:.1f}s{skipped}"
        )
        return 0
    paths = expand_paths(args.input)
    os.makedirs(args.out, exist_ok=True)
    report = SkipReport()
    total_bytes = sum(os.path.getsize(x) for x in paths)
    with tqdm(desc="read", unit=" rows", total=None, disable=total_bytes < 1 << 20, file=sys.stderr) as bar:
        events = read_events(
            paths,
            spec,
            fmt=args.format,
            skip_invalid=args.skip_invalid,
            report=report,
            progress=bar.update,
            names=[c.strip() for c in args.columns.split(",")] if args.columns else None,
            skip_rows=args.skip_rows,
        )
    rows = len(events)
    events, split = prepare_events(events, spec)
    with tqdm(desc="write", unit=" events", total=len(events), disable=len(events) < 100_000, file=sys.stderr) as bar:
        sessions = write_sessions(events, split, spec, args.out, progress=bar.update)
    items = write_corpus(events, os.path.join(args.out, "corpus.jsonl"))
    summary = import_summary(
        paths,
        rows=rows + report.total,
        skipped=report.total,
        events=len(events),
        users=len(np.unique(events.user)),
        items=items,
        sessions=sessions,
        action_counts=((events.actions[:, None] >> np.arange(len(spec.actions))) & 1).sum(0),
        spec=spec,
        args=summary_args(args),
    )
    with replaced(os.path.join(args.out, "import.json")) as f:
        json.dump(summary, f, indent=2)
    counts = ", ".join(f"{k} {v:,}" for k, v in sessions.items())
    print(
        f"imported {rows:,} rows ({len(events):,} events of {summary['users']:,} users on {items:,} items) "
        f"into {counts} sessions in {args.out} in {time.time() - start:.1f}s; {report.summary()}"
    )
    return 0


def summary_args(args: argparse.Namespace) -> dict:
    """The arguments import.json records: those that shape the sessions."""
    return {k: v for k, v in vars(args).items() if k not in ("debug", "runner")}


if __name__ == "__main__":
    sys.exit(main())
