"""The optimizer: AdamW for dense weights, Adagrad for hash tables (element-wise, or row-wise with
sparse row updates: `step/rowwise.py`; the action-bias extension's groups their own), global-norm
clipping, an optional moving average of the parameters, and optional bad-step skipping."""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from phoenix_flax.config import OptimizerConfig
from phoenix_flax.extensions.optimizer import action_bias_newton
from phoenix_flax.model.embeddings import TABLES
from phoenix_flax.step.rowwise import (
    RowGradients,
    RowwiseAdagrad,
    apply_rowwise_adagrad,
    is_embedding_table,
)


def param_labels(params, bias_tables: bool = False, bias_offsets: bool = False) -> object:
    """'tables' for the hash tables, 'dense' for everything else; with `bias_tables`, the ranker's
    action-bias tables are 'bias_tables'; with `bias_offsets`, its post and author tables (the ones
    holding the offsets) are 'bias_offsets'."""

    def label(path, _):  # every HashTable's parameter is named `table`
        keys = [getattr(k, "key", None) for k in path]
        if "table" not in keys:
            return "dense"
        if "action_bias" not in keys:
            return "tables"
        if bias_offsets and ("post" in keys or "author" in keys):
            return "bias_offsets"
        return "bias_tables" if bias_tables else "tables"

    return jax.tree_util.tree_map_with_path(label, params)


def decay_touched_rows(rate: float) -> optax.GradientTransformation:
    """Decoupled weight decay of the rows `[..., rows, cols]` whose update is nonzero: the rows
    the batch looked up (Adagrad leaves the others exactly still). `rate` is the learning rate
    times the decay."""

    def update(updates, state, params):
        def decay(u, p):
            touched = jnp.any(u != 0, axis=-1, keepdims=True)
            return u - rate * jnp.where(touched, p, 0).astype(u.dtype)

        return jax.tree.map(decay, updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class ParamAverageState(NamedTuple):
    count: jax.Array  # updates averaged so far
    average: optax.Params  # the parameters' moving average, shaped as the parameters


def average_params(decay: float) -> optax.GradientTransformation:
    """Keeps an exponential moving average of the parameters as updated (what evaluation and
    serving use); the updates pass through unchanged. The decay of update t is
    `min(decay, (1 + t) / (10 + t))`, so the starting parameters are averaged out within the
    first steps rather than after 1 / (1 - decay) of them."""

    def init(params):
        return ParamAverageState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates, state, params):
        rate = jnp.minimum(decay, (1.0 + state.count) / (10.0 + state.count))
        updated = optax.apply_updates(params, updates)
        average = jax.tree.map(lambda a, p: (rate * a + (1 - rate) * p).astype(a.dtype), state.average, updated)
        return updates, ParamAverageState(state.count + 1, average)

    return optax.GradientTransformation(init, update)


def averaged_params(optimizer: nnx.Optimizer) -> nnx.State | None:
    """The optimizer's moving average of the parameters, a State of arrays shaped as the model's
    `nnx.Param` state (None when it keeps none: `optimizer.ema_decay` 0)."""
    chain = optimizer.opt_state
    if isinstance(chain, BadStepState):
        chain = chain.inner
    last = chain[-1]
    return nnx.as_pure(last.average) if isinstance(last, ParamAverageState) else None


@contextlib.contextmanager
def averaged_weights(model: nnx.Module, optimizer: nnx.Optimizer):
    """Within the block, `model` holds the parameters' moving average (when the optimizer keeps
    one); its own parameters come back after. No step may run within: the two share buffers."""
    average = averaged_params(optimizer)
    if average is None:
        yield
        return
    trained = nnx.as_pure(nnx.state(model, nnx.Param))
    nnx.update(model, average)
    try:
        yield
    finally:
        nnx.update(model, trained)


