"""Sharded training on 8 simulated CPU devices: rules, parity with one device."""

import jax
import numpy as np
import pytest
from conftest import tiny_experiment
from jax.sharding import PartitionSpec as P

from phoenix_flax.data.pipeline import global_batch, make_dataset
from phoenix_flax.sharding import make_mesh, mesh_shape
from phoenix_flax.step.step import create_train_state, make_train_step


def test_mesh_shape_fills_and_checks():
    assert mesh_shape({"data": -1, "fsdp": 2, "model": 2}, 8) == (2, 2, 2)
    assert mesh_shape({"data": 2, "fsdp": 4, "model": 1}, 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="do not divide"):
        mesh_shape({"data": -1, "fsdp": 3, "model": 1}, 8)
    with pytest.raises(ValueError, match="has 4 devices, but there are 8"):
        mesh_shape({"data": 2, "fsdp": 2, "model": 1}, 8)


def run_steps(cfg, mesh, batches):
    model, optimizer = create_train_state(cfg, mesh, steps_per_epoch=2.0)
    step = make_train_step(cfg.loss)
    losses = [jax.device_get(step(model, optimizer, global_batch(b, mesh))) for b in batches]
    return model, optimizer, losses


@pytest.fixture(scope="module")
def parity(tiny_world):
    cfg = tiny_experiment(tiny_world["data_dir"])
    data = iter(make_dataset(cfg.model, cfg.data, "train", process_index=0, process_count=1))
    batches = [next(data) for _ in range(3)]
    one = run_steps(cfg, make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1]), batches)
    eight = run_steps(cfg, make_mesh({"data": 2, "fsdp": 2, "model": 2}), batches)
    return one, eight


@pytest.mark.slow
def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say(parity):
    _, (model, optimizer, _) = parity
    table = model.embeddings.post.table[...]
    assert table.sharding.spec == P(("model", "fsdp"))
    assert table.addressable_shards[0].data.shape == (1024 // 4, 16)
    gate = model.ranker.transformer.layers[0].ffn.gate[...]
    assert gate.sharding.spec == P("fsdp", "model")
    query = model.retrieval.transformer.layers[0].attn.query[...]
    assert query.sharding.spec == P("fsdp", "model")
    mu = optimizer.opt_state[1].inner_states["dense"].inner_state[0].mu
    assert mu["ranker"]["transformer"]["layers"][0]["ffn"]["gate"][...].sharding.spec == P("fsdp", "model")
    accumulator = optimizer.tables.post[...]  # row-wise Adagrad's: one per row, where the row lives
    assert accumulator.sharding.spec == P(("model", "fsdp")) and accumulator.addressable_shards[0].data.shape == (256,)


@pytest.mark.slow
def test_three_steps_on_a_2x2x2_mesh_match_one_device(parity):
    (_, _, one), (_, _, eight) = parity
    for a, b in zip(one, eight, strict=True):
        for k in ("loss", "ranking_loss", "retrieval_loss", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4)
    assert one[0]["loss"] != one[2]["loss"]  # the steps really trained


@pytest.mark.slow
def test_indivisible_parameters_are_named(tiny_world):
    cfg = tiny_experiment(tiny_world["data_dir"], model={"post_vocab_rows": 1022})
    with pytest.raises(ValueError, match=r"embeddings.*post.*1022"):
        create_train_state(cfg, make_mesh({"data": 2, "fsdp": 2, "model": 2}), steps_per_epoch=1.0)
