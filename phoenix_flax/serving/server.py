"""phoenix-serve's engine: a checkpoint restored and compiled for every batch shape, concurrent
requests micro-batched on one model thread, newer checkpoints loaded in the background and
swapped in between batches, and the HTTP app (starlette) with its Prometheus metrics.

Requests are validated in the event loop (the programs' parser and limits), so a bad one is
answered 4xx there and never joins a batch; the model thread takes up to `max_batch` queued
sessions, waiting at most `max_wait_ms` after the first, and answers them together.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phoenix_flax.checkpoint.manager import Checkpointer
from phoenix_flax.checkpoint.restore import Restored, restore_model
from phoenix_flax.cli import scoring_from_args
from phoenix_flax.data.raw import RecordError, Session, SessionParser
from phoenix_flax.errors import PhoenixError
from phoenix_flax.model.scoring import FeedScoring, WeightsError, action_weights
from phoenix_flax.serving.index import CorpusIndex, retrieval_line, retrieve, retrieved_session
from phoenix_flax.serving.ranking import CachedRanker, bucket, ranked_candidates, ranking_line

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 16  # sessions answered together (bucketed: 1, 2, 4, ... compiled at warm-up)
    max_wait_ms: float = 2.0  # how long a batch's first request waits for others
    chunk_size: int = 512  # candidates scored at once
    max_candidates: int = 2000  # per /rank request
    max_history: int = 4096  # history items per request
    max_top_k: int = 1000  # per /retrieve request
    max_body_bytes: int = 16 << 20
    reload_interval_s: float = 30.0  # how often the workdir is looked at for a newer checkpoint


class RequestError(PhoenixError):
    """A request the server refuses: its HTTP status and what is wrong, naming the field."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def _dummy_sessions(n: int) -> list[Session]:
    """`n` sessions of one history item and one candidate: the warm-up's input."""
    one = np.ones(1, np.int64)
    item = (one, one, np.zeros(1, np.int32), np.zeros(1, np.int64))
    return [Session(0, 1, *item, *item, False) for _ in range(n)]


class Served:
    """One checkpoint ready to answer: restored, its corpus index loaded or built, and every
    batch shape compiled (`warm_up`), so that no request compiles."""

    def __init__(self, restored: Restored, corpus: str | None, options: ServeOptions, report: Callable[[str], None]):
        model, cfg = restored.model, restored.cfg.model
        self.restored, self.step, self.cfg, self.options = restored, restored.step, cfg, options
        self.ranker = None
        if model.ranker is not None:
            self.ranker = CachedRanker(
                model, cfg, options.max_batch, options.chunk_size, restored.counts, bucketed=True
            )
        self.index = None
        if corpus is not None and model.retrieval is not None:
            self.index, _ = CorpusIndex.load_or_build(restored.workdir, restored, corpus, report)
        self.parser = SessionParser(cfg.actions, surface_vocab_size=cfg.product_surface_vocab_size)
        self.history_parser = SessionParser(
            cfg.actions, require_candidates=False, surface_vocab_size=cfg.product_surface_vocab_size
        )

    @property
    def searched(self) -> int:
        """Corpus posts taken per user before its history is excluded: one shape for every request."""
        return min(len(self.index.post_ids), self.options.max_top_k + self.options.max_history)

    def warm_up(self) -> None:
        for rows in sorted({bucket(n, self.options.max_batch) for n in range(1, self.options.max_batch + 1)}):
            sessions = _dummy_sessions(rows)
            if self.ranker is not None:
                self.ranker.probabilities(sessions)
            if self.index is not None:
                self.retrieve(sessions)

    def retrieve(self, sessions: Sequence[Session]) -> list[list[tuple[int, float]]]:
        """The top `max_top_k` of the corpus per session (a request takes its `top_k` first)."""
        return retrieve(
            self.restored.model,
            self.cfg,
            self.index,
            sessions,
            self.options.max_top_k,
            batch_size=self.options.max_batch,
            bucketed=True,
            searched=self.searched,
        )


