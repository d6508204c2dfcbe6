"""The model a config trains, created sharded; the losses of a batch; the jitted train and eval steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from phoenix_flax.config import ExperimentConfig, LossConfig
from phoenix_flax.data.batch import is_valid, labeled_candidates
from phoenix_flax.extensions.exposure import exposure_loss, record_exposure
from phoenix_flax.sharding import check_divisible, use_mesh
from phoenix_flax.step.losses import ranking_bce, sampled_softmax_loss
from phoenix_flax.step.model import PhoenixModel
from phoenix_flax.step.optimizer import BadStepState, TrainOptimizer, make_optimizer
from phoenix_flax.step.rowwise import row_gradients


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


def new_train_state(cfg: ExperimentConfig, steps_per_epoch: float) -> tuple[PhoenixModel, TrainOptimizer]:
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
    return model, TrainOptimizer(model, tx, cfg.optimizer)


def abstract_train_state(cfg: ExperimentConfig):
    """Shapes and dtypes of the model and optimizer state a config trains, allocating nothing."""
    return nnx.state(nnx.eval_shape(lambda: new_train_state(cfg, steps_per_epoch=1.0)))


def create_train_state(
    cfg: ExperimentConfig, mesh: jax.sharding.Mesh, steps_per_epoch: float
) -> tuple[PhoenixModel, TrainOptimizer]:
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


def compute_losses(
    model: PhoenixModel, batch: dict, cfg: LossConfig, looked_up: dict | None = None
) -> tuple[jax.Array, dict, dict]:
    """-> (total loss, scalar metrics, outputs). Outputs: ranker `logits [B, C, A]` and their
    `logit_parts` (`PhoenixRanker.logit_parts`), retrieval `users [N, D]` and `positives [N, D]`
    (N = B, or a packed batch's B x G sessions).
    `looked_up`: the tables' rows of the batch, looked up beforehand (`HashEmbeddings.__call__`)."""
    metrics, outputs = {}, {}
    total = jnp.float32(0.0)
    emb = model.embeddings(batch, looked_up)  # every table looked up once, for both towers
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
        # A vector a session: a packed batch's [B, G, D] flattened, every session a row.
        users = model.retrieval.user_from_embeddings(batch, emb)
        positives = model.retrieval.candidate_tower(emb["positive_post_embeddings"], emb["positive_author_embeddings"])
        users, positives = users.reshape(-1, users.shape[-1]), positives.reshape(-1, positives.shape[-1])
        positive_id, positive_valid = batch["positive_id"].reshape(-1), batch["positive_valid"].reshape(-1)
        log_q = None if model.frequency is None else model.frequency.log_q(positive_id)
        temperature = model.retrieval.temperature()
        ret = sampled_softmax_loss(users, positives, positive_id, positive_valid, temperature, log_q)
        total = total + cfg.retrieval_weight * ret
        metrics["retrieval_loss"] = ret
        metrics["temperature"] = temperature
        outputs["users"], outputs["positives"] = users, positives
    metrics["loss"] = total
    return total, metrics, outputs


def train_step_fn(cfg: LossConfig):
    """The step's body, not jitted: `step(model, optimizer, batch) -> metrics`, updating both."""

    def train_step(model: PhoenixModel, optimizer: TrainOptimizer, batch: dict) -> dict:
        def loss_fn(m, looked_up=None):
            loss, metrics, _ = compute_losses(m, batch, cfg, looked_up)
            return loss, metrics

        if model.frequency is not None:  # before the loss: every positive of the batch has a rate
            model.frequency.update(batch["positive_id"].reshape(-1), batch["positive_valid"].reshape(-1))
        if model.exposure_frequency is not None:
            record_exposure(model, batch)
        if optimizer.tables is None:
            (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
            metrics["grad_norm"] = optax.tree.norm(grads)
            optimizer.update(model, grads, grad_norm=metrics["grad_norm"])
        else:  # row-wise tables: the loss differentiated by the looked-up rows, not the tables
            hashes = model.embeddings.table_hashes(batch)
            looked_up = {name: getattr(model.embeddings, name).lookup(h) for name, h in hashes.items()}
            wrt = nnx.DiffState(0, optimizer.wrt)
            (_, metrics), (grads, cotangents) = nnx.value_and_grad(loss_fn, argnums=(wrt, 1), has_aux=True)(
                model, looked_up
            )
            rows = {
                name: row_gradients(getattr(model.embeddings, name).table.shape[0], h, cotangents[name])
                for name, h in hashes.items()
            }
            squares = optax.tree.norm(grads, squared=True) + sum(jnp.sum(jnp.square(r.sums)) for r in rows.values())
            metrics["grad_norm"] = jnp.sqrt(squares)
            optimizer.update(model, grads, grad_norm=metrics["grad_norm"], row_grads=rows)
        metrics["sessions"] = jnp.sum(is_valid(batch["user_hashes"]).astype(jnp.int32))  # packed: several a row
        if isinstance(optimizer.opt_state, BadStepState):  # optimizer.skip_bad_steps
            metrics["skipped"] = optimizer.opt_state.skipped[...]
            metrics["bad_steps_in_a_row"] = optimizer.opt_state.in_a_row[...]
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
