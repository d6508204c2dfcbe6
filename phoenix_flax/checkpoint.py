"""Orbax checkpoints of a run: model, optimizer, data-iterator position and config, verified.

Each step's checkpoint holds the items `model`, `optimizer`, `data` (grain.checkpoint) and
`config` (JSON), and Orbax's `metrics`; with `optimizer.ema_decay`, also `average`: the
parameters' moving average (part of the optimizer's state too, which training resumes from),
which evaluation and serving restore without the optimizer. Saves are asynchronous. Once a
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
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from phoenix_flax.config import CheckpointConfig, ExperimentConfig, from_dict, to_dict
from phoenix_flax.counting import PostCounts
from phoenix_flax.errors import PhoenixError
from phoenix_flax.model import PhoenixModel
from phoenix_flax.sharding import make_mesh
from phoenix_flax.training import abstract_model, abstract_train_state, averaged_params

ITEMS = ("model", "optimizer", "data", "config")  # every step's
AVERAGE = "average"  # a step's with optimizer.ema_decay
INTEGRITY_FILE = "integrity.json"


class CheckpointError(PhoenixError):
    """A run's checkpoints cannot be used as asked."""


class DamagedCheckpointError(CheckpointError):
    def __init__(self, step: int, item: str, reason: str):
        self.step, self.item, self.reason = step, item, reason
        super().__init__(f"checkpoint step {step} is damaged: {item}: {reason}")


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was written by a model or optimizer of other shapes than the config's."""


# --- integrity records ----------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_integrity(step_dir: str) -> str:
    """Records every file of the step's items (size, SHA-256); returns the step's digest."""
    files = {}
    for item in sorted(os.listdir(step_dir)):
        if not os.path.isdir(os.path.join(step_dir, item)):
            continue
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            for name in sorted(names):
                path = os.path.join(root, name)
                files[os.path.relpath(path, step_dir)] = [os.path.getsize(path), _sha256(path)]
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "digest": digest, "files": files}, f)
    os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))  # never a half-written record
    return digest


def check_integrity(step: int, step_dir: str, items: Sequence[str]) -> str | None:
    """The step's digest, after checking the files of `items` against the record; None when the
    step has no record (its run stopped before writing it). Raises DamagedCheckpointError."""
    if not os.path.isdir(step_dir):
        raise DamagedCheckpointError(step, "checkpoint", f"its directory {step_dir} is missing")
    path = os.path.join(step_dir, INTEGRITY_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        files, digest = record["files"], record["digest"]
    except (OSError, ValueError, KeyError) as e:
        raise DamagedCheckpointError(step, INTEGRITY_FILE, f"unreadable ({e})") from None
    for item in items:
        if not any(rel.split(os.sep)[0] == item for rel in files):
            raise DamagedCheckpointError(step, item, "no files of it were recorded when it was saved")
    for rel, (size, sha) in files.items():
        item = rel.split(os.sep)[0]
        if item not in items:
            continue
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            raise DamagedCheckpointError(step, item, f"file {rel} is missing")
        actual = os.path.getsize(full)
        if actual != size:
            raise DamagedCheckpointError(step, item, f"file {rel} has {actual} bytes; {size} were written")
        if _sha256(full) != sha:
            raise DamagedCheckpointError(step, item, f"file {rel} differs from what was written (SHA-256)")
    return digest


def _failed_item(error: Exception) -> str:
    """Which item an Orbax error is about, from its message."""
    text = str(error)
    for item in (*ITEMS, AVERAGE, "metrics"):
        if f'"{item}"' in text or f"'{item}'" in text or f"/{item}/" in text or text.endswith(f"/{item}"):
            return item
    return "checkpoint"


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: tensorstore's own words (`OUT_OF_RANGE: Error reading ...`)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


class _AbandonedReads(logging.Filter):
    """When a restore fails, Orbax closes its event loop with reads still in flight. As they
    finish on tensorstore's threads, amid or after the program's own error, Python reports each:
    a callback finding the loop closed (a traceback or an unraisable exception), a future or task
    whose exception was never retrieved (asyncio's logger, naming the checkpoint's files), a read
    coroutine never awaited (a warning). They say nothing the error did not. Installed once,
    before any restore (some are reported before the error reaches our code), this drops those
    and only those: the checkpoint directories restored from are registered with `watch`."""

    # Orbax's read coroutines (orbax/checkpoint/_src/serialization/serialization.py).
    READS = ("_read_shard", "_read_array_index_and_device_put", "_read_and_create_array", "async_deserialize")
    NEVER_RETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")
    installed: _AbandonedReads | None = None

    def __init__(self):
        super().__init__()
        self.directories: set[str] = set()

    @classmethod
    def watch(cls, directory: str) -> None:
        if cls.installed is None:
            cls.installed = cls()
            cls.installed._install()
        cls.installed.directories.add(directory)

    def _install(self) -> None:
        warnings.filterwarnings("ignore", f"coroutine '({'|'.join(self.READS)})' was never awaited", RuntimeWarning)
        logging.getLogger("asyncio").addFilter(self)
        previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

        def unraisable_hook(unraisable) -> None:
            code = getattr(unraisable.object, "cr_code", None)
            abandoned_read = code is not None and code.co_name in self.READS
            if not (_closed_loop(unraisable.exc_value, unraisable.exc_traceback) or abandoned_read):
                previous_unraisable(unraisable)

        def except_hook(kind, error, tb) -> None:
            if not _closed_loop(error, tb):
                previous_except(kind, error, tb)

        sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.NEVER_RETRIEVED) and any(d in message for d in self.directories))


