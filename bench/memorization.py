"""What remembering each post can reach on bench/quality.py's worlds, and what hashing its ID
into table rows leaves of it: per action with at least 50 test positives, the test AUC of

  post rate:  each post's smoothed action rate in training, by its exact ID (the baseline
              bench/quality.py beats the model against: what counting learns);
  exact:      the most probable per-post logit offsets of a logistic regression (a shared
              intercept plus one offset per post ID) under a Gaussian prior whose variance is fit
              to the offsets (EM): what the action bias's Newton steps converge to, with no row
              shared;
  ROWSxH:     the same with each post's offset the sum of H rows of a ROWS-row table, the rows
              chosen by the model's hash functions (phoenix_flax.data.hashing): the action bias's post
              table. The demo config's table first, then any --tables.

A model whose post knowledge flows through ROWSxH rows is bounded by that column on an action the
post decides (video_view, photo_expand), as it learns no more than these offsets do there. The
model's AUC from bench/quality.py's run is printed beside them when --workdir has it, and then a
second table: what that model would reach with perfect memorization, its user-dependent parts
(`PhoenixRanker.logit_parts`: the action bias's "affinity" and the "transformer"'s unembedding)
added to the exact offsets in place of its post and author offsets,

  exact+user:  at the model's own weights (1 and 1);
  best mix:    at the best of a grid of weights for the two (0 to 1 by 0.25 each), chosen on the
               test split itself: a bound on any reweighting, not a model;
  sd:          the bootstrap standard deviation (over test sessions, the weights held) of best
               mix's AUC minus the post rate's: how far apart the two must be to differ;
  rate+user:   best mix and its sd again with counting itself in place of the exact offsets (the
               logit of the post rate): what the model's user knowledge adds to what counting knows.

The worlds and their prepared datasets are bench/quality.py's, made in --workdir or reused from it.

    python bench/memorization.py [--worlds dense,sparse] [--workdir runs/quality] [--tables 262144x2,...]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from quality import WORLDS

from phoenix_flax.config import load, replace_fields
from phoenix_flax.data.counting import PostCounts, split_labels
from phoenix_flax.data.hashing import hash_ids
from phoenix_flax.evaluation.evaluate import MIN_POSITIVES
from phoenix_flax.evaluation.metrics import auc
from train.demo import DEMO_CONFIG, make_world

USER_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the best mix's grid, for the affinity and the transformer each
BOOTSTRAP = 200  # resamples of the test sessions
ITERATIONS = 300  # of the fit below: 400 gave the same test AUCs to 4 digits on the sparse world
EM_FROM = 50  # iterations before the prior variance is first fit (the offsets must have moved)


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
    base = load(DEMO_CONFIG)
    actions = list(base.model.actions)
    tables = [f"{base.model.post_vocab_rows}x{base.model.num_post_hashes}"] + [t for t in args.tables.split(",") if t]
    for name in args.worlds.split(","):
        root = os.path.join(args.workdir, name)
        cfg = replace_fields(base, data=make_world(WORLDS[name], root, {}))
        train_posts, train_labels = split_labels(cfg, actions, cfg.data.train_split)
        test_posts, test_labels = split_labels(cfg, actions, "test")
        columns = {"post rate": PostCounts.of(train_posts, train_labels, actions).rates(test_posts)}
        for table in [None, *tables]:
            train_rows, test_rows, num_rows = posts_rows(train_posts, test_posts, table)
            b, theta = most_probable_offsets(train_rows, num_rows, train_labels)
            columns[table or "exact"] = b + theta[test_rows].sum(1)
        model_auc = None  # the model's per-action AUCs, from bench/quality.py's run
        if os.path.exists(metrics_file := os.path.join(root, "metrics.json")):
            with open(metrics_file) as f:
                model_auc = {a: r["auc"] for a, r in json.load(f)["actions"].items()}

        print(f"\n{name} world: {WORLDS[name]}")
        header = [*columns, "model"] if model_auc else list(columns)
        print(f"{'action':<16}{'positives':>10}" + "".join(f"{c:>14}" for c in header))
        for i, action in enumerate(actions):
            positives = int(test_labels[:, i].sum())
            if positives < MIN_POSITIVES:
                continue
            cells = [auc(scores[:, i], test_labels[:, i]) for scores in columns.values()]
            if model_auc:
                cells.append(model_auc.get(action, float("nan")))
            print(f"{action:<16}{positives:>10}" + "".join(f"{x:>14.4f}" for x in cells))
        if model_auc:
            # Both depend on the post alone: per post, for the model's own pass over the test split.
            unique, first = np.unique(test_posts, return_index=True)
            by_post = (unique, columns["post rate"][first], columns["exact"][first])
            perfect_memorization(os.path.join(root, "train"), by_post)


def perfect_memorization(train_dir: str, by_post) -> None:
    """The second table (see the module's docstring), from the run's best checkpoint; `by_post`:
    the test posts' sorted IDs and their post rates and exact offsets `[N, A]`."""
    from phoenix_flax.checkpoint.restore import restore_model  # JAX starts here, not before
    from phoenix_flax.evaluation.evaluate import collect
    from phoenix_flax.sharding import make_mesh, use_mesh

    mesh = make_mesh({"data": -1, "fsdp": 1, "model": 1})
    restored = restore_model(train_dir, "best", mesh)
    with use_mesh(mesh, restored.cfg.mesh.logical_rules()):
        out = collect(restored.model, restored.cfg, "test", 512, mesh, logit_parts=True, counts=restored.counts)
    if "logit_affinity" not in out:
        print(f"(the model of {train_dir} has no affinity: no table of its user parts)")
        return
    labels, user = out["labels"], (out["logit_affinity"], out["logit_transformer"])
    unique, rates, offsets = by_post
    row = np.searchsorted(unique, out["post_id"])
    rate, exact, actions = rates[row], offsets[row], restored.cfg.model.actions
    memorized = {"exact": exact, "rate": np.log(rate / (1 - rate))}  # [N, A] logits: smoothed rates are in (0, 1)
    _, session = np.unique(out["session_id"], return_inverse=True)
    rng = np.random.default_rng(0)
    print(f"\nwith perfect memorization: {train_dir} (step {restored.step}), its user parts beside the exact offsets")
    print(
        f"{'action':<16}{'post rate':>11}{'exact':>9}{'exact+user':>12}{'best mix':>10}{'(weights)':>14}{'sd':>8}"
        f"{'rate+user':>11}{'(weights)':>14}{'sd':>8}"
    )
    for i, action in enumerate(actions):
        y = labels[:, i]
        if y.sum() < MIN_POSITIVES:
            continue
        best, grid_aucs = [], []  # per memorization: the best mix's (weights, scores, AUC); every mix's AUC
        for logits in memorized.values():
            mixes = {
                (wa, wt): logits[:, i] + wa * user[0][:, i] + wt * user[1][:, i]
                for wa in USER_WEIGHTS
                for wt in USER_WEIGHTS
            }
            aucs = {w: auc(scores, y) for w, scores in mixes.items()}
            grid_aucs.append(aucs)
            weights = max(aucs, key=aucs.get)
            best.append((weights, mixes[weights], aucs[weights]))
        differences = []  # [resamples, memorizations]: best mix minus the post rate, on the same resamples
        for k in session_resamples(session, rng):
            post_rate = auc(rate[k, i], y[k])
            differences.append([auc(scores[k], y[k]) - post_rate for _, scores, _ in best])
        cells = f"{action:<16}{auc(rate[:, i], y):>11.4f}{auc(exact[:, i], y):>9.4f}"
        cells += f"{grid_aucs[0][1.0, 1.0]:>12.4f}"  # exact+user: the exact offsets' mix at the model's weights
        for (weights, _, best_auc), sd, width in zip(best, np.std(differences, axis=0), (10, 11), strict=True):
            cells += f"{best_auc:>{width}.4f}{f'({weights[0]:g}, {weights[1]:g})':>14}{sd:>8.4f}"
        print(cells)


def session_resamples(session: np.ndarray, rng: np.random.Generator):
    """`session [n]` (0..S-1, each candidate's) -> BOOTSTRAP index arrays, each the candidates of S
    sessions drawn with replacement (a session drawn twice, its candidates twice)."""
    sessions = session.max() + 1
    for _ in range(BOOTSTRAP):
        drawn = np.bincount(rng.integers(0, sessions, sessions), minlength=sessions)  # [S] times drawn
        yield np.repeat(np.arange(len(session)), drawn[session])


if __name__ == "__main__":
    main()
