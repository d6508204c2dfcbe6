"""Training, checkpoints, evaluation and configs, end to end on a tiny synthetic world."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow.parquet as pq
import pytest
from conftest import REPO, cli_overrides, tiny_experiment
from flax import nnx

from phoenix_flax.checkpoint.manager import Checkpointer
from phoenix_flax.checkpoint.restore import restore_model
from phoenix_flax.config import ConfigError, apply_overrides, from_dict, load, to_dict
from phoenix_flax.data.counting import PostCounts
from phoenix_flax.errors import CheckpointError
from phoenix_flax.evaluation.evaluate import evaluate, format_table
from phoenix_flax.evaluation.metrics import auc, calibration, normalized_entropy, recall_at_k, weighted_auc
from phoenix_flax.model.scoring import action_weights
from phoenix_flax.sharding import make_mesh
from phoenix_flax.step.step import abstract_model, create_train_state
from phoenix_flax.testing import gated_blend_features
from phoenix_flax.training.loop import BadStepsError, NonFiniteLossError, train


def losses(logged):
    return [(m["step"], m["loss"]) for m in logged if "loss" in m]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sections",
    [
        {},
        {
            "model": {"scan_layers": True, "remat": "full"},
            "data": {"pack_prefix": 30, "pack_candidates": 24, "pack_sessions": 4, "batch_size": 8},
        },
    ],
    ids=["looped", "scanned-packed"],
)
def test_a_resumed_run_repeats_the_uninterrupted_losses(tiny_world, tmp_path, sections):
    cfg = tiny_experiment(tiny_world["data_dir"], **sections)
    full = losses(train(cfg, str(tmp_path / "full")))
    first = losses(train(cfg, str(tmp_path / "split"), stop_after=4))
    rest = losses(train(cfg, str(tmp_path / "split")))
    assert [s for s, _ in first] == [1, 2, 3, 4] and [s for s, _ in rest] == [5, 6]
    np.testing.assert_allclose([x for _, x in first + rest], [x for _, x in full], rtol=1e-6)
    with Checkpointer(str(tmp_path / "split")) as checkpoints:
        assert checkpoints.all_steps() == [4, 6]  # keep=2


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_saves_nothing_after_it(tiny_world, tmp_path):
    cfg = tiny_experiment(
        tiny_world["data_dir"],
        optimizer={"learning_rate": 1e30, "warmup_steps": 1},
        checkpoint={"every_steps": 1, "keep": 10},
        train={"steps": 20},
    )
    with pytest.raises(NonFiniteLossError) as error:
        train(cfg, str(tmp_path))
    bad = error.value.step
    assert 1 < bad < 20 and "next_index" in str(error.value.position)
    with Checkpointer(str(tmp_path)) as checkpoints:
        saved = checkpoints.all_steps()
    assert saved and max(saved) < bad


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh_and_evaluates(tiny_world, tmp_path):
    cfg = tiny_experiment(
        tiny_world["data_dir"],
        mesh={"data": 2, "fsdp": 2, "model": 2},
        data={"truth_file": tiny_world["truth"], "corpus_file": tiny_world["corpus"]},
    )
    train(cfg, str(tmp_path))
    with Checkpointer(str(tmp_path)) as checkpoints:
        assert checkpoints.config(6) == cfg
        trained = abstract_model(cfg, make_mesh({"data": 2, "fsdp": 2, "model": 2}))
        checkpoints.restore(6, trained)
        single = abstract_model(cfg, make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1]))
        checkpoints.restore(6, single)
    table = single.embeddings.post.table[...]
    assert len(table.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(table), np.asarray(trained.embeddings.post.table[...]))

    result = evaluate(str(tmp_path), split="test")  # all 8 devices, data=8: another mesh again
    assert result["step"] == 6 and result["candidates"] > 100
    for row in result["actions"].values():
        for key in ("auc", "popularity_auc", "oracle_auc", "ece"):
            assert np.isnan(row[key]) or 0 <= row[key] <= 1
        assert row["calibration_ratio"] > 0 if row["positives"] else row["calibration_ratio"] is None
    assert result["actions"]["favorite"]["oracle_auc"] > 0.6
    # Every test candidate is evaluated: the truth's mean over the observed rate, from the raw files.
    truth = np.load(tiny_world["truth"])
    shown = pq.read_table(tiny_world["raw"]["test"]).column("candidates").combine_chunks().flatten()
    for i, a in enumerate(truth["actions"]):
        observed = np.mean([a in actions for actions in shown.field("actions").to_pylist()])
        got = result["actions"][a]["oracle_calibration_ratio"]
        assert got == pytest.approx(truth["probs"][:, i].mean() / observed, rel=1e-6) if observed else got is None
    assert set(result["retrieval_corpus"]) == {"recall@1", "recall@10", "recall@100"}
    assert "favorite" in format_table(result)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_world, tmp_path):
    cfg = tiny_experiment(tiny_world["data_dir"], train={"steps": 100000}, checkpoint={"every_steps": 100000})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "train.train",
            "--config",
            str(REPO / "configs" / "demo.py"),
            "--workdir",
            str(tmp_path),
            *cli_overrides(cfg),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted" in err
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    with Checkpointer(str(tmp_path)) as checkpoints:
        assert checkpoints.latest_step() == last_logged >= 3


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one(tiny_world, tmp_path):
    """jax.distributed on 127.0.0.1 with gloo: 2 processes x 2 CPU devices against 1 x 4."""
    cfg = tiny_experiment(tiny_world["data_dir"], train={"steps": 3})
    args = ["-m", "train.train", "--config", str(REPO / "configs" / "demo.py"), *cli_overrides(cfg)]

    def env(devices):
        e = dict(os.environ, JAX_PLATFORMS="cpu")
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        return e

    single = subprocess.run(
        [sys.executable, *args, "--workdir", str(tmp_path / "one")],
        cwd=REPO,
        env=env(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    import portpicker

    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                *args,
                "--workdir",
                str(tmp_path / "two"),
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--coordinator-address",
                f"127.0.0.1:{port}",
            ],
            cwd=REPO,
            env=env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]

    def read(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [m for m in map(json.loads, lines) if "loss" in m]  # training lines, not eval_*

    one, two = read("one"), read("two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for k in ("loss", "ranking_loss", "retrieval_loss"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4)


# --- configs ----------------------------------------------------------------------------------

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_round_trips(name):
    cfg = load(str(REPO / "configs" / f"{name}.py"))
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_config_overrides_are_typed():
    cfg = load(str(REPO / "configs" / "demo.py"))
    out = apply_overrides(
        cfg,
        [
            "--config.model.emb_size=32",
            "--config.data.positive_actions=favorite,reply",
            "--config.loss.logq",
            "none",
            "--config.data.truth_file=none",
        ],
    )
    assert out.model.emb_size == 32 and out.data.positive_actions == ("favorite", "reply")
    assert out.loss.logq == "none" and out.data.truth_file is None
    for bad, message in [
        ("--config.model.emb=3", "unknown config key 'model.emb'"),
        ("--config.model.emb_size=large", "model.emb_size='large': expected int"),
        ("--config.loss.logq=sometimes", "expected one of"),
        ("--config.model.num_kv_heads=3", "must be a multiple of num_kv_heads=3"),
        ("--config.model=3", "is a section"),
        ("--mesh.data=2", "unrecognised argument"),
        ("--config.optimizer.action_bias_weight_decay=0.1", "action_bias_weight_decay=0.1: must be 0 with newton"),
        ("--config.optimizer.action_bias_initial_accumulator=0", "must be > 0 with newton offsets"),
        ("--config.optimizer.action_bias_newton_step=1.5", r"action_bias_newton_step=1.5: must be in \(0, 1\]"),
        ("--config.model.calibration=false", r"count_blend=True: needs calibration \(fit with its shifts\)"),
        ("--config.model.count_blend=false", "count_gate=True: needs count_blend"),
        ("--config.eval.blend_prior_std=0", "blend_prior_std=0.0: must be a positive number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(cfg, [bad])


def test_tpu_pod_config_is_consistent_for_256_chips():
    """Checked without running: mesh, batch over hosts and mesh, parameters over the mesh."""
    import flax.linen as nn
    from jax.sharding import AbstractMesh

    from phoenix_flax.sharding import MESH_AXES, check_divisible, mesh_shape
    from phoenix_flax.step.step import build_model

    sys.path.insert(0, str(REPO / "configs"))
    import tpu_pod

    cfg = load(str(REPO / "configs" / "tpu_pod.py"))
    shape = mesh_shape(dataclasses.asdict(cfg.mesh), tpu_pod.NUM_CHIPS)
    assert shape == (8, 16, 2)
    data, fsdp, model = shape
    assert cfg.data.batch_size % (data * fsdp) == 0 and cfg.data.batch_size % tpu_pod.NUM_HOSTS == 0
    assert cfg.model.num_kv_heads % model == 0 and cfg.model.num_q_heads % model == 0
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    mesh = AbstractMesh(shape, MESH_AXES)
    with nn.logical_axis_rules(cfg.mesh.logical_rules()):
        check_divisible(nnx.state(abstract, nnx.Param), mesh)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert params > 1e11  # production-size tables: 2^28 posts x 512
    assert os.path.exists(cfg.data.data_dir) is False  # a remote path, not this machine's


# --- metrics ----------------------------------------------------------------------------------


def test_auc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 1)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(scores, labels) == pytest.approx(pairwise)
    assert np.isnan(auc(scores, np.zeros(300, bool)))


def test_normalized_entropy_and_recall():
    y = np.array([1, 0, 0, 1, 0])
    assert normalized_entropy(np.full(5, 0.4), y) == pytest.approx(1.0)
    assert normalized_entropy(np.array([0.9, 0.1, 0.1, 0.9, 0.1]), y) < 0.5
    assert recall_at_k(np.array([0, 5, 50, np.inf])) == {"recall@1": 0.25, "recall@10": 0.5, "recall@100": 0.75}


@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [0.0, 0.5], ids=["parameters", "moving-average"])
def test_the_best_checkpoint_by_validation_auc(tiny_world, tmp_path, ema_decay):
    """best_metric eval_mean_auc: the kept best step is the one with the highest logged value,
    and that value equals the actions' mean AUC computed by phoenix-eval's own pass over the
    same validation sessions with the restored model. With optimizer.ema_decay, both are the
    parameters' moving average."""
    from phoenix_flax.data.pipeline import open_source
    from phoenix_flax.evaluation.evaluate import collect
    from phoenix_flax.extensions.calibration import fit_logit_blend

    cfg = tiny_experiment(
        tiny_world["data_dir"],
        eval={"every_steps": 2, "batches": 10},
        checkpoint={"every_steps": 2, "keep": 1, "best_metric": "eval_mean_auc", "best_mode": "max"},
        optimizer={"learning_rate": 3e-2, "ema_decay": ema_decay, "table_optimizer": "adagrad"},
    )
    logged = train(cfg, str(tmp_path))
    evals = {m["step"]: m for m in logged if "eval_mean_auc" in m}
    assert sorted(evals) == [2, 4, 6] and all("eval_weighted_auc" in m for m in evals.values())
    best = max(evals, key=lambda s: evals[s]["eval_mean_auc"])
    restored = restore_model(str(tmp_path), "best")
    assert restored.step == best
    mesh = make_mesh({"data": -1, "fsdp": 1, "model": 1})
    got = collect(restored.model, restored.cfg, "validation", 16, mesh, logit_parts=True, counts=restored.counts)
    source = open_source(cfg.data.data_dir, "validation")
    first = {int(source[i]["session_id"]) for i in range(10 * cfg.data.batch_size)}  # stored order
    rows = np.isin(got["session_id"], list(first))
    probs, labels = got["probs"][rows], got["labels"][rows]
    want = np.nanmean([auc(probs[:, i], labels[:, i]) for i in range(labels.shape[1])])
    assert evals[best]["eval_mean_auc"] == pytest.approx(want, abs=1e-5)
    # What the probabilities are made of: the logits' parts and the training split's counted
    # log-odds (counted here again, by post), weighted per action by the blend, plus the shifts.
    counted = PostCounts.of_split(cfg, cfg.model.actions)
    np.testing.assert_array_equal(counted.shown, restored.counts.shown)
    parts = [got[f"logit_{k}"] for k in ("transformer", "post", "author", "affinity")]
    assert np.abs(got["logit_affinity"]).max() > 0 and np.abs(got["logit_post"]).max() > 0
    features = np.stack(gated_blend_features(parts, counted.log_odds(got["post_id"])))  # [9, n, A]
    weights = np.asarray(restored.model.ranker.blend[...])  # [9, A]
    shifts = np.asarray(restored.model.ranker.calibration[...])
    logits = np.einsum("kna,ka->na", features, weights) + shifts
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), got["probs"], atol=1e-5)
    # The blend was fit on these sessions (about weights 1 for the parts and 0 for the counts and
    # the gated parts), and the shifts make their mean prediction the rate of these sessions and
    # the training split's.
    std = cfg.eval.blend_prior_std
    deviation, _ = fit_logit_blend(sum(p[rows] for p in parts), labels, features[:, rows], std, std)
    np.testing.assert_allclose(weights, np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])[:, None] + deviation, atol=1e-4)
    assert np.abs(deviation[5:]).max() > 0.01  # the gated parts' weights too
    assert np.abs(deviation).max() > 0.01 and np.abs(shifts).max() > 0.01
    pooled = (labels.sum(0) + counted.positives.sum(0)) / (len(labels) + counted.shown.sum())
    np.testing.assert_allclose(probs.mean(0), pooled, rtol=1e-4)
    weights = action_weights(cfg.model.actions)
    assert evals[best]["eval_weighted_auc"] == pytest.approx(weighted_auc(probs, labels, weights), abs=1e-5)


