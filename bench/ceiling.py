"""What each kind of knowledge is worth on bench/quality.py's worlds: the share of the oracle's
AUC lift over 0.5 reached by the world's own probability function when the user's interest is
estimated from the session's history, as a model must (the posterior mean of the world's
Dirichlet prior given the topics of the history's posts), and the posts are known

  posts:           exactly (topic, quality, popularity, media type, spam author);
  authors+media:   by their author's topic and quality, plus their media type and popularity;
  authors:         by their author's topic and quality only (no media type, no popularity).

Each is an upper bound for a model that learns that knowledge from the training data; the gap to
the oracle is what one session's history cannot tell about the user. Scored on the test split's
candidates, the actions with at least 50 test positives, as bench/quality.py scores the model.
The worlds are those of bench/quality.py (synthesized in --workdir, or reused from it).

    python bench/ceiling.py [--worlds dense,sparse,cold] [--workdir runs/quality]
"""

from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import pyarrow.parquet as pq
from quality import WORLDS

from phoenix_flax.data import synth
from phoenix_flax.evaluation.evaluate import MIN_POSITIVES
from phoenix_flax.evaluation.metrics import auc

KNOWLEDGE = ("posts", "authors+media", "authors")


def read_test(world: synth.World, world_dir: str) -> dict[str, np.ndarray]:
    """The test split as world indices: per candidate its post, surface, labels [N, A], session
    and author familiarity (as the world counts it); per session its interest estimate [S, K]."""
    posts, surfaces, labels, sessions, interest, familiarity = [], [], [], [], [], []
    k = world.cfg.topics
    path = os.path.join(world_dir, "test.parquet")

    def index(ids: list[int]) -> np.ndarray:  # post IDs -> the world's post indices
        ids = np.asarray(ids, np.int64)
        found = np.minimum(np.searchsorted(world.post_ids, ids), len(world.post_ids) - 1)
        if (world.post_ids[found] != ids).any():
            raise SystemExit(f"{path}: post {ids[world.post_ids[found] != ids][0]} is not one of the world's")
        return found

    for s in pq.read_table(path).to_pylist():
        history = index([h["post_id"] for h in s["history"]])
        engaged = np.array([any(a in synth.POSITIVE for a in h["actions"]) for h in s["history"]], bool)
        candidates = index([c["post_id"] for c in s["candidates"]])
        counts = np.bincount(world.post_topic[history], minlength=k)
        estimate = (counts + 0.3) / (counts.sum() + 0.3 * k)  # the world's Dirichlet(0.3) prior
        same_author = world.post_author[candidates][:, None] == world.post_author[history][None, :]
        posts.append(candidates)
        surfaces.append([c["product_surface"] for c in s["candidates"]])
        labels.append([[a in c["actions"] for a in synth.ACTIONS] for c in s["candidates"]])
        sessions.append(np.full(len(candidates), len(interest)))
        interest.append(estimate)
        familiarity.append((same_author & engaged[None, :]).sum(-1))
    return {
        "posts": np.concatenate(posts),
        "surface": np.concatenate(surfaces),
        "labels": np.concatenate(labels).astype(bool),
        "session": np.concatenate(sessions),
        "interest": np.stack(interest),
        "familiarity": np.concatenate(familiarity),
    }


def probabilities(world: synth.World, test: dict, knowledge: str) -> np.ndarray:
    """[N, A]: the world's probability function with the user and the posts known as `knowledge` says."""
    view = copy.copy(world)
    view.interest = test["interest"]  # one "user" per session: its estimate
    args = (test["session"], test["posts"], test["surface"], test["familiarity"])
    if knowledge != "posts":
        view.post_topic = world.author_topic[world.post_author]
        view.post_quality = world.author_quality[world.post_author]
    if knowledge == "authors":
        view.post_log_pop_z = np.zeros_like(world.post_log_pop_z)
    probs = view.probabilities(*args)
    if knowledge == "authors":  # no media type: the probabilities before the media mask
        for action, media in (("video_view", synth.VIDEO), ("photo_expand", synth.PHOTO)):
            view.post_media = np.full_like(world.post_media, media)
            probs[:, synth.A[action]] = view.probabilities(*args)[:, synth.A[action]]
    return probs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default=",".join(WORLDS))
    p.add_argument("--workdir", default="runs/quality")
    args = p.parse_args()
    summary = {}
    for name in args.worlds.split(","):
        world_dir = os.path.join(args.workdir, name, "world")
        world = synth.World(WORLDS[name])
        try:
            synth.reuse_or_write(world, world_dir)
        except synth.WorldMismatchError as e:
            raise SystemExit(f"{e}; use another --workdir") from None
        test = read_test(world, world_dir)
        oracle = np.load(os.path.join(world_dir, "test_truth.npz"))["probs"]
        labels = test["labels"]
        judged = [i for i in range(labels.shape[1]) if labels[:, i].sum() >= MIN_POSITIVES]
        oracle_auc = {i: auc(oracle[:, i], labels[:, i]) for i in judged}
        print(f"\n{name} world: {WORLDS[name]}")
        print(f"{'action':<16}{'positives':>10}{'oracle':>9}" + "".join(f"{k:>15}" for k in KNOWLEDGE))
        lifts = {k: {} for k in KNOWLEDGE}
        for knowledge in KNOWLEDGE:
            probs = probabilities(world, test, knowledge)
            for i in judged:
                lifts[knowledge][i] = (auc(probs[:, i], labels[:, i]) - 0.5) / (oracle_auc[i] - 0.5)
        for i in judged:
            row = "".join(f"{lifts[k][i]:>15.1%}" for k in KNOWLEDGE)
            print(f"{synth.ACTIONS[i]:<16}{int(labels[:, i].sum()):>10}{oracle_auc[i]:>9.4f}{row}")
        summary[name] = {k: np.mean(list(v.values())) for k, v in lifts.items()}
    print("\nmean share of the oracle's lift, the user from the session's history and the posts known as")
    print(f"{'world':<8}" + "".join(f"{k:>15}" for k in KNOWLEDGE))
    for name, row in summary.items():
        print(f"{name:<8}" + "".join(f"{row[k]:>15.1%}" for k in KNOWLEDGE))


if __name__ == "__main__":
    main()
