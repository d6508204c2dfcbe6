"""Production shapes: blockwise attention against the dense reference, scanned and rematerialized
layers against the loop, the sharded table lookup against a plain gather, and the planner."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, assert_blockwise_equals_dense
from flax import nnx

from phoenix_flax.config import ModelConfig, load, replace_fields
from phoenix_flax.model.attention import causal_mask, flash_attention, ranker_attention_mask
from phoenix_flax.model.embeddings import sharded_lookup
from phoenix_flax.model.ranker import PhoenixRanker
from phoenix_flax.model.retrieval import PhoenixRetrieval
from phoenix_flax.sharding import DEFAULT_RULES, make_mesh, parse_rules, rules_to_text, use_mesh
from phoenix_flax.testing import model_inputs, random_batch

SMALL = ModelConfig(
    emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=2, num_layers=3, actions=("a", "b", "c", "d"),
    user_vocab_rows=64, post_vocab_rows=256, author_vocab_rows=64, history_len=11, num_candidates=5,
    attention_block=4,  # several blocks, none full at the end: every path of the blockwise code runs
)  # fmt: skip


def padded_batch(cfg, seed=0, b=3):
    """Padding in the history and the candidates, a row without a user, a row with one candidate."""
    batch = random_batch(cfg, b, np.random.default_rng(seed))
    batch["user_hashes"][1] = 0
    batch["candidate_post_hashes"][2, 1:, 0] = 0
    batch["history_post_hashes"][0, 7:, 0] = 0
    return batch


def loss_and_grads(model, batch, tower="ranker"):
    valid = batch["candidate_post_hashes"][..., 0] != 0

    def loss(m):
        if tower == "ranker":
            logits = m(model_inputs(batch))
            return jnp.sum(jnp.where(valid[..., None], jnp.sin(logits), 0.0)), logits
        users = m.user(model_inputs(batch))
        return jnp.sum(jnp.cos(3 * users)), users

    (value, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)  # compiled once, not op by op
    return value, out, grads


# --- the kernel ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("blocks", [(8, 8), (16, 5), (7, 13), (64, 64)])
def test_blockwise_kernel_equals_dense_with_its_log_sum_exp(causal, blocks):
    rng = np.random.default_rng(0)
    b, t, n, g, k = 3, 37, 2, 3, 8
    q = jnp.asarray(rng.normal(size=(b, t, n, g, k)), jnp.float32) * 2
    keys = jnp.asarray(rng.normal(size=(b, t, n, k)), jnp.float32) * 2
    values = jnp.asarray(rng.normal(size=(b, t, n, k)), jnp.float32)
    valid = jnp.asarray(rng.random((b, t)) < 0.8).at[:, 0].set(True)
    mask = causal_mask(valid) if causal else jnp.broadcast_to(valid[:, None, :], (b, t, t))
    weights = jnp.asarray(rng.normal(size=(b, n, g, t)), jnp.float32)

    def blockwise(q, k, v):
        return flash_attention(q, k, v, None, valid.astype(jnp.int32), causal, 0.7, *blocks, False)

    assert_blockwise_equals_dense(blockwise, q, keys, values, mask, jnp.cos(jnp.arange(k)), weights)


def test_the_ranker_mask_is_what_the_blockwise_form_computes():
    """The structure the blockwise code assumes: prefix causal, candidates see the prefix and themselves."""
    mask = np.asarray(ranker_attention_mask(jnp.array([[True, True, True]]), jnp.array([[True, True]])))[0]
    np.testing.assert_array_equal(mask[:3, :3], np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(mask[3:, :3], np.ones((2, 3), bool))
    np.testing.assert_array_equal(mask[3:, 3:], np.eye(2, dtype=bool))
    assert not mask[:3, 3:].any()


# --- the models ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["shared", "sequential"])
def test_blockwise_ranker_equals_dense_forward_and_gradients(positions):
    cfg = dataclasses.replace(SMALL, candidate_positions=positions)
    batch = padded_batch(cfg)
    dense = loss_and_grads(PhoenixRanker(dataclasses.replace(cfg, attention="dense"), rngs=nnx.Rngs(0)), batch)
    blockwise = loss_and_grads(PhoenixRanker(cfg, rngs=nnx.Rngs(0)), batch)
    valid = batch["candidate_post_hashes"][..., 0] != 0
    np.testing.assert_allclose(np.asarray(blockwise[1])[valid], np.asarray(dense[1])[valid], atol=1e-5, rtol=0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dense[2]), jax.tree.leaves(blockwise[2]), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_blockwise_user_tower_equals_dense_forward_and_gradients():
    batch = padded_batch(SMALL)
    dense = loss_and_grads(
        PhoenixRetrieval(dataclasses.replace(SMALL, attention="dense"), rngs=nnx.Rngs(0)), batch, "user"
    )
    blockwise = loss_and_grads(PhoenixRetrieval(SMALL, rngs=nnx.Rngs(0)), batch, "user")
    np.testing.assert_allclose(blockwise[1], dense[1], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(dense[2]), jax.tree.leaves(blockwise[2]), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def stacked_copy(loop_model, cfg):
    """The same model in the scanned layout: each layer's parameters stacked on axis 0."""
    scanned = type(loop_model)(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(1))
    state = nnx.to_pure_dict(nnx.state(loop_model, nnx.Param))
    state["transformer"]["layers"] = stack_layers(state["transformer"]["layers"])
    target = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(target, state)
    nnx.update(scanned, target)
    return scanned


