"""Test set-up. Eight simulated CPU devices, configured before JAX starts, for the sharding tests."""

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# The 8 devices share 2 cores: under load a collective's participants can arrive far apart, and
# XLA's CPU runtime aborts the process ("Fatal Python error: Aborted") when one waits past its
# termination timeout (40 s by default). A loaded run of the suite ended so once, in a test whose
# steps ring the row-wise tables' gradients over 8 devices; the cause was not seen, this is the likely one.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_timeout_seconds=1800 --xla_cpu_collective_call_terminate_timeout_seconds=1800"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs shared by every test and the programs they start: the many small runs
# compile the same steps, and compiling dominates their time on a CPU.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="phoenix-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "phoenix_reference_golden.npz"  # see tests/data/README.md


@pytest.fixture(scope="session")
def golden():
    """The original implementation's reference vectors, split by key prefix."""
    z = np.load(REFERENCE)

    def section(prefix):
        return {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}

    return {
        "config": json.loads(str(z["config_json"])),
        "ranker_params": section("ranker_params/"),
        "retrieval_params": section("retrieval_params/"),
        "batch": section("batch/"),
        "embeddings": section("embeddings/"),
        "expected": section("expected/"),
    }


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small synthetic world, prepared once: {'raw': files by split, 'data_dir', 'truth', 'corpus'}."""
    from phoenix_flax.data import prepare, synth

    root = tmp_path_factory.mktemp("tiny_world")
    cfg = synth.WorldConfig(seed=0, users=120, authors=20, posts=400, sessions=1600, candidates=8, history=16)
    world = synth.World(cfg)
    files = synth.write_world(world, synth.simulate(world, progress=False), str(root / "raw"))
    data_dir = str(root / "prepared")
    prepare.prepare(data_dir, {split: prepare.SplitSource((path,)) for split, path in files.items()})
    return {
        "raw": files,
        "data_dir": data_dir,
        "truth": str(root / "raw" / "test_truth.npz"),
        "corpus": str(root / "raw" / "corpus.jsonl"),
    }


# The model extensions configs/demo.py turns on (phoenix_flax/extensions).
EXTENSIONS = {"action_bias": True, "calibration": True, "count_blend": True, "count_gate": True}


def tiny_experiment(data_dir: str, **sections):
    """A small joint experiment on `data_dir`, with the demo's extensions; `sections` replace
    fields: tiny_experiment(d, train={"steps": 3})."""
    from phoenix_flax.config import (
        CheckpointConfig,
        DataConfig,
        EvalConfig,
        ExperimentConfig,
        LossConfig,
        ModelConfig,
        OptimizerConfig,
        TrainConfig,
        replace_fields,
    )

    cfg = ExperimentConfig(
        name="tiny",
        model=ModelConfig(
            emb_size=16,
            key_size=4,
            num_q_heads=4,
            num_kv_heads=2,
            num_layers=1,
            history_len=8,
            num_candidates=8,
            user_vocab_rows=256,
            post_vocab_rows=1024,
            author_vocab_rows=64,
            **EXTENSIONS,
        ),
        data=DataConfig(data_dir=data_dir, batch_size=16),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
        loss=LossConfig(ranking_weight=1.0, retrieval_weight=0.5, logq="estimated", frequency_buckets=4096),
        checkpoint=CheckpointConfig(every_steps=3, keep=2, asynchronous=False),
        eval=EvalConfig(every_steps=1000, batches=2),
        train=TrainConfig(steps=6, log_every=1),
    )
    return replace_fields(cfg, **sections)


def cli_overrides(cfg, base=None) -> list[str]:
    """`--config.a.b=v` arguments turning configs/demo.py into `cfg`."""
    from phoenix_flax.config import apply_overrides, load, to_dict

    base = to_dict(load(str(REPO / "configs" / "demo.py")) if base is None else base)

    def walk(target, current, prefix):
        for k, v in target.items():
            if isinstance(v, dict):
                yield from walk(v, current[k], f"{prefix}{k}.")
            elif v != current[k]:
                text = "none" if v is None else ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
                yield f"--config.{prefix}{k}={text}"

    args = list(walk(to_dict(cfg), base, ""))
    assert apply_overrides(load(str(REPO / "configs" / "demo.py")), args) == cfg
    return args


def run_program(module, *args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_line_error(result, *fragments):
    """A non-zero exit with one line on stderr, which says what went wrong: no traceback, and no
    messages from background threads after it."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def flip_16_bytes(path: pathlib.Path, at: float = 0.5) -> None:
    """Same size, 16 bytes changed (at a fraction `at` of the file): only a checksum can tell."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + 16] = bytes(255 - b for b in data[start : start + 16])
    path.write_bytes(bytes(data))


def largest_file(step_dir: pathlib.Path, item: str) -> pathlib.Path:
    """The largest file of a checkpoint step's item (`model`, `optimizer`, ...): damage a restore reads."""
    return max((p for p in (step_dir / item).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: pathlib.Path) -> None:
    """The first half of the file kept."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def assert_blockwise_equals_dense(blockwise, q, k, v, mask, out_weights, lse_weights, real=None):
    """`blockwise(q, k, v) -> (out [B, Tq, N, G, K], lse [B, N, G, Tq])` against dense attention
    under `mask [B, Tq, Tk]` (logits scaled by 0.7, soft-capped at 30): the outputs and log-sum-exps
    of the queries `real [B, Tq]` (default: all), and the gradients by q, k and v of
    sum(out * out_weights) + sum(lse * lse_weights)."""
    import jax
    import jax.numpy as jnp

    from phoenix_flax.model.attention import dense_attention

    def dense(q, k, v):
        logits = jnp.einsum("bqngk,bsnk->bngqs", q, k) * 0.7
        logits = jnp.where(mask[:, None, None], 30 * jnp.tanh(logits / 30), -1e30)
        return dense_attention(q, k, v, mask, 0.7), jax.nn.logsumexp(logits, -1)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a)[0] * out_weights) + jnp.sum(fn(*a)[1] * lse_weights)

    real = np.ones(q.shape[:2], bool) if real is None else real
    (want_out, want_lse), (got_out, got_lse) = dense(q, k, v), blockwise(q, k, v)
    np.testing.assert_allclose(np.asarray(got_out)[real], np.asarray(want_out)[real], atol=1e-5, rtol=1e-5)
    got_lse, want_lse = np.moveaxis(np.asarray(got_lse), 3, 1), np.moveaxis(np.asarray(want_lse), 3, 1)
    np.testing.assert_allclose(got_lse[real], want_lse[real], atol=1e-5, rtol=1e-5)
    want = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)  # compiled once, not op by op
    got = jax.jit(jax.grad(loss(blockwise), argnums=(0, 1, 2)))(q, k, v)
    for x, y in zip(want, got, strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-5)


# --- interaction logs (phoenix-import, in one process and on Beam) ---------------------------------


def random_log(seed=0, users=12, items=30, events=200):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(events):
        rows.append(
            {
                "uid": int(rng.integers(1, users + 1)),
                "iid": f"item-{int(rng.integers(items))}",  # string IDs: hashed
                "ts": int(rng.integers(0, 50)),  # many ties
                "rating": int(rng.integers(1, 6)),
                "kind": str(rng.choice(["view", "reply"])),
            }
        )
    return rows


def write_csv(path, rows, sep=","):
    cols = list(rows[0])
    with open(path, "w") as f:
        f.write(sep.join(cols) + "\n")
        for r in rows:
            f.write(sep.join(str(r[c]) for c in cols) + "\n")
    return str(path)


def run_import(tmp_path, inputs, *extra):
    """phoenix-import on `inputs` into `tmp_path/imported`, labels from the rating -> (exit code, out)."""
    from train import import_logs

    out = tmp_path / "imported"
    argv = ["--input", *inputs, "--out", str(out), "--user", "uid", "--item", "iid", "--timestamp", "ts"]
    argv += ["--rule", "click:*", "--rule", "favorite:rating>=4", "--rule", "not_interested:rating<=2"]
    return import_logs.main([*argv, *extra]), out
