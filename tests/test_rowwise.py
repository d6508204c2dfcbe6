"""Row-wise Adagrad with sparse row updates (optimizer.table_optimizer="rowwise_adagrad") against
a dense numpy reference, unsharded and sharded over simulated devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_experiment
from flax import nnx

import phoenix_flax.step.rowwise
from phoenix_flax.config import ConfigError, OptimizerConfig, apply_overrides
from phoenix_flax.data.pipeline import global_batch
from phoenix_flax.extensions.exposure import record_exposure
from phoenix_flax.sharding import DEFAULT_RULES, make_mesh, use_mesh
from phoenix_flax.step.rowwise import EPS, apply_rowwise_adagrad, row_gradients
from phoenix_flax.step.step import compute_losses, create_train_state, make_train_step
from phoenix_flax.testing import random_batch

MESHES = {
    "one device": {"data": 1, "fsdp": 1, "model": 1},
    "fsdp 8": {"data": 1, "fsdp": 8, "model": 1},  # rows and batch over the same axis: the ring
    "2x2x2": {"data": 2, "fsdp": 2, "model": 2},  # rows over model x fsdp, batch over data x fsdp
    "data 8": {"data": 8, "fsdp": 1, "model": 1},  # tables replicated: the blocks all-gathered
}


def dense_rowwise_adagrad(table, accumulator, grad, lr, weight_decay):
    """Row-wise Adagrad on a dense gradient `[rows, D]` (float64): the rows with a nonzero gradient
    add its mean square to their accumulator and step by lr * g / sqrt(accumulator), decayed."""
    table, accumulator = table.astype(np.float64), accumulator.astype(np.float64)
    touched = (grad != 0).any(-1)
    accumulator[touched] += (grad[touched] ** 2).mean(-1)
    step = grad[touched] / np.sqrt(accumulator[touched] + EPS)[:, None] + weight_decay * table[touched]
    table[touched] -= lr * step
    return table, accumulator


@pytest.mark.parametrize("mesh", MESHES, ids=list(MESHES))
def test_sparse_updates_equal_dense_rowwise_adagrad_over_several_steps(mesh, monkeypatch):
    """Duplicated rows within and across sessions, padding (hash 0), a clipped step and a
    skipped one: the same table and accumulators as the dense reference after each step. Rows
    are updated 5 at a time, so the chunks' loop and its last, overlapping chunk are in play."""
    monkeypatch.setattr(phoenix_flax.step.rowwise, "UPDATE_CHUNK", 5)
    rows, dim, lr, decay = 64, 4, 0.1, 0.2
    rng = np.random.default_rng(0)
    table, accumulator = rng.normal(size=(rows, dim)).astype(np.float32), np.full(rows, 0.01, np.float32)
    want_table, want_acc = table.astype(np.float64), accumulator.astype(np.float64)
    update = jax.jit(
        lambda t, a, h, c, scale, keep: apply_rowwise_adagrad(
            t, a, row_gradients(rows, h, c), learning_rate=lr, weight_decay=decay, scale=scale, keep=keep
        )
    )
    sizes = MESHES[mesh]
    with use_mesh(make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))]), DEFAULT_RULES):
        got_table, got_acc = jnp.asarray(table), jnp.asarray(accumulator)
        for scale, keep in ((1.0, True), (0.5, True), (1.0, False), (1.0, True)):
            hashes = rng.integers(0, 20, size=(8, 6)).astype(np.int32)  # 20 of 64 rows: many repeats
            hashes[:, -1] = 0  # padding looks up row 0, which is never updated
            hashes[:, 0] = rows - 1  # the last shard's last row, from every session
            cotangents = rng.normal(size=(8, 6, dim)).astype(np.float32)
            got_table, got_acc = update(got_table, got_acc, hashes, cotangents, jnp.float32(scale), jnp.bool_(keep))
            grad = np.zeros((rows, dim))
            np.add.at(grad, hashes.reshape(-1), cotangents.reshape(-1, dim).astype(np.float64) * scale)
            grad[0] = 0
            if keep:
                want_table, want_acc = dense_rowwise_adagrad(want_table, want_acc, grad, lr, decay)
            np.testing.assert_allclose(np.asarray(got_table), want_table, rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(got_acc), want_acc, rtol=2e-5)
    assert np.array_equal(np.asarray(got_table)[0], table[0]) and got_acc[0] == accumulator[0]
    assert not np.array_equal(np.asarray(got_table)[rows - 1], table[rows - 1])


