"""Orbax checkpoints of a run: model, optimizer, data-iterator position and config, verified.

Each step's checkpoint holds the items `model`, `optimizer`, `data` (grain.checkpoint) and
`config` (JSON), and Orbax's `metrics`; with `optimizer.ema_decay`, also `average`: the
parameters' moving average (part of the optimizer's state too, which training resumes from),
which evaluation and serving restore without the optimizer; with `model.count_blend`, also
`counts`: the post counts the model scores with. Saves are asynchronous. Once a
save is complete, its integrity record (`integrity.json` in the step's directory: every file's
size and SHA-256) is written; restoring checks it, so a truncated, missing or altered file is
found before anything is trained on. The latest K steps are kept, the best by an evaluation
metric beside them, and never deleted: the newest step whose record was written.

A damaged step (a file missing, truncated or changed, an item Orbax cannot read, non-finite
parameters) is reported in one line naming the step, the item and why. Training resumes from
the newest step that restores completely and moves the damaged newer ones aside
(`WORKDIR/damaged/`); evaluation and serving skip them. Restoring places arrays with the
shardings of the target given, so a checkpoint restores onto any mesh or device count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from phoenix_flax.checkpoint.integrity import INTEGRITY_FILE, check_integrity, write_integrity
from phoenix_flax.checkpoint.orbax_workarounds import (
    AbandonedIO,
    failed_item,
    root_cause,
    without_read_only_notices,
    write_failure,
)
from phoenix_flax.config import CheckpointConfig, ExperimentConfig, from_dict, to_dict
from phoenix_flax.data.counting import PostCounts
from phoenix_flax.errors import CheckpointError, CheckpointSaveError, DamagedCheckpointError, PhoenixError
from phoenix_flax.step.optimizer import averaged_params

ITEMS = ("model", "optimizer", "data", "config")  # every step's
AVERAGE = "average"  # a step's with optimizer.ema_decay
COUNTS = "counts"  # a step's with model.count_blend: the post counts it scores with


@jax.jit
def _non_finite(state) -> dict:
    return jax.tree.map(lambda x: ~jnp.all(jnp.isfinite(x)), state)


def _check_finite(step: int, item: str, state) -> None:
    """Training never saves after a non-finite loss, so a non-finite parameter is damage."""
    floating = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros((), jnp.float32), state)
    flags = jax.device_get(_non_finite(floating))
    bad = [jax.tree_util.keystr(p) for p, flag in jax.tree_util.tree_leaves_with_path(flags) if flag]
    if bad:
        raise DamagedCheckpointError(
            step, item, f"non-finite values in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        )


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def damaged_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "damaged")


class _NewestRecorded:
    """An Orbax preservation policy: preserves the newest step whose integrity record is written: the last step known good is
    never deleted, whatever the other policies say."""

    def __init__(self, recorded: Callable[[], set[int]]):
        self.recorded = recorded

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        recorded = self.recorded()
        newest = max((c.step for c in checkpoints if c.step in recorded), default=None)
        return [c.step == newest for c in checkpoints]


class Checkpointer:
    """A run's checkpoints. Use as a context manager (or call `close`): Orbax's background
    threads finish, and the last save's integrity record is written, on every exit path."""

    def __init__(self, workdir: str, cfg: CheckpointConfig | None = None, *, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        self.workdir, self.cfg, self.read_only = workdir, cfg, read_only
        self.directory = checkpoint_dir(workdir)
        self._unrecorded: list[int] = []  # saved steps whose integrity record is still to write
        self.failed = False  # a save failed to write (CheckpointSaveError)
        policies = [
            ocp.checkpoint_managers.preservation_policy.LatestN(cfg.keep),
            _NewestRecorded(self._recorded_steps),
        ]
        worst = float("inf") if cfg.best_mode == "min" else float("-inf")

        def metric(metrics: dict) -> float:  # a step saved under another best_metric ranks last
            return float(metrics.get(cfg.best_metric, worst))

        if cfg.best_metric:
            policies.append(
                ocp.checkpoint_managers.preservation_policy.BestN(
                    get_metric_fn=metric, reverse=cfg.best_mode == "min", n=1, keep_checkpoints_without_metrics=False
                )
            )
        with without_read_only_notices() if read_only else contextlib.nullcontext():
            options = ocp.CheckpointManagerOptions(
                # best_fn makes Orbax write each checkpoint's metrics and read them back on resume.
                best_fn=metric if cfg.best_metric else None,
                best_mode=cfg.best_mode,
                enable_async_checkpointing=True,  # synchronous saves wait at once (`cfg.asynchronous`)
                preservation_policy=ocp.checkpoint_managers.preservation_policy.AnyPreservationPolicy(policies),
                read_only=read_only,
                create=not read_only,
                cleanup_tmp_directories=not read_only,  # the partial steps of a failed save or a kill
            )
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(*ITEMS, AVERAGE, COUNTS))
        if not read_only:
            AbandonedIO.watch(self.directory)  # before any save: a failed one is reported once, by `_writing`

    @classmethod
    def open_run(cls, workdir: str) -> Checkpointer:
        """A run's checkpoints, read-only, with its own checkpoint config (for 'best')."""
        if not os.path.isdir(checkpoint_dir(workdir)):
            raise CheckpointError(f"no checkpoints in {workdir} (expected {checkpoint_dir(workdir)})")
        with cls(workdir, read_only=True) as plain:
            saved = None
            for step in sorted(plain.all_steps(), reverse=True):
                with contextlib.suppress(DamagedCheckpointError):
                    saved = plain.config(step).checkpoint
                    break
        return cls(workdir, saved, read_only=True)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _recorded_steps(self) -> set[int]:
        return {s for s in self.manager.all_steps() if os.path.exists(os.path.join(self.step_dir(s), INTEGRITY_FILE))}

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (None when no checkpoint has metrics)."""
        return self.manager.best_step()

    # Saving.

    def save(
        self,
        step: int,
        model,
        optimizer,
        data_iterator,
        config: ExperimentConfig,
        metrics=None,
        counts: PostCounts | None = None,
    ) -> None:
        """Saves a step's items; `counts`: the post counts the model scores with (the count blend),
        saved in the step under its integrity record, so that the step serves what it was fit with."""
        self.wait()  # the previous save complete and recorded: the retention policy sees it as good
        items = {
            "model": ocp.args.StandardSave(nnx.state(model)),
            "optimizer": ocp.args.StandardSave(nnx.state(optimizer)),
            "data": grain.checkpoint.CheckpointSave(data_iterator),
            "config": ocp.args.JsonSave(to_dict(config)),
        }
        average = averaged_params(optimizer)
        if average is not None:
            items[AVERAGE] = ocp.args.StandardSave(average)
        if counts is not None:
            items[COUNTS] = ocp.args.StandardSave(counts.arrays())
        args = ocp.args.Composite(**items)
        with self._writing([step]):
            self.manager.save(step, args=args, metrics=metrics, force=True)
        self._unrecorded.append(step)
        if not self.cfg.asynchronous:
            self.wait()

    @contextlib.contextmanager
    def _writing(self, steps: Sequence[int]):
        """A save that fails to write (a full disk, a file-size limit, a read-only folder) raises
        CheckpointSaveError in one line; the saved steps stay, and the next run removes the partial one."""
        try:
            yield
        except Exception as e:
            reason = write_failure(root_cause(e))
            if reason is None:
                raise
            self.failed = AbandonedIO.installed.save_failed = True
            saved = [s for s in self.manager.all_steps() if s not in steps]
            raise CheckpointSaveError(steps, self.directory, reason, max(saved, default=None)) from e

    def record_finished(self) -> None:
        """Writes the integrity records of saves that have completed (cheap when none has)."""
        if self._unrecorded and not self.manager.is_saving_in_progress():
            self._record()

    def _record(self) -> None:
        # A step without its folder failed: it stays, for the error the next wait raises to name.
        done = [step for step in self._unrecorded if os.path.isdir(self.step_dir(step))]
        if jax.process_index() == 0:  # every process's shards are written once Orbax finalizes
            for step in done:
                write_integrity(self.step_dir(step))
        self._unrecorded = [step for step in self._unrecorded if step not in done]

    def wait(self) -> None:
        with self._writing(self._unrecorded):
            self.manager.wait_until_finished()
        self._record()

    def close(self) -> None:
        if self.failed:  # said once already; what is left of Orbax's threads only needs stopping
            with contextlib.suppress(Exception):
                self.manager.close()
            return
        try:
            self.wait()
        finally:
            self.manager.close()

    # Restoring.

    def verify(self, step: int, items: Sequence[str] = ITEMS) -> str | None:
        """Checks the step's files for `items`; returns its digest (None without a record)."""
        return check_integrity(step, self.step_dir(step), items)

    def _restore_items(self, step: int, items: dict) -> dict:
        AbandonedIO.watch(self.directory)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # whatever Orbax or tensorstore raise on bad files
            cause = root_cause(e)
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise DamagedCheckpointError(step, failed_item(e, (*ITEMS, AVERAGE, COUNTS)), reason[:400]) from e

    def restore(self, step: int, model, optimizer=None, data_iterator=None, *, average: bool = False) -> str | None:
        """Restores into `model` (and `optimizer`, `data_iterator`) in place, on their shardings,
        after checking the step's files; with `average`, the model's parameters are the saved
        moving average. Returns the step's digest (None without a record).
        Raises DamagedCheckpointError naming the step, the item and why."""
        items = {"model": ocp.args.StandardRestore(_target(nnx.state(model)))}
        if average:
            items[AVERAGE] = ocp.args.StandardRestore(_target(nnx.as_pure(nnx.state(model, nnx.Param))))
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(_target(nnx.state(optimizer)))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if optimizer is None:
            digest = self.verify(step, (*items, "config"))
        else:  # a resume: the step goes on to be served, so every item it has must be whole
            saved = [
                item for item in (*ITEMS, AVERAGE, COUNTS) if os.path.isdir(os.path.join(self.step_dir(step), item))
            ]
            digest = self.verify(step, saved)
        restored = self._restore_items(step, items)
        _check_finite(step, "model", restored["model"])
        nnx.update(model, restored["model"])
        if average:
            _check_finite(step, AVERAGE, restored[AVERAGE])
            nnx.update(model, restored[AVERAGE])
        if optimizer is not None:
            _check_finite(step, "optimizer", restored["optimizer"])
            nnx.update(optimizer, restored["optimizer"])
        return digest

    def counts(self, step: int, actions: Sequence[str]) -> PostCounts:
        """The post counts saved with the step (`save`'s `counts`), for `actions` (its config's)."""
        self.verify(step, (COUNTS,))
        restored = self._restore_items(step, {COUNTS: ocp.args.StandardRestore()})[COUNTS]
        try:
            return PostCounts.from_arrays({k: np.asarray(v) for k, v in restored.items()}, actions)
        except (KeyError, ValueError) as e:
            raise DamagedCheckpointError(step, COUNTS, f"not the post counts training saves ({e})") from None

    def config(self, step: int) -> ExperimentConfig:
        self.verify(step, ("config",))
        restored = self._restore_items(step, {"config": ocp.args.JsonRestore()})
        try:
            return from_dict(restored["config"])
        except PhoenixError as e:
            raise DamagedCheckpointError(step, "config", f"not a config this version reads: {e}") from None

    def set_aside(self, step: int) -> str:
        """Moves a damaged step out of the run (never deleted): `WORKDIR/damaged/<step>[-k]`."""
        os.makedirs(damaged_dir(self.workdir), exist_ok=True)
        target, k = os.path.join(damaged_dir(self.workdir), str(step)), 1
        while os.path.exists(target):
            target, k = os.path.join(damaged_dir(self.workdir), f"{step}-{k}"), k + 1
        os.rename(self.step_dir(step), target)
        return target


def _target(state):
    """An abstract pytree with the shapes, dtypes and shardings of `state`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