class BadStepState(NamedTuple):
    inner: optax.OptState  # the wrapped optimizer's state, unchanged by a skipped step
    norms: jax.Array  # [window] float32: the gradient norms of recent kept steps (NaN: none yet)
    position: jax.Array  # int32: where the next kept norm goes in `norms`
    skipped: jax.Array  # int32: whether the last step was skipped (0 or 1)
    in_a_row: jax.Array  # int32: steps skipped in a row up to the last one


def skip_bad_steps(inner: optax.GradientTransformation, factor: float, window: int) -> optax.GradientTransformation:
    """Skips a step whose gradient norm (`grad_norm`, of every gradient of the step; by default
    the gradients') is not finite, or above `factor` times the median of the last `window` kept
    steps' norms (once 4 are known): its updates are 0 and `inner`'s state stays as it was, so the
    parameters and every optimizer statistic are unchanged. The state counts skipped steps in a
    row (the training loop stops after too many)."""

    def init(params):
        zero = jnp.zeros([], jnp.int32)
        return BadStepState(inner.init(params), jnp.full([window], jnp.nan, jnp.float32), zero, zero, zero)

    def update(grads, state, params=None, *, grad_norm=None, **extra):
        grad_norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
        norm = grad_norm.astype(jnp.float32)
        known = jnp.sum(jnp.isfinite(state.norms))
        too_large = (known >= 4) & (norm > factor * jnp.nanmedian(state.norms))
        bad = ~jnp.isfinite(norm) | too_large
        updates, inner_state = inner.update(grads, state.inner, params, grad_norm=grad_norm, **extra)
        updates = jax.tree.map(lambda u: jnp.where(bad, jnp.zeros_like(u), u), updates)
        inner_state = jax.tree.map(lambda new, old: jnp.where(bad, old, new), inner_state, state.inner)
        norms = jnp.where(bad, state.norms, state.norms.at[state.position].set(norm))
        position = jnp.where(bad, state.position, (state.position + 1) % window)
        skipped = bad.astype(jnp.int32)
        return updates, BadStepState(inner_state, norms, position, skipped, (state.in_a_row + 1) * skipped)

    return optax.GradientTransformationExtraArgs(init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax's `clip_by_global_norm`, by the `grad_norm` the step passes (the norm of all of its
    gradients, the row-wise tables' included, which optax never sees); by default the updates'."""

    def update(updates, state, params=None, *, grad_norm=None, **extra):
        del params, extra
        grad_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        return jax.tree.map(lambda g: g * clip_factor(grad_norm, max_norm).astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def clip_factor(grad_norm: jax.Array, max_norm: float) -> jax.Array:
    """What gradients are multiplied by so that their global norm is at most `max_norm`."""
    return jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)


def make_optimizer(
    cfg: OptimizerConfig,
    total_steps: int,
    impression_gradient: float | None = None,
    *,
    action_bias: bool = False,
    offset_columns: int | None = None,
    steps_per_epoch: float | None = None,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with warmup and cosine decay for dense weights and
    Adagrad (or AdamW) with weight decay for the hash tables; with the `action_bias` extension,
    its tables with their own decay and starting accumulator, and `action_bias_newton` for its
    offsets; with `ema_decay`, the parameters' moving average kept last; with `skip_bad_steps`,
    all of it wrapped by `skip_bad_steps`.
    `impression_gradient`: the unit of `action_bias_initial_accumulator` (1 / (batch x candidates x
    actions)); `offset_columns` (the number of actions) and `steps_per_epoch`: needed by newton
    offsets."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_learning_rate_fraction,
    )
    dense = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    transforms = {"dense": dense}
    if cfg.table_optimizer != "rowwise_adagrad":  # else TrainOptimizer updates the tables
        transforms["tables"] = _table_optimizer(cfg, cfg.table_weight_decay, cfg.table_initial_accumulator)
    newton = action_bias and cfg.action_bias_offsets == "newton"
    if action_bias:
        bias_accumulator = cfg.table_initial_accumulator
        if cfg.action_bias_initial_accumulator:
            if impression_gradient is None:
                raise ValueError("optimizer.action_bias_initial_accumulator needs the impression_gradient unit")
            bias_accumulator = cfg.action_bias_initial_accumulator * impression_gradient**2
        transforms["bias_tables"] = _table_optimizer(cfg, cfg.action_bias_weight_decay, bias_accumulator)
    if newton:
        if None in (impression_gradient, offset_columns, steps_per_epoch):
            raise ValueError("newton action-bias offsets need impression_gradient, offset_columns and steps_per_epoch")
        transforms["bias_offsets"] = action_bias_newton(
            cfg.table_learning_rate,
            cfg.action_bias_newton_step,
            offset_columns,
            impression_gradient,
            bias_accumulator,
            steps_per_epoch,
        )
    labels = functools.partial(param_labels, bias_tables=action_bias, bias_offsets=newton)
    steps = [clip_by_global_norm(cfg.grad_clip_norm), optax.multi_transform(transforms, labels)]
    if cfg.ema_decay:
        steps.append(average_params(cfg.ema_decay))
    if cfg.skip_bad_steps:
        return skip_bad_steps(optax.chain(*steps), cfg.bad_step_norm_factor, cfg.bad_step_window)
    return optax.chain(*steps)


def _table_optimizer(
    cfg: OptimizerConfig, weight_decay: float, initial_accumulator: float
) -> optax.GradientTransformation:
    """Element-wise Adagrad from `initial_accumulator` with decay of the rows a step touches (or
    AdamW) for hash tables. (With "rowwise_adagrad" only the action bias's tables come here.)"""
    lr = cfg.table_learning_rate
    if cfg.table_optimizer != "adamw":
        # eps far below a squared row gradient (~1e-10), so it does not take the accumulator's place
        tables = optax.adagrad(lr, initial_accumulator, eps=1e-20)
        return optax.chain(tables, decay_touched_rows(lr * weight_decay)) if weight_decay else tables
    # AdamW moves untouched rows too (momentum), so its own decay covers every row
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=weight_decay)


class TrainOptimizer(nnx.Optimizer):
    """`nnx.Optimizer` over the model's parameters; with table_optimizer "rowwise_adagrad", over
    all but the HashEmbeddings tables, which it updates itself by the rows a step touched
    (`step/rowwise.py`), their accumulators part of its state (and so of every checkpoint)."""

    def __init__(self, model, tx: optax.GradientTransformation, cfg: OptimizerConfig):
        rowwise = cfg.table_optimizer == "rowwise_adagrad"
        super().__init__(model, tx, wrt=nnx.All(nnx.Param, nnx.Not(is_embedding_table)) if rowwise else nnx.Param)
        self.grad_clip_norm = cfg.grad_clip_norm
        self.table_learning_rate, self.table_weight_decay = cfg.table_learning_rate, cfg.table_weight_decay
        rows = {name: getattr(model.embeddings, name).table.shape[0] for name in TABLES}
        self.tables = nnx.data(RowwiseAdagrad(rows, cfg.table_initial_accumulator) if rowwise else None)

    def update(self, model, grads, /, *, grad_norm: jax.Array, row_grads: dict[str, RowGradients] | None = None):
        """One step: `grads` of `wrt`; with row-wise tables, `row_grads` of each table;
        `grad_norm` of them all."""
        super().update(model, grads, grad_norm=grad_norm)
        if self.tables is None:
            return
        skipped = self.opt_state.skipped[...] if isinstance(self.opt_state, BadStepState) else 0
        for name, rows in row_grads.items():
            table, accumulator = getattr(model.embeddings, name).table, getattr(self.tables, name)
            table[...], accumulator[...] = apply_rowwise_adagrad(
                table[...],
                accumulator[...],
                rows,
                learning_rate=self.table_learning_rate,
                weight_decay=self.table_weight_decay,
                scale=clip_factor(grad_norm, self.grad_clip_norm),
                keep=skipped == 0,
            )