@dataclasses.dataclass
class Job:
    """One request's session on its way through a batch; `done` gets its output line and the
    step that answered it."""

    kind: str  # "rank" or "retrieve"
    session: Session
    weights: np.ndarray
    feed: FeedScoring
    top_k: int = 0
    then_rank: bool = False
    done: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


def answer(served: Served, jobs: Sequence[Job]) -> list[dict]:
    """The output lines of a batch of jobs, as phoenix-rank and phoenix-retrieve write them."""
    actions = served.cfg.actions
    retrieving = [j for j in jobs if j.kind == "retrieve"]
    found = served.retrieve([j.session for j in retrieving]) if retrieving else []
    hits = {id(j): h[: j.top_k] for j, h in zip(retrieving, found, strict=True)}
    to_rank = {}  # id(job) -> the session whose candidates are ranked
    for job in jobs:
        if job.kind == "rank":
            to_rank[id(job)] = job.session
        elif job.then_rank:
            to_rank[id(job)] = retrieved_session(job.session, served.index, hits[id(job)])
    ranked_probs = served.ranker.probabilities(list(to_rank.values())) if to_rank else []
    probs = dict(zip(to_rank, ranked_probs, strict=True))
    lines = []
    for job in jobs:
        if job.kind == "rank":
            lines.append(ranking_line(job.session, probs[id(job)], actions, job.weights, job.feed))
        else:
            ranked = None
            if job.then_rank:
                ranked = ranked_candidates(to_rank[id(job)], probs[id(job)], actions, job.weights, job.feed)
            lines.append(retrieval_line(job.session, served.index, hits[id(job)], ranked))
    return lines


