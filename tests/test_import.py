"""phoenix-import: logs to sessions, checked against a direct construction in plain Python."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_log, run_import, write_csv

from phoenix_flax.config import DEFAULT_ACTIONS
from phoenix_flax.data.importer import ActionRule, Implication, ImportSpec, ImportSpecError
from phoenix_flax.data.raw import read_corpus, read_sessions
from train import import_logs

ACTIONS = ("favorite", "reply", "click", "dwell", "not_interested")


def expected_sessions(rows, max_history, implied=True):
    """The importer's rules written out directly: merge per (user, item) at the first time,
    label, imply, order, split leave-last-out, one candidate per session, training histories capped."""
    merged = {}
    for i, r in enumerate(rows):
        acts = (
            {"click"}
            | ({"favorite"} if r["rating"] >= 4 else set())
            | ({"not_interested"} if r["rating"] <= 2 else set())
        )
        acts |= {"reply"} if r["kind"] == "reply" else set()
        key = (r["uid"], r["iid"])
        if key in merged:
            t, j, a = merged[key]
            merged[key] = (min(t, r["ts"]), j if (t, j) <= (r["ts"], i) else i, a | acts)
        else:
            merged[key] = (r["ts"], i, acts)
    by_user = {}
    for (u, item), (t, i, acts) in merged.items():
        if implied and acts & {"favorite", "reply"}:
            acts = acts | {"dwell"}
        by_user.setdefault(u, []).append((t, i, item, acts))
    out = {"train": [], "validation": [], "test": []}
    for u, events in by_user.items():
        events.sort(key=lambda e: (e[0], e[1]))
        n = len(events)
        for j, (_, _, item, acts) in enumerate(events):
            split = "test" if (j == n - 1 and n >= 2) else "validation" if (j == n - 2 and n >= 3) else "train"
            first = max(0, j - max_history) if split == "train" else 0  # evaluation splits: all history
            history = [(e[2], sorted(e[3])) for e in events[first:j]]
            out[split].append((u, history, item, sorted(acts)))
    return out


def as_tuples(path, item_ids):
    """The sessions of a written split, with hashed item IDs mapped back to names."""
    name = {v: k for k, v in item_ids.items()}
    out = []
    for _, s in read_sessions([path], DEFAULT_ACTIONS):

        def acts(mask):
            return sorted(a for i, a in enumerate(DEFAULT_ACTIONS) if mask >> i & 1)

        history = [(name[p], acts(m)) for p, m in zip(s.history_post_id, s.history_actions, strict=True)]
        assert len(s.candidate_post_id) == 1
        out.append((s.user_id, history, name[s.candidate_post_id[0]], acts(s.candidate_actions[0])))
    return out


def item_ids(out):
    from phoenix_flax.data.importer import _hashed_ids

    names = [f"item-{i}" for i in range(100)]
    return dict(zip(names, _hashed_ids(np.array(names))[0].tolist(), strict=True))


def test_import_builds_the_sessions_of_a_direct_construction(tmp_path):
    rows = random_log()
    # Labels from rules on the rating and from an action-name column ('view' rows name 'click').
    path = write_csv(tmp_path / "log.csv", [{**r, "kind": "reply" if r["kind"] == "reply" else "click"} for r in rows])
    rc, out = run_import(
        tmp_path, [path], "--action", "kind", "--implied", "favorite,reply => dwell", "--max-history", "5"
    )
    assert rc == 0
    want = expected_sessions(rows, max_history=5)
    ids = item_ids(out)
    for split in ("train", "validation", "test"):
        got = as_tuples(str(out / f"{split}.parquet"), ids)
        assert sorted(got, key=repr) == sorted(want[split], key=repr), split
    summary = json.loads((out / "import.json").read_text())
    assert summary["rows"] == len(rows) and summary["sessions"]["test"] == len(want["test"])
    post_ids, _ = read_corpus(str(out / "corpus.jsonl"))
    assert sorted(post_ids.tolist()) == sorted({ids[r["iid"]] for r in rows})


def test_implied_actions_are_off_by_default_and_chain(tmp_path):
    spec = dict(user="u", item="i", timestamp="t", actions=ACTIONS, rules=(ActionRule.parse("click:*"),))
    from phoenix_flax.data.importer import Events, prepare_events

    events = Events(*(np.array(x, dtype) for x, dtype in [
        ([1, 1], np.int64), ([5, 6], np.int64), ([0, 0], np.int64), ([0, 0], np.int64), ([1.0, 2.0], np.float64),
        ([0b00001, 0b00100], np.int64),  # favorite; click
    ]))  # fmt: skip
    plain, _ = prepare_events(events, ImportSpec(**spec))
    assert plain.actions.tolist() == [0b00001, 0b00100]
    chained = ImportSpec(
        **spec, implications=(Implication.parse("favorite => reply"), Implication.parse("reply => dwell"))
    )
    done, _ = prepare_events(events, chained)
    assert done.actions.tolist() == [0b01011, 0b00100]  # favorite -> reply -> dwell; click alone implies nothing


def test_time_split_and_sessions_of_several_candidates(tmp_path):
    rows = [{"uid": 1, "iid": f"item-{i}", "ts": i, "rating": 5, "kind": "click"} for i in range(10)]
    path = write_csv(tmp_path / "log.tsv", rows, sep="\t")
    rc, out = run_import(
        tmp_path, [path], "--split", "time", "--validation-from", "6", "--test-from", "8",
        "--candidates-per-session", "4", "--max-history", "3",
    )  # fmt: skip
    assert rc == 0
    sessions = {
        split: [s for _, s in read_sessions([str(out / f"{split}.parquet")], DEFAULT_ACTIONS)]
        for split in ("train", "validation", "test")
    }
    ids = item_ids(out)
    seq = lambda names: [ids[f"item-{i}"] for i in names]  # noqa: E731
    assert [s.candidate_post_id.tolist() for s in sessions["train"]] == [seq(range(4)), seq(range(4, 6))]
    assert [s.history_post_id.tolist() for s in sessions["train"]] == [[], seq([1, 2, 3])]
    assert [s.candidate_post_id.tolist() for s in sessions["validation"]] == [seq([6, 7])]
    assert [s.history_post_id.tolist() for s in sessions["test"]] == [seq(range(8))]  # all of it


def test_parquet_input_gives_the_csv_result_and_integer_ids_are_kept(tmp_path):
    rows = [{**r, "kind": "click"} for r in random_log(seed=1)]
    csv_rc, csv_out = run_import(tmp_path / "a", [write_csv(tmp_path / "log.csv", rows)])
    table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
    pq.write_table(table, tmp_path / "log.parquet")
    pq_rc, pq_out = run_import(tmp_path / "b", [str(tmp_path / "log.parquet")])
    assert csv_rc == pq_rc == 0
    for split in ("train", "validation", "test"):
        assert pq.read_table(csv_out / f"{split}.parquet").equals(pq.read_table(pq_out / f"{split}.parquet"))
    users = {s.user_id for _, s in read_sessions([str(pq_out / "train.parquet")], DEFAULT_ACTIONS)}
    assert users <= {r["uid"] for r in rows}  # integer user IDs as they were


@pytest.mark.parametrize(
    "bad, column, problem",
    [
        ({"ts": "yesterday"}, "ts", "not a number or an ISO date-time: 'yesterday'"),
        ({"rating": "five"}, "rating", "not a number: 'five'"),
        ({"uid": ""}, "uid", "missing"),
        ({"kind": "like"}, "kind", "not an action of the vocabulary"),
    ],
)
def test_bad_rows_are_named_or_skipped_and_counted(tmp_path, capsys, bad, column, problem):
    rows = [{**r, "kind": "click"} for r in random_log(seed=2, events=20)]
    rows[6] = {**rows[6], **bad}
    path = write_csv(tmp_path / "log.csv", rows)
    rc, _ = run_import(tmp_path, [path], "--action", "kind")
    err = capsys.readouterr().err
    assert rc == 2 and f"log.csv:8: field '{column}': {problem}" in err  # header is line 1, row 6 is line 8
    rc, out = run_import(tmp_path, [path], "--action", "kind", "--skip-invalid")
    assert rc == 0 and json.loads((out / "import.json").read_text())["rows_skipped"] == 1
    assert "skipped 1 invalid record" in capsys.readouterr().out


def test_bad_specs_are_named(tmp_path, capsys):
    path = write_csv(tmp_path / "log.csv", random_log(events=5))
    rc, _ = run_import(tmp_path, [path], "--rule", "like:rating>=4")
    assert rc == 2 and "actions ['like'] are not in the vocabulary" in capsys.readouterr().err
    rc, _ = run_import(tmp_path, [path], "--rule", "favorite:rating=>4")
    assert rc == 2 and "rule 'favorite:rating=>4': expected" in capsys.readouterr().err
    out = tmp_path / "o"
    rc = import_logs.main(
        [
            "--input",
            path,
            "--out",
            str(out),
            "--user",
            "nope",
            "--item",
            "iid",
            "--timestamp",
            "ts",
            "--rule",
            "click:*",
        ]
    )
    assert rc == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(ImportSpecError, match="time split needs"):
        ImportSpec("u", "i", "t", ACTIONS, rules=(ActionRule.parse("click:*"),), split="time")


def test_files_without_a_header_are_named_by_columns_and_lines_still_count(tmp_path, capsys):
    rows = [{**r, "kind": "click"} for r in random_log(seed=3, events=10)]
    path = tmp_path / "log.data"  # MovieLens' u.data style: tab-separated, no header
    body = "".join(f"{r['uid']}\t{r['iid']}\t{r['rating']}\t{r['ts']}\n" for r in rows)
    path.write_text(body)
    argv = ["--input", str(path), "--user", "uid", "--item", "iid", "--timestamp", "ts", "--rule", "click:*"]
    argv += ["--rule", "favorite:rating>=4", "--columns", "uid,iid,rating,ts"]
    assert import_logs.main([*argv, "--out", str(tmp_path / "a")]) == 0
    with_header = tmp_path / "ratings.inter"  # RecBole's ml-100k.inter: the same with a header
    with_header.write_text("u:token\ti:token\tr:float\tt:float\n" + body)
    assert (
        import_logs.main([*argv[:1], str(with_header), *argv[2:], "--skip-rows", "1", "--out", str(tmp_path / "b")])
        == 0
    )
    for split in ("train", "validation", "test"):
        assert pq.read_table(tmp_path / "a" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "b" / f"{split}.parquet")
        )
    lines = body.splitlines()
    lines[4] = lines[4].split("\t")[0] + "\tx\tfive\t1"
    path.write_text("\n".join(lines) + "\n")
    assert import_logs.main([*argv, "--out", str(tmp_path / "c")]) == 2
    assert "log.data:5: field 'rating': not a number: 'five'" in capsys.readouterr().err


def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(
    "line_5, column, problem",
    [
        (b"3,item-\xff,4,9,view", "iid", "not UTF-8 text"),
        (b"3,item-1,4", None, "3 fields where the header has 5: '3,item-1,4'"),
        (b"3,item-1,4,9,view,extra", None, "6 fields where the header has 5"),
        (b"3,9223372036854775808,4,9,view", "iid", "an integer ID beyond int64"),
        (b"-9223372036854775809,item-1,4,9,view", "uid", "an integer ID beyond int64"),
    ],
)
def test_unreadable_rows_are_blamed_on_their_line_and_skippable(tmp_path, capsys, line_5, column, problem):
    """Each bad row at its own line (not the header's), also when a row before it was left out;
    --skip-invalid leaves out exactly the bad rows and the good ones keep their labels."""
    good = [f"{u},item-{u % 4},{u % 5 + 1},{u},view".encode() for u in range(1, 9)]
    lines = [b"uid,iid,rating,ts,kind", *good[:3], line_5, *good[3:5], b"1,item-1", *good[5:]]
    path = write_lines(tmp_path / "log.csv", lines)
    rc, _ = run_import(tmp_path, [path])
    where = f"log.csv:5: field '{column}': " if column else "log.csv:5: "
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and where + problem in err[0], err
    rc, out = run_import(tmp_path, [path], "--skip-invalid")
    summary = json.loads((out / "import.json").read_text())
    assert rc == 0 and summary["rows_skipped"] == 2 and summary["events"] == len(good)
    printed = capsys.readouterr().out
    assert "log.csv:8: 2 fields where the header has 5: '1,item-1'" in printed  # the short row after it
    rc, direct = run_import(tmp_path / "direct", [write_lines(tmp_path / "good.csv", [lines[0], *good])])
    assert rc == 0
    for split in ("train", "validation", "test"):
        assert pq.read_table(out / f"{split}.parquet").equals(pq.read_table(direct / f"{split}.parquet"))


def test_the_line_of_a_row_counts_the_rows_left_out_before_it(tmp_path, capsys):
    lines = [b"uid,iid,rating,ts,kind", b"1,a,5,1,view", b"1,b", b"2,c", b"1,d,5,2,view", b"1,e,5,x,view"]
    rc, _ = run_import(tmp_path, [write_lines(tmp_path / "log.csv", lines)], "--skip-invalid")
    printed = capsys.readouterr().out
    assert rc == 0 and "log.csv:6: field 'ts': not a number or an ISO date-time: 'x'" in printed
    assert "2 x record: 2 fields where the header has 5 (first: " + f"{tmp_path}/log.csv:3" in printed