@pytest.mark.slow
def test_training_length_in_epochs(tiny_world, tmp_path):
    sessions = pq.read_metadata(tiny_world["raw"]["train"]).num_rows
    cfg = tiny_experiment(
        tiny_world["data_dir"],
        train={"epochs": 0.25, "steps": 1},
        checkpoint={"every_steps": 100, "best_metric": ""},
        eval={"batches": 0},
    )
    reports = []
    logged = train(cfg, str(tmp_path), report=reports.append)
    steps = -(-sessions // (4 * 16))  # a quarter of the sessions, 16 per step, rounded up
    assert max(m["step"] for m in logged) == steps > 1
    assert any(f"{steps:,} steps of 16 over {sessions:,} sessions" in r for r in reports)
    # Without validation nothing fits the calibration shifts: said, and they stay 0.
    assert any("calibration shifts (model.calibration) stay 0" in r for r in reports)
    assert not np.asarray(restore_model(str(tmp_path)).model.ranker.calibration[...]).any()
    with pytest.raises(ConfigError, match=r"epochs=0\.0: must be a positive number"):
        tiny_experiment(tiny_world["data_dir"], train={"epochs": 0.0})


def test_an_auc_best_metric_must_be_maximized(tiny_world):
    with pytest.raises(ConfigError, match="is better higher: set best_mode='max'"):
        tiny_experiment(tiny_world["data_dir"], checkpoint={"best_metric": "eval_mean_auc"})


def test_calibration_ratio_and_ece_by_hand():
    probs = np.array([0.1, 0.1, 0.2, 0.2, 0.6, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1])
    # mean prediction 2.0/6 over rate 3/6
    # 3 bins of 2 by prediction: (0.1, 0.1) vs 0/2, (0.2, 0.2) vs 1/2, (0.6, 0.8) vs 2/2
    ratio, ece = calibration(probs, labels, bins=3)
    assert ratio == pytest.approx(2.0 / 3.0)
    assert ece == pytest.approx((2 * 0.1 + 2 * 0.3 + 2 * 0.3) / 6)
    rng = np.random.default_rng(0)
    p = rng.random(200_000) * 0.2
    ratio, ece = calibration(p, rng.random(len(p)) < p)  # labels drawn from the predictions
    assert ratio == pytest.approx(1.0, abs=0.01) and ece < 0.005
    assert np.isnan(calibration(p, np.zeros(len(p)))[0])


def test_calibration_shifts_minimize_the_log_loss_with_their_prior():
    from phoenix_flax.extensions.calibration import fit_logit_shifts

    rng = np.random.default_rng(0)
    logits = rng.normal(-1.0, 1.5, (400, 3))
    labels = np.stack(
        [
            rng.random(400) < 1 / (1 + np.exp(-(logits[:, 0] + 0.7))),  # under-predicted by 0.7 logits
            rng.random(400) < 0.01,  # rare: the prior matters
            np.zeros(400),  # no positive: finite all the same
        ],
        axis=1,
    ).astype(np.float64)
    for prior_std, actions in ((0.1, 3), (1e3, 2)):  # without a prior, no positive has no minimum
        shifts = fit_logit_shifts(logits, labels, prior_std)
        grid = np.linspace(-12, 3, 15001)  # 0.001 apart: the objective, directly, per action
        for a in range(actions):
            p = 1 / (1 + np.exp(-(logits[:, a, None] + grid)))
            bce = -(labels[:, a, None] * np.log(p) + (1 - labels[:, a, None]) * np.log1p(-p)).sum(0)
            assert shifts[a] == pytest.approx(grid[np.argmin(bce + grid**2 / (2 * prior_std**2))], abs=2e-3)
    weak = fit_logit_shifts(logits, labels, 1e3)  # hardly a prior: mean prediction = observed rate
    np.testing.assert_allclose((1 / (1 + np.exp(-(logits + weak))))[:, :2].mean(0), labels[:, :2].mean(0), atol=1e-4)
    assert weak[0] == pytest.approx(0.7, abs=0.3) and np.isfinite(weak[2]) and weak[2] < -4


def test_the_logit_blend_is_the_most_probable_under_its_priors():
    """Weights and shifts where the penalized log loss has zero gradient (it is convex, so its
    minimum), and a planted blend recovered from many samples."""
    from phoenix_flax.extensions.calibration import fit_logit_blend

    rng = np.random.default_rng(1)
    n, k, a = 100_000, 3, 2
    logits, features = rng.normal(-1.0, 1.0, (n, a)), rng.normal(0.0, 1.0, (k, n, a))
    planted_w, planted_b = np.array([[0.5, -0.3], [0.0, 1.2], [-0.8, 0.4]]), np.array([0.3, -0.6])
    z = logits + np.einsum("kna,ka->na", features, planted_w) + planted_b
    labels = (rng.random((n, a)) < 1 / (1 + np.exp(-z))).astype(np.float64)
    labels[:, 1] *= rng.random(n) < 0.02  # a rare action besides: the prior matters there
    for prior_std, shift_std in ((1e3, 1e3), (0.3, 0.1)):
        w, b = fit_logit_blend(logits, labels, features, prior_std, shift_std)
        p = 1 / (1 + np.exp(-(logits + np.einsum("kna,ka->na", features, w) + b)))
        gradient_w = np.einsum("kna,na->ka", features, p - labels) + w / prior_std**2
        gradient_b = (p - labels).sum(0) + b / shift_std**2
        np.testing.assert_allclose(gradient_w, 0, atol=0.05)  # of sums over 100,000 candidates
        np.testing.assert_allclose(gradient_b, 0, atol=0.05)
    w, b = fit_logit_blend(logits[:, :1], labels[:, :1], features[:, :, :1], 1e3, 1e3)
    np.testing.assert_allclose(w[:, 0], planted_w[:, 0], atol=0.03)
    assert b[0] == pytest.approx(planted_b[0], abs=0.03)

    # Correlated parts of unequal scales, bimodal counts (a post's media) and the parts gated by
    # them: full Newton steps (each coordinate's clipped to 1) cycle here without converging.
    rng = np.random.default_rng(4)
    n = 20_000
    parts = rng.normal(0, 1, (4, n, 1)) * np.array([3, 2, 1, 1])[:, None, None] + rng.normal(0, 2, (1, n, 1))
    counts = np.where(rng.random((n, 1)) < 0.3, rng.normal(2, 0.5, (n, 1)), rng.normal(-3, 1, (n, 1)))
    features = np.stack(gated_blend_features(list(parts), counts))  # [9, n, 1]
    labels = (rng.random((n, 1)) < 1 / (1 + np.exp(-(counts + 0.5 * features[5] - 1)))).astype(np.float64)
    w, b = fit_logit_blend(parts.sum(0), labels, features, 1.0, 1.0)
    p = 1 / (1 + np.exp(-(parts.sum(0) + np.einsum("kna,ka->na", features, w) + b)))
    np.testing.assert_allclose(np.einsum("kna,na->ka", features, p - labels) + w, 0, atol=0.05)
    np.testing.assert_allclose((p - labels).sum(0) + b, 0, atol=0.05)


def test_shifts_to_rates_give_the_mean_prediction_asked():
    from phoenix_flax.extensions.calibration import shifts_to_rates

    rng = np.random.default_rng(2)
    logits = rng.normal(-2.0, 1.5, (5000, 3))
    shifts = shifts_to_rates(logits, np.array([0.3, 0.001, 0.0]))
    means = (1 / (1 + np.exp(-(logits + shifts)))).mean(0)
    np.testing.assert_allclose(means[:2], [0.3, 0.001], rtol=1e-5)
    assert np.isfinite(shifts[2]) and means[2] < 1e-5  # no positive at all: a finite shift all the same


@pytest.mark.slow
def test_the_best_checkpoint_is_kept_and_found_after_reopening(tiny_world, tmp_path):
    cfg = tiny_experiment(
        tiny_world["data_dir"],
        eval={"every_steps": 2, "batches": 2},
        checkpoint={"every_steps": 2, "keep": 1},
        optimizer={"learning_rate": 3e-2},
    )
    logged = train(cfg, str(tmp_path))
    evals = {m["step"]: m["eval_loss"] for m in logged if "eval_loss" in m}
    best = min(evals, key=evals.get)
    with Checkpointer.open_run(str(tmp_path)) as checkpoints:
        # The latest 1, the best, and the newest step known good when the latest was saved.
        assert checkpoints.all_steps() == sorted({best, 4, 6})
        assert checkpoints.best_step() == best
    assert restore_model(str(tmp_path), "best").step == best
    assert restore_model(str(tmp_path)).step == 6
    with pytest.raises(CheckpointError, match="no checkpoint of step 3"):
        restore_model(str(tmp_path), 3)


@pytest.mark.parametrize("scale", [1e-6, 1.0])
def test_a_table_row_moves_by_the_learning_rate_whatever_its_gradients_scale(scale):
    """Adagrad from a zero accumulator: a row's first step is lr x sign(gradient), however small
    the gradient (a row's share of a mean loss is tiny); rows the batch did not touch stay still,
    and the touched ones decay by lr x table_weight_decay."""
    from phoenix_flax.config import OptimizerConfig
    from phoenix_flax.step.optimizer import make_optimizer

    lr, decay = 0.1, 0.5
    cfg = OptimizerConfig(
        table_optimizer="adagrad",
        table_learning_rate=lr,
        table_initial_accumulator=0.0,
        table_weight_decay=decay,
        grad_clip_norm=1e9,
        action_bias_initial_accumulator=0.0,
        action_bias_offsets="adagrad",
    )
    rng = np.random.default_rng(0)
    params = {"emb": {"table": rng.normal(size=(4, 3)).astype(np.float32)}, "w": np.ones(3, np.float32)}
    grad = np.zeros((4, 3), np.float32)
    grad[[1, 3]] = rng.normal(size=(2, 3)) * scale
    tx = make_optimizer(cfg, total_steps=10)
    updates, _ = tx.update({"emb": {"table": grad}, "w": np.ones(3, np.float32)}, tx.init(params), params)
    table = params["emb"]["table"]
    want = np.where((grad != 0).any(-1, keepdims=True), -lr * np.sign(grad) - lr * decay * table, 0)
    np.testing.assert_allclose(np.asarray(updates["emb"]["table"]), want, rtol=1e-5, atol=1e-7)


def test_the_moving_average_of_the_parameters_by_hand():
    """optimizer.ema_decay: after each update t (from 0) the average is
    r * average + (1 - r) * parameters, r = min(decay, (1 + t) / (10 + t)), starting from the
    initial parameters; the updates themselves are those of the optimizer without it."""
    from phoenix_flax.config import OptimizerConfig
    from phoenix_flax.step.optimizer import ParamAverageState, make_optimizer

    decay = 0.5
    rng = np.random.default_rng(0)
    params = {
        "w": rng.normal(size=(3, 2)).astype(np.float32),
        "emb": {"table": rng.normal(size=(4, 2)).astype(np.float32)},
    }
    averaged = make_optimizer(
        OptimizerConfig(ema_decay=decay, warmup_steps=1, table_optimizer="adagrad"),
        20,
        1e-3,
        offset_columns=1,
        steps_per_epoch=1,
    )
    plain = make_optimizer(
        OptimizerConfig(warmup_steps=1, table_optimizer="adagrad"), 20, 1e-3, offset_columns=1, steps_per_epoch=1
    )
    state, plain_state = averaged.init(params), plain.init(params)
    want = jax.tree.map(np.copy, params)
    rates = [min(decay, (1 + t) / (10 + t)) for t in range(12)]
    assert rates[0] < decay == rates[-1]  # the first steps below the configured decay, the last at it
    for r in rates:
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        updates, state = averaged.update(grads, state, params)
        plain_updates, plain_state = plain.update(grads, plain_state, params)
        jax.tree.map(np.testing.assert_array_equal, updates, plain_updates)
        params = jax.tree.map(lambda p, u: p + np.asarray(u), params, updates)
        want = jax.tree.map(lambda a, p, r=r: r * a + (1 - r) * p, want, params)
    assert isinstance(state[-1], ParamAverageState) and int(state[-1].count) == 12
    jax.tree.map(
        lambda a, w: np.testing.assert_allclose(np.asarray(a), w, rtol=1e-5, atol=1e-6), state[-1].average, want
    )


@pytest.mark.slow
def test_the_moving_average_resumes_and_is_what_evaluation_restores(tiny_world, tmp_path):
    """A run stopped and resumed keeps the same average as one that was not (it is optimizer
    state); restore_model gives the average (saved beside the parameters), not the parameters."""
    from phoenix_flax.step.optimizer import averaged_params

    cfg = tiny_experiment(tiny_world["data_dir"], optimizer={"ema_decay": 0.5, "table_optimizer": "adagrad"})
    train(cfg, str(tmp_path / "full"))
    train(cfg, str(tmp_path / "split"), stop_after=4)
    train(cfg, str(tmp_path / "split"))
    full, split = restore_model(str(tmp_path / "full")), restore_model(str(tmp_path / "split"))
    assert full.step == split.step == 6
    averages = [nnx.state(r.model, nnx.Param) for r in (full, split)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), *averages)

    mesh = make_mesh({"data": -1, "fsdp": 1, "model": 1})
    with Checkpointer(str(tmp_path / "full")) as checkpoints:
        trained, optimizer = create_train_state(cfg, mesh, steps_per_epoch=1.0)  # shapes only: restored
        checkpoints.restore(6, trained, optimizer)
    kept = averaged_params(optimizer)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), nnx.as_pure(averages[0]), kept
    )
    differ = jax.tree.leaves(
        jax.tree.map(
            lambda a, p: not np.allclose(np.asarray(a), np.asarray(p)), kept, nnx.as_pure(nnx.state(trained, nnx.Param))
        )
    )
    assert sum(differ) > len(differ) // 2  # the average is not the parameters


