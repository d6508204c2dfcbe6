"""`phoenix-import` throughput: a log of 1M events (CSV) to sessions, stage by stage.

    python bench/import.py [--events 1000000] [--users 20000] [--items 50000] [--max-history 50]

Writes a synthetic rating log (Zipf-popular items, string item IDs, ratings 1-5, timestamps)
to a temporary directory, then runs the importer's stages as `phoenix-import` does (read and
label, merge and split, write sessions, write the corpus) and prints each stage's time and the
events per second over the whole import.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from phoenix_flax.config import DEFAULT_ACTIONS
from phoenix_flax.data.importer import (
    ActionRule,
    Implication,
    ImportSpec,
    prepare_events,
    read_events,
    write_corpus,
    write_sessions,
)


def synthetic_log(path: str, events: int, users: int, items: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    item = np.minimum(rng.zipf(1.2, events), items) - 1
    table = pa.table(
        {
            "user": rng.integers(1, users + 1, events),
            "item": pa.array(np.char.add("item-", item.astype(str))),
            "rating": rng.integers(1, 6, events),
            "timestamp": rng.integers(1_600_000_000, 1_700_000_000, events),
        }
    )
    pacsv.write_csv(table, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--max-history", type=int, default=50)
    args = p.parse_args()
    spec = ImportSpec(
        user="user",
        item="item",
        timestamp="timestamp",
        actions=DEFAULT_ACTIONS,
        rules=(ActionRule.parse("click:*"), ActionRule.parse("favorite:rating>=4")),
        implications=(Implication.parse("favorite => dwell"),),
        max_history=args.max_history,
    )
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.csv")
        synthetic_log(log, args.events, args.users, args.items)
        size = os.path.getsize(log)
        times = {}
        start = t = time.perf_counter()
        events = read_events([log], spec)
        times["read and label"], t = time.perf_counter() - t, time.perf_counter()
        events, split = prepare_events(events, spec)
        times["merge, imply, split"], t = time.perf_counter() - t, time.perf_counter()
        sessions = write_sessions(events, split, spec, os.path.join(tmp, "out"))
        times["write sessions"], t = time.perf_counter() - t, time.perf_counter()
        write_corpus(events, os.path.join(tmp, "out", "corpus.jsonl"))
        times["write corpus"] = time.perf_counter() - t
        total = time.perf_counter() - start
    print(
        f"{args.events:,} events ({size / 2**20:.0f} MiB CSV), {args.users:,} users, history up to {args.max_history}"
    )
    for stage, seconds in times.items():
        print(f"  {stage:<22} {seconds:6.1f} s")
    print(f"  {'total':<22} {total:6.1f} s   {args.events / total:,.0f} events/s; sessions {sessions}")


if __name__ == "__main__":
    main()
