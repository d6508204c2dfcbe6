"""`phoenix-synth`: a synthetic engagement world with known true action probabilities.

    phoenix-synth --out DIR [--sessions N] [--users N] [--posts N] [--format parquet|jsonl] ...

Writes train/validation/test sessions, `corpus.jsonl` (every post), `test_truth.npz` (the true
probability of every action for every test candidate) and `world.json`. See
`phoenix_flax.data.synth` for the world's rules.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence

from phoenix_flax.cli import ArgumentParser, add_debug_arg, run
from phoenix_flax.data.synth import World, WorldConfig, simulate, write_world
from phoenix_flax.validation import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="phoenix-synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    for f in dataclasses.fields(WorldConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="session file format")
    add_debug_arg(p)
    args = p.parse_args(argv)
    try:
        cfg = WorldConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WorldConfig)})
    except ConfigError as e:
        p.error(str(e))
    if cfg.posts < cfg.candidates or min(cfg.users, cfg.authors, cfg.topics, cfg.sessions) < 1:
        p.error("need at least one user, author, topic and session, and posts >= candidates")
    return run(p.prog, lambda: synthesize(cfg, args.out, args.format), args.debug)


def synthesize(cfg: WorldConfig, out: str, fmt: str) -> int:
    start = time.time()
    world = World(cfg)
    splits = simulate(world)
    files = write_world(world, splits, out, fmt)
    counts = ", ".join(f"{k} {len(v.session_id):,}" for k, v in splits.items())
    print(f"wrote {counts} sessions, {cfg.posts:,} posts to {out} in {time.time() - start:.1f}s")
    print("session files: " + " ".join(files[s] for s in ("train", "validation", "test")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
