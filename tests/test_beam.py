"""phoenix-import and phoenix-prepare on Apache Beam (DirectRunner): the in-memory programs' output."""

import glob
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_log, run_import, write_csv

from phoenix_flax.data.prepare import STATISTICS_FILE, dataset_dir
from train import prepare as prepare_cli

BEAM = ["--runner", "DirectRunner"]


def sessions_of(out: pathlib.Path, split: str) -> list[dict]:
    """A split's sessions from `split.parquet` or its shards, by session ID."""
    files = sorted(glob.glob(str(out / f"{split}.parquet")) + glob.glob(str(out / f"{split}-*-of-*.parquet")))
    assert files, f"no {split} sessions in {out}"
    return sorted((r for f in files for r in pq.read_table(f).to_pylist()), key=lambda r: r["session_id"])


def assert_same_import(memory: pathlib.Path, beam: pathlib.Path) -> None:
    for split in ("train", "validation", "test"):
        assert sessions_of(beam, split) == sessions_of(memory, split), split
    corpus = [sorted((d / "corpus.jsonl").read_text().splitlines()) for d in (memory, beam)]
    assert corpus[0] == corpus[1] and corpus[0]
    summaries = [json.loads((d / "import.json").read_text()) for d in (memory, beam)]
    for s in summaries:
        s["args"].pop("out")
    assert summaries[0] == summaries[1]


def log_in_two_files(tmp_path, seed: int) -> tuple[list[str], list[dict]]:
    """A log split over a CSV and a Parquet file, with ties in time within and across them, an
    action column, and 3 bad rows in the CSV."""
    rows = random_log(seed=seed, users=9, items=25, events=240)
    rows = [{**r, "kind": "reply" if r["kind"] == "reply" else "click"} for r in rows]
    first, second = rows[:150], rows[150:]
    first[10] = {**first[10], "ts": "soon"}
    first[40] = {**first[40], "rating": ""}
    first[41] = {**first[41], "kind": "like"}
    table = pa.table({k: [r[k] for r in second] for k in second[0]})
    pq.write_table(table, tmp_path / "b.parquet")
    return [write_csv(tmp_path / "a.csv", first), str(tmp_path / "b.parquet")], rows


@pytest.mark.parametrize(
    "split",
    [
        ["--max-history", "4"],
        ["--split", "time", "--validation-from", "30", "--test-from", "40", "--candidates-per-session", "3"],
    ],
    ids=["leave-last-out", "time"],
)
def test_beam_import_gives_the_in_memory_sessions_corpus_and_counts(tmp_path, split):
    """Every rule kind (a column of names, thresholds, every event), chained implications, ties
    in time, two files of two formats, bad rows skipped: record for record the same."""
    inputs, _ = log_in_two_files(tmp_path, seed=3)
    options = ["--action", "kind", "--implied", "favorite => reply", "--implied", "reply => dwell", "--skip-invalid"]
    assert run_import(tmp_path / "memory", inputs, *options, *split)[0] == 0
    assert run_import(tmp_path / "beam", inputs, *options, *split, *BEAM)[0] == 0
    memory, beam = tmp_path / "memory" / "imported", tmp_path / "beam" / "imported"
    assert_same_import(memory, beam)
    assert json.loads((beam / "import.json").read_text())["rows_skipped"] == 3
    invalid = [json.loads(x) for x in (beam / "invalid_rows.jsonl").read_text().splitlines()]
    assert sorted((pathlib.Path(x["file"]).name, x["line"], x["column"]) for x in invalid) == [
        ("a.csv", 12, "ts"),
        ("a.csv", 42, "rating"),
        ("a.csv", 43, "kind"),
    ]


def test_beam_import_stops_at_a_bad_row_naming_it_in_one_line(tmp_path, capsys):
    inputs, _ = log_in_two_files(tmp_path, seed=4)
    assert run_import(tmp_path, inputs[:1], "--action", "kind", *BEAM)[0] == 2
    err = capsys.readouterr().err
    assert err == f"phoenix-import: error: {inputs[0]}:12: field 'ts': not a number or an ISO date-time: 'soon'\n"
    assert run_import(tmp_path, [inputs[1]], "--action", "kind", *BEAM)[0] == 0
    assert run_import(tmp_path, [inputs[1]], "--action", "kind", *BEAM)[0] == 2  # the same --out again
    assert "already holds sessions" in capsys.readouterr().err


