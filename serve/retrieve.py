"""`phoenix-retrieve`: the top-K posts of a corpus for each session, optionally then ranked.

    phoenix-retrieve --workdir DIR --corpus posts.jsonl --input sessions.jsonl --top-k K --output out.jsonl
                     [--include-seen] [--then-rank [--weights a=w,...] [feed-scorer options]]

Builds the corpus's candidate-tower vectors once and saves them beside the checkpoint
(`WORKDIR/index/`), reused while the checkpoint and the corpus are unchanged. Top-K is exact, by
dot product, over the corpus in chunks. Posts in a session's history are excluded unless
--include-seen. Writes one line per session, in input order:
{"user_id": ..., "candidates": [{"post_id": ..., "author_id": ..., "retrieval_score": s}, ...]}
and with --then-rank each candidate also has "probs" and "score", sorted by score.
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
    log,
    positive_int,
    read_session_input,
    run,
    scoring_from_args,
)
from phoenix_flax.files import replaced
from phoenix_flax.model.scoring import action_weights


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="phoenix-retrieve", description=__doc__.split("\n\n")[0])
    add_session_input_args(p)
    p.add_argument("--corpus", required=True, help="JSON Lines of {post_id, author_id}")
    p.add_argument("--top-k", type=positive_int, required=True)
    p.add_argument("--include-seen", action="store_true", help="keep posts already in the history")
    p.add_argument("--then-rank", action="store_true", help="rank the retrieved posts with the ranker")
    add_scoring_args(p)  # for --then-rank
    args = p.parse_args(argv)
    return run(p.prog, lambda: retrieve_top_k(args), args.debug)


def retrieve_top_k(args: argparse.Namespace) -> int:
    overrides, feed = scoring_from_args(args)
    check_writable(args.output)

    from phoenix_flax.checkpoint.restore import restore_model  # JAX starts here
    from phoenix_flax.serving.index import CorpusIndex, retrieval_line, retrieve, retrieved_session
    from phoenix_flax.serving.ranking import CachedRanker, ranked_candidates

    restored = restore_model(args.workdir, args.step)
    model, cfg = restored.model, restored.cfg.model
    restored.require("retrieval")
    if args.then_rank:
        restored.require("ranker", "--then-rank: ")
    weights = action_weights(cfg.actions, overrides).astype(np.float64)
    sessions, report = read_session_input(args, cfg, require_candidates=False)
    index, rebuilt = CorpusIndex.load_or_build(args.workdir, restored, args.corpus, report=log)
    print(f"{'built' if rebuilt else 'reused'} the index of {len(index.post_ids):,} posts", file=sys.stderr)
    hits = retrieve(model, cfg, index, sessions, args.top_k, include_seen=args.include_seen, batch_size=args.batch_size)
    if args.then_rank:
        retrieved = [retrieved_session(s, index, h) for s, h in zip(sessions, hits, strict=True)]
        probs = CachedRanker(model, cfg, args.batch_size, counts=restored.counts).probabilities(retrieved)
    with replaced(args.output) as f:
        for i, (session, h) in enumerate(zip(sessions, hits, strict=True)):
            ranked = None
            if args.then_rank:
                ranked = ranked_candidates(retrieved[i], probs[i], cfg.actions, weights, feed)
            f.write(json.dumps(retrieval_line(session, index, h, ranked), allow_nan=False) + "\n")
    print(
        f"retrieved top {args.top_k} for {len(sessions):,} sessions with step {restored.step}; {report.summary()}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
