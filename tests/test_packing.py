"""Packed sessions (`data.pack_prefix`): the segment-masked blockwise kernel against the dense
reference, and the model's logits, losses and gradients on packed rows against the unpacked
model's on the same sessions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_blockwise_equals_dense, tiny_experiment
from flax import nnx

from phoenix_flax.config import ConfigError
from phoenix_flax.data.batch import DEVICE_FIELDS, pad_batch
from phoenix_flax.data.pipeline import global_batch, make_dataset
from phoenix_flax.model.attention import causal_mask, flash_attention
from phoenix_flax.sharding import make_mesh, use_mesh
from phoenix_flax.step.step import build_model, compute_losses

MESH_2X2X2 = {"data": 2, "fsdp": 2, "model": 2}


def packed_segments(rng, rows: int, length: int) -> np.ndarray:
    """[rows, length]: sessions of 1 to 11 positions one after another, padding at the end (more
    in each later row; the last row one session)."""
    out = []
    for r in range(rows):
        lengths = rng.integers(1, 12, size=8) if r < rows - 1 else [length - 5]
        seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[: length - 3 * r]
        out.append(np.pad(seg, (0, length - len(seg))))
    return np.stack(out).astype(np.int32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "candidates"])
@pytest.mark.parametrize("blocks", [(8, 8), (7, 13)])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "batch"])
def test_blockwise_kernel_with_segments_equals_the_dense_mask(causal, blocks, per_row):
    """Forward, log-sum-exp and gradients, where a query sees only its own segment's keys; blocks
    that straddle sessions, sessions longer than a block, all-padding blocks at the rows' ends."""
    rng = np.random.default_rng(0)
    b, t, n, g, k = 3, 37, 2, 3, 8
    q = jnp.asarray(rng.normal(size=(b, t, n, g, k)), jnp.float32) * 2
    keys = jnp.asarray(rng.normal(size=(b, t, n, k)), jnp.float32) * 2
    values = jnp.asarray(rng.normal(size=(b, t, n, k)), jnp.float32)
    seg = jnp.asarray(packed_segments(rng, b, t))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg > 0)[:, None, :]
    mask = same & (causal_mask(seg > 0) if causal else True)
    real = np.asarray(seg > 0)  # padding queries' outputs are never read
    out_weights = jnp.where(seg[..., None, None, None] > 0, jnp.cos(jnp.arange(k)), 0.0)
    lse_weights = jnp.where(seg[:, None, None] > 0, jnp.asarray(rng.normal(size=(b, n, g, t)), jnp.float32), 0.0)

    def blockwise(q, k, v):
        return flash_attention(q, k, v, seg, seg, causal, 0.7, *blocks, per_row)

    assert_blockwise_equals_dense(blockwise, q, keys, values, mask, out_weights, lse_weights, real)


# --- the model on packed rows ------------------------------------------------------------------

PACKING = {"pack_prefix": 40, "pack_candidates": 12, "pack_sessions": 4, "batch_size": 3}


def same_sessions(cfg):
    """The first packed batch of the training split, and an unpacked batch of the same examples."""
    packed = next(iter(make_dataset(cfg.model, cfg.data, "train", shuffle=False, num_epochs=1, packed=True)))
    real = packed["prefix_segment"].max(axis=1)[:, None] > np.arange(cfg.data.pack_sessions)  # [B, G]
    keys = set(zip(packed["session_id"][real].tolist(), packed["candidate_offset"][real].tolist(), strict=True))
    unpacked = next(iter(make_dataset(cfg.model, cfg.data, "train", shuffle=False, num_epochs=1, batch_size=64)))
    examples = zip(unpacked["session_id"].tolist(), unpacked["candidate_offset"].tolist(), strict=True)
    rows = [i for i, key in enumerate(examples) if key in keys]
    assert len(rows) == len(keys) > cfg.data.batch_size  # several sessions a row, each found
    return packed, pad_batch({k: v[rows] for k, v in unpacked.items()}, len(rows) + 2)


def logits_by_candidate(batch, logits, packed):
    """(session, candidate index in the session) -> its logits [A]."""
    out = {}
    for b, c in zip(*np.nonzero(batch["candidate_post_hashes"][..., 0]), strict=True):
        if packed:
            s = batch["candidate_segment"][b, c] - 1
            key = (batch["session_id"][b, s], batch["candidate_offset"][b, s] + batch["candidate_position"][b, c])
        else:
            key = (batch["session_id"][b], batch["candidate_offset"][b] + c)
        out[int(key[0]), int(key[1])] = logits[b, c]
    return out