def _closed_loop(error: BaseException | None, tb) -> bool:
    """asyncio's "Event loop is closed", raised where a closed loop is handed work."""
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or tb.tb_frame.f_code.co_name == "_check_closed"


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


# --- notices --------------------------------------------------------------------------------


class _ReadOnlyNotices(logging.Filter):
    """Orbax warns on every read-only open that it is read-only; evaluation and serving always
    open read-only, so the notice is expected, not news. Other warnings pass."""

    PREFIXES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIXES)


@contextlib.contextmanager
def _without_read_only_notices():
    logger, notices = logging.getLogger("absl"), _ReadOnlyNotices()
    logger.addFilter(notices)
    try:
        yield
    finally:
        logger.removeFilter(notices)


# --- the manager ----------------------------------------------------------------------------


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
        with _without_read_only_notices() if read_only else contextlib.nullcontext():
            options = ocp.CheckpointManagerOptions(
                # best_fn makes Orbax write each checkpoint's metrics and read them back on resume.
                best_fn=metric if cfg.best_metric else None,
                best_mode=cfg.best_mode,
                enable_async_checkpointing=True,  # synchronous saves wait at once (`cfg.asynchronous`)
                preservation_policy=ocp.checkpoint_managers.preservation_policy.AnyPreservationPolicy(policies),
                read_only=read_only,
                create=not read_only,
            )
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(*ITEMS, AVERAGE))

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

    def save(self, step: int, model, optimizer, data_iterator, config: ExperimentConfig, metrics=None) -> None:
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
        args = ocp.args.Composite(**items)
        self.manager.save(step, args=args, metrics=metrics, force=True)
        self._unrecorded.append(step)
        if not self.cfg.asynchronous:
            self.wait()

    def record_finished(self) -> None:
        """Writes the integrity records of saves that have completed (cheap when none has)."""
        if self._unrecorded and not self.manager.is_saving_in_progress():
            self._record()

    def _record(self) -> None:
        if jax.process_index() == 0:  # every process's shards are written once Orbax finalizes
            for step in self._unrecorded:
                if os.path.isdir(self.step_dir(step)):
                    write_integrity(self.step_dir(step))
        self._unrecorded = []

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._record()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    # Restoring.

    def verify(self, step: int, items: Sequence[str] = ITEMS) -> str | None:
        """Checks the step's files for `items`; returns its digest (None without a record)."""
        return check_integrity(step, self.step_dir(step), items)

    def _restore_items(self, step: int, items: dict) -> dict:
        _AbandonedReads.watch(self.directory)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # whatever Orbax or tensorstore raise on bad files
            cause = _root_cause(e)
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise DamagedCheckpointError(step, _failed_item(e), reason[:400]) from e

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
        digest = self.verify(step, (*items, "config"))
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


def config_differences(saved: ExperimentConfig, current: ExperimentConfig) -> list[str]:
    """`section.key: <saved> in the checkpoint, <current> now` for every field that differs."""
    a, b = to_dict(saved), to_dict(current)
    out = []
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [
                f"{section}.{k}: {x.get(k)!r} in the checkpoint, {y.get(k)!r} now"
                for k in sorted(set(x) | set(y))
                if x.get(k) != y.get(k)
            ]
        elif x != y:
            out.append(f"{section}: {x!r} in the checkpoint, {y!r} now")
    return out


