"""The training loop: sharded steps, evaluation, Orbax checkpoints, resumable and preemption-safe.

Metrics go to `WORKDIR/metrics.jsonl` and TensorBoard files in `WORKDIR/tensorboard`;
checkpoints to `WORKDIR/checkpoints`. Started again on the same workdir, a run continues from
its newest checkpoint that restores completely, exactly as if it had not stopped (damaged newer
steps are reported and moved aside). SIGTERM saves a checkpoint and stops. The workdir is locked
while a run trains in it. Everything that can be checked before device work is checked first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from phoenix_flax.checkpoint.manager import Checkpointer
from phoenix_flax.checkpoint.restore import check_compatible, restore_newest
from phoenix_flax.cli import log
from phoenix_flax.config import ConfigError, ExperimentConfig, dumps, replace_fields
from phoenix_flax.config.experiment import eval_metric_names
from phoenix_flax.data.batch import labeled_candidates
from phoenix_flax.data.counting import PostCounts
from phoenix_flax.data.pipeline import (
    dataset_actions,
    dataset_splits,
    dataset_statistics,
    global_batch,
    make_dataset,
    open_source,
)
from phoenix_flax.errors import DamagedCheckpointError, PhoenixError
from phoenix_flax.evaluation.metrics import auc, weighted_auc
from phoenix_flax.extensions import fits_post_hoc, scores_with_counts
from phoenix_flax.files import OutputError, replaced
from phoenix_flax.model.scoring import action_weights
from phoenix_flax.sharding import make_mesh, mesh_shape, use_mesh
from phoenix_flax.step.model import PhoenixModel
from phoenix_flax.step.optimizer import averaged_weights
from phoenix_flax.step.step import create_train_state, make_eval_step, make_train_step
from phoenix_flax.training.workdir import WorkdirLock

BAD_STEP_METRICS = ("skipped", "bad_steps_in_a_row")  # per step; the log has each window's count


class BadStepsError(PhoenixError):
    exit_code = 3

    def __init__(self, step: int, limit: int, position):
        super().__init__(
            f"{limit} bad steps in a row up to step {step} (gradient norms not finite or above "
            f"optimizer.bad_step_norm_factor x their median; all skipped, nothing of them applied); the "
            f"last batch came from data position {position}"
        )


class NonFiniteLossError(PhoenixError):
    exit_code = 3

    def __init__(self, step: int, position, metrics: dict):
        self.step, self.position = step, position
        super().__init__(
            f"non-finite loss at step {step} (metrics {metrics}); the batch came from data position "
            f"{position}. Nothing from this step on was saved."
        )


class Preemption:
    """Turns SIGTERM into a flag the loop checks at step boundaries."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def any_process(self) -> bool:
        """Whether any process was asked to stop (a collective with several processes)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class MetricWriter:
    """Metrics as JSON Lines (`metrics.jsonl`) and TensorBoard event files, from process 0 only.

    A run resumed from step N continues the log: lines of later steps (written by the run that
    stopped, and trained again now) are dropped first, so no step appears twice, and so is a
    line a crash cut short (with a notice); the complete ones are kept. The event file starts
    with a restart at step N + 1, from which TensorBoard hides the stopped run's events.

    Events are written and flushed with each metrics line, in the caller's thread (not by
    tensorboardX's SummaryWriter, whose thread and exit hook held unwritten events that a full
    disk then failed a second time, after the program's one-line error).
    """

    def __init__(self, workdir: str, resume_step: int, name: str = "metrics", report: Callable[[str], None] = log):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, f"{name}.jsonl")
        if os.path.exists(self.path):
            kept = []
            with open(self.path, errors="replace") as f:
                for number, line in enumerate(f, 1):
                    try:
                        step = json.loads(line)["step"] if line.strip() else None
                    except (ValueError, KeyError, TypeError):
                        report(
                            f"note: {self.path}:{number}: dropped an incomplete line (a write cut short): {line[:60]!r}"
                        )
                        continue
                    if step is not None and step <= resume_step:
                        kept.append(line.rstrip("\n") + "\n")
            with replaced(self.path) as f:
                f.writelines(kept)
        self.jsonl = open(self.path, "a")  # noqa: SIM115  (open for the run; closed by __exit__)
        self.tb_dir = os.path.join(workdir, "tensorboard")
        try:
            os.makedirs(self.tb_dir, exist_ok=True)
            # its name holds the time in seconds: a suffix keeps a run resumed within the same second apart
            self.events = EventsWriter(os.path.join(self.tb_dir, "events"), f".{time.time_ns()}")
            self.events.write_event(Event(step=resume_step + 1, session_log=SessionLog(status=SessionLog.START)))
            self.events.flush()
        except OSError as e:
            self.jsonl.close()
            raise OutputError(f"cannot write {self.tb_dir}: {e.strerror or e}") from e

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        try:
            self.jsonl.write(json.dumps({"step": step, "time": now, **metrics}) + "\n")
            self.jsonl.flush()
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from e
        try:
            for k, v in metrics.items():
                self.events.write_event(Event(wall_time=now, step=step, summary=scalar(k, v)))
            self.events.flush()
        except OSError as e:
            raise OutputError(f"cannot write {self.tb_dir}: {e.strerror or e}") from e

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, kind, error, tb) -> None:
        """Closes the files."""
        if not self.enabled:
            return
        with contextlib.suppress(OSError):  # every line and event was flushed, or its failure raised
            self.jsonl.close()
            self.events.close()


def preflight(cfg: ExperimentConfig) -> set[str]:
    """What can be checked before any device work: the dataset, its splits and vocabulary
    against the model, and the batch against processes and the mesh. Returns the dataset's
    splits; raises ConfigError naming every problem."""
    data = cfg.data
    try:
        splits, actions, stats = (
            dataset_splits(data.data_dir),
            dataset_actions(data.data_dir),
            dataset_statistics(data.data_dir),
        )
    except PhoenixError as e:
        raise ConfigError(f"data.data_dir={data.data_dir!r}: {e}") from None
    problems = []
    if data.train_split not in splits:
        problems.append(f"data.train_split={data.train_split!r}: the dataset has splits {sorted(splits)}")
    if cfg.checkpoint.best_metric and data.eval_split not in splits:
        problems.append(
            f"checkpoint.best_metric={cfg.checkpoint.best_metric!r} needs the evaluation split "
            f"data.eval_split={data.eval_split!r}, which the dataset lacks (it has {sorted(splits)}); "
            "prepare one, or set --config.checkpoint.best_metric= to keep no best checkpoint"
        )
    for key, names in (("model.actions", cfg.model.actions), ("data.positive_actions", data.positive_actions)):
        missing = [a for a in names if a not in actions]
        if missing:
            problems.append(f"{key}: {missing} are not in the dataset's vocabulary {list(actions)}")
    for split, s in stats.get("splits", {}).items():
        top = s.get("max_product_surface", -1)
        if top >= cfg.model.product_surface_vocab_size:
            problems.append(
                f"model.product_surface_vocab_size={cfg.model.product_surface_vocab_size}: split {split!r} has "
                f"product_surface {top}; the vocabulary must cover it"
            )
    processes, devices = jax.process_count(), jax.device_count()
    if data.batch_size % processes:
        problems.append(f"data.batch_size={data.batch_size}: does not divide over {processes} processes")
    try:
        shape = dict(zip(("data", "fsdp", "model"), mesh_shape(cfg.mesh.axis_sizes(), devices), strict=True))
        batch_devices = shape["data"] * shape["fsdp"]
        if data.batch_size % batch_devices:
            problems.append(
                f"data.batch_size={data.batch_size}: does not divide over the mesh's data x fsdp = {batch_devices} devices"
            )
    except ValueError as e:
        problems.append(f"mesh: {e}")
    if problems:
        raise ConfigError(problems)
    return splits


def validation_pass(model, cfg: ExperimentConfig, eval_step, mesh, counts: PostCounts | None):
    """Over the first `eval.batches` validation batches (the same ones each time), reading only:
    the mean losses `{eval_<name>: float}` and, with a ranker, every process's valid candidates
    gathered on the host (`"labels"` `[N, A]` and, for `ExtendedRanker.fit_post_hoc`, the logits
    or, with the count blend, their parts and `"counts"`, the candidates' counted log-odds)."""
    blend = scores_with_counts(model.ranker)
    data = iter(make_dataset(cfg.model, cfg.data, cfg.data.eval_split, shuffle=False))
    totals: dict[str, list] = {}
    gathered: dict[str, list] = {}  # per key, the valid candidates' values of each batch
    for _ in range(cfg.eval.batches):
        local = next(data)
        batch = global_batch(local if counts is None else counts.with_log_odds(local), mesh, cfg.mesh.logical_rules())
        metrics, outputs = eval_step(model, batch)
        for k, v in metrics.items():
            totals.setdefault(k, []).append(v)
        if "logits" in outputs:
            if blend:  # what the blend weighs
                wanted = {**outputs["logit_parts"], "counts": batch["candidate_count_logits"]}
            else:
                wanted = {"logits": outputs["logits"]}
            wanted["labels"] = batch["candidate_actions"]
            got, valid = multihost_utils.process_allgather((wanted, labeled_candidates(batch)), tiled=True)
            for k, v in got.items():
                gathered.setdefault(k, []).append(v[valid])
    losses = {f"eval_{k}": float(np.mean(jax.device_get(v))) for k, v in totals.items()}
    return losses, {k: np.concatenate(v) for k, v in gathered.items()}


def ranking_metrics(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None) -> dict[str, float]:
    """The actions' mean AUC and, with the actions' score `weights [A]`, the weighted score's AUC,
    of logits `[N, A]`.
    An AUC without both classes is undefined: left out (the step is then no candidate for the
    best checkpoint), never written as a number."""
    result = {}
    probs = 1 / (1 + np.exp(-logits))
    aucs = [a for a in (auc(probs[:, i], labels[:, i]) for i in range(labels.shape[1])) if np.isfinite(a)]
    if aucs:
        result["eval_mean_auc"] = float(np.mean(aucs))
    if weights is not None and np.isfinite(w := weighted_auc(probs, labels, weights)):
        result["eval_weighted_auc"] = w
    return result


def evaluate_during_training(
    model, cfg: ExperimentConfig, eval_step, mesh, counts: PostCounts | None
) -> dict[str, float]:
    """The validation metrics a step logs (`eval_metric_names`): `validation_pass`, then, where the
    ranker has post-hoc heads (`ExtendedRanker.fit_post_hoc`: calibration shifts, count blend), the
    named step that fits them on those candidates and sets them in `model` (every process fits the
    same, from the gathered values), so that the checkpoint saved at this step holds them and the
    AUCs are of what it serves."""
    result, got = validation_pass(model, cfg, eval_step, mesh, counts)
    if got:
        if fits_post_hoc(model.ranker):
            logits = model.ranker.fit_post_hoc(got, counts, cfg.eval)
        else:
            logits = got["logits"]
        weighted = "eval_weighted_auc" in eval_metric_names(cfg.loss, cfg.eval, cfg.model)
        result |= ranking_metrics(logits, got["labels"], action_weights(cfg.model.actions) if weighted else None)
    return result


def _resume(checkpoints: Checkpointer, cfg: ExperimentConfig, model, optimizer, data, report) -> int:
    """The step training continues from (0 for a new run), its state restored into the arguments."""
    steps = checkpoints.all_steps()
    if not steps:
        return 0
    for step in sorted(steps, reverse=True):  # the newest config that reads decides compatibility
        try:
            saved = checkpoints.config(step)
        except DamagedCheckpointError:
            continue
        differences = check_compatible(saved, cfg, step)  # before any restore: a mismatch is no damage
        if differences:
            report("resuming with a config that differs from the checkpoint's: " + "; ".join(differences))
        break
    step = restore_newest(checkpoints, model, optimizer, data, report)
    report(f"resumed from step {step}")
    return step


def train(
    cfg: ExperimentConfig,
    workdir: str,
    *,
    stop_after: int | None = None,
    report: Callable[[str], None] = log,
) -> list[dict]:
    """Trains to `cfg.train.steps` (or `stop_after` more steps); returns the logged metrics."""
    splits = preflight(cfg)
    sessions = len(open_source(cfg.data.data_dir, cfg.data.train_split))
    if cfg.train.epochs is not None:
        steps = max(1, math.ceil(cfg.train.epochs * sessions / cfg.data.batch_size))
        cfg = replace_fields(cfg, train={"steps": steps})
        report(
            f"train.epochs={cfg.train.epochs:g}: {steps:,} steps of {cfg.data.batch_size} over {sessions:,} sessions"
        )
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            lock = stack.enter_context(WorkdirLock(workdir))
            if lock.stale:
                report(f"note: a previous run ({lock.stale}); taking it over")
        mesh = make_mesh(cfg.mesh.axis_sizes())
        report(
            f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
            f"{jax.process_count()} process(es)"
        )
        model, optimizer = create_train_state(cfg, mesh, steps_per_epoch=sessions / cfg.data.batch_size)
        report(f"{sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))):,} parameters")
        data = iter(make_dataset(cfg.model, cfg.data, cfg.data.train_split, packed=cfg.data.packed))
        checkpoints = stack.enter_context(Checkpointer(workdir, cfg.checkpoint))
        step = _resume(checkpoints, cfg, model, optimizer, data, report)
        counts = None
        if scores_with_counts(model.ranker):
            counts = PostCounts.of_split(cfg, cfg.model.actions)
            report(f"model.count_blend: counted {len(counts.post_ids):,} posts in '{cfg.data.train_split}'")
        if jax.process_index() == 0:
            with replaced(os.path.join(workdir, "config.json")) as f:
                f.write(dumps(cfg))
        writer = stack.enter_context(MetricWriter(workdir, resume_step=step, report=report))
        preemption = Preemption()
        stack.callback(preemption.restore)
        stack.enter_context(use_mesh(mesh, cfg.mesh.logical_rules()))  # the steps trace with the rules
        has_eval = cfg.eval.batches > 0 and cfg.data.eval_split in splits
        if fits_post_hoc(model.ranker) and not has_eval:
            report(
                f"note: no validation during training (eval.batches={cfg.eval.batches}, splits {sorted(splits)}): "
                "the calibration shifts (model.calibration) stay 0, and the blend (model.count_blend) the logits' own sum"
            )
        run = TrainRun(cfg, mesh, model, optimizer, data, checkpoints, writer, preemption, counts, has_eval, report)
        last = cfg.train.steps if stop_after is None else min(cfg.train.steps, step + stop_after)
        return _loop(run, step, last)


@dataclasses.dataclass
class TrainRun:
    """What the loop works with: the config, the mesh, the train state and everything it reads
    from or writes to."""

    cfg: ExperimentConfig
    mesh: jax.sharding.Mesh
    model: PhoenixModel
    optimizer: nnx.Optimizer
    data: Iterator  # the training split's pipeline, resumable (`get_state`)
    checkpoints: Checkpointer
    writer: MetricWriter
    preemption: Preemption
    counts: PostCounts | None  # the training split's post counts, with model.count_blend
    has_eval: bool  # whether to evaluate (and fit post-hoc heads) during training
    report: Callable[[str], None]


def _loop(run: TrainRun, step: int, last: int) -> list[dict]:
    """Steps from `step` to `last`, logging, evaluating and saving as the config says."""
    cfg, mesh, model, optimizer, data, checkpoints = (
        run.cfg,
        run.mesh,
        run.model,
        run.optimizer,
        run.data,
        run.checkpoints,
    )
    train_step = nnx.cached_partial(make_train_step(cfg.loss), model, optimizer)
    rules = cfg.mesh.logical_rules()
    eval_step = make_eval_step(cfg.loss)
    logged: list[dict] = []
    window: list[tuple[int, object, dict]] = []  # device metrics since the last host sync
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", unit="step", disable=jax.process_index() != 0)
    window_start = time.perf_counter()

    def flush() -> None:
        """The one host sync: fetch the window's metrics, stop on a non-finite loss, log means."""
        nonlocal window, window_start
        if not window:
            return
        fetched = jax.device_get([m for _, _, m in window])
        limit, too_many = cfg.optimizer.max_bad_steps_in_a_row, None
        for (s, position, _), m in zip(window, fetched, strict=True):
            if m.get("bad_steps_in_a_row", 0) >= limit:
                too_many = too_many or BadStepsError(s, limit, position)  # raised once the window is logged
            elif not m.get("skipped") and not all(np.isfinite(v) for v in m.values()):
                raise NonFiniteLossError(s, position, {k: float(v) for k, v in m.items()})
        elapsed = time.perf_counter() - window_start
        kept = [m for m in fetched if not m.get("skipped")]  # a skipped step's figures may be NaN: not logged
        means = {k: float(np.mean([m[k] for m in kept])) for k in fetched[0] if kept and k not in BAD_STEP_METRICS}
        if "skipped" in fetched[0]:
            means["skipped_steps"] = sum(int(m["skipped"]) for m in fetched)
        means["steps_per_second"] = len(window) / elapsed
        means["sessions_per_second"] = sum(int(m["sessions"]) for m in fetched) / elapsed
        run.writer.write(window[-1][0], means)
        logged.append({"step": window[-1][0], **means})
        if too_many:
            raise too_many
        bar.set_postfix(
            loss=f"{means.get('loss', math.nan):.4f}",
            steps_s=f"{means['steps_per_second']:.1f}",
            sessions_s=f"{means['sessions_per_second']:,.0f}",
        )
        bar.update(window[-1][0] - bar.n)
        checkpoints.record_finished()  # a completed asynchronous save gets its integrity record
        window, window_start = [], time.perf_counter()

    try:
        while step < last:
            position = data.get_state()
            metrics = train_step(global_batch(next(data), mesh, rules))
            step += 1
            window.append((step, position, metrics))
            boundary = step % cfg.train.log_every == 0 or step == last
            if boundary:
                flush()
            stop = boundary and run.preemption.any_process()
            eval_metrics = None
            if run.has_eval and (step % cfg.eval.every_steps == 0 or step == last or stop):
                flush()
                with averaged_weights(model, optimizer):  # what evaluation and serving will restore
                    eval_metrics = evaluate_during_training(model, cfg, eval_step, mesh, run.counts)
                run.writer.write(step, eval_metrics)
                logged.append({"step": step, **eval_metrics})
            if step % cfg.checkpoint.every_steps == 0 or step == last or stop:
                flush()  # never save parameters a non-finite step may have touched
                checkpoints.save(step, model, optimizer, data, cfg, metrics=eval_metrics, counts=run.counts)
            if stop:
                run.report(f"preempted: saved step {step}, exiting")
                break
    finally:
        bar.close()
    return logged
