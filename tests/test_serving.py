"""Serving: cached ranking equals the full sequence; the rank and retrieve programs."""

import dataclasses
import json
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import tiny_experiment

from phoenix_flax.checkpoint import restore_model
from phoenix_flax.data.raw import SessionParser
from phoenix_flax.hashing import hash_ids
from phoenix_flax.scoring import action_weights
from phoenix_flax.serving import CachedRanker, prefix_batch
from phoenix_flax.trainer import train
from serve import rank as rank_cli
from serve import retrieve as retrieve_cli


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("serving_run"))
    train(tiny_experiment(tiny_world["data_dir"]), workdir)
    cfg, step, model = restore_model(workdir)
    return {"workdir": workdir, "cfg": cfg, "model": model, "step": step}


@pytest.fixture(scope="module")
def sessions(tiny_world, trained):
    """Test sessions from the world; every third one with 3x the candidates (24 > C=8)."""
    records = pq.read_table(tiny_world["raw"]["test"]).to_pylist()[:10]
    for i, r in enumerate(records):
        if i % 3 == 0:
            r["candidates"] = r["candidates"] * 3
    parser = SessionParser(trained["cfg"].model.actions)
    return records, [parser.parse(r, i) for i, r in enumerate(records)]


def full_sequence_probs(model, cfg, session):
    """Every candidate of the session in one sequence, the ranker's plain forward pass."""
    batch = prefix_batch([session], cfg, 1)
    batch["candidate_post_hashes"] = hash_ids(session.candidate_post_id, cfg.num_post_hashes, cfg.post_vocab_rows)[None]
    batch["candidate_author_hashes"] = hash_ids(
        session.candidate_author_id, cfg.num_author_hashes, cfg.author_vocab_rows
    )[None]
    batch["candidate_product_surface"] = session.candidate_product_surface[None]
    return 1 / (1 + np.exp(-np.asarray(model.ranker(batch))[0]))


def test_cached_chunked_scores_equal_the_full_sequence(trained, sessions):
    model, cfg = trained["model"], trained["cfg"].model
    _, parsed = sessions
    small = CachedRanker(model, cfg, batch_size=3, chunk_size=5).probabilities(parsed)
    large = CachedRanker(model, cfg, batch_size=16, chunk_size=512).probabilities(parsed)
    for session, a, b in zip(parsed, small, large, strict=True):
        full = full_sequence_probs(model, cfg, session)
        assert a.shape == full.shape == (len(session.candidate_post_id), cfg.num_actions)
        np.testing.assert_allclose(a, full, atol=1e-5, rtol=0)
        np.testing.assert_allclose(b, full, atol=1e-5, rtol=0)


def test_cached_context_needs_shared_positions(trained, sessions):
    from flax import nnx

    from phoenix_flax.ranker import PhoenixRanker

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
        full = full_sequence_probs(model, cfg, session)
        j = int(np.argmax(full @ w))
        assert cands[0]["post_id"] == session.candidate_post_id[j]


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

    got = retrieve(trained, tmp_path, tiny_world["corpus"], users_only, "--top-k", "7", "--include-seen")
    for line, u in zip(got, users, strict=True):
        want = np.argsort(-(vectors @ u), kind="stable")[:7]
        assert [c["post_id"] for c in line["candidates"]] == post_ids[want].tolist()
        np.testing.assert_allclose([c["retrieval_score"] for c in line["candidates"]], (vectors @ u)[want], atol=1e-5)

    unseen = retrieve(trained, tmp_path, tiny_world["corpus"], users_only, "--top-k", "7")
    assert "reused the index" in capsys.readouterr().err
    for line, session, u in zip(unseen, parsed, users, strict=True):
        seen = set(session.history_post_id.tolist())
        order = [p for p in post_ids[np.argsort(-(vectors @ u), kind="stable")] if p not in seen][:7]
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
