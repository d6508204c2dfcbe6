"""Evaluation of a checkpoint on a split: metrics, baselines and retrieval against the corpus.

Reports, per action, the model's AUC, normalized entropy (NE) and calibration (mean predicted
probability over the observed rate, and the expected calibration error); the AUC of the weighted score
(label: the weighted engagement value is positive); retrieval recall@1/10/100 within each batch
and against the whole corpus; and, where the data has true probabilities (the synthetic world),
the oracle's AUC per action beside the model's and a popularity baseline's (each post's action
rates in the training split). The `next-item` protocol adds HR@k, NDCG@k and MRR of each
positive candidate in a full ranking of the corpus (`next_item`). Runs in one process on this machine's devices, whatever mesh the
checkpoint was trained on.
"""

from __future__ import annotations

import errno
import math
import os
import sys
import zipfile
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from phoenix_flax.checkpoint.restore import restore_model
from phoenix_flax.config import ExperimentConfig, replace_fields
from phoenix_flax.data.batch import labeled_candidates
from phoenix_flax.data.counting import PostCounts, split_labels
from phoenix_flax.data.pipeline import bit_positions, dataset_actions, global_batch, make_dataset, open_source
from phoenix_flax.data.prepare import FEATURES
from phoenix_flax.data.raw import Session, read_corpus
from phoenix_flax.errors import CheckpointError, DatasetError
from phoenix_flax.evaluation.metrics import (
    auc,
    calibration,
    calibration_ratio,
    normalized_entropy,
    ranking_metrics,
    recall_at_k,
    weighted_auc,
)
from phoenix_flax.model.scoring import action_weights
from phoenix_flax.serving.index import CorpusIndex
from phoenix_flax.serving.ranking import prefix_batch
from phoenix_flax.sharding import make_mesh, use_mesh
from phoenix_flax.step.step import make_eval_step


def collect(
    model,
    cfg: ExperimentConfig,
    split: str,
    batch_size: int,
    mesh,
    logit_parts: bool = False,
    counts: PostCounts | None = None,
) -> dict[str, np.ndarray]:
    """One pass over `split`: per valid candidate and per row with a positive, what eval needs;
    with `logit_parts`, also each part of the ranker's logits per candidate (`logit_transformer`,
    `logit_post`, ...: `PhoenixRanker.logit_parts`). `counts`: the run's post counts, which a
    ranker with `model.count_blend` scores with (`Restored.counts`)."""
    data = make_dataset(
        cfg.model,
        cfg.data,
        split,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        batch_size=batch_size,
        process_index=0,
        process_count=1,
    )
    eval_step = make_eval_step(cfg.loss)
    out: dict[str, list] = {k: [] for k in ("probs", "labels", "session_id", "position", "post_id")}
    out.update({k: [] for k in ("users", "positive_post_id", "in_batch_rank")})
    for batch in data:
        if counts is not None:
            batch = counts.with_log_odds(batch)
        _, outputs = eval_step(model, global_batch(batch, mesh, cfg.mesh.logical_rules()))
        outputs = jax.device_get(outputs)
        valid = labeled_candidates(batch)
        if logit_parts:
            for name, part in outputs["logit_parts"].items():
                out.setdefault(f"logit_{name}", []).append(part[valid])
        if "probs" in outputs:
            out["probs"].append(outputs["probs"][valid])
            out["labels"].append(batch["candidate_actions"][valid])
            rows, cols = np.nonzero(valid)
            out["session_id"].append(batch["session_id"][rows])
            out["position"].append(batch["candidate_offset"][rows] + cols)
            out["post_id"].append(batch["candidate_post_id"][valid])
        if "users" in outputs:
            pv = batch["positive_valid"]
            users, pos, ids = outputs["users"][pv], outputs["positives"][pv], batch["positive_id"][pv]
            scores = users @ pos.T
            own = np.diag(scores)[:, None]
            other_post = ids[None, :] != ids[:, None]  # the same post elsewhere is no competitor
            out["in_batch_rank"].append(((scores > own) & other_post).sum(1))
            out["users"].append(users)
            out["positive_post_id"].append(batch["positive_post_id"][pv])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


