"""Fault injection: what disks, crashes and hostile inputs do to every file the project writes.

Full disks and file-size limits (RLIMIT_FSIZE, set on a running trainer; a small tmpfs where the
machine allows one), truncations and byte flips of prepared datasets and index caches (checkpoint
items: test_robustness.py), torn metrics lines, kill -9 during writes, and seeded random input
for the session and log parsers. Each asserts one line and the exit code, or a rebuild, and
that nothing written before was lost.
"""

import json
import os
import pathlib
import random
import re
import resource
import shlex
import shutil
import struct
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
    run_program,
    tiny_experiment,
    truncate,
)

from phoenix_flax.config import DEFAULT_ACTIONS
from phoenix_flax.data.importer import ActionRule, ImportSpec, read_events
from phoenix_flax.data.pipeline import dataset_actions, dataset_statistics, open_source
from phoenix_flax.data.prepare import dataset_dir
from phoenix_flax.data.raw import INT64_MAX, INT64_MIN, SessionFormatError, SkipReport, read_sessions
from phoenix_flax.errors import DatasetError
from phoenix_flax.evaluation.evaluate import oracle_scores, read_truth
from phoenix_flax.training.loop import MetricWriter

ACTIONS = DEFAULT_ACTIONS[:4]


# --- torn metrics lines ---------------------------------------------------------------------------


def test_a_torn_metrics_line_is_dropped_with_a_notice_and_the_complete_ones_kept(tmp_path):
    complete = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(complete[:2]) + '{"step": 3, "lo\n' + complete[3] + '{"step": 5, "lo'
    )
    notes = []
    with MetricWriter(str(tmp_path), resume_step=4, report=notes.append) as writer:
        writer.write(5, {"loss": 0.2})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 4, 5]
    assert [n.split(": dropped")[0] for n in notes] == [f"note: {tmp_path}/metrics.jsonl:{i}" for i in (3, 5)]


def test_a_metrics_line_that_cannot_be_written_is_named(tmp_path):
    from phoenix_flax.files import OutputError

    with MetricWriter(str(tmp_path), resume_step=0) as writer:
        writer.jsonl.close()
        writer.jsonl = open("/dev/full", "w")  # noqa: SIM115  (every write: ENOSPC)
        with pytest.raises(OutputError, match=f"cannot write {tmp_path}/metrics.jsonl: No space left on device"):
            writer.write(1, {"loss": 1.0})


