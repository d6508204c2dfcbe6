"""Serving: cached ranking equals the full sequence; the rank and retrieve programs."""

import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, flip_16_bytes, largest_file, tiny_experiment, truncate

from phoenix_flax.checkpoint.restore import restore_model
from phoenix_flax.config import ModelConfig, apply_overrides
from phoenix_flax.data.hashing import hash_ids
from phoenix_flax.data.raw import SessionParser
from phoenix_flax.model.scoring import FeedScoring, action_weights, feed_scores
from phoenix_flax.serving.ranking import CachedRanker, prefix_batch
from phoenix_flax.testing import gated_blend_features
from phoenix_flax.training.loop import train
from serve import rank as rank_cli
from serve import retrieve as retrieve_cli
from serve import serve as serve_cli
from train import evaluate as evaluate_cli


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """The tiny experiment with every extension the demo trains with, the exposure softmax too."""
    workdir = str(tmp_path_factory.mktemp("serving_run"))
    train(tiny_experiment(tiny_world["data_dir"], loss={"exposure_weight": 0.1}), workdir)
    restored = restore_model(workdir)
    cfg, step, model, counts = restored.cfg, restored.step, restored.model, restored.counts
    return {"workdir": workdir, "cfg": cfg, "model": model, "step": step, "counts": counts}


@pytest.fixture(scope="module")
def sessions(tiny_world, trained):
    """Test sessions from the world; every third one with 3x the candidates (24 > C=8)."""
    records = pq.read_table(tiny_world["raw"]["test"]).to_pylist()[:10]
    for i, r in enumerate(records):
        if i % 3 == 0:
            r["candidates"] = r["candidates"] * 3
    parser = SessionParser(trained["cfg"].model.actions)
    return records, [parser.parse(r, i) for i, r in enumerate(records)]


def full_sequence_batch(cfg, session):
    """Every candidate of the session in one sequence: a batch of one."""
    batch = prefix_batch([session], cfg, 1)
    batch["candidate_post_hashes"] = hash_ids(session.candidate_post_id, cfg.num_post_hashes, cfg.post_vocab_rows)[None]
    batch["candidate_author_hashes"] = hash_ids(
        session.candidate_author_id, cfg.num_author_hashes, cfg.author_vocab_rows
    )[None]
    batch["candidate_product_surface"] = session.candidate_product_surface[None]
    return batch


def full_sequence_probs(model, cfg, session, counts):
    """The full sequence's forward pass in parts, blended in numpy with the counts' log-odds by the
    checkpoint's weights, plus its calibration shifts."""
    batch = full_sequence_batch(cfg, session)
    parts = {k: np.asarray(v)[0] for k, v in model.ranker.logit_parts(batch).items()}  # [m, A] each
    named = [parts[k] for k in ("transformer", "post", "author", "affinity")]
    features = gated_blend_features(named, counts.log_odds(session.candidate_post_id))
    weights = np.asarray(model.ranker.blend[...])  # [9, A]
    logits = sum(w * f for w, f in zip(weights, features, strict=True)) + np.asarray(model.ranker.calibration[...])
    return 1 / (1 + np.exp(-logits))


def test_cached_chunked_scores_equal_the_full_sequence(trained, sessions):
    model, cfg, counts = trained["model"], trained["cfg"].model, trained["counts"]
    _, parsed = sessions
    assert np.abs(np.asarray(model.ranker.calibration[...])).max() > 0.01  # fit at the run's last step
    weights = np.asarray(model.ranker.blend[...])
    assert np.abs(weights[4]).max() > 0.01 and np.abs(weights[5:]).max() > 0.01  # the counts' and gated parts' too
    small = CachedRanker(model, cfg, batch_size=3, chunk_size=5, counts=counts).probabilities(parsed)
    large = CachedRanker(model, cfg, batch_size=16, chunk_size=512, counts=counts).probabilities(parsed)
    with pytest.raises(ValueError, match="blends in post counts"):
        CachedRanker(model, cfg)
    for session, a, b in zip(parsed, small, large, strict=True):
        full = full_sequence_probs(model, cfg, session, counts)
        assert a.shape == full.shape == (len(session.candidate_post_id), cfg.num_actions)
        np.testing.assert_allclose(a, full, atol=1e-5, rtol=0)
        np.testing.assert_allclose(b, full, atol=1e-5, rtol=0)


