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
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, cli_overrides, tiny_experiment

from phoenix_flax.config import DEFAULT_ACTIONS
from phoenix_flax.data.importer import ActionRule, ImportSpec, read_events
from phoenix_flax.data.pipeline import dataset_actions, dataset_statistics, open_source
from phoenix_flax.data.prepare import dataset_dir
from phoenix_flax.data.raw import INT64_MAX, INT64_MIN, SessionFormatError, SkipReport, read_sessions
from phoenix_flax.errors import DatasetError
from phoenix_flax.evaluation.evaluate import oracle_scores, read_truth
from phoenix_flax.training.loop import MetricWriter

ACTIONS = DEFAULT_ACTIONS[:4]


def flip_16_bytes(path: pathlib.Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + 16] = bytes(255 - b for b in data[start : start + 16])
    path.write_bytes(bytes(data))


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --- torn metrics lines ---------------------------------------------------------------------------


def test_a_torn_metrics_line_is_dropped_with_a_notice_and_the_complete_ones_kept(tmp_path):
    complete = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(complete[:2]) + '{"step": 3, "lo\n' + complete[3] + '{"step": 5, "lo'
    )
    notes = []
    writer = MetricWriter(str(tmp_path), resume_step=4, report=notes.append)
    writer.write(5, {"loss": 0.2})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 4, 5]
    assert [n.split(": dropped")[0] for n in notes] == [f"note: {tmp_path}/metrics.jsonl:{i}" for i in (3, 5)]


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


def as_record(session) -> dict:
    """A parsed Session back in the raw format."""

    def items(post, author, surface, actions, labeled):
        return [
            {
                "post_id": int(p),
                "author_id": int(a),
                "product_surface": int(s),
                **({"actions": [n for i, n in enumerate(ACTIONS) if int(m) >> i & 1]} if labeled else {}),
            }
            for p, a, s, m in zip(post, author, surface, actions, strict=True)
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