def check_compatible(saved: ExperimentConfig, current: ExperimentConfig, step: int) -> list[str]:
    """The differences between the configs; raises when the model or optimizer state differ in
    structure or shape (the checkpoint cannot be restored into the current one)."""
    differences = config_differences(saved, current)
    if differences:
        old, new = abstract_train_state(saved), abstract_train_state(current)
        shapes = jax.tree.map(lambda x: (x.shape, x.dtype), old), jax.tree.map(lambda x: (x.shape, x.dtype), new)
        if jax.tree.structure(old) != jax.tree.structure(new) or shapes[0] != shapes[1]:
            raise IncompatibleCheckpointError(
                f"the checkpoint of step {step} holds a model or optimizer of other shapes than this config's: "
                + "; ".join(differences)
                + ". Use another --workdir, or the checkpoint's config"
            )
    return differences


def restore_newest(
    checkpoints: Checkpointer, model, optimizer, data_iterator, report: Callable[[str], None]
) -> int | None:
    """Training's resume: restores the newest step that restores completely and returns it (None
    when the run has no checkpoint). Newer damaged steps are reported and moved aside; when none
    restores, nothing is moved and CheckpointError names every step's problem."""
    damaged: list[DamagedCheckpointError] = []
    restored = None
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            checkpoints.restore(step, model, optimizer, data_iterator)
        except DamagedCheckpointError as e:
            damaged.append(e)
            continue
        restored = step
        break
    if damaged and restored is None:
        raise CheckpointError(
            f"no checkpoint of {checkpoints.workdir} restores: "
            + "; ".join(str(e) for e in damaged)
            + ". Move them aside to start over"
        )
    for e in damaged:
        moved = checkpoints.set_aside(e.step) if jax.process_index() == 0 else damaged_dir(checkpoints.workdir)
        report(f"{e}; moved to {moved}, resuming from step {restored}")
    if damaged:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("phoenix: damaged checkpoints set aside")
        checkpoints.manager.reload()
    return restored


class Restored(NamedTuple):
    cfg: ExperimentConfig
    step: int
    model: PhoenixModel
    digest: str | None  # the checkpoint's content, from its integrity record (None without one)
    counts: PostCounts | None = None  # the run's post counts, with model.count_blend


def restore_model(
    workdir: str,
    step: int | str | None = "latest",
    mesh: jax.sharding.Mesh | None = None,
    report: Callable[[str], None] | None = None,
) -> Restored:
    """A run's model for evaluation and serving, restored onto `mesh` (default: this machine's
    devices, data-parallel), whatever mesh it trained on.

    'latest' (or None) takes the newest step that restores completely, reporting damaged newer
    ones; an explicit step or 'best' must restore, or DamagedCheckpointError names why.
    """
    mesh = mesh or make_mesh({"data": -1, "fsdp": 1, "model": 1})
    with Checkpointer.open_run(workdir) as checkpoints:
        steps = checkpoints.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {checkpoints.directory}")
        if step in (None, "latest"):
            candidates = sorted(steps, reverse=True)
        elif step == "best":
            best = checkpoints.best_step()
            if best is None:
                raise CheckpointError(
                    f"no checkpoint of {workdir} has the metric to choose the best by; saved: {steps}"
                )
            candidates = [best]
        elif int(step) in steps:
            candidates = [int(step)]
        else:
            raise CheckpointError(f"no checkpoint of step {step} in {checkpoints.directory}; saved: {steps}")
        damaged = []
        for candidate in candidates:
            try:
                cfg = checkpoints.config(candidate)
                model = abstract_model(cfg, mesh)
                digest = checkpoints.restore(candidate, model, average=cfg.optimizer.ema_decay > 0)
            except DamagedCheckpointError as e:
                if len(candidates) == 1:
                    raise
                damaged.append(e)
                continue
            for e in damaged:
                (report or _stderr)(f"{e}; using step {candidate}")
            counts = None
            if getattr(model.ranker, "blend", None) is not None:
                counts = PostCounts.load(PostCounts.file(workdir), cfg.model.actions)
            return Restored(cfg, candidate, model, digest, counts)
    raise CheckpointError(f"no checkpoint of {workdir} restores: " + "; ".join(str(e) for e in damaged))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