@pytest.mark.parametrize("bias_decay", [0.0, 0.25])
def test_the_action_bias_tables_decay_by_their_own_rate(bias_decay):
    """optimizer.action_bias_weight_decay: the action-bias rows a step touches decay at their own
    rate, the embeddings' at table_weight_decay; without the action bias, no group of its own."""
    from phoenix_flax.config import OptimizerConfig
    from phoenix_flax.step.optimizer import make_optimizer

    lr, decay = 0.1, 0.5
    base = dict(table_learning_rate=lr, table_initial_accumulator=0.0, table_weight_decay=decay, grad_clip_norm=1e9)
    base["table_optimizer"] = "adagrad"  # the embeddings' rows element-wise too, as the bias's
    cfg = OptimizerConfig(
        **base, action_bias_weight_decay=bias_decay, action_bias_initial_accumulator=0.0, action_bias_offsets="adagrad"
    )
    rng = np.random.default_rng(0)
    table = rng.normal(size=(4, 3)).astype(np.float32)
    params = {"emb": {"table": table}, "action_bias": {"post": {"table": table}}, "w": np.ones(3, np.float32)}
    grad = np.zeros((4, 3), np.float32)
    grad[[0, 2]] = rng.normal(size=(2, 3))
    grads = {"emb": {"table": grad}, "action_bias": {"post": {"table": grad}}, "w": np.ones(3, np.float32)}
    tx = make_optimizer(cfg, total_steps=10, action_bias=True)
    updates, _ = tx.update(grads, tx.init(params), params)
    touched = (grad != 0).any(-1, keepdims=True)
    for name, got, rate in (
        ("embedding", updates["emb"]["table"], decay),
        ("action bias", updates["action_bias"]["post"]["table"], bias_decay),
    ):
        want = np.where(touched, -lr * np.sign(grad) - lr * rate * table, 0)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7, err_msg=name)
    assert set(tx.init(params)[1].inner_states) == {"dense", "tables", "bias_tables"}  # (clipping, multi_transform)
    without = {k: v for k, v in params.items() if k != "action_bias"}
    assert set(make_optimizer(cfg, total_steps=10).init(without)[1].inner_states) == {"dense", "tables"}


