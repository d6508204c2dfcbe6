"""Raw format, preparation, the synthetic world and the grain pipeline."""

import itertools
import json
import os
import pathlib
import pickle
import shutil
import tempfile

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phoenix_flax.config import DEFAULT_ACTIONS, ModelConfig
from phoenix_flax.config.data import DataConfig
from phoenix_flax.data import prepare as prep
from phoenix_flax.data.batch import STEP_FIELDS
from phoenix_flax.data.hashing import FINGERPRINT_ROWS, hash_ids
from phoenix_flax.data.pipeline import ExamplesToBatch, SessionToExamples, global_batch, make_dataset
from phoenix_flax.data.raw import SessionFormatError, SessionParser, SkipReport, read_sessions
from phoenix_flax.data.synth import (
    ACTIONS,
    PHOTO,
    VIDEO,
    World,
    WorldConfig,
    WorldMismatchError,
    simulate,
    write_world,
)
from phoenix_flax.errors import DatasetError
from phoenix_flax.validation import ConfigError
from train import demo
from train import prepare as prepare_cli
from train import synth as synth_cli

CFG = ModelConfig(history_len=4, num_candidates=3, user_vocab_rows=97, post_vocab_rows=101, author_vocab_rows=89)


def item(post, author=7, surface=1, actions=("click",)):
    return {"post_id": post, "author_id": author, "product_surface": surface, "actions": list(actions)}


