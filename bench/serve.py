"""phoenix-serve under load: requests/s and latency with 1, 8 and 64 concurrent clients, beside
phoenix-rank's sessions/s on the same sessions.

The demo's model (`make demo` trains it in runs/demo), its test sessions with 500 candidates each
(their own, then posts of the corpus). The server runs as `phoenix-serve` on loopback; each
client posts /rank requests one after another on its own keep-alive connection for --seconds
per level. Then, with the server stopped, phoenix-rank's work (restore, CachedRanker with its
default batch of 64, the output lines) is timed on the same sessions, after a warm-up.
    python bench/serve.py [--workdir runs/demo/train] [--world runs/demo/world] [--seconds 20]
                          [--clients 1,8,64] [--candidates 500] [--sessions 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sessions_with(world: str, count: int, candidates: int) -> list[dict]:
    """`count` test sessions of the world, each with `candidates` candidates: its own, then
    distinct posts of the corpus it does not already show."""
    rng = np.random.default_rng(0)
    with open(os.path.join(world, "corpus.jsonl")) as f:
        corpus = [json.loads(line) for line in f]
    out = []
    for record in pq.read_table(os.path.join(world, "test.parquet")).slice(0, count).to_pylist():
        shown = {c["post_id"] for c in record["candidates"]}
        extra = [corpus[i] for i in rng.permutation(len(corpus)) if corpus[i]["post_id"] not in shown]
        needed = candidates - len(record["candidates"])
        record["candidates"] = [{k: v for k, v in c.items() if k != "actions"} for c in record["candidates"]] + [
            {"post_id": p["post_id"], "author_id": p["author_id"], "product_surface": 0} for p in extra[:needed]
        ]
        out.append(record)
    return out


def post(connection: http.client.HTTPConnection, body: bytes) -> float:
    started = time.perf_counter()
    connection.request("POST", "/rank", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"/rank answered {response.status}")
    return time.perf_counter() - started


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[int, float, np.ndarray]:
    """-> (requests answered, seconds, latencies) of `clients` clients posting for `seconds`."""
    deadline = time.perf_counter() + seconds

    def client(i: int) -> list[float]:
        connection, latencies = http.client.HTTPConnection("127.0.0.1", port, timeout=120), []
        while time.perf_counter() < deadline:
            latencies.append(post(connection, bodies[(i + len(latencies) * clients) % len(bodies)]))
        connection.close()
        return latencies

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = np.concatenate([np.array(x) for x in pool.map(client, range(clients))])
    return len(latencies), time.perf_counter() - started, latencies


def batches(port: int) -> tuple[float, float]:
    """(batches, sessions) the server has answered, from its /metrics."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", "/metrics")
    metrics = connection.getresponse().read().decode()
    connection.close()
    found = dict(re.findall(r"^phoenix_batch_sessions_(count|sum) (\S+)$", metrics, re.M))
    return float(found["count"]), float(found["sum"])


def rank_program_rate(workdir: str, records: list[dict], rounds: int = 3) -> float:
    """phoenix-rank's sessions/s on `records`, its scoring and output lines (no file, no start-up)."""
    from phoenix_flax.checkpoint.restore import restore_model
    from phoenix_flax.data.raw import SessionParser
    from phoenix_flax.model.scoring import action_weights
    from phoenix_flax.serving.ranking import CachedRanker, ranking_line

    restored = restore_model(workdir)
    cfg = restored.cfg.model
    sessions = [SessionParser(cfg.actions).parse(r, i) for i, r in enumerate(records)]
    ranker, weights = CachedRanker(restored.model, cfg, counts=restored.counts), action_weights(cfg.actions)

    def rank() -> None:
        for s, p in zip(sessions, ranker.probabilities(sessions), strict=True):
            json.dumps(ranking_line(s, p, cfg.actions, weights))

    rank()  # compiles
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        rank()
        best = min(best, time.perf_counter() - started)
    return len(sessions) / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "demo", "train"))
    p.add_argument("--world", default=os.path.join(REPO, "runs", "demo", "world"))
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        sys.exit(f"no trained run in {args.workdir}: run `make demo` first, or give --workdir and --world")
    records = sessions_with(args.world, args.sessions, args.candidates)
    bodies = [json.dumps(r).encode() for r in records]

    options = ["--port", "0", "--max-batch", str(args.max_batch), "--max-candidates", str(args.candidates)]
    server = subprocess.Popen(
        [sys.executable, "-m", "serve.serve", "--workdir", args.workdir, *options],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(re.search(r"listening on http://[^:]+:(\d+)", server.stderr.readline()).group(1))
        started = time.perf_counter()
        line = server.stderr.readline()
        if "ready" not in line:
            sys.exit(f"the server did not start: {line}{server.stderr.read()}")
        print(f"phoenix-serve ready in {time.perf_counter() - started:.1f} s (restore, warm-up of every batch shape)")
        print(f"{args.candidates} candidates a request, {len(records)} distinct sessions, --max-batch {args.max_batch}")
        print(f"{'clients':>8} {'requests':>9} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11}")
        for clients in [int(c) for c in args.clients.split(",")]:
            load(port, bodies, clients, min(2.0, args.seconds))  # warm the connections and the batcher
            before = batches(port)
            n, elapsed, latencies = load(port, bodies, clients, args.seconds)
            after = batches(port)
            p50, p99 = np.percentile(latencies, [50, 99]) * 1000
            mean_batch = (after[1] - before[1]) / (after[0] - before[0])
            print(f"{clients:>8} {n:>9} {n / elapsed:>11.1f} {p50:>8.1f} {p99:>8.1f} {mean_batch:>11.2f}", flush=True)
    finally:
        server.terminate()
        server.wait(120)
    rate = rank_program_rate(args.workdir, records)
    print(f"phoenix-rank (in-process, batch 64, warm): {rate:.1f} sessions/s on the same sessions")


if __name__ == "__main__":
    main()