def test_the_action_bias_tables_start_adagrad_from_their_own_accumulator_counted_in_impressions():
    """optimizer.action_bias_initial_accumulator k: the action-bias rows' first step is
    -lr g / sqrt(k u^2 + g^2), u the gradient unit of one impression, so a view's gradient
    (0.9 u) moves a row further than a non-view's (0.05 u); the embeddings' stays -lr sign(g)."""
    from phoenix_flax.config import OptimizerConfig
    from phoenix_flax.step.optimizer import make_optimizer

    lr, k, unit = 0.1, 2.0, 1e-5
    cfg = OptimizerConfig(table_optimizer="adagrad", table_learning_rate=lr, table_weight_decay=0.0, grad_clip_norm=1e9)
    cfg = dataclasses.replace(
        cfg, action_bias_weight_decay=0.0, action_bias_initial_accumulator=k, action_bias_offsets="adagrad"
    )
    table = np.zeros((3, 2), np.float32)
    params = {"emb": {"table": table}, "action_bias": {"post": {"table": table}}, "w": np.ones(2, np.float32)}
    grad = np.array([[0.9, -0.05], [0, 0], [-3.0, 0.5]], np.float32) * unit
    grads = {"emb": {"table": grad}, "action_bias": {"post": {"table": grad}}, "w": np.ones(2, np.float32)}
    tx = make_optimizer(cfg, total_steps=10, impression_gradient=unit, action_bias=True)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(
        np.asarray(updates["action_bias"]["post"]["table"]), -lr * grad / np.sqrt(k * unit**2 + grad**2), rtol=1e-4
    )
    np.testing.assert_allclose(np.asarray(updates["emb"]["table"]), -lr * np.sign(grad), rtol=1e-5)
    with pytest.raises(ValueError, match="impression_gradient"):
        make_optimizer(cfg, total_steps=10, action_bias=True)