def session(i, n_history=6, n_candidates=4):
    """Session i: history posts i*100+1.. (oldest first), candidates i*100+50.., one favorite."""
    return {
        "user_id": 10_000 + i,
        "session_id": i,
        "history": [item(i * 100 + k + 1, actions=("favorite",) if k % 2 else ()) for k in range(n_history)],
        "candidates": [
            item(i * 100 + 50 + k, author=k, actions=("favorite", "reply") if k == 1 else ("dwell",))
            for k in range(n_candidates)
        ],
        "ignored_field": "anything",
    }


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 sessions, split 30/10, prepared once."""
    root = tmp_path_factory.mktemp("data")
    train = write_jsonl(root / "train.jsonl", [session(i, n_history=i % 9, n_candidates=1 + i % 7) for i in range(30)])
    valid = write_jsonl(root / "valid.jsonl", [session(i) for i in range(30, 40)])
    sources = {"train": prep.SplitSource((train,)), "validation": prep.SplitSource((valid,))}
    stats, report = prep.prepare(str(root / "prepared"), sources)
    return {"root": root, "data_dir": str(root / "prepared"), "train": train, "stats": stats, "report": report}


# --- raw format -------------------------------------------------------------------------------

BAD_RECORDS = [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    ('{"history": [], "candidates": []}', r"bad.jsonl:2: field 'user_id': missing"),
    ('{"user_id": "12", "history": [], "candidates": []}', r"field 'user_id': expected an integer: got str '12'"),
    ('{"user_id": true, "history": [], "candidates": []}', r"field 'user_id': expected an integer: got bool"),
    ('{"user_id": 9223372036854775808, "history": [], "candidates": []}', r"field 'user_id': out of the int64 range"),
    ('{"user_id": 1, "history": {}, "candidates": []}', r"field 'history': expected a list"),
    (
        '{"user_id": 1, "history": [{"post_id": 1, "author_id": 2, "product_surface": 0}], "candidates": []}',
        r"field 'history\[0\].actions': missing",
    ),
    (
        '{"user_id": 1, "history": [], "candidates": [{"post_id": 1.5, "author_id": 2, "product_surface": 0}]}',
        r"field 'candidates\[0\].post_id': expected an integer: got float",
    ),
    (
        '{"user_id": 1, "history": [], "candidates": [{"post_id": 1, "author_id": 2, "product_surface": 0, '
        '"actions": ["favourite"]}]}',
        r"field 'candidates\[0\].actions\[0\]': unknown action: 'favourite'",
    ),
    (
        '{"user_id": 1, "history": [], "candidates": [{"post_id": 1, "author_id": 2, "product_surface": -1}]}',
        r"field 'candidates\[0\].product_surface': out of range",
    ),
    ('{"user_id": 1, "history": [], "candidates": []}', r"field 'candidates': empty"),
    (
        '{"user_id": 1, "history": [], "candidates": [{"post_id": 1, "author_id": 2, "product_surface": 0, '
        '"actions": []}, {"post_id": 1, "author_id": 2, "product_surface": 0}]}',
        r"field 'candidates\[1\].actions': present for some candidates",
    ),
    ("[1, 2]", r"bad.jsonl:2: expected a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD_RECORDS)
def test_bad_input_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [session(0), line])
    with pytest.raises(SessionFormatError, match=message):
        list(read_sessions([path], DEFAULT_ACTIONS))


def test_skip_invalid_counts_each_reason_and_keeps_every_valid_record(tmp_path):
    lines = [session(0), BAD_RECORDS[0][0], session(1), BAD_RECORDS[2][0], BAD_RECORDS[2][0], session(2), ""]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    report = SkipReport()
    kept = list(read_sessions([path], DEFAULT_ACTIONS, skip_invalid=True, report=report))
    assert [s.user_id for _, s in kept] == [10_000, 10_001, 10_002]
    assert report.total == 3
    assert report.counts == {"record: not valid JSON": 1, "user_id: expected an integer": 2}
    assert "mixed.jsonl:4: field 'user_id'" in report.summary()


def statistics(data_dir) -> dict:
    """The statistics file phoenix-prepare saves beside the dataset."""
    return json.loads(pathlib.Path(prep.dataset_dir(str(data_dir)), prep.STATISTICS_FILE).read_text())


def test_prepare_cli_reports_errors_and_skips(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [session(0), session(1), BAD_RECORDS[8][0], session(2)])
    rc = prepare_cli.main(["--data-dir", str(tmp_path / "a"), "--train", path])
    assert rc == 2 and "in.jsonl:3: field 'candidates[0].actions[0]'" in capsys.readouterr().err
    assert not os.path.exists(prep.dataset_dir(str(tmp_path / "a")))  # nothing half-written

    rc = prepare_cli.main(["--data-dir", str(tmp_path / "b"), "--train", path, "--skip-invalid"])
    out = capsys.readouterr().out
    assert rc == 0 and "train: 3 sessions" in out and "skipped 1 invalid record" in out
    assert statistics(tmp_path / "b")["skipped"] == {"candidates[].actions[]: unknown action": 1}

    rc = prepare_cli.main(["--data-dir", str(tmp_path / "b"), "--train", path, "--skip-invalid"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert prepare_cli.main(["--data-dir", str(tmp_path / "c"), "--train", str(tmp_path / "nothing*.jsonl")]) == 2


def test_prepare_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where tempfile.mkdtemp() makes its folders
    path = write_jsonl(tmp_path / "in.jsonl", [session(0), session(1)])
    prep.prepare(str(tmp_path / "d"), {"train": prep.SplitSource((path,))})
    assert os.path.exists(prep.dataset_dir(str(tmp_path / "d")))
    assert os.listdir(scratch) == []


def test_parquet_reads_like_jsonl(tmp_path):
    records = [session(i, n_history=i, n_candidates=2) for i in range(4)]
    jsonl = write_jsonl(tmp_path / "s.jsonl", records)
    parquet = str(tmp_path / "s.parquet")
    pq.write_table(
        pa.Table.from_pylist([{k: v for k, v in r.items() if k != "ignored_field"} for r in records]), parquet
    )
    a = [s for _, s in read_sessions([jsonl], DEFAULT_ACTIONS)]
    b = [s for _, s in read_sessions([parquet], DEFAULT_ACTIONS)]
    for x, y in zip(a, b, strict=True):
        for field in x.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))

    bad = [dict(records[1])]
    bad[0]["history"] = [dict(bad[0]["history"][0], post_id=None)]
    pq.write_table(pa.Table.from_pylist([records[0] | {"history": []}, *bad]), str(tmp_path / "bad.parquet"))
    with pytest.raises(SessionFormatError, match=r"bad.parquet:2: field 'history\[0\].post_id': missing"):
        list(read_sessions([str(tmp_path / "bad.parquet")], DEFAULT_ACTIONS))


def random_records(rng, n, actions=DEFAULT_ACTIONS):
    """n raw records of every shape the format allows: empty and long histories, unlabeled
    sessions, in_network given or not, session_id given or null, negative and 2^62 IDs."""

    def items(k, labeled):
        out = []
        for _ in range(k):
            names = list(rng.choice(actions, size=int(rng.integers(0, 4))))  # repeats included
            out.append(
                {
                    "post_id": int(rng.integers(-(1 << 62), 1 << 62)),
                    "author_id": int(rng.integers(0, 1000)),
                    "product_surface": int(rng.integers(0, 5)),
                    "actions": names if labeled else None,
                    "in_network": [None, True, False][int(rng.integers(0, 3))],
                }
            )
        return out

    return [
        {
            "session_id": None if i % 5 == 0 else int(rng.integers(0, 1 << 40)),
            "user_id": int(rng.integers(1, 1 << 40)),
            "history": items(int(rng.integers(0, 12)), labeled=True),
            "candidates": items(int(rng.integers(1, 6)), labeled=bool(i % 7)),
        }
        for i in range(n)
    ]


def record_by_record(path, skip_invalid=False):
    """(key, Session) of a file parsed one decoded record at a time: the reference for the
    columnar Parquet reader."""
    from phoenix_flax.data.raw import _Invalid, _records, default_session_id

    parser, out = SessionParser(DEFAULT_ACTIONS), []
    for line, record, _ in _records(path):
        try:
            out.append((f"0:{line}", parser.parse(record, default_session_id=default_session_id(0, line))))
        except _Invalid:
            if not skip_invalid:
                raise
    return out


def assert_same_sessions(got, want):
    assert [k for k, _ in got] == [k for k, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        for field in a.__dataclass_fields__:
            x, y = getattr(a, field), getattr(b, field)
            assert type(x) is type(y), field
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype, field
            np.testing.assert_array_equal(x, y, err_msg=field)


def test_parquet_batches_parse_as_their_records_do(tmp_path):
    rng = np.random.default_rng(0)
    records = random_records(rng, 4200)  # two of the reader's 4096-row batches
    path = str(tmp_path / "s.parquet")
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=1000)
    got = list(read_sessions([path], DEFAULT_ACTIONS))
    assert_same_sessions(got, record_by_record(path))
    assert any(s.candidate_in_network is not None for _, s in got) and not all(s.labeled for _, s in got)
    # int32 columns and no in_network or session_id: still read as their records are
    narrow = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "session_id"} for r in records[:50]])
    item = pa.struct([("post_id", pa.int32()), ("author_id", pa.int32()), ("product_surface", pa.int8()),
                      ("actions", pa.list_(pa.string()))])  # fmt: skip
    narrow = narrow.cast(pa.schema([("user_id", pa.int64()), ("history", pa.list_(item)), ("candidates", pa.list_(item))]),
                         safe=False)  # fmt: skip
    pq.write_table(narrow, path)
    assert_same_sessions(list(read_sessions([path], DEFAULT_ACTIONS)), record_by_record(path))

    # A bad record in the second batch: the error names its line; skipped, the others are kept
    # with the session ids the record-by-record reading gives them.
    records[4100]["candidates"][0]["actions"] = ["favourite"]
    records[10]["history"] = [{"post_id": 1, "author_id": 2, "product_surface": 0, "actions": None, "in_network": None}]
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=1000)
    with pytest.raises(SessionFormatError, match=r"s.parquet:11: field 'history\[0\].actions': missing"):
        list(read_sessions([path], DEFAULT_ACTIONS))
    report = SkipReport()
    got = list(read_sessions([path], DEFAULT_ACTIONS, skip_invalid=True, report=report))
    assert_same_sessions(got, record_by_record(path, skip_invalid=True))
    assert len(got) == 4198 and report.counts == {
        "history[].actions: missing": 1,
        "candidates[].actions[]: unknown action": 1,
    }
    assert "s.parquet:4101: field 'candidates[0].actions[0]'" in report.summary()


# --- preparation ------------------------------------------------------------------------------


def test_statistics_match_the_raw_records(dataset):
    s = dataset["stats"]["train"]
    raw = [session(i, n_history=i % 9, n_candidates=1 + i % 7) for i in range(30)]
    assert s["sessions"] == 30
    assert s["mean_history_length"] == pytest.approx(np.mean([len(r["history"]) for r in raw]))
    cands = [c for r in raw for c in r["candidates"]]
    for action in ("favorite", "dwell", "report"):
        want = np.mean([action in c["actions"] for c in cands])
        assert s["candidate_action_rates"][action] == pytest.approx(want)
    assert dataset["report"].total == 0


def test_split_statistics_counted_in_bulk_match_a_direct_count():
    rng = np.random.default_rng(1)
    parser = SessionParser(DEFAULT_ACTIONS)
    sessions = [parser.parse(r, i) for i, r in enumerate(random_records(rng, 5000))]  # past one bulk count
    stats = prep.SplitStatistics(DEFAULT_ACTIONS)
    for s in sessions:
        stats.add(s)
    got = stats.to_dict()
    history = np.concatenate([s.history_actions for s in sessions])
    labeled = np.concatenate([s.candidate_actions for s in sessions if s.labeled])
    for i, action in enumerate(DEFAULT_ACTIONS):
        assert got["history_action_rates"][action] == pytest.approx(np.mean((history >> i) & 1))
        assert got["candidate_action_rates"][action] == pytest.approx(np.mean((labeled >> i) & 1))
    assert got["labeled_sessions"] == sum(s.labeled for s in sessions)
    assert got["max_product_surface"] == max(
        int(np.max(np.concatenate([s.history_product_surface, s.candidate_product_surface]))) for s in sessions
    )


def test_sessions_are_serialized_as_tfds_serializes_them(dataset):
    """`session_example` against TFDS's generic encoding and serialization of the same fields,
    byte for byte once the map's entries are ordered (TFDS's own order changes between processes)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import example_serializer
    from tensorflow_datasets.core.example_parser import tf_example_pb2

    features = tfds.features.FeaturesDict(prep.FEATURES)
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    sessions = [s for _, s in read_sessions([dataset["train"]], DEFAULT_ACTIONS)]
    sessions[0].labeled = False
    for s in sessions:
        theirs = serializer.serialize_example(features.encode_example({k: getattr(s, k) for k in prep.FEATURES}))
        ours = prep.session_example(s)
        assert tf_example_pb2.Example.FromString(theirs).SerializeToString(deterministic=True) == ours