class Engine:
    """The served checkpoint, the model thread that answers batches, and the reloader."""

    def __init__(
        self,
        workdir: str,
        step: int | str = "latest",
        corpus: str | None = None,
        options: ServeOptions | None = None,
        report: Callable[[str], None] = print,
    ):
        self.workdir, self.step_spec, self.corpus = workdir, step, corpus
        self.options, self.report = options or ServeOptions(), report
        self.served: Served | None = None  # None until warmed up
        self.failure: str | None = None  # why the first checkpoint could not be served
        self.refused: set[int] = set()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.registry = CollectorRegistry()
        self.requests = Counter("phoenix_requests", "Requests answered", ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram(
            "phoenix_request_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_sizes = Histogram(
            "phoenix_batch_sessions",
            "Sessions per model batch",
            buckets=[2**i for i in range(11)],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "phoenix_batch_seconds", "Model time per batch", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.served_step = Gauge("phoenix_served_step", "The checkpoint step being served", registry=self.registry)
        self.reloads = Counter("phoenix_reloads", "Checkpoint reloads", ["outcome"], registry=self.registry)
        self.queued = Gauge("phoenix_queued_sessions", "Sessions waiting for a batch", registry=self.registry)

    # Lifecycle.

    def start(self, on_failure: Callable[[], None] = lambda: None) -> None:
        """Loads and warms up the checkpoint in the background (`ready` then turns true), then
        starts the model thread and, for 'latest' or 'best', the reloader. A checkpoint that
        cannot be served is kept in `failure` and `on_failure` called."""

        def load() -> None:
            try:
                self.served = self._prepare(restore_model(self.workdir, self.step_spec))
            except (PhoenixError, OSError, ValueError) as e:
                self.failure = str(e)
                on_failure()
                return
            self.served_step.set(self.served.step)
            self.report(f"phoenix-serve: serving step {self.served.step} of {self.workdir}; ready")
            if self.step_spec in ("latest", "best"):
                self._spawn(self._reload_loop, "phoenix-reload")

        self._spawn(self._batch_loop, "phoenix-batches")
        self._spawn(load, "phoenix-load")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def ready(self) -> bool:
        return self.served is not None

    def close(self) -> None:
        """Answers what is queued, then stops the threads."""
        self._stop.set()
        self._queue.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def _prepare(self, restored: Restored) -> Served:
        if restored.model.ranker is None and (self.corpus is None or restored.model.retrieval is None):
            restored.require("ranker", "nothing to serve: ")
        served = Served(restored, self.corpus, self.options, self.report)
        served.warm_up()
        return served

    # Batches.

    def submit(self, job: Job) -> concurrent.futures.Future:
        self._queue.put(job)
        self.queued.inc()
        return job.done

    def _next_batch(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs, deadline = [first], time.monotonic() + self.options.max_wait_ms / 1000
        while len(jobs) < self.options.max_batch:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:  # closing: this batch is answered, then the loop ends
                self._queue.put(None)
                break
            jobs.append(job)
        self.queued.dec(len(jobs))
        return jobs

    def _batch_loop(self) -> None:
        while (jobs := self._next_batch()) is not None:
            served = self.served  # swapped by the reloader between batches only
            started = time.perf_counter()
            try:
                results = answer(served, jobs)
            except Exception:  # (a bug: answered job by job, so that only its own request fails)
                self.report(f"phoenix-serve: a batch failed, answering its {len(jobs)} requests one by one")
                for job in jobs:
                    try:
                        job.done.set_result((answer(served, [job])[0], served.step))
                    except Exception as e:  # a bug, reported with its traceback
                        self.report(f"phoenix-serve: a request failed: {traceback.format_exc(limit=-3)}")
                        job.done.set_exception(e)
            else:
                for job, line in zip(jobs, results, strict=True):
                    job.done.set_result((line, served.step))
            self.batch_sizes.observe(len(jobs))
            self.batch_seconds.observe(time.perf_counter() - started)

    # Reloads.

    def wanted_step(self) -> int | None:
        with Checkpointer.open_run(self.workdir) as checkpoints:
            return checkpoints.best_step() if self.step_spec == "best" else checkpoints.latest_step()

    def _reload_loop(self) -> None:
        while not self._stop.wait(self.options.reload_interval_s):
            self.reload_once()

    def reload_once(self) -> bool:
        """Loads the wanted checkpoint if it is another than the served one, and swaps it in;
        one that cannot be loaded, or holds another model, is refused in one line (once)."""
        served = self.served
        try:
            step = self.wanted_step()
        except (PhoenixError, OSError) as e:
            self.report(f"phoenix-serve: cannot look for a newer checkpoint: {e}; still serving step {served.step}")
            return False
        if step is None or step == served.step or step in self.refused:
            return False
        try:
            restored = restore_model(self.workdir, step)
            now, then = dataclasses.asdict(served.cfg), dataclasses.asdict(restored.cfg.model)
            differences = [f"model.{k}: {then[k]!r} (serving {now[k]!r})" for k in now if now[k] != then[k]]
            if differences:  # other shapes or computations than the ones compiled and served
                raise PhoenixError("it holds another model: " + "; ".join(differences))
            new = self._prepare(restored)
        except (PhoenixError, OSError, ValueError) as e:
            self.refused.add(step)
            self.reloads.labels("refused").inc()
            self.report(f"phoenix-serve: refused step {step}: {e}; still serving step {served.step}")
            return False
        self.served = new
        self.served_step.set(new.step)
        self.reloads.labels("loaded").inc()
        self.report(f"phoenix-serve: now serving step {new.step} (was {served.step})")
        return True


# --- HTTP -----------------------------------------------------------------------------------------


async def _json_body(request: Request, limit: int):
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise RequestError(413, f"body: {int(size):,} bytes, more than the limit {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body: more than the limit of {limit:,} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body: not JSON: {e}") from None


def _float_param(request: Request, name: str) -> float | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise RequestError(400, f"query parameter '{name}': expected a number, got {text!r}") from None


def _scoring(request: Request, served: Served) -> tuple[np.ndarray, FeedScoring]:
    """The feed scorer's options from the query, phoenix-rank's options by their names
    (weights=favorite=1,report=-20, offset_negatives, author_decay, author_floor,
    out_of_network_factor)."""
    options = argparse.Namespace(
        weights=request.query_params.get("weights"),
        offset_negatives=_float_param(request, "offset_negatives"),
        author_decay=_float_param(request, "author_decay"),
        author_floor=_float_param(request, "author_floor") or 0.0,
        out_of_network_factor=1.0 if (f := _float_param(request, "out_of_network_factor")) is None else f,
    )
    try:
        overrides, feed = scoring_from_args(options)
        weights = action_weights(served.cfg.actions, overrides)
    except WeightsError as e:
        raise RequestError(400, f"query: {e}") from None
    return weights.astype(np.float64), feed


def _within(count: int, limit: int, field: str, what: str) -> None:
    if count > limit:
        raise RequestError(413, f"field '{field}': {count:,} {what}, more than the limit {limit:,}")


def make_app(engine: Engine, on_failure: Callable[[], None] = lambda: None) -> Starlette:
    """The HTTP app: POST /rank, POST /retrieve, GET /healthz, /readyz, /metrics. The engine
    starts with the app and is closed after its last request is answered."""
    options = engine.options

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start(on_failure)
        yield
        await asyncio.to_thread(engine.close)

    def serving() -> Served:
        served = engine.served
        if served is None:
            raise RequestError(503, "not ready: the checkpoint is still loading")
        return served

    async def rank_job(request: Request) -> Job:
        served = serving()
        if served.ranker is None:
            raise RequestError(404, f"step {served.step} has no ranker (it trained with loss.ranking_weight=0)")
        record = await _json_body(request, options.max_body_bytes)
        weights, feed = _scoring(request, served)
        session = served.parser.parse_record(record)
        _within(len(session.candidate_post_id), options.max_candidates, "candidates", "candidates")
        _within(len(session.history_post_id), options.max_history, "history", "history items")
        return Job("rank", session, weights, feed)

    async def retrieve_job(request: Request) -> Job:
        served = serving()
        if served.index is None:
            raise RequestError(
                404, "no corpus to retrieve from (start phoenix-serve with --corpus and a retrieval model)"
            )
        body = await _json_body(request, options.max_body_bytes)
        if not isinstance(body, dict):
            raise RequestError(400, f"body: expected a JSON object, got {type(body).__name__}")
        top_k, then_rank = body.get("top_k"), body.get("then_rank", False)
        if type(top_k) is not int or top_k < 1:
            raise RequestError(400, f"field 'top_k': expected a whole number >= 1, got {top_k!r}")
        _within(top_k, options.max_top_k, "top_k", "posts")
        if type(then_rank) is not bool:
            raise RequestError(400, f"field 'then_rank': expected true or false, got {then_rank!r}")
        if then_rank and served.ranker is None:
            raise RequestError(404, f"then_rank: step {served.step} has no ranker")
        weights, feed = _scoring(request, served)
        session = served.history_parser.parse_record({"user_id": body.get("user_id"), "history": body.get("history")})
        _within(len(session.history_post_id), options.max_history, "history", "history items")
        return Job("retrieve", session, weights, feed, top_k=top_k, then_rank=then_rank)

    def endpoint(name: str, make_job: Callable):
        async def handle(request: Request) -> Response:
            started = time.perf_counter()
            try:
                job = await make_job(request)
                line, step = await asyncio.wrap_future(engine.submit(job))
                response = Response(
                    json.dumps(line, allow_nan=False),
                    media_type="application/json",
                    headers={"X-Phoenix-Step": str(step)},
                )
            except (RequestError, RecordError) as e:
                response = JSONResponse({"error": str(e)}, getattr(e, "status", 400))
            except Exception as e:  # a bug, reported by the model thread
                response = JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
            engine.requests.labels(name, str(response.status_code)).inc()
            engine.latency.labels(name).observe(time.perf_counter() - started)
            return response

        return handle

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if engine.ready:
            return JSONResponse({"status": "ready", "step": engine.served.step})
        return JSONResponse({"status": "loading" if engine.failure is None else f"failed: {engine.failure}"}, 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(engine.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/rank", endpoint("rank", rank_job), methods=["POST"]),
            Route("/retrieve", endpoint("retrieve", retrieve_job), methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