def tensorboard_events(folder):
    """Every event of a TensorBoard folder's event files, read from the record framing (length,
    its CRC, the serialized Event, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            events.append(Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return events


def test_tensorboard_events_hold_each_written_metric_and_a_resume_purges_later_steps(tmp_path):
    with MetricWriter(str(tmp_path), resume_step=0) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": 1.0 / step, "auc": 0.5})
    with MetricWriter(str(tmp_path), resume_step=1) as writer:
        writer.write(2, {"loss": 0.25})
    scalars = [
        (e.step, v.tag, v.simple_value) for e in tensorboard_events(tmp_path / "tensorboard") for v in e.summary.value
    ]
    third = pytest.approx(1 / 3)  # stored as float32
    first_run = [
        (1, "loss", 1.0),
        (1, "auc", 0.5),
        (2, "loss", 0.5),
        (2, "auc", 0.5),
        (3, "loss", third),
        (3, "auc", 0.5),
    ]
    assert scalars == [*first_run, (2, "loss", 0.25)]
    starts = [e.step for e in tensorboard_events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert starts == [1, 2]  # TensorBoard hides a run's events from these steps on when it restarts


def test_metrics_that_cannot_be_written_fail_once_in_the_writer_and_leave_nothing_to_fail_at_exit(tmp_path):
    """Events are written and flushed with the metrics line, in the caller's thread: a full disk
    (here a file-size limit) is one OutputError there; no background thread or exit hook is left
    holding unwritten events to print a traceback later."""
    program = (
        "import resource\n"
        "from phoenix_flax.files import OutputError\n"
        "from phoenix_flax.training.loop import MetricWriter\n"
        "try:\n"
        f"    with MetricWriter({str(tmp_path)!r}, resume_step=0) as writer:\n"
        "        writer.write(1, {'loss': 1.0})\n"
        "        resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))\n"
        "        writer.write(2, {f'metric_{i}': float(i) for i in range(64)})\n"
        "except OutputError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert result.stdout == f"cannot write {tmp_path}/metrics.jsonl: File too large\n"
    scalars = [(e.step, v.tag) for e in tensorboard_events(tmp_path / "tensorboard") for v in e.summary.value]
    assert scalars == [(1, "loss")]


def test_an_output_is_written_whole_or_left_as_it_was(tmp_path):
    """`replaced` under a file-size limit (a full disk's error, EFBIG for ENOSPC): one OutputError
    naming the file; the previous content stays and no temporary file is left."""
    out = tmp_path / "out.jsonl"
    out.write_text("before\n")
    program = (
        "import resource, sys\n"
        "from phoenix_flax.files import OutputError, replaced\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        f"    with replaced({str(out)!r}) as f:\n"
        "        for _ in range(1000): f.write('x' * 99 + '\\n')\n"
        "except OutputError as e:\n"
        "    print(e); sys.exit(2)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout.strip() == f"cannot write {out}: File too large", result
    assert out.read_text() == "before\n" and os.listdir(tmp_path) == ["out.jsonl"]


# --- damaged prepared datasets --------------------------------------------------------------------


@pytest.fixture
def prepared_copy(tiny_world, tmp_path):
    target = tmp_path / "prepared"
    shutil.copytree(tiny_world["data_dir"], target)
    return str(target), pathlib.Path(dataset_dir(str(target)))


@pytest.mark.parametrize("damage", ["truncated", "16 bytes flipped", "emptied"])
def test_a_damaged_dataset_shard_is_named_when_read(prepared_copy, damage):
    data_dir, files = prepared_copy
    (shard,) = files.glob("*-train.array_record-*")
    {"truncated": truncate, "16 bytes flipped": flip_16_bytes, "emptied": lambda p: p.write_bytes(b"")}[damage](shard)
    source = open_source(data_dir, "train")
    with pytest.raises(DatasetError, match=f"{shard} is damaged .*prepare the dataset again"):
        source.__getitems__(list(range(len(source))))


@pytest.mark.parametrize("name", ["dataset_info.json", "metadata.json", "statistics.json"])
def test_a_damaged_dataset_description_is_named(prepared_copy, name):
    data_dir, files = prepared_copy
    truncate(files / name)
    with pytest.raises(DatasetError, match=f"the prepared dataset in {files} is damaged"):
        dataset_actions(data_dir)
        dataset_statistics(data_dir)


# --- truth files ----------------------------------------------------------------------------------


def test_truth_files_of_another_kind_or_split_are_named(tiny_world, tmp_path):
    truth = read_truth(tiny_world["truth"], ACTIONS)
    some = truth["session_id"][:3]
    np.testing.assert_array_equal(
        oracle_scores(truth, some, np.zeros(3, np.int64), ACTIONS, "t"),
        truth["probs"][truth["offsets"][:3]][:, : len(ACTIONS)],
    )
    with pytest.raises(DatasetError, match="t lacks some evaluated sessions or candidates"):
        oracle_scores(truth, some + 10**9, np.zeros(3, np.int64), ACTIONS, "t")
    with pytest.raises(DatasetError, match="t lacks some evaluated sessions or candidates"):
        oracle_scores(truth, some, np.full(3, 10**6), ACTIONS, "t")
    with pytest.raises(DatasetError, match=r"has no true probabilities of \['likes'\]"):
        read_truth(tiny_world["truth"], ("favorite", "likes"))
    copy = tmp_path / "truth.npz"
    for write, problem in [
        (lambda p: p.write_text('{"post_id": 1}\n'), "is not a truth file"),
        (lambda p: np.save(p.open("wb"), np.array([{}], object), allow_pickle=True), "is not a truth file"),
        (lambda p: (shutil.copy(tiny_world["truth"], p), truncate(p)), "is not a truth file"),
        (lambda p: np.savez(p, session_id=np.arange(3)), r"it lacks \['offsets', 'probs', 'actions'\]"),
    ]:
        write(copy)
        with pytest.raises(DatasetError, match=f"{copy}.*{problem}"):
            read_truth(str(copy), ACTIONS)


# --- the parsers, on seeded random input ----------------------------------------------------------

EXTREMES = [
    0,
    -1,
    1,
    INT64_MAX,
    INT64_MIN,
    INT64_MAX + 1,
    INT64_MIN - 1,
    2**64,
    1.5,
    1e308,
    -0.0,
    True,
    None,
    "7",
    [],
    {},
]


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(EXTREMES)
    if kind == 1:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(6)))
    if kind == 2:
        return rng.random() * 10 ** rng.randrange(-5, 300)
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["user_id", "history", "candidates", "post_id", "author_id", "product_surface", "actions", "in_network"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def valid_record(rng: random.Random) -> dict:
    def item(labeled: bool) -> dict:
        out = {
            "post_id": rng.randrange(INT64_MIN, INT64_MAX + 1),
            "author_id": rng.randrange(-5, 5),
            "product_surface": rng.randrange(3),
        }
        if labeled:
            out["actions"] = rng.sample(ACTIONS, rng.randrange(len(ACTIONS) + 1))
        return out

    labeled = rng.random() < 0.5
    return {
        "user_id": rng.choice([INT64_MIN, INT64_MAX, rng.randrange(1000)]),
        "history": [item(True) for _ in range(rng.randrange(4))],
        "candidates": [item(labeled) for _ in range(rng.randrange(1, 4))],
    }


def mutated(rng: random.Random, record: dict) -> dict:
    """A valid record with one value somewhere replaced by a random one."""
    record = json.loads(json.dumps(record))
    target = record
    while True:
        key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
        inner = target[key]
        if isinstance(inner, (dict, list)) and inner and rng.random() < 0.6:
            target = inner
            continue
        target[key] = random_json(rng)
        return record


def random_line(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40))).replace(b"\n", b" ")
    if kind == 1:
        return json.dumps(random_json(rng)).encode()
    if kind == 2:
        return json.dumps(valid_record(rng)).encode()
    text = json.dumps(mutated(rng, valid_record(rng)))
    if kind == 4:  # torn
        text = text[: rng.randrange(len(text))]
    return text.encode("utf-8", "surrogatepass")


def as_record(session, actions=ACTIONS) -> dict:
    """A parsed Session back in the raw format."""

    def items(post, author, surface, masks, labeled):
        return [
            {
                "post_id": int(p),
                "author_id": int(a),
                "product_surface": int(s),
                **({"actions": [n for i, n in enumerate(actions) if int(m) >> i & 1]} if labeled else {}),
            }
            for p, a, s, m in zip(post, author, surface, masks, strict=True)
        ]

    s = session
    return {
        "session_id": s.session_id,
        "user_id": s.user_id,
        "history": items(s.history_post_id, s.history_author_id, s.history_product_surface, s.history_actions, True),
        "candidates": items(
            s.candidate_post_id, s.candidate_author_id, s.candidate_product_surface, s.candidate_actions, s.labeled
        ),
    }


def test_the_session_parser_accepts_with_a_round_trip_or_names_file_line_and_field(tmp_path):
    """Random bytes, random JSON, extreme numbers and valid records with one value changed: each
    line is read back to the same record or rejected with its file and line, never a traceback."""
    rng = random.Random(33)
    lines = [random_line(rng) for _ in range(600)]
    path = tmp_path / "random.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = SkipReport()
    accepted = {
        int(key.split(":")[1]): s for key, s in read_sessions([str(path)], ACTIONS, skip_invalid=True, report=report)
    }
    nonblank = [i for i, line in enumerate(lines, start=1) if line.strip()]
    assert len(accepted) + report.total == len(nonblank) and 50 < len(accepted) < len(nonblank) - 50
    again = tmp_path / "again.jsonl"
    again.write_text("".join(json.dumps(as_record(s)) + "\n" for s in accepted.values()))
    reread = [s for _, s in read_sessions([str(again)], ACTIONS)]
    assert [as_record(s) for s in reread] == [as_record(s) for s in accepted.values()]
    for line in nonblank:  # each rejected line, alone, is named at its line
        if line in accepted:
            continue
        single = tmp_path / "single.jsonl"
        single.write_bytes(b"\n" * (line - 1) + lines[line - 1] + b"\n")
        with pytest.raises(SessionFormatError) as error:
            list(read_sessions([str(single)], ACTIONS))
        assert (error.value.path, error.value.line) == (str(single), line)


def random_csv_value(rng: random.Random) -> bytes:
    return rng.choice(
        [
            str(rng.randrange(-5, 50)).encode(),
            str(rng.choice([INT64_MAX, INT64_MIN, INT64_MAX + 1, INT64_MIN - 1, 2**64])).encode(),
            b"",
            b"1e400",
            b"nan",
            b"2026-12-04T10:00:00",
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
            .replace(b"\n", b"")
            .replace(b",", b"")
            .replace(b'"', b"")
            .replace(b"\r", b""),
            f"item-{rng.randrange(9)}".encode(),
        ]
    )


def test_the_log_parser_accepts_with_a_round_trip_or_names_file_line_and_column(tmp_path):
    rng = random.Random(34)
    rows = []
    for _ in range(400):
        fields = [random_csv_value(rng) for _ in range(rng.choice([4, 4, 4, 4, 3, 5]))]
        if rng.random() < 0.5:  # mostly well-formed rows
            fields = [
                str(rng.randrange(20)).encode(),
                f"item-{rng.randrange(9)}".encode(),
                b"3",
                str(rng.randrange(99)).encode(),
            ]
        rows.append(b",".join(fields))
    path = tmp_path / "log.csv"
    path.write_bytes(b"user,item,rating,ts\n" + b"\n".join(rows) + b"\n")
    spec = ImportSpec(
        "user", "item", "ts", ACTIONS, rules=(ActionRule.parse("favorite:rating>=4"), ActionRule.parse("quote:*"))
    )
    report = SkipReport()
    events = read_events([str(path)], spec, skip_invalid=True, report=report)
    assert len(events) + report.total == len(rows) and 100 < len(events) < len(rows) - 20
    lines = [e.split(": ")[0] for e in report.examples.values()]
    assert all(line.startswith(f"{path}:") for line in lines)
    # Round trip: the accepted events written back as integers read to the same events.
    again = tmp_path / "again.csv"
    again.write_text(
        "user,item,rating,ts\n"
        + "".join(
            f"{u},{i},{4 if m >> ACTIONS.index('favorite') & 1 else 1},{float(t)!r}\n"
            for u, i, m, t in zip(events.user, events.item, events.actions, events.time, strict=True)
        )
    )
    back = read_events([str(again)], spec)
    for field in ("user", "item", "time", "actions"):
        np.testing.assert_array_equal(getattr(back, field), getattr(events, field))
    # Without --skip-invalid: the first bad row, by line, and nothing else.
    first_bad = min(int(e.split(":")[1]) for e in lines)
    with pytest.raises(SessionFormatError) as error:
        read_events([str(path)], spec)
    assert (error.value.path, error.value.line) == (str(path), first_bad)


# --- full disks during checkpoint saves -------------------------------------------------------------

STEPS = 30


def fault_experiment(data_dir: str):
    return tiny_experiment(
        data_dir, train={"steps": STEPS}, checkpoint={"every_steps": 3, "keep": 2, "asynchronous": True}
    )


def train_args(cfg) -> list[str]:
    return ["-m", "train.train", "--config", str(REPO / "configs" / "demo.py"), *cli_overrides(cfg)]


def logged_losses(workdir: pathlib.Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    from phoenix_flax.training.loop import train

    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(fault_experiment(tiny_world["data_dir"]), str(workdir))
    return {"workdir": workdir, "losses": logged_losses(workdir)}


def assert_ends_in_one_error(stderr: str, *fragments) -> str:
    """Progress lines, then the error in one line, and nothing else: no traceback, no thread's report."""
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    for fragment in fragments:
        assert fragment in last, last
    return last


def failed_and_saved(stderr: str, workdir: pathlib.Path) -> tuple[int, int]:
    """The failed save's step F, named in one line with the last saved one (F - 3)."""
    last = assert_ends_in_one_error(
        stderr, "phoenix-train: error: cannot save checkpoint step ", f"in {workdir}/checkpoints: "
    )
    named = re.fullmatch(r".*step (\d+) in .*: (No space left on device|File too large) \(a full disk or a "
                         r"file-size limit\?\); step (\d+) is the last saved", last)  # fmt: skip
    assert named, last
    failed, saved = int(named.group(1)), int(named.group(3))
    assert saved == failed - 3, last
    return failed, saved


@pytest.mark.slow
def test_a_file_size_limit_during_a_save_is_one_line_and_the_last_saved_step_resumes(
    tiny_world, uninterrupted, tmp_path
):
    """RLIMIT_FSIZE, lowered on the running trainer once its first step is saved: the next save's
    files outgrow it (EFBIG, what a full disk's ENOSPC is to the program)."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, *train_args(fault_experiment(tiny_world["data_dir"])), "--workdir", str(workdir)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "3" / "integrity.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (16384, 16384))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    _, saved = failed_and_saved(stderr, workdir)
    # The disk freed: a resume goes on from the last saved step to the uninterrupted run's losses.
    resumed = subprocess.run(
        [sys.executable, *train_args(fault_experiment(tiny_world["data_dir"])), "--workdir", str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0 and f"resumed from step {saved}" in resumed.stderr, resumed.stderr[-3000:]
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # the partial step went
    got, want = logged_losses(workdir), uninterrupted["losses"]
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)


def can_mount_tmpfs() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; rmdir $d"
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rm", "sh", "-c", probe]).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_tmpfs(), reason="no tmpfs here (unshare -rm and mount are not permitted)")
def test_a_full_disk_during_a_save_is_one_line_and_the_last_saved_step_restores(tiny_world, uninterrupted, tmp_path):
    """A tmpfs with room for a little over two checkpoints (a mount namespace of its own): the
    first save always fits, the third (two kept, one being written) never does."""
    step_bytes = sum(
        p.stat().st_size for p in (uninterrupted["workdir"] / "checkpoints" / str(STEPS)).rglob("*") if p.is_file()
    )
    disk, copy = tmp_path / "disk", tmp_path / "run"
    disk.mkdir()
    train = " ".join(map(shlex.quote, [sys.executable, *train_args(fault_experiment(tiny_world["data_dir"]))]))
    script = (
        f"mount -t tmpfs -o size={step_bytes * 22 // 10 // 1024}k tmpfs {disk} && cd {REPO} && "
        f"{train} --workdir {disk}/run; code=$?; cp -a {disk}/run {copy}; exit $code"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    _, saved = failed_and_saved(result.stderr.replace(f"{disk}/run", str(copy)), copy)
    from phoenix_flax.checkpoint.restore import restore_model

    assert restore_model(str(copy), "latest").step == saved  # whole: its integrity record checked


# --- full disks and kills during outputs ------------------------------------------------------------


@pytest.mark.slow
def test_an_output_beyond_a_file_size_limit_is_one_line_and_the_previous_one_stays(tiny_world, uninterrupted, tmp_path):
    out = tmp_path / "ranked.jsonl"
    out.write_text("before\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the cache writes too
    rank = ["--workdir", str(uninterrupted["workdir"]), "--input", tiny_world["raw"]["test"], "--output", str(out)]
    limited = (  # the limit set in the child, which then becomes the program (no fork from this threaded process)
        "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384)); "
        "os.execv(sys.executable, [sys.executable, '-m', 'serve.rank', *sys.argv[1:]])"
    )
    result = subprocess.run(
        [sys.executable, "-c", limited, *rank], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )
    assert_one_line_error(result, f"phoenix-rank: error: cannot write {out}: File too large")
    assert out.read_text() == "before\n" and os.listdir(tmp_path) == ["ranked.jsonl"]


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_tmpfs(), reason="no mount namespace here (unshare -rm and mount are not permitted)")
def test_retrieval_and_ranking_run_on_a_read_only_workdir(tiny_world, uninterrupted, tmp_path):
    """The index that cannot be saved is used from memory (retrieval, then ranking what it found);
    nothing else writes to the workdir."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted["workdir"], workdir, ignore=shutil.ignore_patterns("index"))
    out = tmp_path / "out"
    out.mkdir()
    common = f"--workdir {workdir} --input {tiny_world['raw']['test']}"
    script = (
        f"mount --bind -o ro {workdir} {workdir} && cd {REPO} && "
        f"{sys.executable} -m serve.retrieve {common} --corpus {tiny_world['corpus']} --top-k 5 --then-rank "
        f"--output {out}/retrieved.jsonl"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"note: cannot save the index (cannot write {workdir}/index" in result.stderr or (
        f"note: cannot save the index ([Errno 30] Read-only file system: '{workdir}/index')" in result.stderr
    ), result.stderr[-3000:]
    retrieved = [json.loads(line) for line in (out / "retrieved.jsonl").read_text().splitlines()]
    assert len(retrieved) == len(list(read_sessions([tiny_world["raw"]["test"]], DEFAULT_ACTIONS)))
    assert all(len(r["candidates"]) == 5 and "score" in r["candidates"][0] for r in retrieved)  # ranked too
    assert not (workdir / "index").exists()


def random_events_csv(path: pathlib.Path, events: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    user, item = rng.integers(0, events // 20, events), rng.zipf(1.3, events) % 5000
    rating, ts = rng.integers(1, 6, events), rng.integers(0, 10**6, events)
    path.write_text(
        "user,item,rating,ts\n"
        + "".join(f"{u},i{i},{r},{t}\n" for u, i, r, t in zip(user, item, rating, ts, strict=True))
    )
    return str(path)


@pytest.mark.slow
def test_kill_9_during_an_import_leaves_each_output_whole_or_absent(tmp_path):
    """Killed at random moments (reading, writing the splits, the corpus, the summary): each file
    there is the one a complete run writes; a run after it completes."""
    log = random_events_csv(tmp_path / "log.csv", 150_000)
    args = [
        "--input",
        log,
        "--user",
        "user",
        "--item",
        "item",
        "--timestamp",
        "ts",
        "--rule",
        "click:*",
        "--rule",
        "favorite:rating>=4",
    ]
    start = time.time()
    assert run_program("train.import_logs", *args, "--out", str(tmp_path / "reference")).returncode == 0
    duration = time.time() - start
    outputs = ["train.parquet", "validation.parquet", "test.parquet", "corpus.jsonl"]
    reference = {name: (tmp_path / "reference" / name).read_bytes() for name in outputs}
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    out = tmp_path / "killed"
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "train.import_logs", *args, "--out", str(out)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, duration))
        proc.kill()
        proc.wait()
        for name in outputs:
            if (out / name).exists():
                assert (out / name).read_bytes() == reference[name], f"seed {seed}: {name}"
    assert run_program("train.import_logs", *args, "--out", str(out)).returncode == 0
    for name in outputs:
        assert (out / name).read_bytes() == reference[name]


# --- state a checkpoint serves with -----------------------------------------------------------------


@pytest.mark.slow
def test_resuming_a_copy_on_another_dataset_leaves_every_earlier_step_ranking_as_before(tiny_world, tmp_path, capsys):
    """The post counts a step blends in are that step's (saved in it): a copy resumed on a dataset
    of other counts serves its earlier steps byte for byte as the original does."""
    from phoenix_flax.checkpoint.restore import restore_model
    from phoenix_flax.data import prepare
    from phoenix_flax.data.counting import PostCounts
    from phoenix_flax.serving.ranking import CachedRanker
    from phoenix_flax.training.loop import train
    from serve import rank as rank_cli

    cfg = tiny_experiment(tiny_world["data_dir"], train={"steps": 6}, checkpoint={"every_steps": 3, "keep": 5})
    original, copy = tmp_path / "original", tmp_path / "copy"
    train(cfg, str(original))
    shutil.copytree(original, copy)
    other = str(tmp_path / "other")  # the validation sessions as its training split: other counts
    raw = tiny_world["raw"]
    prepare.prepare(
        other,
        {"train": prepare.SplitSource((raw["validation"],)), "validation": prepare.SplitSource((raw["validation"],))},
    )
    other_cfg = tiny_experiment(other, train={"steps": 9}, checkpoint={"every_steps": 3, "keep": 5})
    train(other_cfg, str(copy))

    def ranked(workdir, step) -> bytes:
        out = tmp_path / f"{workdir.name}_{step}.jsonl"
        args = ["--workdir", str(workdir), "--step", str(step), "--input", raw["test"], "--output", str(out)]
        assert rank_cli.main(args) == 0
        return out.read_bytes()

    for step in (3, 6):
        assert ranked(copy, step) == ranked(original, step)
    restored = restore_model(str(original), 6)
    other_counts = PostCounts.of_split(other_cfg, cfg.model.actions)  # what the resumed run counted
    assert not np.array_equal(other_counts.arrays()["shown"], restored.counts.arrays()["shown"])
    sessions = [s for _, s in read_sessions([raw["test"]], cfg.model.actions)][:8]
    served = CachedRanker(restored.model, cfg.model, counts=restored.counts).probabilities(sessions)
    recounted = CachedRanker(restored.model, cfg.model, counts=other_counts).probabilities(sessions)
    assert any(not np.array_equal(a, b) for a, b in zip(served, recounted, strict=True))  # the counts matter


def test_altered_bytes_in_a_session_file_are_named_never_read_as_other_sessions(tiny_world, tmp_path):
    """Page checksums (written by phoenix-import and phoenix-synth, checked on reading): 16 bytes
    flipped anywhere give the original sessions or an error naming the file, never others."""
    original = [as_record(s, DEFAULT_ACTIONS) for _, s in read_sessions([tiny_world["raw"]["train"]], DEFAULT_ACTIONS)]
    damaged = tmp_path / "train.parquet"
    named = 0
    for at in np.linspace(0.02, 0.98, 25):
        shutil.copy(tiny_world["raw"]["train"], damaged)
        flip_16_bytes(damaged, at)
        try:
            got = [as_record(s, DEFAULT_ACTIONS) for _, s in read_sessions([str(damaged)], DEFAULT_ACTIONS)]
        except SessionFormatError as e:
            assert e.path == str(damaged)
            named += 1
            continue
        assert got == original, f"flipped at {at:.2f}: other sessions read"
    assert named >= 20