def test_preparing_twice_gives_the_same_dataset(dataset, tmp_path):
    prep.prepare(str(tmp_path), {"train": prep.SplitSource((dataset["train"],))})
    for name in ("phoenix_sessions-train.array_record-00000-of-00001",):
        a = pathlib.Path(prep.dataset_dir(dataset["data_dir"]), name).read_bytes()
        b = pathlib.Path(prep.dataset_dir(str(tmp_path)), name).read_bytes()
        assert a == b


def test_split_by_fraction_is_a_partition(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", [session(i, 2, 2) for i in range(60)])
    rc = prepare_cli.main(
        ["--data-dir", str(tmp_path / "d"), "--input", path, "--fractions", "train=0.5,test=0.5", "--seed", "3"]
    )
    assert rc == 0
    stats = statistics(tmp_path / "d")["splits"]
    assert stats["train"]["sessions"] + stats["test"]["sessions"] == 60
    assert 15 < stats["train"]["sessions"] < 45


# --- pipeline ---------------------------------------------------------------------------------


def examples(sess, cfg=CFG, data_actions=DEFAULT_ACTIONS, positive=("favorite",)):
    """One session's examples, as the pipeline batches them, one dict of arrays per example."""
    import dataclasses

    from phoenix_flax.data.raw import SessionParser

    record = dataclasses.asdict(SessionParser(data_actions).parse(sess, 0))
    batch = ExamplesToBatch(cfg, data_actions, positive)(SessionToExamples(cfg).flat_map(record))
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["session_id"]))]


