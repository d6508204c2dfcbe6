"""The training loop: sharded steps, evaluation, Orbax checkpoints, resumable and preemption-safe.

Metrics go to `WORKDIR/metrics.jsonl` and TensorBoard files in `WORKDIR/tensorboard`;
checkpoints to `WORKDIR/checkpoints`. Started again on the same workdir, a run continues from
its latest checkpoint exactly as if it had not stopped. SIGTERM saves a checkpoint and stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from phoenix_flax.checkpoint import Checkpointer
from phoenix_flax.cli import log
from phoenix_flax.config import ExperimentConfig, dumps
from phoenix_flax.data.pipeline import dataset_splits, global_batch, make_dataset
from phoenix_flax.sharding import make_mesh
from phoenix_flax.training import create_train_state, make_eval_step, make_train_step


class NonFiniteLossError(RuntimeError):
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
    """Metrics as JSON Lines (`metrics.jsonl`) and TensorBoard event files, from process 0 only."""

    def __init__(self, workdir: str, name: str = "metrics"):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, f"{name}.jsonl")
        self.jsonl = open(self.path, "a")  # noqa: SIM115  (open for the run; closed by close())
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def evaluate_during_training(model, cfg: ExperimentConfig, eval_step, mesh) -> dict[str, float]:
    """Mean metrics over the first `eval.batches` validation batches (the same ones each time)."""
    data = iter(make_dataset(cfg.model, cfg.data, cfg.data.eval_split, shuffle=False))
    totals: dict[str, list] = {}
    for _ in range(cfg.eval.batches):
        metrics, _ = eval_step(model, global_batch(next(data), mesh))
        for k, v in metrics.items():
            totals.setdefault(k, []).append(v)
    return {f"eval_{k}": float(np.mean(jax.device_get(v))) for k, v in totals.items()}


def train(cfg: ExperimentConfig, workdir: str, *, stop_after: int | None = None) -> list[dict]:
    """Trains to `cfg.train.steps` (or `stop_after` more steps); returns the logged metrics."""
    mesh = make_mesh(dataclasses.asdict(cfg.mesh))
    log(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)"
    )
    model, optimizer = create_train_state(cfg, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(f"{n_params:,} parameters")

    data = iter(make_dataset(cfg.model, cfg.data, cfg.data.train_split))
    checkpoints = Checkpointer(workdir, cfg.checkpoint)
    step = 0
    if (latest := checkpoints.latest_step()) is not None:
        saved = checkpoints.config(latest)
        if saved != cfg:
            log("warning: the config differs from the one the checkpoint was saved with")
        checkpoints.restore(latest, model, optimizer, data)
        step = latest
        log(f"resumed from step {step}")
    if jax.process_index() == 0:
        with open(f"{workdir}/config.json", "w") as f:
            f.write(dumps(cfg))

    train_step = nnx.cached_partial(make_train_step(cfg.loss), model, optimizer)
    eval_step = make_eval_step(cfg.loss)
    has_eval = cfg.data.eval_split in dataset_splits(cfg.data.data_dir)
    writer = MetricWriter(workdir)
    preemption = Preemption()
    last = cfg.train.steps if stop_after is None else min(cfg.train.steps, step + stop_after)
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
        for (s, position, _), m in zip(window, fetched, strict=True):
            if not all(np.isfinite(v) for v in m.values()):
                raise NonFiniteLossError(s, position, {k: float(v) for k, v in m.items()})
        elapsed = time.perf_counter() - window_start
        means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        means["steps_per_second"] = len(window) / elapsed
        means["sessions_per_second"] = len(window) * cfg.data.batch_size / elapsed
        writer.write(window[-1][0], means)
        logged.append({"step": window[-1][0], **means})
        bar.set_postfix(
            loss=f"{means['loss']:.4f}",
            steps_s=f"{means['steps_per_second']:.1f}",
            sessions_s=f"{means['sessions_per_second']:,.0f}",
        )
        bar.update(window[-1][0] - bar.n)
        window, window_start = [], time.perf_counter()

    try:
        while step < last:
            position = data.get_state()
            metrics = train_step(global_batch(next(data), mesh))
            step += 1
            window.append((step, position, metrics))
            boundary = step % cfg.train.log_every == 0 or step == last
            if boundary:
                flush()
            stop = boundary and preemption.any_process()
            eval_metrics = None
            if has_eval and (step % cfg.eval.every_steps == 0 or step == last or stop):
                flush()
                eval_metrics = evaluate_during_training(model, cfg, eval_step, mesh)
                writer.write(step, eval_metrics)
                logged.append({"step": step, **eval_metrics})
            if step % cfg.checkpoint.every_steps == 0 or step == last or stop:
                flush()  # never save parameters a non-finite step may have touched
                checkpoints.save(step, model, optimizer, data, cfg, metrics=eval_metrics)
            if stop:
                log(f"preempted: saved step {step}, exiting")
                break
    finally:
        bar.close()
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        preemption.restore()
    return logged
