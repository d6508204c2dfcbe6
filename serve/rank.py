"""`phoenix-rank`: score sessions' candidates with a trained ranker.

    phoenix-rank --workdir DIR [--step N] --input sessions.jsonl --output scores.jsonl [--weights a=w,...]
                 [--offset-negatives 0.001] [--author-decay 0.5 --author-floor 0.25] [--out-of-network-factor 0.7]

Writes one line per input session, in input order:
{"user_id": ..., "candidates": [{"post_id": ..., "probs": {"favorite": p, ...}, "score": s}, ...]}
with the candidates sorted by score. Any number of candidates per session: they are scored in
chunks against the session's user context, computed once. The score is the weighted sum of the
probabilities; the options add the steps of X's feed scorer (`phoenix_flax/model/scoring.py`), and then
each candidate also has "weighted_score", the plain sum.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from phoenix_flax.cli import (
    ArgumentParser,
    add_scoring_args,
    add_session_input_args,
    check_writable,
    positive_int,
    read_session_input,
    run,
    scoring_from_args,
)
from phoenix_flax.files import replaced
from phoenix_flax.model.scoring import action_weights


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="phoenix-rank", description=__doc__.split("\n\n")[0])
    add_session_input_args(p)
    add_scoring_args(p)
    p.add_argument("--chunk-size", type=positive_int, default=512, help="candidates scored at once")
    args = p.parse_args(argv)
    return run(p.prog, lambda: rank(args), args.debug)


def rank(args: argparse.Namespace) -> int:
    overrides, feed = scoring_from_args(args)
    check_writable(args.output)

    from phoenix_flax.checkpoint.restore import restore_model  # JAX starts here
    from phoenix_flax.serving.ranking import CachedRanker, ranking_line

    restored = restore_model(args.workdir, args.step)
    restored.require("ranker")
    cfg = restored.cfg.model
    weights = action_weights(cfg.actions, overrides).astype(np.float64)
    sessions, report = read_session_input(args, cfg)
    probs = CachedRanker(restored.model, cfg, args.batch_size, args.chunk_size, restored.counts).probabilities(sessions)
    with replaced(args.output) as f:
        for session, p_session in zip(sessions, probs, strict=True):
            f.write(json.dumps(ranking_line(session, p_session, cfg.actions, weights, feed), allow_nan=False) + "\n")
    print(
        f"ranked {sum(len(x) for x in probs):,} candidates of {len(sessions):,} sessions with step {restored.step}; "
        f"{report.summary()}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
