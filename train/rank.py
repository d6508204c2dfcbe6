"""`phoenix-rank`: score sessions' candidates with a trained ranker.

    phoenix-rank --workdir DIR [--step N] --input sessions.jsonl --output scores.jsonl [--weights a=w,...]

Writes one line per input session, in input order:
{"user_id": ..., "candidates": [{"post_id": ..., "probs": {"favorite": p, ...}, "score": s}, ...]}
with the candidates sorted by score. Any number of candidates per session: they are scored in
chunks against the session's user context, computed once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from phoenix_flax.data.raw import Session, SessionFormatError, SkipReport, expand_paths, read_sessions
from phoenix_flax.scoring import action_weights


def parse_weights(text: str | None) -> dict[str, float]:
    """'favorite=1,report=-20' -> {'favorite': 1.0, 'report': -20.0}."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--weights: bad entry {part!r}; expected action=number") from None
        if not eq:
            raise ValueError(f"--weights: bad entry {part!r}; expected action=number")
    return out


def ranked(session: Session, probs: np.ndarray, actions: Sequence[str], weights: np.ndarray) -> list[dict]:
    """A session's candidates with their probabilities and score, best first."""
    scores = probs.astype(np.float64) @ weights
    order = np.argsort(-scores, kind="stable")
    return [
        {
            "post_id": int(session.candidate_post_id[j]),
            "probs": {a: round(float(p), 6) for a, p in zip(actions, probs[j])},
            "score": round(float(scores[j]), 6),
        }
        for j in order
    ]


def add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", default="latest", help="a step, 'latest' or 'best'")
    p.add_argument("--input", required=True, nargs="+", help="sessions (.jsonl or .parquet; globs allowed)")
    p.add_argument("--output", required=True)
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid sessions and report them")
    p.add_argument("--batch-size", type=int, default=64, help="sessions per user-context batch")


def read_input(args, actions, require_candidates: bool = True) -> tuple[list[Session], SkipReport]:
    report = SkipReport()
    read = read_sessions(expand_paths(args.input), actions, skip_invalid=args.skip_invalid, report=report,
                         require_candidates=require_candidates)  # fmt: skip
    return [s for _, s in read], report


def step_arg(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="phoenix-rank", description=__doc__.split("\n\n")[0])
    add_input_args(p)
    p.add_argument("--weights", help="score weights, e.g. favorite=1,report=-20 (others: the defaults)")
    p.add_argument("--chunk-size", type=int, default=512, help="candidates scored at once")
    args = p.parse_args(argv)

    from phoenix_flax.serving import CachedRanker, restore  # JAX starts here

    try:
        cfg, step, model = restore(args.workdir, step_arg(args.step))
        actions = cfg.model.actions
        weights = action_weights(actions, parse_weights(args.weights)).astype(np.float64)
        sessions, report = read_input(args, actions)
        ranker = CachedRanker(model, cfg.model, args.batch_size, args.chunk_size)
        probs = ranker.probabilities(sessions)
    except (SessionFormatError, FileNotFoundError, ValueError) as e:
        print(f"phoenix-rank: error: {e}", file=sys.stderr)
        return 2
    with open(args.output, "w") as f:
        for session, p_session in zip(sessions, probs, strict=True):
            line = {"user_id": session.user_id, "candidates": ranked(session, p_session, actions, weights)}
            f.write(json.dumps(line) + "\n")
    print(f"ranked {sum(len(x) for x in probs):,} candidates of {len(sessions):,} sessions with step {step}; "
          f"{report.summary()}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
