"""When things go wrong: damaged checkpoints, kill -9, two trainers, bad configs, incompatible resumes.

Each test does to a small run what users and machines do, and asserts the outcome: a fallback
with the losses an uninterrupted run has, a refusal in one line, or a named error.
"""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (
    REPO,
    assert_one_line_error,
    cli_overrides,
    flip_16_bytes,
    largest_file,
    run_program,
    tiny_experiment,
    truncate,
)

from phoenix_flax.checkpoint.integrity import INTEGRITY_FILE
from phoenix_flax.checkpoint.manager import Checkpointer
from phoenix_flax.checkpoint.restore import restore_model
from phoenix_flax.config import ConfigError, apply_overrides, load
from phoenix_flax.errors import CheckpointError, DamagedCheckpointError, IncompatibleCheckpointError
from phoenix_flax.training.loop import train
from phoenix_flax.training.workdir import WorkdirLock, WorkdirLockedError
from train import evaluate as evaluate_cli
from train import train as train_cli

STEPS = 9


def losses(logged) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in logged if "loss" in m}


def logged_steps(workdir) -> list[int]:
    """The training steps of metrics.jsonl, in file order (eval lines left out)."""
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [m["step"] for m in map(json.loads, lines) if "loss" in m]


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    """An uninterrupted run of 9 steps, and the same run stopped after 6 (checkpoints at 3, 6)."""
    root = tmp_path_factory.mktemp("robustness")
    cfg = tiny_experiment(tiny_world["data_dir"], train={"steps": STEPS}, checkpoint={"keep": 1})
    full = losses(train(cfg, str(root / "full")))
    train(cfg, str(root / "stopped"), stop_after=6)
    return {"cfg": cfg, "full": full, "stopped": root / "stopped"}


