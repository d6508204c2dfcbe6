"""Optimizer, losses of a batch, sharded creation of the train state, and the jitted steps."""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from phoenix_flax.batch import labeled_candidates
from phoenix_flax.config import ExperimentConfig, LossConfig, OptimizerConfig
from phoenix_flax.extensions.exposure import exposure_loss, record_exposure
from phoenix_flax.extensions.optimizer import action_bias_newton
from phoenix_flax.losses import ranking_bce, sampled_softmax_loss
from phoenix_flax.model import PhoenixModel
from phoenix_flax.sharding import check_divisible, use_mesh


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
    last = optimizer.opt_state[-1]
    return nnx.as_pure(last.average) if isinstance(last, ParamAverageState) else None


@contextlib.contextmanager
def averaged_weights(model: PhoenixModel, optimizer: nnx.Optimizer):
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
    offsets; with `ema_decay`, the parameters' moving average kept last.
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
    transforms = {
        "dense": dense,
        "tables": _table_optimizer(cfg, cfg.table_weight_decay, cfg.table_initial_accumulator),
    }
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
    steps = [optax.clip_by_global_norm(cfg.grad_clip_norm), optax.multi_transform(transforms, labels)]
    if cfg.ema_decay:
        steps.append(average_params(cfg.ema_decay))
    return optax.chain(*steps)


def _table_optimizer(
    cfg: OptimizerConfig, weight_decay: float, initial_accumulator: float
) -> optax.GradientTransformation:
    """Adagrad from `initial_accumulator` with decay of the rows a step touches (or AdamW) for hash tables."""
    lr = cfg.table_learning_rate
    if cfg.table_optimizer == "adagrad":
        # eps far below a squared row gradient (~1e-10), so it does not take the accumulator's place
        tables = optax.adagrad(lr, initial_accumulator, eps=1e-20)
        return optax.chain(tables, decay_touched_rows(lr * weight_decay)) if weight_decay else tables
    # AdamW moves untouched rows too (momentum), so its own decay covers every row
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=weight_decay)


def build_model(cfg: ExperimentConfig, seed: int | None = None) -> PhoenixModel:
    """The model a config trains (unsharded; call under a mesh and rules to shard)."""
    loss = cfg.loss
    buckets = loss.frequency_buckets if loss.logq == "estimated" else None
    return PhoenixModel(
        cfg.model,
        rngs=nnx.Rngs(cfg.train.seed if seed is None else seed),
        ranker=loss.ranking_weight > 0,
        retrieval=loss.retrieval_weight > 0,
        frequency_buckets=buckets,
        frequency_alpha=loss.frequency_alpha,
        exposure_frequency_buckets=buckets if loss.exposure_weight > 0 else None,
    )


def _check_fits(cfg: ExperimentConfig, mesh: jax.sharding.Mesh) -> None:
    """Before allocating anything: every sharded parameter dimension divides over the mesh."""
    check_divisible(nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param), mesh)


def new_train_state(cfg: ExperimentConfig, steps_per_epoch: float) -> tuple[PhoenixModel, nnx.Optimizer]:
    """The model and optimizer a config trains (created sharded under `sharding.use_mesh`);
    `steps_per_epoch`: the training split's sessions over the batch size (the action bias's
    newton prior counts once an epoch; no shape depends on it)."""
    model = build_model(cfg)
    a = cfg.model.num_actions
    impression = 1.0 / (cfg.data.batch_size * cfg.model.num_candidates * a)
    tx = make_optimizer(
        cfg.optimizer,
        cfg.train.steps,
        impression,
        action_bias=model.ranker is not None and cfg.model.action_bias,
        offset_columns=a,
        steps_per_epoch=steps_per_epoch,
    )
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def abstract_train_state(cfg: ExperimentConfig):
    """Shapes and dtypes of the model and optimizer state a config trains, allocating nothing."""
    return nnx.state(nnx.eval_shape(lambda: new_train_state(cfg, steps_per_epoch=1.0)))


def create_train_state(
    cfg: ExperimentConfig, mesh: jax.sharding.Mesh, steps_per_epoch: float
) -> tuple[PhoenixModel, nnx.Optimizer]:
    """Model and optimizer, created inside jit directly in their shards (never whole on one device)."""
    with use_mesh(mesh, cfg.mesh.logical_rules()):
        _check_fits(cfg, mesh)
        return nnx.jit(lambda: new_train_state(cfg, steps_per_epoch))()