def example_by_example(session, s, c, bits, positive_mask):
    """A session's examples built one at a time with plain slicing: the reference for the
    pipeline's vectorized batches."""
    multi_hot = lambda m: ((np.asarray(m, np.int64)[..., None] >> bits) & 1).astype(np.int32)  # noqa: E731
    n = min(len(session["history_post_id"]), s)
    history = {}
    for key in ("history_post_id", "history_author_id", "history_product_surface", "history_actions"):
        history[key] = np.zeros(s, session[key].dtype)
        history[key][:n] = session[key][len(session[key]) - n :]
    history["history_actions"] = multi_hot(history["history_actions"])
    history["history_valid"] = np.arange(s) < n
    m, labeled = len(session["candidate_post_id"]), bool(session["labeled"])
    hits = [j for j in range(m) if labeled and session["candidate_actions"][j] & positive_mask]
    out = []
    for start in range(0, m, c):
        k = min(c, m - start)
        ex = {"session_id": np.int64(session["session_id"]), "candidate_offset": np.int32(start)}
        ex |= {"user_id": np.int64(session["user_id"]), **history}
        for key in ("candidate_post_id", "candidate_author_id", "candidate_product_surface", "candidate_actions"):
            ex[key] = np.zeros(c, session[key].dtype)
            ex[key][:k] = session[key][start : start + k]
        ex["candidate_actions"] = multi_hot(ex["candidate_actions"])
        ex["candidate_valid"] = np.arange(c) < k
        ex["labeled"] = np.bool_(labeled)
        first = start == 0 and len(hits) > 0
        ex["positive_post_id"] = np.int64(session["candidate_post_id"][hits[0]] if first else 0)
        ex["positive_author_id"] = np.int64(session["candidate_author_id"][hits[0]] if first else 0)
        ex["positive_valid"] = np.bool_(first)
        out.append(ex)
    return out


def test_session_records_decode_as_tfds_does(dataset, monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    from phoenix_flax.data import pipeline

    # Written in three shards: records are found across shard boundaries, one at a time and in
    # batches out of order, and in a copy pickled as grain's worker processes get it.
    data_dir = str(tmp_path / "sharded")
    builder = prep.PhoenixSessions(data_dir=data_dir, sources={"train": prep.SplitSource((dataset["train"],))})
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3), file_format="array_record")
    theirs = tfds.data_source(prep.DATASET_NAME, data_dir=data_dir, split="train")
    ours = pipeline.open_source(data_dir, "train")
    assert len(ours) == len(theirs) == 30 and len(builder.info.splits["train"].shard_lengths) == 3
    order = np.random.default_rng(0).permutation(30).tolist()
    for got_records in (
        [ours[i] for i in order],
        ours.__getitems__(order),
        pickle.loads(pickle.dumps(ours)).__getitems__(order),
    ):
        for got, want in zip(got_records, theirs.__getitems__(order), strict=True):
            assert got.keys() == want.keys()
            for key in got:
                assert (
                    type(got[key]) is type(want[key]) and np.asarray(got[key]).dtype == np.asarray(want[key]).dtype
                ), key
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with pytest.raises(IndexError, match="record 30 of split 'train', which has 30"):
        ours[30]
    # Some fields only (the popularity baseline's pass): those of the whole parse.
    some = ("labeled", "candidate_post_id", "candidate_actions")
    subset = pipeline.open_source(data_dir, "train", some).__getitems__(order)
    for got, whole in zip(subset, ours.__getitems__(order), strict=True):
        assert set(got) == set(some)
        for key in some:
            np.testing.assert_array_equal(got[key], whole[key], err_msg=key)
    with pytest.raises(ValueError, match=r"fields \['bookmarks'\] are not among"):
        pipeline.open_source(data_dir, "train", ("labeled", "bookmarks"))
    # A dataset without a field the parser expects: the error names the dataset, record and field.
    monkeypatch.setattr(pipeline, "_FIELD_TYPES", (*pipeline._FIELD_TYPES, ("bookmarks", int, True)))
    with pytest.raises(DatasetError, match=r"split 'train', record 3: no field 'bookmarks'"):
        pipeline.open_source(data_dir, "train")[3]


