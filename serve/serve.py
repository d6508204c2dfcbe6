"""`phoenix-serve`: rank and retrieve over HTTP, with micro-batching and hot checkpoint reload.

    phoenix-serve --workdir DIR [--step latest|best|N] [--corpus posts.jsonl] [--host 127.0.0.1] [--port 8000]

    POST /rank      a session, as a line of phoenix-rank's input -> phoenix-rank's output line;
                    feed-scorer options as query parameters: ?weights=favorite=1,report=-20&
                    offset_negatives=0.001&author_decay=0.5&author_floor=0.25&out_of_network_factor=0.7
    POST /retrieve  {"user_id", "history", "top_k", "then_rank"} -> phoenix-retrieve's output line
    GET  /healthz   the process answers;  GET /readyz  200 once the checkpoint is loaded and compiled
    GET  /metrics   Prometheus: requests, latencies, batch sizes, reloads, the step served

Concurrent requests are answered together (up to --max-batch sessions, waiting at most
--max-wait-ms for them); every batch shape is compiled before the server is ready. With --step
latest (or best), a newer (or new best) checkpoint is loaded in the background and swapped in
between batches; one that does not restore, or holds another model, is refused in one line and
the served one stays. A bad request gets a 4xx naming the field. SIGTERM or Ctrl-C: requests in
flight are answered, then the server exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence

from phoenix_flax.cli import ArgumentParser, add_checkpoint_args, add_debug_arg, count, positive_int, run
from phoenix_flax.data.raw import InputFileError
from phoenix_flax.errors import CheckpointError


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="phoenix-serve", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--corpus", help="JSON Lines of {post_id, author_id}: the posts /retrieve returns")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000, help="0: any free port (printed)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="sessions answered together")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    p.add_argument("--chunk-size", type=positive_int, default=512, help="candidates scored at once")
    p.add_argument("--max-candidates", type=positive_int, default=2000, help="candidates per /rank request")
    p.add_argument("--max-history", type=positive_int, default=4096, help="history items per request")
    p.add_argument("--max-top-k", type=positive_int, default=1000, help="top_k per /retrieve request")
    p.add_argument("--reload-interval", type=float, default=30.0, help="seconds between looks for a newer checkpoint")
    add_debug_arg(p)
    args = p.parse_args(argv)
    return run(p.prog, lambda: serve(args), args.debug)


def port_number(text: str) -> int:
    port = count(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


def serve(args: argparse.Namespace) -> int:
    if args.corpus is not None and not os.path.isfile(args.corpus):
        raise InputFileError(f"--corpus {args.corpus}: no such file")
    from phoenix_flax.checkpoint.manager import Checkpointer
    from phoenix_flax.checkpoint.restore import steps_to_restore

    with Checkpointer.open_run(args.workdir) as checkpoints:
        steps_to_restore(checkpoints, args.step)  # no such step: one line, before listening
    listening = socket.create_server((args.host, args.port))  # a port in use: one line too

    import uvicorn

    from phoenix_flax.cli import log
    from phoenix_flax.serving.server import Engine, ServeOptions, make_app

    options = ServeOptions(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        chunk_size=args.chunk_size,
        max_candidates=args.max_candidates,
        max_history=args.max_history,
        max_top_k=args.max_top_k,
        reload_interval_s=args.reload_interval,
    )
    engine = Engine(args.workdir, args.step, args.corpus, options, report=log)
    server = uvicorn.Server(
        uvicorn.Config(
            make_app(engine, on_failure=lambda: setattr(server, "should_exit", True)),
            log_level="warning",
            timeout_graceful_shutdown=60,
        )
    )
    host, port = listening.getsockname()[:2]
    log(f"phoenix-serve: listening on http://{host}:{port}; loading step {args.step} of {args.workdir}")
    # uvicorn answers SIGTERM by draining, then raises it again: this handler makes that a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[listening])
    if engine.failure is not None:
        raise CheckpointError(engine.failure)
    log("phoenix-serve: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