def copy_of(runs, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(runs["stopped"], workdir)
    return workdir


def truncate_stored_values(step_dir: pathlib.Path, item: str) -> None:
    """Halves every data file of the item's OCDBT store: damage a restore must read. (One file
    is not enough: the store keeps files no longer referenced, and one of those can be the largest.)"""
    for path in (step_dir / item).rglob("*"):
        if path.is_file() and path.parent.name == "d":
            truncate(path)


DAMAGE = {
    "truncated model file": lambda step: truncate(largest_file(step, "model")),
    "deleted optimizer file": lambda step: largest_file(step, "optimizer").unlink(),
    "16 bytes overwritten in the model": lambda step: flip_16_bytes(largest_file(step, "model")),
    "deleted data-position item": lambda step: shutil.rmtree(step / "data"),
    "truncated post counts": lambda step: truncate(largest_file(step, "counts")),
    "truncated integrity record": lambda step: truncate(step / INTEGRITY_FILE),
    "16 bytes overwritten in the integrity record": lambda step: flip_16_bytes(step / INTEGRITY_FILE),
    "truncated, no integrity record": lambda step: (
        (step / INTEGRITY_FILE).unlink(),
        truncate_stored_values(step, "model"),
    ),
}


@pytest.mark.slow
def test_retention_keeps_the_newest_good_step_beside_the_latest(runs):
    """keep=1, yet step 3 stays: it was the newest step known good when step 6 was saved."""
    with Checkpointer(str(runs["stopped"])) as checkpoints:
        assert checkpoints.all_steps() == [3, 6]
        for step in (3, 6):
            assert checkpoints.verify(step) is not None  # both have their integrity record


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_step_is_set_aside_and_training_resumes_from_the_one_before(runs, tmp_path, damage):
    workdir = copy_of(runs, tmp_path)
    DAMAGE[damage](workdir / "checkpoints" / "6")
    reports = []
    resumed = losses(train(runs["cfg"], str(workdir), report=reports.append))

    assert sorted(resumed) == [4, 5, 6, 7, 8, 9]
    np.testing.assert_allclose([resumed[s] for s in range(4, 10)], [runs["full"][s] for s in range(4, 10)], rtol=1e-6)
    (notice,) = [r for r in reports if "damaged" in r]
    assert notice.startswith("checkpoint step 6 is damaged: ") and "resuming from step 3" in notice
    assert (workdir / "damaged" / "6").is_dir()  # moved aside, not deleted
    assert logged_steps(workdir) == list(range(1, STEPS + 1))  # the log continues without repeating 4-6


@pytest.mark.slow
def test_serving_skips_a_damaged_latest_step_and_refuses_a_damaged_explicit_one(runs, tmp_path):
    workdir = copy_of(runs, tmp_path)
    flip_16_bytes(largest_file(workdir / "checkpoints" / "6", "model"))
    reports = []
    assert restore_model(str(workdir), report=reports.append).step == 3
    assert len(reports) == 1 and reports[0].startswith("checkpoint step 6 is damaged: model: file ")
    with pytest.raises(DamagedCheckpointError, match=r"step 6 is damaged: model: .* differs from what was written"):
        restore_model(str(workdir), 6)
    assert not (workdir / "damaged").exists()  # evaluation and serving change nothing


@pytest.mark.slow
def test_when_no_step_restores_nothing_is_moved_and_every_problem_is_named(runs, tmp_path):
    workdir = copy_of(runs, tmp_path)
    truncate(largest_file(workdir / "checkpoints" / "6", "model"))
    largest_file(workdir / "checkpoints" / "3", "optimizer").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint .* restores: checkpoint step 6 .*; checkpoint step 3 "):
        train(runs["cfg"], str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"] and not (workdir / "damaged").exists()


@pytest.mark.slow
def test_resuming_with_other_model_shapes_names_the_fields_and_touches_nothing(runs, tmp_path):
    workdir = copy_of(runs, tmp_path)
    wider = apply_overrides(runs["cfg"], ["--config.model.emb_size=32", "--config.model.key_size=8"])
    with pytest.raises(
        IncompatibleCheckpointError, match=r"model.emb_size: 16 in the checkpoint, 32 now; model.key_size"
    ):
        train(wider, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


@pytest.mark.slow
def test_resuming_with_a_harmless_change_says_what_changed(runs, tmp_path):
    workdir = copy_of(runs, tmp_path)
    reports = []
    train(apply_overrides(runs["cfg"], ["--config.train.log_every=3"]), str(workdir), report=reports.append)
    assert any("train.log_every: 1 in the checkpoint, 3 now" in r for r in reports)


@pytest.mark.slow
@pytest.mark.parametrize("record", ["with its integrity record", "without one (Orbax finds it)"])
def test_eval_of_a_damaged_explicit_step_exits_with_one_line(runs, tmp_path, record):
    workdir = copy_of(runs, tmp_path)
    step = workdir / "checkpoints" / "6"
    if record.startswith("without"):
        (step / INTEGRITY_FILE).unlink()
        truncate_stored_values(step, "model")
        # Orbax's root cause: a read past the truncated end (its wording varies with the driver
        # that hits it first: "OUT_OF_RANGE: Error reading ..." or "OUT_OF_RANGE: Error opening ...
        # Error reading Byte range ...").
        expected = ("OUT_OF_RANGE", "Error reading")
    else:
        largest_file(step, "model").unlink()
        expected = ("is missing",)
    result = run_program(
        "train.evaluate", "--workdir", str(workdir), "--step", "6", "--output", str(tmp_path / "m.json")
    )
    assert_one_line_error(result, "phoenix-eval: error: checkpoint step 6 is damaged: model: ", *expected)


@pytest.mark.slow
def test_only_what_reads_abandoned_by_a_failed_restore_report_is_dropped():
    """What Orbax's reads abandoned by a failed restore report (they made the damaged-step error
    above more than one line, now and then) is dropped; the same from elsewhere still shows."""
    program = (
        "from phoenix_flax.checkpoint.orbax_workarounds import AbandonedIO\n"
        "AbandonedIO.watch('/run/checkpoints')\n"
        "async def _read_array_index_and_device_put(): pass\n"
        "async def ours(): pass\n"
        "abandoned, forgotten = _read_array_index_and_device_put(), ours()\n"
        "del abandoned, forgotten\n"
        "import logging; log = logging.getLogger('asyncio')\n"
        "log.error('Future exception was never retrieved: Error reading x in /run/checkpoints/6/model/')\n"
        "log.error('Future exception was never retrieved: Error reading x in /elsewhere/')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "coroutine 'ours' was never awaited" in result.stderr
    assert "_read_array_index_and_device_put" not in result.stderr
    assert "/elsewhere/" in result.stderr and "/run/checkpoints" not in result.stderr


def test_config_problems_are_all_named_at_once_before_any_work(tiny_world, capsys):
    bad = [
        "--config.checkpoint.every_steps=0",
        "--config.checkpoint.best_metric=eval_weighted_acu",  # in the same section as a failing field
        "--config.model.num_candidates=0",
        "--config.data.batch_size=0",
        "--config.train.steps=-5",
        "--config.model.history_len=0",
        "--config.optimizer.learning_rate=nan",
        "--config.loss.logq=sometimes",
    ]
    rc = train_cli.main(["--config", str(REPO / "configs" / "demo.py"), "--workdir", "/nonexistent/never", *bad])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for expected in (
        "checkpoint.every_steps=0: must be at least 1",
        "model.num_candidates=0: must be at least 1",
        "data.batch_size=0: must be at least 1",
        "train.steps=-5: must be at least 1",
        "model.history_len=0: must be at least 1",
        "optimizer.learning_rate='nan': expected a finite number",
        "loss.logq='sometimes': expected one of",
        "checkpoint.best_metric='eval_weighted_acu': evaluation during training produces",
    ):
        assert expected in err, err
    assert not os.path.exists("/nonexistent/never")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--config.model.emb_size=0"], ["model.emb_size=0: must be at least 1"]),
        (["--config.model.actions=favorite,favorite"], ["model.actions=('favorite', 'favorite'): has duplicates"]),
        (
            ["--config.model.emb_size=0", "--config.loss.action_weights=1,2"],
            ["model.emb_size=0: must be at least 1", "loss.action_weights has 2 weights for 15 actions"],
        ),
        (
            ["--config.model.actions=favorite,likes"],
            [
                "checkpoint.best_metric='eval_weighted_auc' needs a default score weight for every action; "
                "model.actions has ['likes'] without one (pick another metric, e.g. 'eval_mean_auc')"
            ],
        ),
    ],
)
def test_nothing_is_derived_from_an_invalid_field(overrides, expected):
    """demo.py's best_metric is eval_weighted_auc, valid for its actions: a bad model field is
    named alone, not beside a best_metric complaint derived from it."""
    with pytest.raises(ConfigError) as error:
        apply_overrides(load(str(REPO / "configs" / "demo.py")), overrides)
    assert error.value.problems == expected


@pytest.mark.parametrize(
    "source, line, message",
    [
        ("from configs.demo import *\nx = (\n", 2, "'(' was never closed"),
        ("def get_config():\n    return 1 / 0\n", 2, "ZeroDivisionError: division by zero"),
        ("import phoenix_nope\n", 1, "ModuleNotFoundError: No module named 'phoenix_nope'"),
    ],
)
def test_a_config_file_that_fails_is_named_by_file_and_line(tmp_path, capsys, source, line, message):
    path = tmp_path / "broken.py"
    path.write_text(source)
    rc = train_cli.main(["--config", str(path), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"phoenix-train: error: config: {path}:{line}: {message}"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--config.checkpoint.best_metric=eval_nope"],
            "checkpoint.best_metric='eval_nope': evaluation during training produces",
        ),
        (["--config.eval.batches=0"], "produces nothing (eval.batches=0)"),
        (
            ["--config.loss.ranking_weight=0", "--config.checkpoint.best_metric=eval_ranking_loss"],
            "best_metric='eval_ranking_loss'",
        ),
        (["--config.loss.action_weights=1,2"], "loss.action_weights has 2 weights for 15 actions"),
        (
            ["--config.model.affinity_rank=0"],
            "loss.exposure_weight=0.1 trains the ranker's affinity factors: it needs",
        ),
        (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one axis may be -1"),
    ],
)
def test_sections_that_disagree_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(load(str(REPO / "configs" / "demo.py")), overrides)


def test_preflight_names_data_and_mesh_problems_before_device_work(tiny_world, tmp_path):
    missing = tiny_experiment(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=r"data.data_dir=.*no prepared dataset in"):
        train(missing, str(tmp_path / "run"))
    assert not (tmp_path / "nothing").exists()  # TFDS was not left to generate an empty dataset there
    assert not (tmp_path / "run").exists()

    cfg = tiny_experiment(
        tiny_world["data_dir"],
        data={"batch_size": 12, "eval_split": "holdout"},
        mesh={"data": 8, "fsdp": 1, "model": 1},
        model={"actions": ("favorite", "bookmark")},
        loss={"action_weights": None},
    )
    with pytest.raises(ConfigError) as error:
        train(cfg, str(tmp_path / "run"))
    problems = "\n".join(error.value.problems)
    assert "data.batch_size=12: does not divide over the mesh's data x fsdp = 8 devices" in problems
    assert "needs the evaluation split data.eval_split='holdout'" in problems
    assert "model.actions: ['bookmark'] are not in the dataset's vocabulary" in problems


def test_training_data_with_surfaces_beyond_the_vocabulary_is_refused(tmp_path):
    from phoenix_flax.data.prepare import SplitSource, prepare

    record = {
        "user_id": 1,
        "history": [],
        "candidates": [{"post_id": 2, "author_id": 3, "product_surface": 999, "actions": []}],
    }
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(record) + "\n")
    prepare(str(tmp_path / "prepared"), {"train": SplitSource((str(path),))})
    cfg = tiny_experiment(str(tmp_path / "prepared"), checkpoint={"best_metric": ""})
    with pytest.raises(
        ConfigError, match=r"model.product_surface_vocab_size=16: split 'train' has product_surface 999"
    ):
        train(cfg, str(tmp_path / "run"))


def test_the_workdir_lock_refuses_a_second_holder_and_reports_a_stale_one(tmp_path):
    with WorkdirLock(str(tmp_path)) as first:
        assert first.stale is None
        with pytest.raises(WorkdirLockedError, match=f"in use by another training run \\(pid {os.getpid()} on "):
            WorkdirLock(str(tmp_path)).acquire()
    with WorkdirLock(str(tmp_path)) as again:  # released cleanly: nothing stale
        assert again.stale is None
    (tmp_path / ".lock").write_text(json.dumps({"pid": 4242, "host": "gone", "started": "yesterday"}))
    with WorkdirLock(str(tmp_path)) as taken:  # a holder that died without releasing
        assert taken.stale.startswith("pid 4242 on gone, started yesterday, ended without releasing its lock")


@pytest.mark.slow
def test_a_second_trainer_on_one_workdir_refuses_and_the_first_is_unharmed(tiny_world, tmp_path):
    cfg = tiny_experiment(tiny_world["data_dir"], train={"steps": 100_000}, checkpoint={"every_steps": 5})
    args = ["--config", str(REPO / "configs" / "demo.py"), "--workdir", str(tmp_path), *cli_overrides(cfg)]
    first = subprocess.Popen(
        [sys.executable, "-m", "train.train", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_steps(first, tmp_path, 3)
        second = run_program("train.train", *args, "--config.train.seed=1")
        assert_one_line_error(
            second, "phoenix-train: error: ", "is in use by another training run", f"pid {first.pid} "
        )
        assert first.poll() is None  # still training
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["seed"] == 0
    steps = logged_steps(tmp_path)
    assert steps == list(range(1, len(steps) + 1))  # one run's log, no interleaving
    assert restore_model(str(tmp_path)).step == steps[-1]


def wait_for_steps(proc, workdir, n, timeout=300):
    metrics = pathlib.Path(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while not metrics.exists() or len(metrics.read_text().splitlines()) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_repeats_the_uninterrupted_losses(tiny_world, tmp_path):
    """Saves every step, asynchronously, so kills land during saves as well as between them."""
    steps = 24
    cfg = tiny_experiment(
        tiny_world["data_dir"], train={"steps": steps}, checkpoint={"every_steps": 1, "keep": 2, "asynchronous": True}
    )
    args = ["--config", str(REPO / "configs" / "demo.py"), *cli_overrides(cfg)]
    reference = run_program("train.train", *args, "--workdir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    workdir = tmp_path / "killed"
    for _ in range(2):  # each a program start (~15 s): the suite's time; the seed varies the moments
        proc = subprocess.Popen(
            [sys.executable, "-m", "train.train", *args, "--workdir", str(workdir)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        metrics = workdir / "metrics.jsonl"
        before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        wait_for_steps(proc, workdir, before + 1)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.communicate()
    final = run_program("train.train", *args, "--workdir", str(workdir))
    assert final.returncode == 0, f"seed {seed}: {final.stderr[-3000:]}"

    def read(w):
        lines = (w / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["loss"]) for m in map(json.loads, lines) if "loss" in m]

    want, got = read(tmp_path / "reference"), read(workdir)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, steps + 1)), f"seed {seed}"
    np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=1e-6, err_msg=f"seed {seed}")


@pytest.mark.slow
def test_a_step_without_integrity_record_still_restores(runs, tmp_path):
    """A run killed after Orbax finished a save but before the record was written."""
    workdir = copy_of(runs, tmp_path)
    (workdir / "checkpoints" / "6" / INTEGRITY_FILE).unlink()
    restored = restore_model(str(workdir))
    assert restored.step == 6 and restored.digest is None


def test_evaluation_of_a_missing_run_is_one_line(tmp_path, capsys):
    rc = evaluate_cli.main(["--workdir", str(tmp_path / "none"), "--output", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "phoenix-eval: error: no checkpoints in" in err[0]


@pytest.mark.slow
def test_training_without_evaluation_saves_when_no_best_checkpoint_is_asked_for(tiny_world, tmp_path):
    cfg = tiny_experiment(tiny_world["data_dir"], eval={"batches": 0}, checkpoint={"best_metric": ""})
    logged = train(cfg, str(tmp_path))
    assert not [m for m in logged if any(k.startswith("eval_") for k in m)]
    with Checkpointer(str(tmp_path)) as checkpoints:
        assert checkpoints.all_steps() == [3, 6]


@pytest.mark.slow
def test_evaluating_on_data_of_another_action_vocabulary_is_one_line(runs, tmp_path, capsys):
    from phoenix_flax.data.prepare import SplitSource, prepare

    record = {
        "user_id": 1,
        "history": [],
        "candidates": [{"post_id": 2, "author_id": 3, "product_surface": 0, "actions": []}],
    }
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(record) + "\n")
    prepare(str(tmp_path / "other"), {"test": SplitSource((str(path),))}, actions=("favorite", "reply"))
    args = [
        "--workdir",
        str(runs["stopped"]),
        "--data-dir",
        str(tmp_path / "other"),
        "--output",
        str(tmp_path / "m.json"),
    ]
    rc = evaluate_cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("phoenix-eval: error: the model's actions ['repost', 'quote'")
    assert "are not in the dataset's vocabulary ['favorite', 'reply']" in err[-1]