def test_cached_context_needs_shared_positions(trained, sessions):
    from flax import nnx

    from phoenix_flax.model.ranker import PhoenixRanker

    cfg = dataclasses.replace(trained["cfg"].model, candidate_positions="sequential")
    ranker = PhoenixRanker(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="candidate_positions='shared'"):
        ranker.user_context(prefix_batch(sessions[1][:2], cfg, 2))


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_rank_writes_sessions_in_order_with_candidates_by_score(trained, sessions, tmp_path):
    records, parsed = sessions
    records = [
        {**r, "candidates": [{k: v for k, v in c.items() if k != "actions"} for c in r["candidates"]]} for r in records
    ]  # inference input: no labels
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    rc = rank_cli.main(
        [
            "--workdir",
            trained["workdir"],
            "--input",
            path,
            "--output",
            str(out),
            "--weights",
            "report=-100,favorite=3",
            "--chunk-size",
            "7",
        ]
    )
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    actions = trained["cfg"].model.actions
    w = action_weights(actions, {"report": -100.0, "favorite": 3.0})
    model, cfg = trained["model"], trained["cfg"].model
    assert [x["user_id"] for x in lines] == [r["user_id"] for r in records]
    for line, session in zip(lines, parsed, strict=True):
        cands = line["candidates"]
        assert sorted(c["post_id"] for c in cands) == sorted(session.candidate_post_id.tolist())
        scores = [c["score"] for c in cands]
        assert scores == sorted(scores, reverse=True)
        for c in cands:
            assert list(c["probs"]) == list(actions)
            assert c["score"] == pytest.approx(np.dot([c["probs"][a] for a in actions], w), abs=1e-4)
        full = full_sequence_probs(model, cfg, session, trained["counts"])
        j = int(np.argmax(full @ w))
        assert cands[0]["post_id"] == session.candidate_post_id[j]


def test_rank_applies_the_feed_scorer_options(trained, sessions, tmp_path, capsys):
    records, _ = sessions
    records = [
        {**r, "candidates": [{**c, "in_network": c["post_id"] % 2 == 0} for c in r["candidates"]]} for r in records
    ]  # a post's flag and author are the same wherever it appears, so the output's post IDs find them
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    options = ["--offset-negatives", "0.01", "--author-decay", "0.5", "--author-floor", "0.2"]
    argv = ["--workdir", trained["workdir"], "--input", path, "--output", str(out), "--weights", "report=-100"]
    assert rank_cli.main([*argv, *options, "--out-of-network-factor", "0.3"]) == 0
    actions = trained["cfg"].model.actions
    w = action_weights(actions, {"report": -100.0})
    feed = FeedScoring(negative_offset=0.01, author_decay=0.5, author_floor=0.2, out_of_network_factor=0.3)
    for line, record in zip(map(json.loads, out.read_text().splitlines()), records, strict=True):
        cands = line["candidates"]
        by_post = {c["post_id"]: c for c in record["candidates"]}
        probs = np.array([[c["probs"][a] for a in actions] for c in cands])
        authors = np.array([by_post[c["post_id"]]["author_id"] for c in cands])
        in_network = np.array([by_post[c["post_id"]]["in_network"] for c in cands])
        expected = feed_scores(probs, w, authors, in_network, feed)  # from the printed (rounded) probabilities
        np.testing.assert_allclose([c["score"] for c in cands], expected, atol=1e-4)
        np.testing.assert_allclose([c["weighted_score"] for c in cands], probs @ w, atol=1e-4)
        assert [c["score"] for c in cands] == sorted((c["score"] for c in cands), reverse=True)
        assert not in_network.all()  # the factor had something to act on
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{**records[0], "candidates": [{**records[0]["candidates"][0], "in_network": 1}]}]
    )
    rc = rank_cli.main(["--workdir", trained["workdir"], "--input", bad, "--output", str(tmp_path / "o")])
    assert (
        rc == 2 and "bad.jsonl:1: field 'candidates[0].in_network': expected true or false" in capsys.readouterr().err
    )


def test_rank_reports_bad_input(trained, tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"user_id": 1, "history": [], "candidates": [{"post_id": "x", "author_id": 1, "product_surface": 0}]}],
    )
    rc = rank_cli.main(["--workdir", trained["workdir"], "--input", path, "--output", str(tmp_path / "o")])
    assert rc == 2 and "bad.jsonl:1: field 'candidates[0].post_id'" in capsys.readouterr().err