TRUTH_FIELDS = ("session_id", "offsets", "probs", "actions")  # phoenix-synth's test_truth.npz


def read_truth(path: str, actions: Sequence[str]) -> dict[str, np.ndarray]:
    """A truth file (phoenix-synth's `test_truth.npz`: each session's candidates' true
    probabilities), checked; DatasetError says what is wrong with it."""
    not_truth = f"{path} is not a truth file (an .npz of {', '.join(TRUTH_FIELDS)})"
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # a zip archive's first bytes
            raise DatasetError(not_truth)
    try:
        with np.load(path, allow_pickle=False) as z:
            truth = {k: z[k] for k in TRUTH_FIELDS if k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{not_truth}: {e}") from None
    missing = [k for k in TRUTH_FIELDS if k not in truth]
    if missing:
        raise DatasetError(f"{path} is not a truth file: it lacks {missing}")
    sessions, offsets, probs = truth["session_id"], truth["offsets"], truth["probs"]
    if offsets.shape != (len(sessions) + 1,) or probs.ndim != 2 or offsets[-1] != len(probs):
        raise DatasetError(f"{path}: the truth's offsets do not fit its {len(sessions)} sessions and {len(probs)} rows")
    unknown = sorted(set(actions) - set(truth["actions"].tolist()))
    if unknown:
        raise DatasetError(f"{path} has no true probabilities of {unknown}: is it the truth of this dataset?")
    return truth


def oracle_scores(truth: dict, session_id: np.ndarray, position: np.ndarray, actions: Sequence[str], path: str):
    """True probabilities [N, A] of the evaluated candidates, from a truth file (`read_truth`)."""
    order = np.argsort(truth["session_id"])
    sorted_ids = truth["session_id"][order]
    at = np.searchsorted(sorted_ids, session_id).clip(0, max(len(sorted_ids) - 1, 0))
    found = len(sorted_ids) > 0 and (sorted_ids[at] == session_id).all()
    sizes = np.diff(truth["offsets"])
    if not found or (position >= sizes[order[at]]).any():
        raise DatasetError(f"{path} lacks some evaluated sessions or candidates: is it the truth of this split?")
    rows = truth["offsets"][order[at]] + position
    cols = [truth["actions"].tolist().index(a) for a in actions]
    return truth["probs"][rows][:, cols]


def corpus_ranks(model, cfg: ExperimentConfig, corpus_file: str, users: np.ndarray, positive_post_id: np.ndarray):
    """0-based rank of each row's positive among the corpus (inf when outside the top 100)."""
    index = CorpusIndex.build(model, cfg.model, *read_corpus(corpus_file))
    k = min(100, len(index.post_ids))
    ranks = np.full(len(users), np.inf)
    for start in range(0, len(users), 1024):
        idx, _ = index.search(users[start : start + 1024], k)
        found = (idx >= 0) & (index.post_ids[idx] == positive_post_id[start : start + 1024, None])
        hit = found.any(1)
        ranks[start : start + 1024][hit] = found.argmax(1)[hit]
    return ranks


def full_ranks(scores: np.ndarray, target: np.ndarray, excluded: np.ndarray | None) -> np.ndarray:
    """1-based rank of each row's `target` column among `scores` `[b, N]`: 1 + the items scoring
    higher or the same (ties count against the target), items `excluded` `[b, N]` left out;
    inf (never a hit) where the target is -1 (not in the corpus) or is itself excluded, as
    serving's `retrieve` never returns an excluded item."""
    rows = np.arange(len(scores))
    column = np.maximum(target, 0)
    own = scores[rows, column][:, None]
    competitor = np.ones(scores.shape, bool) if excluded is None else ~excluded
    reachable = (target >= 0) & competitor[rows, column]
    competitor[rows, column] = False
    rank = 1.0 + ((scores >= own) & competitor).sum(1)
    return np.where(reachable, rank, np.inf)


def next_item(model, cfg: ExperimentConfig, split: str, corpus_file: str, ks=(10, 20), batch_size: int = 256) -> dict:
    """Next-item metrics with full ranking over the corpus: each labeled candidate with a
    retrieval-positive action (`data.positive_actions`) is a target, ranked by the user tower's
    score among every corpus item, with the items of the session's history excluded (as
    RecBole's full sort does; a target already in the history is then a miss) and included; beside a popularity baseline (positives per item in
    the training split)."""
    if model.retrieval is None:
        raise CheckpointError("next-item evaluation needs a retrieval model (this checkpoint's retrieval_weight was 0)")
    index = CorpusIndex.build(model, cfg.model, *read_corpus(corpus_file))
    row_of = {int(p): j for j, p in enumerate(index.post_ids)}
    data_actions = dataset_actions(cfg.data.data_dir)
    positive_mask = np.bitwise_or.reduce(
        np.int64(1) << bit_positions(cfg.data.positive_actions, data_actions, "positive_actions")
    )
    bits = bit_positions(cfg.model.actions, data_actions, "the model's actions")
    train_posts, train_labels = split_labels(cfg, cfg.data.positive_actions, cfg.data.train_split)
    popularity = np.zeros(len(index.post_ids))
    for post, n in zip(train_posts.tolist(), train_labels.max(1).tolist(), strict=True):
        if post in row_of:
            popularity[row_of[post]] += n
    source = open_source(cfg.data.data_dir, split)
    sessions, targets = [], []  # targets: (session, corpus row or -1)
    for start in range(0, len(source), 1024):
        for record in source.__getitems__(range(start, min(start + 1024, len(source)))):
            if not record["labeled"]:
                continue
            session = Session(**{k: np.asarray(record[k]) for k in FEATURES})
            for j in np.nonzero(session.candidate_actions & positive_mask)[0]:
                targets.append((len(sessions), row_of.get(int(session.candidate_post_id[j]), -1)))
            sessions.append(session)
    users_fn = nnx.jit(lambda m, b: m.retrieval.user(b))
    ranks = {(who, seen): [] for who in ("model", "popularity") for seen in ("seen_excluded", "seen_included")}
    targets = np.array(targets, np.int64).reshape(-1, 2)
    rows = max(1, min(batch_size, (1 << 26) // max(1, len(index.post_ids))))  # [rows, N] scores at once
    for start in range(0, len(targets), rows):
        chunk = targets[start : start + rows]
        group = [sessions[i] for i in chunk[:, 0]]
        users = np.asarray(users_fn(model, prefix_batch(group, cfg.model, rows, bits)))[: len(group)]
        scores = {
            "model": users @ index.vectors.T,
            "popularity": np.broadcast_to(popularity, (len(group), len(popularity))),
        }
        seen = np.zeros((len(group), len(index.post_ids)), bool)
        for r, s in enumerate(group):
            cols = [row_of[p] for p in s.history_post_id.tolist() if p in row_of]
            seen[r, cols] = True
        for who, score in scores.items():
            ranks[(who, "seen_excluded")].append(full_ranks(score, chunk[:, 1], seen))
            ranks[(who, "seen_included")].append(full_ranks(score, chunk[:, 1], None))
    ranks = {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in ranks.items()}
    # In the corpus, yet unreachable once seen items are excluded: already in the history.
    in_history = np.isinf(ranks[("model", "seen_excluded")]) & np.isfinite(ranks[("model", "seen_included")])
    result = {
        "targets": len(targets),
        "targets_outside_corpus": int((targets[:, 1] < 0).sum()),
        "targets_in_history": int(in_history.sum()),
        "corpus": len(index.post_ids),
    }
    for (who, seen), r in ranks.items():
        result.setdefault(who, {})[seen] = ranking_metrics(r, ks)
    return result


def evaluate(
    workdir: str,
    *,
    step: int | str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    truth_file: str | None = None,
    corpus_file: str | None = None,
    batch_size: int | None = None,
    protocol: str = "sessions",
    plots_dir: str | None = None,
) -> dict:
    """Metrics of a checkpoint on `split` (see the module's doc); with `plots_dir`, per action a
    reliability diagram and ROC curves (model, popularity, oracle) as PNG files there."""
    mesh = make_mesh({"data": -1, "fsdp": 1, "model": 1})
    restored = restore_model(workdir, step, mesh)
    cfg, step, model, counts = restored.cfg, restored.step, restored.model, restored.counts
    if data_dir is not None:
        cfg = replace_fields(cfg, data={"data_dir": data_dir})
    truth_file = truth_file or (cfg.data.truth_file if split == "test" else None)
    corpus_file = corpus_file or cfg.data.corpus_file
    if protocol == "next-item" and not corpus_file:
        raise FileNotFoundError(
            errno.ENOENT, "next-item evaluation ranks the whole corpus: give its file (--corpus)", ""
        )
    for what, path in (("true probabilities", truth_file), ("corpus", corpus_file)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, f"the {what} file is missing", path)
    truth = read_truth(truth_file, cfg.model.actions) if truth_file else None
    batch_size = batch_size or cfg.data.batch_size
    batch_size -= batch_size % mesh.size
    print(f"evaluating step {step} of {workdir} on '{split}' ({jax.device_count()} devices)", file=sys.stderr)

    actions = cfg.model.actions
    with use_mesh(mesh, cfg.mesh.logical_rules()):
        got = collect(model, cfg, split, batch_size, mesh, counts=counts)
    result: dict = {"step": step, "split": split}
    if len(got["probs"]):
        labels, probs = got["labels"], got["probs"]
        popular = PostCounts.of_split(cfg, actions).rates(got["post_id"])
        oracle = (
            None if truth is None else oracle_scores(truth, got["session_id"], got["position"], actions, truth_file)
        )
        per_action = {}
        for i, a in enumerate(actions):
            ratio, ece = calibration(probs[:, i], labels[:, i])
            row = {
                "positives": int(labels[:, i].sum()),
                "auc": auc(probs[:, i], labels[:, i]),
                "ne": normalized_entropy(probs[:, i], labels[:, i]),
                "calibration_ratio": ratio,
                "ece": ece,
                "popularity_auc": auc(popular[:, i], labels[:, i]),
            }
            if oracle is not None:
                row["oracle_auc"] = auc(oracle[:, i], labels[:, i])
                # The true probabilities' own ratio: how far the observed rate strays by chance.
                row["oracle_calibration_ratio"] = calibration_ratio(oracle[:, i], labels[:, i])
            per_action[a] = row
        w = action_weights(actions)
        result["candidates"] = len(labels)
        result["actions"] = per_action
        result["weighted_score_auc"] = weighted_auc(probs, labels, w)
        if oracle is not None:
            result["oracle_weighted_score_auc"] = weighted_auc(oracle, labels, w)
        if plots_dir:
            from phoenix_flax.evaluation.plots import write_plots

            curves = {"model": probs, "popularity": popular} | ({"oracle": oracle} if oracle is not None else {})
            result["plots"] = write_plots(plots_dir, actions, labels, curves)
    if len(got["users"]):
        result["retrieval_in_batch"] = recall_at_k(got["in_batch_rank"])
        if corpus_file:
            ranks = corpus_ranks(model, cfg, corpus_file, got["users"], got["positive_post_id"])
            result["retrieval_corpus"] = recall_at_k(ranks)
    if protocol == "next-item":
        result["next_item"] = next_item(model, cfg, split, corpus_file)
    return _undefined_as_none(result)


MIN_POSITIVES = 50  # actions with fewer test positives are too noisy to judge


def judged_actions(result: dict) -> dict[str, dict]:
    """The per-action rows of `evaluate`'s result with enough test positives to judge."""
    return {a: r for a, r in result["actions"].items() if r["positives"] >= MIN_POSITIVES}


def oracle_gap_closed(row: dict) -> float | None:
    """The share of the oracle's AUC lift over 0.5 the model reaches: (AUC - 0.5) / (oracle - 0.5);
    None where either AUC is undefined or the oracle is no better than chance."""
    model, oracle = row["auc"], row.get("oracle_auc")
    if model is None or oracle is None or oracle <= 0.5:
        return None
    return (model - 0.5) / (oracle - 0.5)


CALIBRATION_BAND = (0.9, 1.1)  # a calibration ratio counted as calibrated


def truth_calibration_ratio(row: dict) -> float | None:
    """The mean prediction over the true probabilities' mean (where the data has them): the
    calibration ratio without the observed rate's sampling noise, which the oracle's own ratio
    measures (the model's ratio over the oracle's)."""
    model, oracle = row["calibration_ratio"], row.get("oracle_calibration_ratio")
    return None if model is None or not oracle else model / oracle


def quality_summary(result: dict) -> dict:
    """Over the judged actions: how many beat the popularity (post-rate) baseline, of how many,
    the mean share of the oracle's lift the model reaches, and how many have a calibration ratio
    in CALIBRATION_BAND, against the observed rate and (None without truth) the true probabilities."""
    judged = judged_actions(result)
    closed = [c for c in map(oracle_gap_closed, judged.values()) if c is not None]
    low, high = CALIBRATION_BAND
    truth = [truth_calibration_ratio(r) for r in judged.values()]
    return {
        "beats_popularity": sum(r["auc"] > r["popularity_auc"] for r in judged.values()),
        "judged": len(judged),
        "mean_gap_closed": float(np.mean(closed)) if closed else None,
        "calibrated": sum(low <= r["calibration_ratio"] <= high for r in judged.values()),
        "calibrated_vs_truth": None if None in truth else sum(low <= t <= high for t in truth),
    }


def _undefined_as_none(x):
    """NaN (an AUC or NE without both classes) -> None: absent in strict JSON, not a number."""
    if isinstance(x, dict):
        return {k: _undefined_as_none(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _number(x, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{spec}}"


def format_table(result: dict) -> str:
    lines = []
    if "actions" in result:
        has_oracle = any("oracle_auc" in r for r in result["actions"].values())
        head = f"{'action':<16}{'positives':>10}{'model AUC':>11}{'NE':>7}{'calib':>7}{'ECE':>7}{'popular AUC':>13}"
        lines.append(head + (f"{'oracle AUC':>12}{'gap closed':>12}" if has_oracle else ""))
        for a, r in result["actions"].items():
            line = f"{a:<16}{r['positives']:>10}" + _number(r["auc"], ".4f", 11) + _number(r["ne"], ".3f", 7)
            line += _number(r["calibration_ratio"], ".3f", 7) + _number(r["ece"], ".4f", 7)
            line += _number(r["popularity_auc"], ".4f", 13)
            if has_oracle:
                line += _number(r["oracle_auc"], ".4f", 12) + _number(oracle_gap_closed(r), ".1%", 12)
            lines.append(line)
        lines.append(
            "weighted score AUC:"
            + _number(result["weighted_score_auc"], ".4f", 7)
            + (" (oracle" + _number(result["oracle_weighted_score_auc"], ".4f", 7) + ")" if has_oracle else "")
        )
    if "next_item" in result:
        got = result["next_item"]
        lines.append(
            f"next item: {got['targets']:,} targets ({got['targets_outside_corpus']:,} outside the corpus, "
            f"{got['targets_in_history']:,} already in the history: misses when seen items are excluded), "
            f"full ranking over {got['corpus']:,} items"
        )
        names = list(got["model"]["seen_excluded"])
        lines.append(f"{'':<28}" + "".join(f"{n:>9}" for n in names))
        for who in ("model", "popularity"):
            for seen in ("seen_excluded", "seen_included"):
                row = got[who][seen]
                lines.append(
                    f"{who + ', ' + seen.replace('_', ' '):<28}" + "".join(_number(row[n], ".4f", 9) for n in names)
                )
    for key in ("retrieval_in_batch", "retrieval_corpus"):
        if key in result:
            lines.append(f"{key.replace('_', ' ')}: " + ", ".join(f"{k} {v:.3f}" for k, v in result[key].items()))
    return "\n".join(lines)