def tables(cfg, optimizer: str):
    return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, table_optimizer=optimizer))


@pytest.mark.slow  # three compilations of the tiny model's step: 50 s on 2 cores
def test_a_training_step_moves_the_tables_as_their_dense_gradient_says_and_a_skipped_one_leaves_them():
    """The whole step, sharded (2x2x2) with the demo's extensions: the tables move as dense
    row-wise Adagrad on the dense gradient of the loss (the global norm's clipping included), the
    other parameters as under element-wise table Adagrad, from the same start. Then a step with
    a NaN gradient is skipped: tables and accumulators stay as they were."""
    cfg = tiny_experiment(
        "unused",
        optimizer={"grad_clip_norm": 0.05, "table_weight_decay": 0.3, "skip_bad_steps": True},
        loss={"exposure_weight": 0.1},
    )
    devices = make_mesh(MESHES["2x2x2"])
    batch = global_batch(random_batch(cfg.model, 16, np.random.default_rng(1)), devices)
    model, optimizer = create_train_state(tables(cfg, "rowwise_adagrad"), devices, steps_per_epoch=2.0)
    elementwise, elementwise_optimizer = create_train_state(tables(cfg, "adagrad"), devices, steps_per_epoch=2.0)
    start = {name: np.asarray(getattr(model.embeddings, name).table[...]) for name in ("user", "post", "author")}

    reference = nnx.clone(model)  # the dense gradient, after the step's own state updates
    reference.frequency.update(batch["positive_id"], batch["positive_valid"])
    record_exposure(reference, batch)
    with use_mesh(devices, cfg.mesh.logical_rules()):
        grads = nnx.jit(nnx.grad(lambda m: compute_losses(m, batch, cfg.loss)[0]))(reference)
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads)))
    assert norm > cfg.optimizer.grad_clip_norm  # so the clipping factor is tested

    step = make_train_step(cfg.loss)
    metrics = step(model, optimizer, batch)
    step(elementwise, elementwise_optimizer, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)
    scale = cfg.optimizer.grad_clip_norm / norm
    for name in ("user", "post", "author"):
        grad = np.asarray(getattr(grads.embeddings, name).table[...], np.float64) * scale
        want, want_acc = dense_rowwise_adagrad(
            start[name], np.zeros(len(grad)), grad, cfg.optimizer.table_learning_rate, 0.3
        )
        assert (grad != 0).any(-1).sum() > 10
        got = np.asarray(getattr(model.embeddings, name).table[...])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(getattr(optimizer.tables, name)[...]), want_acc, rtol=1e-3, atol=1e-12)
    dense = nnx.All(nnx.Param, nnx.Not(lambda path, _: path[0] == "embeddings"))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
        nnx.state(model, dense),
        nnx.state(elementwise, dense),
    )

    before = jax.tree.map(np.asarray, (nnx.state(model.embeddings), nnx.state(optimizer.tables)))
    model.ranker.blocks.user_proj[...] = jnp.full_like(model.ranker.blocks.user_proj[...], jnp.nan)
    assert int(step(model, optimizer, batch)["skipped"]) == 1
    after = jax.tree.map(np.asarray, (nnx.state(model.embeddings), nnx.state(optimizer.tables)))
    jax.tree.map(np.testing.assert_array_equal, after, before)


def test_row_wise_tables_are_the_default_and_refuse_a_moving_average():
    assert OptimizerConfig().table_optimizer == "rowwise_adagrad"
    with pytest.raises(ConfigError, match=r"optimizer.ema_decay=0.9: must be 0 with table_optimizer='rowwise_adagrad'"):
        apply_overrides(tables(tiny_experiment("unused"), "rowwise_adagrad"), ["--config.optimizer.ema_decay=0.9"])
    with pytest.raises(ValueError, match="rowwise_adagrad"):
        OptimizerConfig(table_optimizer="rowwise_adagrad", ema_decay=0.5)