def stack_layers(layers: dict):
    """A loop's per-layer pure dicts {0: ..., 1: ...} -> one dict of arrays stacked on axis 0."""
    return jax.tree.map(lambda *x: jnp.stack(x), *(layers[i] for i in sorted(layers)))


def assert_same_gradients(loop_grads, scanned_grads):
    a, b = nnx.to_pure_dict(loop_grads), nnx.to_pure_dict(scanned_grads)
    a["transformer"]["layers"] = stack_layers(a["transformer"]["layers"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_layers_equal_the_loop_under_every_remat_policy(remat):
    batch = padded_batch(SMALL, seed=1)
    loop = PhoenixRanker(SMALL, rngs=nnx.Rngs(0))
    value, logits, grads = loss_and_grads(loop, batch)
    s_value, s_logits, s_grads = loss_and_grads(stacked_copy(loop, dataclasses.replace(SMALL, remat=remat)), batch)
    np.testing.assert_allclose(s_value, value, rtol=1e-5)  # float32: the compilations round differently
    np.testing.assert_allclose(s_logits, logits, atol=1e-5)
    assert_same_gradients(grads, s_grads)
    if remat != "none":  # the loop under the same policy too
        r_value, _, r_grads = loss_and_grads(
            PhoenixRanker(dataclasses.replace(SMALL, remat=remat), rngs=nnx.Rngs(0)), batch
        )
        np.testing.assert_allclose(r_value, value, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(r_grads), strict=True):
            np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_cached_user_context_works_with_scanned_layers():
    cfg = dataclasses.replace(SMALL, scan_layers=True, num_candidates=4)
    model = PhoenixRanker(cfg, rngs=nnx.Rngs(0))
    batch = random_batch(cfg, 2, np.random.default_rng(2))
    batch["candidate_post_hashes"][..., 0] = np.maximum(batch["candidate_post_hashes"][..., 0], 1)
    full = np.asarray(model(model_inputs(batch)))
    context = model.user_context(batch)
    assert context.keys.shape[0] == cfg.num_layers
    rows = np.repeat(np.arange(2, dtype=np.int32), 4)
    cached = model.score_candidates(
        context, rows, batch["candidate_post_hashes"].reshape(8, -1), batch["candidate_author_hashes"].reshape(8, -1),
        batch["candidate_product_surface"].reshape(-1),
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(cached).reshape(2, 4, -1), full, atol=1e-5)


# --- the sharded lookup --------------------------------------------------------------------


def rules_with(*changes: str):
    """The default rules with some names placed elsewhere: `rules_with("batch:data")`."""
    names = {c.split(":")[0] for c in changes}
    return parse_rules([*(r for r in rules_to_text(DEFAULT_RULES) if r.split(":")[0] not in names), *changes])


@pytest.mark.parametrize(
    "rules",
    [DEFAULT_RULES, rules_with("batch:data"), rules_with("vocab:fsdp+data+model"), rules_with("vocab:model")],
    ids=["rows over model x fsdp", "batch over data only", "rows over every axis", "rows over model only"],
)
def test_the_sharded_lookup_equals_a_gather_forward_and_backward(rules):
    rng = np.random.default_rng(3)
    table = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
    hashes = jnp.asarray(rng.integers(0, 64, size=(8, 5, 2)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(8, 5, 2, 6)), jnp.float32)

    def loss(t, lookup):
        return jnp.sum(lookup(t, hashes) * weights)

    plain = jax.value_and_grad(loss)(table, lambda t, h: jnp.take(t, h, axis=0))
    mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
    with use_mesh(mesh, rules):
        sharded = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
            table, lambda t, h: sharded_lookup(t, h, jnp.float32)
        )
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(sharded[1], plain[1], atol=1e-6)  # no peer's rows counted twice


# --- the planner ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def joint():
    """The joint model at a small shape, with production-style settings, on 2 x 2 x 2 devices."""
    from phoenix_flax.config import apply_overrides

    return apply_overrides(
        load(str(REPO / "configs" / "joint_base.py")),
        [
            "--config.model.emb_size=64", "--config.model.key_size=16", "--config.model.history_len=32",
            "--config.model.num_candidates=8", "--config.data.batch_size=32", "--config.model.user_vocab_rows=4096",
            "--config.model.post_vocab_rows=8192", "--config.model.author_vocab_rows=4096", "--config.model.num_layers=2",
            "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.model=2", "--config.model.remat=full",
            "--config.model.attention_block=16",
        ],
    )  # fmt: skip


@pytest.mark.slow
def test_the_plan_of_the_default_rules_on_2x2x2_has_no_involuntary_rematerialization(joint):
    from phoenix_flax.step.plan import plan_train_step

    plan = plan_train_step(joint)
    assert plan.devices == 8 and plan.mesh == {"data": 2, "fsdp": 2, "model": 2}
    assert plan.involuntary_rematerializations == 0
    assert plan.temp_bytes > 0 and plan.flops > 0 and plan.argument_bytes >= plan.parameter_bytes > plan.table_bytes > 0
    assert plan.collectives["all-reduce"]["count"] > 0  # data-parallel gradients
    assert "collective-permute" in plan.collectives  # the ring of the table lookups
    # Packed, rows of the tokens of two padded ones (2 x (33 + 8) = 50 + 32): no more memory, and
    # each device attends over its own rows: no collective beyond the padded step's (a row loop
    # over the global batch all-gathers it: 90 all-gathers against 56, when the candidates' did).
    packed = plan_train_step(
        replace_fields(joint, data={"batch_size": 16, "pack_prefix": 50, "pack_candidates": 32, "pack_sessions": 6})
    )
    assert packed.involuntary_rematerializations == 0
    assert packed.temp_bytes <= plan.temp_bytes, (packed.temp_bytes, plan.temp_bytes)
    assert {k: v["count"] for k, v in packed.collectives.items()} == {
        k: v["count"] for k, v in plan.collectives.items()
    }


def test_the_plan_of_a_small_data_parallel_step_reads_its_memory_and_collectives(tiny_world):
    """The fast tier's plan: the tiny experiment's real step on 2 devices, compiled, not run."""
    from conftest import tiny_experiment

    from phoenix_flax.step.plan import plan_train_step

    cfg = tiny_experiment(tiny_world["data_dir"], mesh={"data": 2})
    plan = plan_train_step(cfg, devices=jax.devices()[:2])
    assert plan.devices == 2 and plan.mesh == {"data": 2, "fsdp": 1, "model": 1}
    assert plan.involuntary_rematerializations == 0
    assert plan.temp_bytes > 0 and plan.flops > 0 and plan.argument_bytes >= plan.parameter_bytes > plan.table_bytes > 0
    assert plan.collectives["all-reduce"]["count"] > 0  # data-parallel gradients


@pytest.mark.slow
def test_phoenix_plan_prints_json_and_fails_on_a_budget_too_small(tmp_path):
    args = [
        sys.executable, "-m", "train.plan", "--config", str(REPO / "configs" / "joint_base.py"), "--devices", "8",
        "--config.model.emb_size=64", "--config.model.key_size=16", "--config.model.history_len=32",
        "--config.data.batch_size=32", "--config.model.user_vocab_rows=4096", "--config.model.post_vocab_rows=8192",
        "--config.model.author_vocab_rows=4096", "--config.model.num_candidates=8", "--config.mesh.data=2",
        "--config.mesh.fsdp=2", "--config.mesh.model=2",
    ]  # fmt: skip
    fits = subprocess.run([*args, "--json", "--hbm", "16GiB"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert fits.returncode == 0, fits.stderr[-3000:]
    plan = json.loads(fits.stdout)
    for key in (
        "argument_bytes",
        "temp_bytes",
        "output_bytes",
        "flops",
        "compile_seconds",
        "involuntary_rematerializations",
    ):
        assert key in plan
    assert plan["devices"] == 8 and plan["fits"] is True
    small = subprocess.run([*args, "--hbm", "1MiB"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert small.returncode == 1
    assert "more than --hbm" in small.stderr and "temporaries" in small.stdout
