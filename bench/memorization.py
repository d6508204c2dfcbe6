"""What remembering each post can reach on bench/quality.py's worlds, and what hashing its ID
into table rows leaves of it: per action with at least 50 test positives, the test AUC of

  post rate:  each post's smoothed action rate in training, by its exact ID (the baseline
              bench/quality.py beats the model against: what counting learns);
  exact:      the most probable per-post logit offsets of a logistic regression (a shared
              intercept plus one offset per post ID) under a Gaussian prior whose variance is fit
              to the offsets (EM): what the action bias's Newton steps converge to, with no row
              shared;
  ROWSxH:     the same with each post's offset the sum of H rows of a ROWS-row table, the rows
              chosen by the model's hash functions (phoenix_flax.hashing): the action bias's post
              table. The demo config's table first, then any --tables.

A model whose post knowledge flows through ROWSxH rows is bounded by that column on an action the
post decides (video_view, photo_expand), as it learns no more than these offsets do there. The
model's AUC from bench/quality.py's run is printed beside them when --workdir has it.

    python bench/memorization.py [--worlds dense,sparse] [--workdir runs/quality] [--tables 262144x2,...]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow.parquet as pq
from quality import WORLDS

from phoenix_flax.config import load
from phoenix_flax.data import synth
from phoenix_flax.evaluation import MIN_POSITIVES, POPULARITY_PRIOR
from phoenix_flax.hashing import hash_ids
from phoenix_flax.metrics import auc
from train.demo import DEMO_CONFIG

ITERATIONS = 300  # of the fit below: the test AUCs move by < 1e-4 after ~200 on these worlds
EM_FROM = 50  # iterations before the prior variance is first fit (the offsets must have moved)


def read_split(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's candidates: post IDs [N] and labels [N, A] (synth.ACTIONS)."""
    posts, labels = [], []
    for s in pq.read_table(path, columns=["candidates"]).column("candidates").to_pylist():
        for c in s:
            posts.append(c["post_id"])
            labels.append([a in c["actions"] for a in synth.ACTIONS])
    return np.asarray(posts, np.int64), np.asarray(labels, np.float64).reshape(-1, len(synth.ACTIONS))


def most_probable_offsets(rows: np.ndarray, num_rows: int, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The MAP of logit[n, a] = b[a] + sum_h theta[rows[n, h], a] under theta[:, a] ~ N(0, v[a]),
    v fit by EM (the mean over used rows of theta^2 plus its posterior variance) ->
    (b [A], theta [num_rows, A]). rows [N, H], y [N, A].

    Diagonal Newton steps (each row's own curvature), a 1/H share of each and at most half a
    logit, so that a post's H rows do not each take the whole step."""
    n, h = rows.shape
    a = y.shape[1]
    rate = y.mean(0).clip(1e-6, 1 - 1e-6)
    b, theta, v = np.log(rate / (1 - rate)), np.zeros((num_rows, a)), np.ones(a)
    flat = (rows[:, :, None] * a + np.arange(a)).reshape(n, -1)  # [N, H * A] into theta.ravel()
    used = np.zeros(num_rows, bool)
    used[rows.ravel()] = True

    def per_row(x: np.ndarray) -> np.ndarray:  # [N, A] summed into each row of each hash -> [rows, A]
        return np.bincount(flat.ravel(), np.tile(x, (1, h)).ravel(), num_rows * a).reshape(num_rows, a)

    for it in range(ITERATIONS):
        p = 1 / (1 + np.exp(-(b + theta[rows].sum(1))))
        residual, curvature = p - y, p * (1 - p)
        b -= np.clip(residual.sum(0) / curvature.sum(0), -0.5, 0.5)
        grad, info = per_row(residual), per_row(curvature)
        theta -= np.clip((grad + theta / v) / (info + 1 / v) / h, -0.5, 0.5)
        if it >= EM_FROM and it % 10 == 0:
            v = np.mean(theta[used] ** 2 + 1 / (info[used] + 1 / v), axis=0)
    return b, theta


def posts_rows(train_posts: np.ndarray, test_posts: np.ndarray, table: str | None):
    """Each candidate's rows: by exact post ID (table None) or by hash into 'ROWSxH' -> (train
    rows, test rows, number of rows)."""
    if table is None:
        ids, inverse = np.unique(np.concatenate([train_posts, test_posts]), return_inverse=True)
        inverse = inverse[:, None] + 1  # row 0: padding, as in the model's tables
        return inverse[: len(train_posts)], inverse[len(train_posts) :], len(ids) + 1
    num_rows, hashes = (int(x) for x in table.split("x"))
    return hash_ids(train_posts, hashes, num_rows), hash_ids(test_posts, hashes, num_rows), num_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="dense,sparse")
    p.add_argument("--workdir", default="runs/quality")
    p.add_argument("--tables", default="", help="more ROWSxHASHES tables, comma-separated")
    args = p.parse_args()
    model = load(DEMO_CONFIG).model
    tables = [f"{model.post_vocab_rows}x{model.num_post_hashes}"] + [t for t in args.tables.split(",") if t]
    for name in args.worlds.split(","):
        world_dir = os.path.join(args.workdir, name, "world")
        if not os.path.exists(os.path.join(world_dir, "world.json")):
            world = synth.World(WORLDS[name])
            synth.write_world(world, synth.simulate(world), world_dir)
        train_posts, train_labels = read_split(os.path.join(world_dir, "train.parquet"))
        test_posts, test_labels = read_split(os.path.join(world_dir, "test.parquet"))
        judged = [i for i in range(len(synth.ACTIONS)) if test_labels[:, i].sum() >= MIN_POSITIVES]

        ids, inverse = np.unique(train_posts, return_inverse=True)
        shown = np.bincount(inverse, minlength=len(ids))[:, None]
        rate = train_labels.mean(0)
        smoothed = np.zeros((len(ids), len(rate))) + POPULARITY_PRIOR * rate
        np.add.at(smoothed, inverse, train_labels)
        smoothed /= shown + POPULARITY_PRIOR
        at = np.searchsorted(ids, test_posts).clip(0, len(ids) - 1)
        columns = {"post rate": np.where((ids[at] == test_posts)[:, None], smoothed[at], rate)}
        for table in [None, *tables]:
            train_rows, test_rows, num_rows = posts_rows(train_posts, test_posts, table)
            b, theta = most_probable_offsets(train_rows, num_rows, train_labels)
            columns[table or "exact"] = b + theta[test_rows].sum(1)
        metrics_file = os.path.join(args.workdir, name, "metrics.json")
        model_auc = {}
        if os.path.exists(metrics_file):
            with open(metrics_file) as f:
                model_auc = {a: r["auc"] for a, r in json.load(f)["actions"].items()}
            columns["model"] = None

        print(f"\n{name} world: {WORLDS[name]}")
        print(f"{'action':<16}{'positives':>10}" + "".join(f"{c:>14}" for c in columns))
        for i in judged:
            action = synth.ACTIONS[i]
            cells = [
                model_auc.get(action, float("nan")) if c == "model" else auc(s[:, i], test_labels[:, i])
                for c, s in columns.items()
            ]
            print(f"{action:<16}{int(test_labels[:, i].sum()):>10}" + "".join(f"{x:>14.4f}" for x in cells))


if __name__ == "__main__":
    main()
