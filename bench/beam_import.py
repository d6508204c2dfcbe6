"""phoenix-import on Apache Beam (DirectRunner) against the in-memory program: events/s and peak
memory for generated logs of 1M and 4M events.

Each log is a CSV of (user, item, rating, time): users' activity and items' popularity skewed
(Zipf), one user with 100,000 events, ratings 1 to 5 (a `click` each, 4 and 5 a `favorite`).
Each program runs in its own process, one after the other; its peak resident memory is the
largest of it and its own child processes (`wait4`'s `ru_maxrss`). Both outputs are checked to
hold the same number of sessions.
    python bench/beam_import.py [--events 1000000,4000000] [--beam-options "--direct_num_workers=2 ..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY_USER_EVENTS = 100_000


def write_log(path: str, events: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    users, items = max(events // 50, 10), max(events // 20, 10)
    user = np.minimum(rng.zipf(1.3, events), users).astype(np.int64)
    user[:HEAVY_USER_EVENTS] = users + 1  # one user with 100,000 events
    table = pa.table(
        {
            "user": user,
            "item": np.minimum(rng.zipf(1.2, events), items).astype(np.int64) * 7 + rng.integers(0, 7, events),
            "rating": rng.integers(1, 6, events),
            "time": np.sort(rng.integers(1_600_000_000, 1_700_000_000, events)),
        }
    )
    pacsv.write_csv(table, path)


def run(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of a program run in its own process."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{shlex.join(argv)} failed:\n{process.stderr.read()}")
    return elapsed, usage.ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", default="1000000,4000000")
    p.add_argument("--beam-options", default="", help="more Beam pipeline options for the Beam runs")
    args = p.parse_args()
    program = [sys.executable, "-m", "train.import_logs"]
    common = ["--user", "user", "--item", "item", "--timestamp", "time"]
    common += ["--rule", "click:*", "--rule", "favorite:rating>=4", "--rule", "not_interested:rating<=2"]
    print(f"{'events':>10} {'program':>22} {'seconds':>8} {'events/s':>10} {'peak RSS GiB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for events in [int(x) for x in args.events.split(",")]:
            log = os.path.join(tmp, f"log_{events}.csv")
            write_log(log, events)
            sessions = {}
            for name, extra in (
                ("in memory", []),
                ("Beam, DirectRunner", ["--runner", "DirectRunner", *shlex.split(args.beam_options)]),
            ):
                out = os.path.join(tmp, f"out_{events}_{len(sessions)}")
                seconds, rss = run([*program, "--input", log, "--out", out, *common, *extra])
                with open(os.path.join(out, "import.json")) as f:
                    sessions[name] = json.load(f)["sessions"]
                print(f"{events:>10,} {name:>22} {seconds:>8.1f} {events / seconds:>10,.0f} {rss:>13.2f}", flush=True)
            if len(set(map(json.dumps, sessions.values()))) != 1:
                sys.exit(f"the programs made different sessions: {sessions}")


if __name__ == "__main__":
    main()