def test_vectorized_batches_equal_examples_built_one_at_a_time():
    rng = np.random.default_rng(0)
    sessions = []
    for i in range(40):  # ragged: empty and long histories, 1 to 11 candidates, some unlabeled
        h, m = int(rng.integers(0, 9)), int(rng.integers(1, 12))
        sessions.append(
            {
                "session_id": np.int64(i),
                "user_id": np.int64(rng.integers(1, 1 << 40)),
                "history_post_id": rng.integers(1, 1 << 40, h),
                "history_author_id": rng.integers(1, 1 << 20, h),
                "history_product_surface": rng.integers(0, 4, h).astype(np.int32),
                "history_actions": rng.integers(0, 1 << len(DEFAULT_ACTIONS), h),
                "candidate_post_id": rng.integers(1, 1 << 40, m),
                "candidate_author_id": rng.integers(1, 1 << 20, m),
                "candidate_product_surface": rng.integers(0, 4, m).astype(np.int32),
                "candidate_actions": rng.integers(0, 1 << len(DEFAULT_ACTIONS), m) * (rng.random(m) < 0.3),
                "labeled": np.bool_(i % 5 != 0),
            }
        )
    cfg = ModelConfig(history_len=4, num_candidates=3, actions=("reply", "favorite", "dwell"))
    to_batch = ExamplesToBatch(cfg, DEFAULT_ACTIONS, ("favorite", "repost"))
    bits = np.array([DEFAULT_ACTIONS.index(a) for a in cfg.actions])
    positive_mask = (1 << DEFAULT_ACTIONS.index("favorite")) | (1 << DEFAULT_ACTIONS.index("repost"))
    # A batch holds examples of many sessions in any order, a session's several examples included.
    refs = [e for x in sessions for e in SessionToExamples(cfg).flat_map(x)]
    want = [ex for x in sessions for ex in example_by_example(x, 4, 3, bits, positive_mask)]
    order = rng.permutation(len(refs))
    batch = to_batch([refs[j] for j in order])
    assert len(refs) == sum(-(-len(x["candidate_post_id"]) // 3) for x in sessions) > len(sessions)
    assert set(batch) == set(want[0])
    assert batch["positive_valid"].any() and not batch["history_valid"].all() and not batch["candidate_valid"].all()
    for key, value in batch.items():
        expected = np.stack([want[j][key] for j in order])
        assert value.dtype == expected.dtype, key
        np.testing.assert_array_equal(value, expected, err_msg=key)


def test_truncation_keeps_the_most_recent_history_and_pads_at_the_end():
    ex = examples(session(1, n_history=6))[0]
    np.testing.assert_array_equal(ex["history_post_id"], [103, 104, 105, 106])  # S=4 most recent, oldest first
    short = examples(session(1, n_history=2))[0]
    np.testing.assert_array_equal(short["history_post_id"], [101, 102, 0, 0])
    np.testing.assert_array_equal(short["history_valid"], [True, True, False, False])
    fav = DEFAULT_ACTIONS.index("favorite")
    np.testing.assert_array_equal(short["history_actions"][:, fav], [0, 1, 0, 0])
    assert short["history_actions"][2:].sum() == 0


def test_every_candidate_lands_in_exactly_one_example_and_the_positive_is_the_first_favorite():
    exs = examples(session(2, n_candidates=7))  # C=3: examples of 3, 3, 1
    assert [int(e["candidate_valid"].sum()) for e in exs] == [3, 3, 1]
    posts = np.concatenate([e["candidate_post_id"][e["candidate_valid"]] for e in exs])
    np.testing.assert_array_equal(posts, 250 + np.arange(7))
    assert [bool(e["positive_valid"]) for e in exs] == [True, False, False]
    assert exs[0]["positive_post_id"] == 251 and exs[0]["positive_author_id"] == 1
    reply = DEFAULT_ACTIONS.index("reply")
    np.testing.assert_array_equal(exs[0]["candidate_actions"][:, reply], [0, 1, 0])


def test_model_vocabulary_may_reorder_a_subset_of_the_datasets():
    import dataclasses

    cfg = dataclasses.replace(CFG, actions=("reply", "dwell"))
    ex = examples(session(3), cfg=cfg)[0]
    np.testing.assert_array_equal(ex["candidate_actions"], [[0, 1], [1, 0], [0, 1]])
    with pytest.raises(DatasetError, match="not in the dataset's vocabulary"):
        examples(session(3), cfg=dataclasses.replace(CFG, actions=("favorite", "bookmark")))
    ex = examples(session(3), positive=("dwell",))[0]
    assert ex["positive_post_id"] == 350


# Rows of 12 [user, history] positions, 7 candidate slots and at most 3 sessions (CFG: a session
# takes at most 1 + 4 and 3).
PACKING = {"pack_prefix": 12, "pack_candidates": 7, "pack_sessions": 3}


def batches(dataset, process_index=0, process_count=1, *, batch_size=4, seed=0, worker_count=0, packed=False, **kw):
    """The pipeline over the test dataset; by default one epoch in order, the last batch padded."""
    data = DataConfig(
        dataset["data_dir"],
        batch_size=batch_size * process_count,
        seed=seed,
        worker_count=worker_count,
        **(PACKING if packed else {}),
    )
    kw = {"num_epochs": 1, "shuffle": False, "drop_remainder": False} | kw
    return make_dataset(
        CFG, data, "train", process_index=process_index, process_count=process_count, packed=packed, **kw
    )


def test_batches_hash_every_id_with_the_models_function(dataset):
    batch = next(iter(batches(dataset)))
    assert set(STEP_FIELDS) <= set(batch)
    ids = batch["candidate_post_id"]
    valid = batch["candidate_post_hashes"][..., 0] != 0
    want = hash_ids(ids, CFG.num_post_hashes, CFG.post_vocab_rows) * valid[..., None]
    np.testing.assert_array_equal(batch["candidate_post_hashes"], want)
    np.testing.assert_array_equal(batch["user_hashes"], hash_ids(10_000 + batch["session_id"], 2, CFG.user_vocab_rows))
    pv = batch["positive_valid"]
    assert (batch["positive_id"][pv] >= 1).all() and (batch["positive_id"][pv] < FINGERPRINT_ROWS).all()
    assert (batch["positive_id"][~pv] == 0).all()
    # The authors' fingerprints (the exposure softmax's IDs): one per author, zero for padding.
    authors, prints = batch["candidate_author_hashes"][valid], batch["candidate_author_fingerprint"][valid]
    assert (batch["candidate_author_fingerprint"][~valid] == 0).all() and (prints >= 1).all()
    pairs = {(tuple(h), f) for h, f in zip(authors.tolist(), prints.tolist(), strict=True)}
    assert len(pairs) == len({h for h, _ in pairs}) == len({f for _, f in pairs}) > 1


def session_ids(dataset, process_index=0, process_count=1, **kw):
    out = []
    for b in batches(dataset, process_index, process_count, **kw):
        valid = b["candidate_post_hashes"][:, :, 0].any(1)
        first = b["candidate_offset"] == 0
        out.extend(b["session_id"][valid & first].tolist())
    return out


def test_process_shards_are_disjoint_and_complete(dataset):
    shards = [session_ids(dataset, process_index=p, process_count=3) for p in range(3)]
    assert sum(len(s) for s in shards) == 30
    assert set().union(*map(set, shards)) == set(range(30))


def test_shuffle_is_global_and_changes_each_epoch(dataset):
    two = session_ids(dataset, shuffle=True, num_epochs=2, seed=1)
    first, second = two[:30], two[30:]
    assert sorted(first) == sorted(second) == list(range(30))
    assert first != second and first != sorted(first)
    assert two == session_ids(dataset, shuffle=True, num_epochs=2, seed=1)  # the seed fixes it


def resumed_equals_uninterrupted(dataset, **kw):
    it = iter(batches(dataset, num_epochs=None, shuffle=True, drop_remainder=True, **kw))
    for _ in range(5):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(7)]
    fresh = iter(batches(dataset, num_epochs=None, shuffle=True, drop_remainder=True, **kw))
    fresh.set_state(state)
    for want in rest:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("packed", [False, True], ids=["a-session-a-row", "packed"])
def test_resumed_iterator_yields_exactly_what_an_uninterrupted_one_would(dataset, packed):
    resumed_equals_uninterrupted(dataset, packed=packed)


EXAMPLE_FIELDS = (
    "user_hashes", "history_post_hashes", "history_author_hashes", "history_actions", "history_product_surface",
    "candidate_post_hashes", "candidate_author_hashes", "candidate_product_surface", "candidate_actions",
    "candidate_author_fingerprint", "labeled", "positive_post_hashes", "positive_author_hashes", "positive_id",
    "positive_valid",
)  # fmt: skip


def unpacked_examples(batch) -> dict:
    """(session, first candidate) -> each field of the example, its padding cut."""
    out = {}
    for i in np.flatnonzero(batch["candidate_post_hashes"][:, 0, 0]):
        h = batch["history_post_hashes"][i, :, 0] != 0
        c = batch["candidate_post_hashes"][i, :, 0] != 0
        fields = {
            k: batch[k][i][h if k.startswith("history") else c]
            if k.startswith(("history", "candidate"))
            else batch[k][i]
            for k in EXAMPLE_FIELDS
        }
        out[int(batch["session_id"][i]), int(batch["candidate_offset"][i])] = fields
    return out


def packed_examples(batch) -> dict:
    """The same of a packed batch, each session's fields read through its segment."""
    out = {}
    for b, g in zip(*np.nonzero(batch["user_hashes"][..., 0]), strict=True):
        p = batch["prefix_segment"][b] == g + 1
        c = batch["candidate_segment"][b] == g + 1
        np.testing.assert_array_equal(batch["prefix_position"][b][p], np.arange(p.sum()))
        np.testing.assert_array_equal(batch["candidate_position"][b][c], np.arange(c.sum()))
        assert not batch["history_post_hashes"][b][p][0].any()  # the user's position holds no item
        fields = {}
        for k in EXAMPLE_FIELDS:
            if k.startswith("history"):
                fields[k] = batch[k][b][p][1:]
            else:
                fields[k] = batch[k][b][c] if k.startswith("candidate") else batch[k][b, g]
        key = (int(batch["session_id"][b, g]), int(batch["candidate_offset"][b, g]))
        assert key not in out
        out[key] = fields
    return out


def test_packed_rows_hold_every_example_once_as_a_session_a_row_holds_it(dataset):
    """Histories of 0 to 8 items (cut to the 4 most recent), 1 to 7 candidates (examples of at
    most 3): every example in exactly one row, each field as the unpacked pipeline has it."""
    want = {}
    for batch in batches(dataset):
        want |= unpacked_examples(batch)
    got, rows, sessions = {}, 0, 0
    for batch in batches(dataset, packed=True):
        examples = packed_examples(batch)
        assert not examples.keys() & got.keys()
        got |= examples
        rows += int(batch["prefix_segment"].any(axis=1).sum())
        sessions += len(examples)
    assert got.keys() == want.keys() and len(want) == 30 + sum(i % 7 >= 3 for i in range(30)) + sum(
        i % 7 >= 6 for i in range(30)
    )
    assert sessions > 2 * rows  # packed, not a session a row
    for key, fields in want.items():
        for k, v in fields.items():
            np.testing.assert_array_equal(got[key][k], v, err_msg=f"{key} {k}")


@pytest.mark.slow
def test_resume_with_worker_processes(dataset):
    resumed_equals_uninterrupted(dataset, worker_count=2)


def test_global_batch_is_sharded_over_data_and_fsdp(dataset):
    batch = next(iter(batches(dataset, batch_size=8)))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"))
    arrays = global_batch(batch, mesh)
    assert set(arrays) == set(STEP_FIELDS)
    x = arrays["candidate_post_hashes"]
    assert x.shape == (8, 3, 2) and x.addressable_shards[0].data.shape == (2, 3, 2)
    np.testing.assert_array_equal(np.asarray(x), batch["candidate_post_hashes"])


# --- synthetic world --------------------------------------------------------------------------


def test_synthetic_world_is_deterministic_and_its_probabilities_follow_the_rules(tmp_path):
    cfg = WorldConfig(seed=5, users=60, authors=12, posts=300, sessions=400, history=16)
    files = [write_world(World(cfg), simulate(World(cfg), progress=False), str(tmp_path / d)) for d in "ab"]
    for split in ("train", "test"):
        assert pq.read_table(files[0][split]).equals(pq.read_table(files[1][split]))
    truth = np.load(tmp_path / "a" / "test_truth.npz")
    n_test = pq.read_table(files[0]["test"]).num_rows
    assert len(truth["session_id"]) == n_test and truth["probs"].shape == (truth["offsets"][-1], len(ACTIONS))

    world = World(cfg)
    posts = np.arange(cfg.posts)
    user = int(np.argmax(world.interest.max(1)))  # the most focused user
    users = np.full_like(posts, user)
    p = world.probabilities(users, posts, np.zeros_like(posts), np.zeros_like(posts))
    media = world.post_media
    assert (p[media != VIDEO, ACTIONS.index("video_view")] == 0).all()
    assert (p[media != PHOTO, ACTIONS.index("photo_expand")] == 0).all()
    liked = world.post_topic == np.argmax(world.interest[user])
    assert 0 < liked.sum() < cfg.posts
    fav, report = ACTIONS.index("favorite"), ACTIONS.index("report")
    assert p[liked, fav].mean() > 2 * p[~liked, fav].mean()
    assert p[liked, report].mean() < p[~liked, report].mean()
    spam = world.author_spam[world.post_author]
    if spam.any():
        assert p[spam, report].mean() > 3 * p[~spam, report].mean()
    for seed in range(5):  # no author dominates the world, whatever the seed
        w = World(WorldConfig(seed=seed, users=200, authors=50, posts=2000))
        assert np.bincount(w.post_author).max() / 2000 < 0.2
    familiar = world.probabilities(users, posts, np.zeros_like(posts), np.full_like(posts, 5))
    follow = ACTIONS.index("follow_author")
    assert (familiar[:, follow] > p[:, follow]).all()


def test_a_world_ends_each_users_sessions_with_its_test_share():
    for test_share in (0.1, 0.3):
        cfg = WorldConfig(seed=2, users=40, authors=10, posts=200, sessions=1200, history=8, test_share=test_share)
        splits = simulate(World(cfg), progress=False)
        total = sum(len(s.session_id) for s in splits.values())
        assert total == cfg.sessions
        shares = {name: len(s.session_id) / total for name, s in splits.items()}
        assert shares["test"] == pytest.approx(test_share, abs=0.03)
        assert shares["validation"] == pytest.approx(0.1, abs=0.03)
        # per user in time order (session IDs are given in time order): train, validation, test
        for user in range(cfg.users):
            ids = [np.asarray(s.session_id)[np.asarray(s.user) == user] for s in splits.values()]
            ordered = [i for i in ids if len(i)]
            assert all(a.max() < b.min() for a, b in itertools.pairwise(ordered))
    for bad in (0.0, 0.6):
        with pytest.raises(ConfigError, match=rf"test_share={bad}"):
            WorldConfig(test_share=bad)


def test_phoenix_synth_names_a_bad_option_without_a_traceback(tmp_path, capsys):
    for option, value in (("--test-share", "0.7"), ("--cold-fraction", "0.9")):
        with pytest.raises(SystemExit) as exit_info:
            synth_cli.main(["--out", str(tmp_path / "w"), option, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"{option[2:].replace('-', '_')}={value}: must be in" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_workdir_holding_another_world_is_refused_not_reused(tmp_path, capsys):
    root = str(tmp_path / "run")
    cfg = WorldConfig(seed=4, users=20, authors=5, posts=80, sessions=120, history=8)
    data = demo.make_world(cfg, root, {})
    assert demo.make_world(cfg, root, {}) == data and f"reusing {data['data_dir']}" in capsys.readouterr().out

    # A world.json from before test_share: the field counts at its default, so the same world matches.
    world_json = tmp_path / "run" / "world" / "world.json"
    saved = json.loads(world_json.read_text())
    del saved["config"]["test_share"]
    world_json.write_text(json.dumps(saved))
    assert demo.make_world(cfg, root, {}) == data
    other = WorldConfig(seed=4, users=20, authors=5, posts=80, sessions=150, history=8, test_share=0.3)
    with pytest.raises(WorldMismatchError) as e:
        demo.make_world(other, root, {})
    assert "sessions=120 (asked 150), test_share=0.1 (asked 0.3); delete" in str(e.value)
    assert "users=" not in str(e.value)

    # phoenix-demo's own WORLD is not this one: one line naming the difference, before any work.
    rc = demo.main(["--workdir", root])
    err = capsys.readouterr().err
    assert rc == 2 and "holds another world: " in err and "--fresh" in err and "Traceback" not in err

    # The prepared dataset without the world it came from is not trusted either.
    shutil.rmtree(tmp_path / "run" / "world")
    with pytest.raises(WorldMismatchError, match="prepared from a world no longer in"):
        demo.make_world(cfg, root, {})
    assert not (tmp_path / "run" / "world").exists()


def test_a_cold_world_shows_its_new_posts_only_after_training(tmp_path):
    cfg = WorldConfig(seed=3, users=60, authors=12, posts=300, sessions=600, history=16, cold_fraction=0.3)
    world = World(cfg)
    files = write_world(world, simulate(world, progress=False), str(tmp_path))
    cold = set(world.post_ids[world.post_cold].tolist())
    assert 0.2 < len(cold) / cfg.posts < 0.4

    def shown(split):
        rows = pq.read_table(files[split]).to_pylist()
        return [c["post_id"] for r in rows for c in r["candidates"]], [h["post_id"] for r in rows for h in r["history"]]

    candidates, history = shown("train")
    assert not cold & set(candidates) and not cold & set(history)  # training never sees them
    test_candidates, _ = shown("test")
    assert 0.15 < np.isin(test_candidates, list(cold)).mean() < 0.45  # shown as often as the others
    # The cold posts are drawn from their own stream: users, authors and posts are those of the
    # same world without them.
    warm = World(WorldConfig(seed=3, users=60, authors=12, posts=300, sessions=600, history=16))
    assert not warm.post_cold.any()
    for name in ("interest", "post_author", "post_topic", "post_media", "post_quality", "post_popularity"):
        np.testing.assert_array_equal(getattr(world, name), getattr(warm, name))
    with pytest.raises(ConfigError, match=r"cold_fraction=0\.9"):
        WorldConfig(cold_fraction=0.9)