@pytest.mark.parametrize(
    "model", [{}, {"candidate_positions": "sequential", "attention": "dense"}], ids=["shared", "sequential-dense"]
)
def test_packed_rows_give_the_logits_losses_and_gradients_of_the_same_sessions_unpacked(tiny_world, model):
    """Ranker and retrieval tower, with the demo's extensions: sessions of every history length up
    to a full one, and sessions split over two examples (8 candidates, 4 a session)."""
    model = {"history_len": 12, "num_candidates": 4, **model}
    cfg = tiny_experiment(tiny_world["data_dir"], model=model, data=PACKING)
    packed, unpacked = same_sessions(cfg)
    lengths = packed["prefix_position"].max(axis=1)
    assert len(set(np.asarray(packed["prefix_position"])[packed["prefix_position"] > 0].tolist())) > 1
    assert lengths.min() >= 1
    net = build_model(cfg)

    @nnx.jit
    def run(net, batch):
        def loss(m):
            total, metrics, outputs = compute_losses(m, batch, cfg.loss)
            return total, (metrics, outputs["logits"])

        (_, (metrics, logits)), grads = nnx.value_and_grad(loss, has_aux=True)(net)
        return metrics, logits, grads

    def device(batch):
        return {k: jnp.asarray(v) for k, v in batch.items() if k in DEVICE_FIELDS}

    want_metrics, want_logits, want_grads = run(net, device(unpacked))
    got_metrics, got_logits, got_grads = run(net, device(packed))
    want_logits, got_logits = np.asarray(want_logits), np.asarray(got_logits)
    for k in ("ranking_loss", "retrieval_loss", "loss"):
        np.testing.assert_allclose(got_metrics[k], want_metrics[k], rtol=1e-6)
    want = logits_by_candidate(unpacked, want_logits, packed=False)
    got = logits_by_candidate(packed, got_logits, packed=True)
    assert got.keys() == want.keys()
    np.testing.assert_allclose(np.stack([got[k] for k in want]), np.stack(list(want.values())), atol=2e-5)
    for (path, x), y in zip(jax.tree.leaves_with_path(want_grads), jax.tree.leaves(got_grads), strict=True):
        np.testing.assert_allclose(y, x, atol=2e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_packing_refuses_rows_too_short_for_a_session_epochs_and_the_exposure_softmax(tiny_world):
    with pytest.raises(ConfigError, match=r"at least 1 \+ model.history_len = 9 and model.num_candidates = 8"):
        tiny_experiment(tiny_world["data_dir"], data={"pack_prefix": 8, "pack_candidates": 8, "pack_sessions": 2})
    with pytest.raises(ConfigError, match="exposure softmax"):
        tiny_experiment(
            tiny_world["data_dir"],
            data={"pack_prefix": 20, "pack_candidates": 16, "pack_sessions": 2},
            model={"affinity_rank": 4},
            loss={"exposure_weight": 0.1},
        )
    with pytest.raises(ConfigError, match=r"give train\.steps"):
        tiny_experiment(
            tiny_world["data_dir"],
            data={"pack_prefix": 20, "pack_candidates": 16, "pack_sessions": 2},
            train={"epochs": 1},
        )
    with pytest.raises(ConfigError, match="pack_sessions"):
        tiny_experiment(tiny_world["data_dir"], data={"pack_prefix": 20, "pack_candidates": 16})


@pytest.mark.slow
def test_packed_rows_on_a_2x2x2_mesh_give_the_losses_and_gradients_of_one_device(tiny_world):
    """Each device attends over the packed rows it holds (shard_map over the batch and heads)."""
    cfg = tiny_experiment(
        tiny_world["data_dir"], model={"history_len": 12}, data=PACKING | {"batch_size": 4}, mesh=MESH_2X2X2
    )
    batch = next(iter(make_dataset(cfg.model, cfg.data, "train", shuffle=False, num_epochs=1, packed=True)))

    @nnx.jit
    def run(net, batch):
        (_, metrics), grads = nnx.value_and_grad(lambda m: compute_losses(m, batch, cfg.loss)[:2], has_aux=True)(net)
        return metrics, grads

    want_metrics, want_grads = run(
        build_model(cfg), {k: jnp.asarray(v) for k, v in batch.items() if k in DEVICE_FIELDS}
    )
    mesh = make_mesh(cfg.mesh.axis_sizes())
    with use_mesh(mesh, cfg.mesh.logical_rules()):
        got_metrics, got_grads = run(build_model(cfg), global_batch(batch, mesh, cfg.mesh.logical_rules()))
    for k in ("ranking_loss", "retrieval_loss"):
        np.testing.assert_allclose(got_metrics[k], want_metrics[k], rtol=1e-5)
    for (path, x), y in zip(jax.tree.leaves_with_path(want_grads), jax.tree.leaves(got_grads), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