def retrieve(trained, tmp_path, corpus, records, *extra):
    out = tmp_path / "retrieved.jsonl"
    rc = retrieve_cli.main(
        [
            "--workdir",
            trained["workdir"],
            "--corpus",
            corpus,
            "--input",
            write_jsonl(tmp_path / "users.jsonl", records),
            "--output",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


@pytest.mark.slow
def test_retrieval_equals_brute_force_and_excludes_seen_posts(trained, sessions, tiny_world, tmp_path, capsys):
    records, parsed = sessions
    model, cfg = trained["model"], trained["cfg"].model
    corpus = [json.loads(x) for x in pathlib.Path(tiny_world["corpus"]).read_text().splitlines()]
    post_ids = np.array([c["post_id"] for c in corpus])
    author_ids = np.array([c["author_id"] for c in corpus])
    vectors = np.asarray(
        model.retrieval.candidates(
            hash_ids(post_ids, cfg.num_post_hashes, cfg.post_vocab_rows),
            hash_ids(author_ids, cfg.num_author_hashes, cfg.author_vocab_rows),
        )
    )
    users = np.asarray(model.retrieval.user(prefix_batch(parsed, cfg, len(parsed))))
    users_only = [{k: r[k] for k in ("user_id", "history")} for r in records]  # no candidates needed
    K = 40  # a tenth of the corpus: deep enough that some session's top-K holds a post it has seen

    got = retrieve(trained, tmp_path, tiny_world["corpus"], users_only, "--top-k", str(K), "--include-seen")
    for line, u in zip(got, users, strict=True):
        want = np.argsort(-(vectors @ u), kind="stable")[:K]
        assert [c["post_id"] for c in line["candidates"]] == post_ids[want].tolist()
        np.testing.assert_allclose([c["retrieval_score"] for c in line["candidates"]], (vectors @ u)[want], atol=1e-5)

    unseen = retrieve(trained, tmp_path, tiny_world["corpus"], users_only, "--top-k", str(K))
    assert "reused the index" in capsys.readouterr().err
    for line, session, u in zip(unseen, parsed, users, strict=True):
        seen = set(session.history_post_id.tolist())
        order = [p for p in post_ids[np.argsort(-(vectors @ u), kind="stable")] if p not in seen][:K]
        assert [c["post_id"] for c in line["candidates"]] == order
    assert any(
        set(session.history_post_id.tolist()) & {c["post_id"] for c in line["candidates"]}
        for line, session in zip(got, parsed, strict=True)
    )  # so the exclusion was tested


def test_then_rank_and_a_stale_index_is_rebuilt(trained, sessions, tiny_world, tmp_path, capsys):
    records, _ = sessions
    corpus = tmp_path / "corpus.jsonl"
    lines = pathlib.Path(tiny_world["corpus"]).read_text().splitlines()
    corpus.write_text("\n".join(lines[:200]) + "\n")
    users_only = [{k: r[k] for k in ("user_id", "history")} for r in records[:3]]
    first = retrieve(trained, tmp_path, str(corpus), users_only, "--top-k", "5", "--then-rank")
    assert "built the index of 200 posts" in capsys.readouterr().err
    for line in first:
        scores = [c["score"] for c in line["candidates"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        assert {"post_id", "author_id", "retrieval_score", "probs", "score"} <= set(line["candidates"][0])
    corpus.write_text("\n".join(lines[:300]) + "\n")  # the corpus changed: the index is stale
    retrieve(trained, tmp_path, str(corpus), users_only, "--top-k", "5")
    assert "built the index of 300 posts" in capsys.readouterr().err


INDEX_DAMAGE = {
    "truncated": truncate,
    "16 bytes flipped": flip_16_bytes,
    "not an npz": lambda path: path.write_text("{}"),
    "empty": lambda path: path.write_bytes(b""),
}


@pytest.mark.parametrize("damage", [*INDEX_DAMAGE, "unwritable"])
def test_a_damaged_index_cache_is_rebuilt_and_an_unwritable_one_kept_in_memory(
    trained, sessions, tiny_world, tmp_path, capsys, damage
):
    """The saved index is only a cache: whatever happened to it, retrieval gives what a fresh
    build gives, and says what it did."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir, ignore=shutil.ignore_patterns("index"))
    run = {**trained, "workdir": str(workdir)}
    users_only = [{k: r[k] for k in ("user_id", "history")} for r in sessions[0][:4]]
    first = retrieve(run, tmp_path, tiny_world["corpus"], users_only, "--top-k", "5")
    (saved,) = (workdir / "index").glob("step_*.npz")
    capsys.readouterr()
    if damage == "unwritable":  # a file where the index folder goes: as a read-only workdir, without root's bypass
        shutil.rmtree(workdir / "index")
        (workdir / "index").write_text("")
        expected = "note: cannot save the index ("
    else:
        INDEX_DAMAGE[damage](saved)
        expected = f"note: the saved index {saved} is damaged ("
    assert retrieve(run, tmp_path, tiny_world["corpus"], users_only, "--top-k", "5") == first
    err = capsys.readouterr().err
    assert expected in err and "built the index of 400 posts" in err, err
    if damage != "unwritable":  # saved again, whole: the next run reuses it
        retrieve(run, tmp_path, tiny_world["corpus"], users_only, "--top-k", "5")
        assert "reused the index" in capsys.readouterr().err


@pytest.mark.parametrize(
    "program, argument, value",
    [
        (rank_cli, "--batch-size", "0"),
        (rank_cli, "--chunk-size", "-1"),
        (rank_cli, "--batch-size", "two"),
        (retrieve_cli, "--batch-size", "-3"),
        (retrieve_cli, "--top-k", "0"),
        (evaluate_cli, "--batch-size", "0"),
    ],
)
def test_sizes_below_one_are_refused_in_one_line(tmp_path, capsys, program, argument, value):
    given = {"--workdir": str(tmp_path), "--output": str(tmp_path / "o")}
    if program is not evaluate_cli:
        given["--input"] = "in.jsonl"
    if program is retrieve_cli:
        given |= {"--corpus": "c.jsonl", "--top-k": "3"}
    args = [x for k, v in {**given, argument: value}.items() for x in (k, v)]
    with pytest.raises(SystemExit) as exit_info:
        program.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert f"error: argument {argument}: " in err[0] and ("must be at least 1" in err[0] or "whole number" in err[0])


# --- what users get wrong ---------------------------------------------------------------------


def unlabeled_input(sessions, tmp_path, name="in.jsonl", edit=None):
    records, _ = sessions
    records = [
        {**r, "candidates": [{k: v for k, v in c.items() if k != "actions"} for c in r["candidates"]]}
        for r in records[:3]
    ]
    if edit:
        edit(records)
    return write_jsonl(tmp_path / name, records)


@pytest.mark.parametrize("weights", ["favorite=nan", "report=-inf", "favorite=inf,reply=1", "favorite=1e39"])
def test_non_finite_weights_are_refused_before_any_output(trained, sessions, tmp_path, capsys, weights):
    out = tmp_path / "out.jsonl"
    rc = rank_cli.main(
        [
            "--workdir",
            trained["workdir"],
            "--input",
            unlabeled_input(sessions, tmp_path),
            "--output",
            str(out),
            "--weights",
            weights,
        ]
    )
    assert rc == 2 and "weights must be finite numbers" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("program", ["rank", "retrieve", "eval"])
def test_an_unwritable_output_fails_before_the_work(trained, sessions, tiny_world, tmp_path, capsys, program):
    out = str(tmp_path / "no_such_folder" / "out.json")
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    shutil.rmtree(workdir / "index", ignore_errors=True)
    args = ["--workdir", str(workdir), "--output", out]
    if program == "eval":
        rc = evaluate_cli.main(args)
    else:
        args += ["--input", unlabeled_input(sessions, tmp_path)]
        rc = (
            rank_cli.main(args)
            if program == "rank"
            else retrieve_cli.main([*args, "--corpus", tiny_world["corpus"], "--top-k", "3"])
        )
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot write --output {out}: No such file or directory" in err
    assert "evaluating" not in err and not (workdir / "index").exists()  # nothing was computed first


def test_surfaces_beyond_the_vocabulary_and_bytes_that_are_not_utf8_are_named_and_skippable(
    trained, sessions, tmp_path, capsys
):
    def edit(records):
        records[1]["candidates"][2]["product_surface"] = 999

    path = unlabeled_input(sessions, tmp_path, edit=edit)
    with open(path, "ab") as f:
        f.write(
            b'{"user_id": 5, "history": [], "candidates": [{"post_id": 1, "author_id": 2, "product_surface": 0, "x": "\xff"}]}\n'
        )
    out = tmp_path / "out.jsonl"
    rc = rank_cli.main(["--workdir", trained["workdir"], "--input", path, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "in.jsonl:2: field 'candidates[2].product_surface': out of range [0, 15]" in err

    rc = rank_cli.main(["--workdir", trained["workdir"], "--input", path, "--output", str(out), "--skip-invalid"])
    err = capsys.readouterr().err
    assert rc == 0 and len(out.read_text().splitlines()) == 2  # sessions 1 and 3 of the file
    assert "in.jsonl:4: not UTF-8: byte 0xff" in err and "skipped 2 invalid record(s)" in err


def test_the_original_architecture_trains_restores_and_serves_the_sigmoid_of_its_logits(tiny_world, sessions, tmp_path):
    """`ModelConfig()`'s extensions off: no post counts, no post-hoc heads; what `phoenix-rank`
    serves is sigmoid of the full sequence's logits."""
    from conftest import EXTENSIONS

    from phoenix_flax.model.ranker import PhoenixRanker

    original = {k: False for k in EXTENSIONS}
    cfg = tiny_experiment(
        tiny_world["data_dir"],
        model=original,
        loss={"retrieval_weight": 0.0},
        eval={"batches": 0},
        checkpoint={"every_steps": 2, "best_metric": ""},
        train={"steps": 2},
    )
    assert all(getattr(ModelConfig(), k) is False for k in EXTENSIONS)
    train(cfg, str(tmp_path))
    restored = restore_model(str(tmp_path))
    assert type(restored.model.ranker) is PhoenixRanker and restored.counts is None
    _, parsed = sessions
    model, model_cfg = restored.model, restored.cfg.model
    served = CachedRanker(model, model_cfg, batch_size=4, chunk_size=5).probabilities(parsed)
    for session, probs in zip(parsed, served, strict=True):
        logits = np.asarray(model.ranker(full_sequence_batch(model_cfg, session)))[0]  # [m, A]
        np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ranking_with_a_retrieval_only_checkpoint_is_a_named_error(tiny_world, sessions, tmp_path, capsys):
    workdir = str(tmp_path / "retrieval_only")
    cfg = tiny_experiment(
        tiny_world["data_dir"], loss={"ranking_weight": 0.0, "exposure_weight": 0.0}, train={"steps": 1}
    )
    train(apply_overrides(cfg, ["--config.checkpoint.best_metric=eval_loss"]), workdir)
    capsys.readouterr()
    args = ["--workdir", workdir, "--input", unlabeled_input(sessions, tmp_path), "--output", str(tmp_path / "o")]
    assert rank_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"phoenix-rank: error: step 1 of {workdir} has no ranker (it trained with loss.ranking_weight=0)"]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_retrieval_from_a_ranking_only_checkpoint_is_a_named_error(tiny_world, sessions, tmp_path, capsys):
    workdir = str(tmp_path / "ranker_only")
    train(tiny_experiment(tiny_world["data_dir"], loss={"retrieval_weight": 0.0}, train={"steps": 1}), workdir)
    capsys.readouterr()
    args = ["--workdir", workdir, "--input", unlabeled_input(sessions, tmp_path), "--output", str(tmp_path / "o")]
    rc = retrieve_cli.main([*args, "--corpus", tiny_world["corpus"], "--top-k", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        f"phoenix-retrieve: error: step 1 of {workdir} has no retrieval model (it trained with loss.retrieval_weight=0)"
    ]


@pytest.mark.slow
def test_a_retrained_workdir_gets_a_fresh_index(trained, sessions, tiny_world, tmp_path, capsys):
    """Same step number, other parameters: the saved index must not be reused."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    users_only = [{k: r[k] for k in ("user_id", "history")} for r in sessions[0][:4]]
    before = retrieve({**trained, "workdir": str(workdir)}, tmp_path, tiny_world["corpus"], users_only, "--top-k", "5")
    capsys.readouterr()
    shutil.rmtree(workdir / "checkpoints")
    cfg = apply_overrides(trained["cfg"], ["--config.train.seed=1"])
    train(cfg, str(workdir))  # the same steps again, from other initial parameters
    after = retrieve({**trained, "workdir": str(workdir)}, tmp_path, tiny_world["corpus"], users_only, "--top-k", "5")
    assert "built the index" in capsys.readouterr().err
    retrained = restore_model(str(workdir))
    corpus = [json.loads(x) for x in pathlib.Path(tiny_world["corpus"]).read_text().splitlines()]
    post_ids = np.array([c["post_id"] for c in corpus])
    m, c = retrained.model, retrained.cfg.model
    vectors = np.asarray(m.retrieval.candidates(
        hash_ids(post_ids, c.num_post_hashes, c.post_vocab_rows),
        hash_ids(np.array([x["author_id"] for x in corpus]), c.num_author_hashes, c.author_vocab_rows),
    ))  # fmt: skip
    parser = SessionParser(c.actions, require_candidates=False)
    users = np.asarray(m.retrieval.user(prefix_batch([parser.parse(r, i) for i, r in enumerate(users_only)], c, 4)))
    for line, u, user in zip(after, users, users_only, strict=True):
        seen = {h["post_id"] for h in user["history"]}
        want = [p for p in post_ids[np.argsort(-(vectors @ u), kind="stable")] if p not in seen][:5]
        assert [x["post_id"] for x in line["candidates"]] == want
    assert any(a["candidates"] != b["candidates"] for a, b in zip(after, before, strict=True))


def test_full_ranks_and_ranking_metrics_by_hand():
    from phoenix_flax.evaluation.evaluate import full_ranks
    from phoenix_flax.evaluation.metrics import ranking_metrics

    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.2, 0.3, 0.4, 0.5]])
    excluded = np.array([[True, False, False, False], [False, False, False, False]])
    # row 0, target 1 (0.5): item 0 higher, item 2 tied (counts against) -> rank 3; item 0 excluded -> 2
    # row 1, target 0 (0.2): every other item higher -> rank 4
    np.testing.assert_array_equal(full_ranks(scores, np.array([1, 0]), None), [3, 4])
    np.testing.assert_array_equal(full_ranks(scores, np.array([1, 0]), excluded), [2, 4])
    # row 0, target 0 excluded (already seen): a miss, as retrieve never returns it
    np.testing.assert_array_equal(full_ranks(scores, np.array([0, 0]), excluded), [np.inf, 4])
    assert full_ranks(scores, np.array([-1, 0]), None)[0] == np.inf  # not in the corpus: never a hit
    got = ranking_metrics(np.array([1.0, 3.0, 12.0, np.inf]), ks=(10,))
    assert got["hr@10"] == pytest.approx(2 / 4)
    assert got["ndcg@10"] == pytest.approx((1.0 + 1 / np.log2(4)) / 4)
    assert got["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 0) / 4)


def test_next_item_ranks_equal_the_retrieval_programs_top_k(trained, tiny_world):
    """The evaluation's full-ranking HR@k equals a count over `retrieve`'s exact top-k (seen
    excluded), an independent path through the corpus index's search."""
    from phoenix_flax.data.raw import read_corpus, read_sessions
    from phoenix_flax.evaluation.evaluate import next_item
    from phoenix_flax.serving.index import CorpusIndex, retrieve

    model, cfg = trained["model"], trained["cfg"]
    got = next_item(model, cfg, "test", tiny_world["corpus"], ks=(10, 20))
    index = CorpusIndex.build(model, cfg.model, *read_corpus(tiny_world["corpus"]))
    sessions = [s for _, s in read_sessions([tiny_world["raw"]["test"]], cfg.model.actions)]
    positive = np.int64(1) << cfg.model.actions.index("favorite")
    targets = [
        (s, p) for s in sessions for p, m in zip(s.candidate_post_id, s.candidate_actions, strict=True) if m & positive
    ]
    assert got["targets"] == len(targets) > 20
    in_history = sum(int(p) in set(s.history_post_id.tolist()) for s, p in targets)
    assert got["targets_in_history"] == in_history > 0  # misses below, as retrieve excludes them
    top = retrieve(model, cfg.model, index, [s for s, _ in targets], 20)  # seen excluded
    for k in (10, 20):
        hits = [
            int(p) in {int(index.post_ids[j]) for j, _ in row[:k]} for (_, p), row in zip(targets, top, strict=True)
        ]
        # Ties at the k-th place could differ between the two paths; float scores make them rare.
        assert got["model"]["seen_excluded"][f"hr@{k}"] == pytest.approx(np.mean(hits), abs=1.5 / len(targets))
    assert set(got["popularity"]["seen_excluded"]) == {"hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr"}


@pytest.mark.slow
def test_phoenix_eval_next_item_protocol_prints_and_writes_the_metrics(trained, tiny_world, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    argv = ["--workdir", trained["workdir"], "--output", str(out), "--protocol", "next-item"]
    assert evaluate_cli.main(argv) == 2  # the corpus is required
    assert "next-item evaluation ranks the whole corpus" in capsys.readouterr().err
    assert evaluate_cli.main([*argv, "--corpus", tiny_world["corpus"]]) == 0
    got = json.loads(out.read_text())["next_item"]
    assert got["corpus"] == len(pathlib.Path(tiny_world["corpus"]).read_text().splitlines())
    assert 0 < got["model"]["seen_excluded"]["hr@20"] <= 1 and got["popularity"]["seen_included"]["mrr"] > 0
    printed = capsys.readouterr().out
    assert "next item:" in printed and "popularity, seen excluded" in printed


def test_phoenix_eval_draws_a_reliability_diagram_and_roc_curves_per_action(trained, tmp_path):
    out = tmp_path / "eval" / "metrics.json"
    out.parent.mkdir()
    assert evaluate_cli.main(["--workdir", trained["workdir"], "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    drawn = [a for a, r in result["actions"].items() if r["auc"] is not None]  # both classes present
    want = [str(out.parent / "plots" / f"{kind}.png") for kind in ("reliability", "roc")]  # a panel per action
    assert result["plots"] == want and len(drawn) >= 5
    for path in want:
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    none = tmp_path / "none.json"
    assert evaluate_cli.main(["--workdir", trained["workdir"], "--output", str(none), "--plots", ""]) == 0
    assert "plots" not in json.loads(none.read_text()) and not (tmp_path / "plots").exists()


def test_phoenix_eval_with_the_truth_of_another_split_is_one_line(trained, tiny_world, tmp_path, capsys):
    truth = dict(np.load(tiny_world["truth"]))
    truth["session_id"] = truth["session_id"] + 10**9  # no evaluated session among them
    other = tmp_path / "other_truth.npz"
    np.savez(other, **truth)
    args = ["--workdir", trained["workdir"], "--output", str(tmp_path / "m.json"), "--plots", ""]
    assert evaluate_cli.main([*args, "--truth", str(other)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [
        f"phoenix-eval: error: {other} lacks some evaluated sessions or candidates: is it the truth of this split?"
    ]
    assert evaluate_cli.main([*args, "--truth", tiny_world["corpus"]]) == 2
    assert f"phoenix-eval: error: {tiny_world['corpus']} is not a truth file" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_roc_curve_by_hand_and_its_area_is_the_auc():
    from phoenix_flax.evaluation.metrics import auc
    from phoenix_flax.evaluation.plots import roc_curve

    fpr, tpr = roc_curve(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    rng = np.random.default_rng(0)
    scores, labels = np.round(rng.random(500), 1), rng.random(500) < 0.3  # many ties
    fpr, tpr = roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(scores, labels))


# --- phoenix-serve --------------------------------------------------------------------------------


def call(port: int, method: str, path: str, body=None) -> tuple[int, dict, object]:
    """(status, headers, decoded JSON or text) of one request to the server on `port`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    kind = response.getheader("content-type", "")
    return response.status, dict(response.getheaders()), json.loads(text) if "json" in kind else text


@contextlib.contextmanager
def serving(engine):
    """`engine`'s app on a free loopback port, in a thread; yields the port once it is ready."""
    import uvicorn

    from phoenix_flax.serving.server import make_app

    listening = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not engine.ready:
        assert engine.failure is None and time.monotonic() < deadline, engine.failure
        time.sleep(0.05)
    try:
        yield listening.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(60)


def in_threads(port: int, requests, clients: int):
    """Each of `requests` (path, body) posted by `clients` threads at once -> (status, headers, body), in order."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda r: call(port, "POST", *r), requests))


SCORING = {"weights": "report=-100,favorite=3", "author_decay": "0.5", "author_floor": "0.25"}
SCORING_ARGS = ["--weights", "report=-100,favorite=3", "--author-decay", "0.5", "--author-floor", "0.25"]


def assert_same_lines(served: dict, written: dict) -> None:
    """Served and written lines agree: the same candidates in the same order, every number to the
    output's 6 decimals (float32 in a batch of another shape may round the last one otherwise;
    scores to 1e-5 of their size: a weight of -100 scales a probability's last digit)."""
    assert served["user_id"] == written["user_id"]
    assert [c["post_id"] for c in served["candidates"]] == [c["post_id"] for c in written["candidates"]]
    for a, b in zip(served["candidates"], written["candidates"], strict=True):
        assert a.keys() == b.keys()
        for key in ("score", "retrieval_score", "weighted_score"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=2e-6)
        if "probs" in a:
            assert a["probs"] == pytest.approx(b["probs"], abs=2e-6)


@pytest.fixture(scope="module")
def server(trained, tiny_world):
    from phoenix_flax.serving.server import Engine, ServeOptions

    notes = []
    engine = Engine(
        trained["workdir"],
        trained["step"],
        tiny_world["corpus"],
        ServeOptions(max_batch=8, max_wait_ms=20, max_candidates=30, max_history=64, max_top_k=50),
        report=notes.append,
    )
    with serving(engine) as port:
        yield {"engine": engine, "port": port, "notes": notes}


def test_served_lines_equal_the_programs_and_no_request_compiles(server, trained, sessions, tiny_world, tmp_path):
    """/rank and /retrieve (then ranked) from 8 concurrent clients, twice over the sessions (batches
    of several sizes): phoenix-rank's and phoenix-retrieve's lines for the same checkpoint, and
    not one compilation after warm-up."""
    import urllib.parse

    records, _ = sessions
    path = write_jsonl(tmp_path / "in.jsonl", records)
    ranked = tmp_path / "ranked.jsonl"
    assert (
        rank_cli.main(["--workdir", trained["workdir"], "--input", path, "--output", str(ranked), *SCORING_ARGS]) == 0
    )
    retrieved = retrieve(trained, tmp_path, tiny_world["corpus"], records, "--top-k", "5", "--then-rank", *SCORING_ARGS)
    ranked = [json.loads(x) for x in ranked.read_text().splitlines()]

    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: (
            compiled.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    query, port = urllib.parse.urlencode(SCORING), server["port"]
    requests = [(f"/rank?{query}", r) for r in records] * 2
    requests += [
        (f"/retrieve?{query}", {"user_id": r["user_id"], "history": r["history"], "top_k": 5, "then_rank": True})
        for r in records
    ]
    answers = in_threads(port, requests, clients=8)
    assert compiled == []
    assert all(status == 200 and headers["x-phoenix-step"] == str(trained["step"]) for status, headers, _ in answers)
    for (_, _, line), want in zip(answers, [*ranked, *ranked, *retrieved], strict=True):
        assert_same_lines(line, want)

    status, _, metrics = call(port, "GET", "/metrics")
    assert status == 200 and f"phoenix_served_step {float(trained['step'])}" in metrics
    batches = {k: float(v) for k, v in re.findall(r"^phoenix_batch_sessions_(count|sum) (\S+)$", metrics, re.M)}
    assert batches["sum"] >= len(requests) and batches["count"] < batches["sum"]  # some batches held several
    assert call(port, "GET", "/healthz")[0] == 200 and call(port, "GET", "/readyz")[2]["step"] == trained["step"]


BAD_REQUESTS = {
    "not JSON": ("/rank", b"{'user_id': 1", 400, "body: not JSON"),
    "not an object": ("/rank", [1, 2], 400, "expected a JSON object"),
    "a post ID that is text": ("/rank", "post_id", 400, "field 'candidates[0].post_id': expected an integer"),
    "an unknown action": ("/rank", "action", 400, "field 'history[0].actions[0]': unknown action"),
    "too many candidates": ("/rank", "many", 413, "field 'candidates': 32 candidates, more than the limit 30"),
    "unknown weights": ("/rank?weights=bogus=1", "ok", 400, "weights given for actions not in the vocabulary"),
    "a bad feed option": ("/rank?author_decay=2", "ok", 400, "author diversity decay must lie in (0, 1]"),
    "a top_k that is text": ("/retrieve", {"user_id": 1, "history": [], "top_k": "5"}, 400, "field 'top_k'"),
    "too large a top_k": ("/retrieve", {"user_id": 1, "history": [], "top_k": 51}, 413, "field 'top_k': 51 posts"),
    "no user": ("/retrieve", {"history": [], "top_k": 5}, 400, "field 'user_id': missing"),
}


def test_bad_requests_get_a_4xx_naming_the_field_and_the_others_their_answer(server, sessions):
    """Bad requests sent among good ones, all at once: each bad one its own 4xx, each good one the
    answer it gets alone."""
    records, _ = sessions
    good = records[1]
    edits = {
        "post_id": lambda r: r["candidates"][0].update(post_id="12"),
        "action": lambda r: r["history"][0].update(actions=["favourite"]),
        "many": lambda r: r.update(candidates=r["candidates"] * 4),
        "ok": lambda r: None,
    }
    port = server["port"]
    alone = call(port, "POST", "/rank", good)
    requests = []
    for path, body, _, _ in BAD_REQUESTS.values():
        if isinstance(body, str):
            edited = json.loads(json.dumps(good))
            edits[body](edited)
            body = edited
        requests += [(path, body), ("/rank", good)]
    answers = in_threads(port, requests, clients=8)
    for (name, (_, _, status, fragment)), bad, ok in zip(
        BAD_REQUESTS.items(), answers[::2], answers[1::2], strict=True
    ):
        assert bad[0] == status and fragment in bad[2]["error"], (name, bad)
        assert ok[0] == 200 and ok[2] == alone[2], name


def test_a_newer_checkpoint_is_swapped_in_under_load_and_a_damaged_one_refused(trained, sessions, tmp_path):
    """Clients rank without pause while step 6 appears in a workdir serving step 3, then a
    damaged step 9: every request is answered (none fails or is lost), the answers after the
    swap are step 6's (phoenix-rank's lines), and step 9 is refused in one line, step 6 kept."""
    from phoenix_flax.serving.server import Engine, ServeOptions

    records, _ = sessions
    workdir, held = tmp_path / "run", tmp_path / "held"
    shutil.copytree(trained["workdir"], workdir, ignore=shutil.ignore_patterns("index"))
    held.mkdir()
    steps = workdir / "checkpoints"
    (steps / "6").rename(held / "6")
    shutil.copytree(held / "6", held / "9")
    flip_16_bytes(largest_file(held / "9", "model"))
    want = {}
    for step in (3, 6):
        out = tmp_path / f"ranked_{step}.jsonl"
        rank_args = ["--workdir", trained["workdir"], "--step", str(step), "--output", str(out)]
        assert rank_cli.main([*rank_args, "--input", write_jsonl(tmp_path / "in.jsonl", records)]) == 0
        want[step] = [json.loads(x) for x in out.read_text().splitlines()]

    notes = []
    engine = Engine(str(workdir), "latest", None, ServeOptions(max_batch=4, reload_interval_s=0.1), report=notes.append)
    answers, stop = [], threading.Event()
    with serving(engine) as port:

        def client(i: int) -> None:
            while not stop.is_set():
                j = (i + len(answers)) % len(records)
                answers.append((j, call(port, "POST", "/rank", records[j])))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = [pool.submit(client, i) for i in range(4)]
            for step in (6, 9):
                time.sleep(1.0)
                (held / str(step)).rename(steps / str(step))  # whole at once, as Orbax finalizes a step
                deadline = time.monotonic() + 120
                while not any(f"step {step}" in n for n in notes[1:]):
                    assert time.monotonic() < deadline, notes
                    time.sleep(0.05)
            time.sleep(1.0)
            stop.set()
            for f in running:
                f.result()
        served_after = call(port, "GET", "/readyz")[2]["step"]

    assert notes[0] == f"phoenix-serve: serving step 3 of {workdir}; ready"
    assert notes[1] == "phoenix-serve: now serving step 6 (was 3)"
    assert len(notes) == 3 and notes[2].startswith("phoenix-serve: refused step 9: checkpoint step 9 is damaged: ")
    assert notes[2].endswith("; still serving step 6") and served_after == 6
    steps_seen = [int(headers["x-phoenix-step"]) for _, (status, headers, _) in answers]
    assert all(status == 200 for _, (status, _, _) in answers)
    assert steps_seen == sorted(steps_seen) and set(steps_seen) == {3, 6}  # swapped once, between batches
    for j, (_, headers, line) in answers:
        assert_same_lines(line, want[int(headers["x-phoenix-step"])][j])


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_then_exits(trained, sessions):
    """SIGTERM while 8 requests wait for their batch (a 2-second wait): each is answered, then the
    server exits cleanly."""
    records, _ = sessions
    server = subprocess.Popen(
        [sys.executable, "-m", "serve.serve", "--workdir", trained["workdir"], "--port", "0", "--max-wait-ms", "2000"],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = server.stderr.readline()
        port = int(re.search(r"listening on http://127.0.0.1:(\d+);", first).group(1))
        deadline = time.monotonic() + 300
        while call(port, "GET", "/readyz")[0] != 200:
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.2)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(call, port, "POST", "/rank", records[i]) for i in range(8)]
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
            answers = [f.result() for f in pending]
        assert server.wait(60) == 0
        rest = server.stderr.read()
    finally:
        server.kill()
    assert [status for status, _, _ in answers] == [200] * 8
    assert [line["user_id"] for _, _, line in answers] == [r["user_id"] for r in records[:8]]
    assert rest.splitlines()[-1] == "phoenix-serve: stopped" and "Traceback" not in rest, rest


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_and_the_served_one_stays(trained, tiny_world, sessions, tmp_path):
    from phoenix_flax.serving.server import Engine

    other = tmp_path / "other"
    train(tiny_experiment(tiny_world["data_dir"], model={"history_len": 12}, train={"steps": 7}), str(other))
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir, ignore=shutil.ignore_patterns("index"))
    notes = []
    engine = Engine(str(workdir), "latest", report=notes.append)
    with serving(engine) as port:
        (other / "checkpoints" / "7").rename(workdir / "checkpoints" / "7")
        assert not engine.reload_once()
        status, headers, _ = call(port, "POST", "/rank", sessions[0][0])
    assert notes[1:] == ["phoenix-serve: refused step 7: it holds another model: model.history_len: 12 (serving 8); "
                         "still serving step 6"]  # fmt: skip
    assert status == 200 and headers["x-phoenix-step"] == "6"


def test_serve_refuses_what_it_cannot_serve_before_listening(trained, tmp_path, capsys):
    for args, error in [
        (["--workdir", str(tmp_path)], f"no checkpoints in {tmp_path}"),
        (["--workdir", trained["workdir"], "--step", "5"], "no checkpoint of step 5 in "),
        (["--workdir", trained["workdir"], "--corpus", str(tmp_path / "posts.jsonl")], "posts.jsonl: no such file"),
    ]:
        assert serve_cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("phoenix-serve: error: ") and error in err and err.count("\n") == 1, err