def abstract_model(cfg: ExperimentConfig, mesh: jax.sharding.Mesh) -> PhoenixModel:
    """The model with abstract arrays (shapes, dtypes and shardings on `mesh`), allocating
    nothing: the target evaluation and serving restore a checkpoint into. (Initializing it
    instead cost a 9-second compilation of the initializers at the demo's shapes.)"""
    with use_mesh(mesh, cfg.mesh.logical_rules()):
        model = nnx.eval_shape(lambda: build_model(cfg))
        check_divisible(nnx.state(model, nnx.Param), mesh)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, x.sharding.spec)), state
    )
    return nnx.merge(graphdef, state)


def compute_losses(model: PhoenixModel, batch: dict, cfg: LossConfig) -> tuple[jax.Array, dict, dict]:
    """-> (total loss, scalar metrics, outputs). Outputs: ranker `logits [B, C, A]` and their
    `logit_parts` (`PhoenixRanker.logit_parts`), retrieval `users [B, D]` and `positives [B, D]`."""
    metrics, outputs = {}, {}
    total = jnp.float32(0.0)
    emb = model.embeddings(batch)  # every table looked up once, for both towers
    if model.ranker is not None:
        parts = model.ranker.parts_from_embeddings(batch, emb)
        logits = sum(parts.values())
        valid = labeled_candidates(batch)
        weights = None if cfg.action_weights is None else jnp.asarray(cfg.action_weights, jnp.float32)
        rank = ranking_bce(logits, batch["candidate_actions"], valid, weights)
        total = total + cfg.ranking_weight * rank
        metrics["ranking_loss"] = rank
        outputs["logits"], outputs["logit_parts"] = logits, parts
        if cfg.exposure_weight > 0:
            exposure = exposure_loss(model, batch, valid)
            total = total + cfg.exposure_weight * exposure
            metrics["exposure_loss"] = exposure
    if model.retrieval is not None:
        users = model.retrieval.user_from_embeddings(batch, emb)
        positives = model.retrieval.candidate_tower(emb["positive_post_embeddings"], emb["positive_author_embeddings"])
        log_q = None if model.frequency is None else model.frequency.log_q(batch["positive_id"])
        temperature = model.retrieval.temperature()
        ret = sampled_softmax_loss(users, positives, batch["positive_id"], batch["positive_valid"], temperature, log_q)
        total = total + cfg.retrieval_weight * ret
        metrics["retrieval_loss"] = ret
        metrics["temperature"] = temperature
        outputs["users"], outputs["positives"] = users, positives
    metrics["loss"] = total
    return total, metrics, outputs


def train_step_fn(cfg: LossConfig):
    """The step's body, not jitted: `step(model, optimizer, batch) -> metrics`, updating both."""

    def train_step(model: PhoenixModel, optimizer: nnx.Optimizer, batch: dict) -> dict:
        def loss_fn(m):
            loss, metrics, _ = compute_losses(m, batch, cfg)
            return loss, metrics

        if model.frequency is not None:  # before the loss: every positive of the batch has a rate
            model.frequency.update(batch["positive_id"], batch["positive_valid"])
        if model.exposure_frequency is not None:
            record_exposure(model, batch)
        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        metrics["grad_norm"] = optax.tree.norm(grads)
        optimizer.update(model, grads)
        return metrics

    return train_step


def make_train_step(cfg: LossConfig):
    """`step(model, optimizer, batch) -> metrics`: one update, model and optimizer donated."""
    return nnx.jit(train_step_fn(cfg), donate_argnums=(0, 1))


def make_eval_step(cfg: LossConfig):
    """`step(model, batch) -> (metrics, outputs)` without updates; with a ranker, outputs add the
    reported `probs [B, C, A]` (`ranker.probabilities`, with the batch's `candidate_count_logits`
    where it has them: the count blend's input) to `compute_losses`' logits."""

    def eval_step(model: PhoenixModel, batch: dict):
        _, metrics, outputs = compute_losses(model, batch, cfg)
        if "logits" in outputs:
            counted = {"count_logits": batch["candidate_count_logits"]} if "candidate_count_logits" in batch else {}
            outputs["probs"] = model.ranker.probabilities(outputs["logit_parts"], **counted)
        return metrics, outputs

    return nnx.jit(eval_step)