def write_jsonl(path: pathlib.Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def raw_sessions(rng, n: int, with_ids: bool) -> list[dict]:
    def items(k, labeled):
        return [
            {
                "post_id": int(rng.integers(1, 1 << 40)),
                "author_id": int(rng.integers(1, 50)),
                "product_surface": int(rng.integers(0, 3)),
                **({"actions": ["favorite"] if rng.random() < 0.3 else []} if labeled else {}),
            }
            for _ in range(k)
        ]

    return [
        {
            **({"session_id": int(rng.integers(0, 1 << 40))} if with_ids else {}),
            "user_id": int(rng.integers(1, 1 << 30)),
            "history": items(int(rng.integers(0, 6)), True),
            "candidates": items(int(rng.integers(1, 4)), True),
        }
        for _ in range(n)
    ]


def prepared(data_dir: pathlib.Path) -> tuple[dict, dict]:
    """({split: its records in order}, statistics) of a prepared dataset."""
    from array_record.python.array_record_module import ArrayRecordReader

    root = pathlib.Path(dataset_dir(str(data_dir)))
    records = {}
    for split in ("train", "validation", "test"):
        for shard in sorted(root.glob(f"*-{split}.array_record-*")):
            reader = ArrayRecordReader(str(shard))
            records.setdefault(split, []).extend(reader.read_all())
            reader.close()
    return records, json.loads((root / STATISTICS_FILE).read_text())


@pytest.mark.parametrize("by", ["files", "fractions"])
def test_beam_prepare_writes_the_in_memory_dataset_record_for_record(tmp_path, by):
    """Sessions with and without IDs over two JSON Lines files and a Parquet file, a bad record
    skipped: the same records in the same order (TFDS's shuffle by the same keys) and the same
    statistics, so training reads the same batches."""
    rng = np.random.default_rng(5)
    first = raw_sessions(rng, 40, with_ids=False)
    first[7]["history"] = "oops"
    files = [
        write_jsonl(tmp_path / "a.jsonl", first),
        write_jsonl(tmp_path / "b.jsonl", raw_sessions(rng, 30, with_ids=True)),
    ]
    pq.write_table(pa.Table.from_pylist(raw_sessions(rng, 30, with_ids=True)), tmp_path / "c.parquet")
    files.append(str(tmp_path / "c.parquet"))
    inputs = (
        ["--train", *files[:2], "--test", files[2]]
        if by == "files"
        else ["--input", *files, "--fractions", "train=0.5,validation=0.25,test=0.25"]
    )
    for name, extra in (("memory", []), ("beam", BEAM)):
        argv = ["--data-dir", str(tmp_path / name), *inputs, "--skip-invalid", *extra]
        assert prepare_cli.main(argv) == 0
    (memory, memory_stats), (beam, beam_stats) = prepared(tmp_path / "memory"), prepared(tmp_path / "beam")
    assert beam_stats == memory_stats and memory_stats["skipped"]
    assert memory.keys() == beam.keys() and all(beam[s] == memory[s] for s in memory)
    assert sum(map(len, memory.values())) == 99  # nothing lost but the bad record


@pytest.mark.slow
def test_a_user_with_100000_events_is_one_task_and_keeps_its_last_history(tmp_path):
    """One user's 10^5 events (and a few other users') on Beam: the in-memory sessions, each
    training session's history the 50 events before it."""
    rng = np.random.default_rng(6)
    n = 100_000
    table = pa.table(
        {
            "uid": np.where(np.arange(n) < n - 500, 1, rng.integers(2, 6, n)),
            "iid": rng.integers(0, 20_000, n),
            "ts": rng.integers(0, 10**9, n),
            "rating": rng.integers(1, 6, n),
        }
    )
    pq.write_table(table, tmp_path / "log.parquet")
    inputs = [str(tmp_path / "log.parquet")]
    assert run_import(tmp_path / "memory", inputs)[0] == 0
    assert run_import(tmp_path / "beam", inputs, *BEAM)[0] == 0
    memory, beam = tmp_path / "memory" / "imported", tmp_path / "beam" / "imported"
    assert_same_import(memory, beam)
    heavy = [s for s in sessions_of(beam, "train") if s["user_id"] == 1]
    assert len(heavy) > 10_000 and {len(s["history"]) for s in heavy[-100:]} == {50}