def test_newton_offsets_take_a_newton_step_and_their_factors_adagrads():
    """optimizer.action_bias_offsets="newton": a post or author row's offset columns move
    -step u (g + u theta / (v S)) / (k u^2 + g^2 + t u^2 / (v S)) (v the prior variance, 1 at the
    start; S steps per epoch; t steps so far), its factor columns and the user table's rows -lr g / sqrt(k u^2 + g^2), the embeddings
    as before; one optimizer group more."""
    from phoenix_flax.config import OptimizerConfig
    from phoenix_flax.step.optimizer import make_optimizer

    lr, k, unit, step, epoch = 0.1, 2.0, 1e-5, 0.5, 4.0
    cfg = OptimizerConfig(table_optimizer="adagrad", table_learning_rate=lr, table_weight_decay=0.0, grad_clip_norm=1e9)
    cfg = dataclasses.replace(cfg, action_bias_initial_accumulator=k, action_bias_newton_step=step)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(3, 3)).astype(np.float32)  # 2 offset columns, 1 factor column
    bias = {name: {"table": table} for name in ("post", "author", "user")}
    params = {"emb": {"table": table}, "action_bias": bias, "w": np.ones(3, np.float32)}
    grad = np.array([[0.9, -0.05, 0.3], [0, 0, 0], [-3.0, 0.5, -0.2]], np.float32) * unit
    grads = jax.tree.map(lambda _: grad, params)
    tx = make_optimizer(
        cfg, total_steps=10, impression_gradient=unit, action_bias=True, offset_columns=2, steps_per_epoch=epoch
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    sums = k * unit**2 + grad.astype(np.float64) ** 2
    adagrad = -lr * grad / np.sqrt(sums)
    newton = -step * unit * (grad + unit * table / epoch) / (sums + unit**2 / epoch)
    want = np.concatenate([newton[:, :2], adagrad[:, 2:]], axis=1)
    for name in ("post", "author"):
        np.testing.assert_allclose(np.asarray(updates["action_bias"][name]["table"]), want, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(np.asarray(updates["action_bias"]["user"]["table"]), adagrad, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(updates["emb"]["table"]), -lr * np.sign(grad), rtol=1e-5)
    assert set(tx.init(params)[1].inner_states) == {"dense", "tables", "bias_tables", "bias_offsets"}
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_optimizer(cfg, total_steps=10, impression_gradient=unit, action_bias=True, offset_columns=2)


def test_newton_offsets_learn_what_smoothed_counting_learns():
    """Rows seen a few times an epoch, one impression a step, over many epochs: each row's offset
    approaches the most probable logit under the fitted prior N(0, v) (solved here by Newton per
    row: sum_i (sigmoid(theta) - y_i) + theta / v = 0 over its impressions of an epoch); the prior
    is wide for the action the rows decide (rates 0.05 or 0.9) and narrow for the one they do not
    (every row 0.3), so that one's offsets stay near 0 while its counts scatter."""
    from phoenix_flax.extensions.optimizer import action_bias_newton

    rows, per_epoch, epochs, unit = 400, 8, 60, 1e-4
    rng = np.random.default_rng(0)
    rates = np.stack([np.where(rng.random(rows) < 0.5, 0.05, 0.9), np.full(rows, 0.3)], axis=1)  # [rows, 2]
    labels = (rng.random((per_epoch, rows, 2)) < rates).astype(np.float32)  # the same every epoch
    base = np.log(rates.mean(0) / (1 - rates.mean(0)))  # the rest of the model's logit
    tx = action_bias_newton(0.05, 1.0, 2, unit, unit**2, float(per_epoch))
    params = {"table": np.zeros((rows, 2), np.float32)}

    @jax.jit
    def step(params, state, y):
        grad = unit * (jax.nn.sigmoid(base + params["table"]) - y)
        updates, state = tx.update({"table": grad}, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(epochs):
        for i in range(per_epoch):
            params, state = step(params, state, labels[i])
    theta, v = np.asarray(params["table"], np.float64), np.asarray(state.prior_variance[0], np.float64)
    assert v[0] > 4 and v[1] < 0.5, v
    best = np.zeros_like(theta)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(base + best)))
        best -= ((p - labels).sum(0) + best / v) / (per_epoch * p * (1 - p) + 1 / v)
    for j in range(2):
        assert np.corrcoef(theta[:, j], best[:, j])[0, 1] > 0.999
        assert np.abs(theta[:, j] - best[:, j]).mean() < 0.2
    counted = labels.mean(0)[:, 1].clip(0.05, 0.95)
    assert theta[:, 1].std() < 0.5 * np.log(counted / (1 - counted)).std()


def test_quality_summary_counts_judged_actions_by_hand():
    from phoenix_flax.evaluation.evaluate import quality_summary

    row = {"positives": 60, "auc": 0.7, "popularity_auc": 0.6, "oracle_auc": 0.9}
    row |= {"calibration_ratio": 1.05, "oracle_calibration_ratio": 1.0}
    result = {
        "actions": {
            "a": row,  # beats popularity, closes (0.7 - 0.5) / (0.9 - 0.5) = 0.5; calibrated
            # loses, closes 0.5; 1.15 of the observed rate but 1.15 / 1.1 of the truth's mean
            "b": row | {"auc": 0.55, "oracle_auc": 0.6, "calibration_ratio": 1.15, "oracle_calibration_ratio": 1.1},
            "c": row | {"positives": 49, "auc": 0.9},  # too few positives: not judged
            # beats; the oracle is no better than chance; 0.88 of both
            "d": row | {"auc": 0.8, "oracle_auc": 0.5, "calibration_ratio": 0.88},
        }
    }
    want = {"beats_popularity": 2, "judged": 3, "mean_gap_closed": pytest.approx(0.5)}
    assert quality_summary(result) == want | {"calibrated": 1, "calibrated_vs_truth": 2}
    result["actions"]["a"] = row | {"oracle_calibration_ratio": None}  # no truth
    assert quality_summary(result)["calibrated_vs_truth"] is None


@pytest.mark.slow
def test_the_demo_reuses_a_finished_run_and_waits_for_a_preempted_one(tiny_world, tmp_path, monkeypatch, capsys):
    import phoenix_flax.training.loop
    from train.demo import train_and_evaluate

    cfg = tiny_experiment(
        tiny_world["data_dir"], data={"truth_file": tiny_world["truth"], "corpus_file": tiny_world["corpus"]}
    )
    monkeypatch.setattr(phoenix_flax.training.loop, "train", lambda c, w: train(c, w, stop_after=4))
    assert train_and_evaluate(cfg, str(tmp_path), {}) is None
    assert "preempted" in capsys.readouterr().out
    monkeypatch.undo()
    finished = train_and_evaluate(cfg, str(tmp_path), {})
    with Checkpointer(str(tmp_path / "train")) as checkpoints:
        assert finished is not None and checkpoints.latest_step() == 6
    assert train_and_evaluate(cfg, str(tmp_path), {}) == finished  # a finished run is evaluated again, not refused


def test_a_bad_step_is_skipped_and_leaves_parameters_and_optimizer_state_as_they_were():
    """Against a dense reference: AdamW run on the kept gradients alone gives the same parameters
    and state; non-finite gradients and ones far above the median are skipped and counted."""
    from phoenix_flax.step.optimizer import skip_bad_steps

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    inner = optax.adamw(0.1)
    tx = skip_bad_steps(inner, factor=10.0, window=8)
    normal = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(6)]
    nan = jax.tree.map(lambda p: jnp.full(p.shape, jnp.nan), params)
    huge = jax.tree.map(lambda g: g * 1000, normal[0])
    sequence = [*normal[:5], nan, huge, normal[5]]  # huge: 4 norms are known by then
    state, p, in_a_row = tx.init(params), params, []
    for g in sequence:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        in_a_row.append(int(state.in_a_row))
    assert in_a_row == [0, 0, 0, 0, 0, 1, 2, 0]
    ref_state, ref = inner.init(params), params
    for g in [*normal[:5], normal[5]]:
        updates, ref_state = inner.update(g, ref_state, ref)
        ref = optax.apply_updates(ref, updates)
    jax.tree.map(np.testing.assert_array_equal, p, ref)
    jax.tree.map(np.testing.assert_array_equal, state.inner, ref_state)


@pytest.mark.slow
def test_training_stops_with_a_named_error_after_too_many_bad_steps_in_a_row(tiny_world, tmp_path):
    """A learning rate that blows the parameters up after the first step: every later gradient
    is NaN, each step is skipped and logged, and the run stops at the limit naming it."""
    optimizer = {"learning_rate": 1e30, "table_learning_rate": 1e30, "warmup_steps": 0, "skip_bad_steps": True}
    cfg = tiny_experiment(
        tiny_world["data_dir"], optimizer={**optimizer, "max_bad_steps_in_a_row": 3}, train={"steps": 20}
    )
    with pytest.raises(BadStepsError, match=r"3 bad steps in a row up to step \d+"):
        train(cfg, str(tmp_path))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged and sum(m.get("skipped_steps", 0) for m in logged) >= 1
    assert all(math.isfinite(v) for m in logged for v in m.values() if isinstance(v, float))
