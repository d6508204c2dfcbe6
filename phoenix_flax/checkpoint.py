"""Orbax checkpoints of a run: model, optimizer, data-iterator position and config.

Each step's checkpoint holds the items `model`, `optimizer`, `data` (grain.checkpoint) and
`config` (JSON). Saves are asynchronous; the latest K are kept, and the best by an evaluation
metric beside them. Restoring places arrays with the shardings of the target given, so a
checkpoint restores onto any mesh or device count.
"""

from __future__ import annotations

import contextlib
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from phoenix_flax.config import CheckpointConfig, ExperimentConfig, from_dict, to_dict
from phoenix_flax.model import PhoenixModel
from phoenix_flax.sharding import make_mesh
from phoenix_flax.training import create_model

ITEMS = ("model", "optimizer", "data", "config")


def _target(state):
    """An abstract pytree with the shapes, dtypes and shardings of `state`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


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


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    def __init__(self, workdir: str, cfg: CheckpointConfig | None = None, *, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        policies = [ocp.checkpoint_managers.preservation_policy.LatestN(cfg.keep)]
        if cfg.best_metric:
            policies.append(
                ocp.checkpoint_managers.preservation_policy.BestN(
                    get_metric_fn=lambda metrics: metrics[cfg.best_metric],
                    reverse=cfg.best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        with _without_read_only_notices() if read_only else contextlib.nullcontext():
            options = ocp.CheckpointManagerOptions(
                # best_fn makes Orbax write each checkpoint's metrics and read them back on resume.
                best_fn=(lambda metrics: metrics[cfg.best_metric]) if cfg.best_metric else None,
                best_mode=cfg.best_mode,
                enable_async_checkpointing=cfg.asynchronous,
                preservation_policy=ocp.checkpoint_managers.preservation_policy.AnyPreservationPolicy(policies),
                read_only=read_only,
                create=not read_only,
            )
            self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)

    @classmethod
    def open_run(cls, workdir: str) -> Checkpointer:
        """A run's checkpoints, read-only, with its own checkpoint config (for 'best')."""
        plain = cls(workdir, read_only=True)
        latest = plain.latest_step()
        if latest is None:
            return plain
        return cls(workdir, plain.config(latest).checkpoint, read_only=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (None when no checkpoint has metrics)."""
        return self.manager.best_step()

    def resolve(self, step: int | str | None) -> int:
        """An int, 'latest' (or None) or 'best' -> a saved step; an error naming what exists."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        if step in (None, "latest"):
            return self.latest_step()
        if step == "best":
            best = self.best_step()
            return self.latest_step() if best is None else best
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.manager.directory}; saved: {steps}")
        return int(step)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, model, optimizer, data_iterator, config: ExperimentConfig, metrics=None) -> None:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model)),
            optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(to_dict(config)),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, model, optimizer=None, data_iterator=None) -> None:
        """Restores into `model` (and `optimizer`, `data_iterator`) in place, on their shardings."""
        items = {"model": ocp.args.StandardRestore(_target(nnx.state(model)))}
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(_target(nnx.state(optimizer)))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        nnx.update(model, restored["model"])
        if optimizer is not None:
            nnx.update(optimizer, restored["optimizer"])

    def config(self, step: int) -> ExperimentConfig:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return from_dict(restored["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_model(
    workdir: str, step: int | str | None = "latest", mesh: jax.sharding.Mesh | None = None
) -> tuple[ExperimentConfig, int, PhoenixModel]:
    """The config, step and model of a run's checkpoint (for evaluation and serving), restored
    onto `mesh` (default: this machine's devices, data-parallel), whatever mesh it trained on."""
    checkpoints = Checkpointer.open_run(workdir)
    try:
        step = checkpoints.resolve(step)
        cfg = checkpoints.config(step)
        model = create_model(cfg, mesh or make_mesh({"data": -1, "fsdp": 1, "model": 1}))
        checkpoints.restore(step, model)
    finally:
        checkpoints.close()
    return cfg, step, model
