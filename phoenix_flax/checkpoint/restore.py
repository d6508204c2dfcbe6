"""Restoring a run: training's resume (the newest step that restores completely, damaged newer
ones set aside) and the model evaluation and serving restore, onto any mesh."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
from jax.experimental import multihost_utils

from phoenix_flax.checkpoint.manager import Checkpointer, damaged_dir
from phoenix_flax.config import ExperimentConfig, to_dict
from phoenix_flax.data.counting import PostCounts
from phoenix_flax.errors import CheckpointError, DamagedCheckpointError, IncompatibleCheckpointError
from phoenix_flax.extensions import scores_with_counts
from phoenix_flax.sharding import make_mesh
from phoenix_flax.step.model import PhoenixModel
from phoenix_flax.step.step import abstract_model, abstract_train_state


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
    counts: PostCounts | None = None  # the step's post counts, with model.count_blend
    workdir: str = ""

    def require(self, part: str, purpose: str = "") -> None:
        """Raises CheckpointError unless the model has `part`: 'ranker' or 'retrieval'."""
        if getattr(self.model, part) is None:
            name, weight = {"ranker": ("ranker", "ranking"), "retrieval": ("retrieval model", "retrieval")}[part]
            raise CheckpointError(
                f"{purpose}step {self.step} of {self.workdir} has no {name} (it trained with loss.{weight}_weight=0)"
            )


def steps_to_restore(checkpoints: Checkpointer, step: int | str | None) -> list[int]:
    """The steps `restore_model` tries for `step` ('latest' or None: every one, newest first),
    or CheckpointError naming why there is none."""
    steps = checkpoints.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {checkpoints.directory}")
    if step in (None, "latest"):
        return sorted(steps, reverse=True)
    if step == "best":
        best = checkpoints.best_step()
        if best is None:
            raise CheckpointError(
                f"no checkpoint of {checkpoints.workdir} has the metric to choose the best by; saved: {steps}"
            )
        return [best]
    if int(step) in steps:
        return [int(step)]
    raise CheckpointError(f"no checkpoint of step {step} in {checkpoints.directory}; saved: {steps}")


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
        candidates = steps_to_restore(checkpoints, step)
        damaged = []
        for candidate in candidates:
            try:
                cfg = checkpoints.config(candidate)
                model = abstract_model(cfg, mesh)
                digest = checkpoints.restore(candidate, model, average=cfg.optimizer.ema_decay > 0)
                counts = None
                if scores_with_counts(model.ranker):
                    counts = checkpoints.counts(candidate, cfg.model.actions)
            except DamagedCheckpointError as e:
                if len(candidates) == 1:
                    raise
                damaged.append(e)
                continue
            for e in damaged:
                (report or _stderr)(f"{e}; using step {candidate}")
            return Restored(cfg, candidate, model, digest, counts, workdir)
    raise CheckpointError(f"no checkpoint of {workdir} restores: " + "; ".join(str(e) for e in damaged))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
