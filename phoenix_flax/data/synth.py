"""A synthetic engagement world with known true action probabilities (the library of `phoenix-synth`).

Users have interests over topics; authors a main topic, a quality, and some are spam; posts a
topic, a media type (text, photo, video), a quality and a popularity. For every shown (user,
post) pair each action has a true probability: positive actions rise with the user's affinity
for the topic and with quality and popularity; negative ones fall with affinity and quality and
rise for spam; video_view and photo_expand need that media; familiarity with the author (past
engagements with them in the user's history) raises follow_author, reply and profile_click.
Actions are drawn from those probabilities. Each user's sessions come in time order; the
history of a session is the user's earlier engaged posts.

Writes train/validation/test sessions (per user in time order: the first 1 - 0.1 - test_share,
the next 10%, the last test_share; by default 80%, 10%, 10%),
`corpus.jsonl` (every post), `test_truth.npz` (the true probabilities of every test candidate),
and `world.json` (the parameters).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from phoenix_flax.config import DEFAULT_ACTIONS
from phoenix_flax.data.raw import items_column
from phoenix_flax.errors import PhoenixError
from phoenix_flax.files import replaced
from phoenix_flax.validation import ConfigError

ACTIONS = DEFAULT_ACTIONS
A = {name: i for i, name in enumerate(ACTIONS)}
POSITIVE = ("favorite", "reply", "repost", "quote", "share", "follow_author")
NEGATIVE = ("not_interested", "block_author", "mute_author", "report")
TEXT, PHOTO, VIDEO = 0, 1, 2
NUM_SURFACES = 4

# Logit of each action for an average pair (affinity, quality and popularity at 0).
BASE_LOGIT = {
    "favorite": -2.0,
    "reply": -4.8,
    "repost": -3.6,
    "quote": -4.6,
    "share": -4.2,
    "follow_author": -5.6,
    "click": -1.4,
    "profile_click": -3.4,
    "video_view": -0.6,
    "photo_expand": -1.0,
    "dwell": -1.0,
    "not_interested": -3.4,
    "block_author": -5.0,
    "mute_author": -4.8,
    "report": -5.6,
}
# Weight of the engagement signal (affinity, quality, popularity); negative actions get minus.
SIGNAL_WEIGHT = {
    "favorite": 1.0,
    "reply": 0.9,
    "repost": 0.9,
    "quote": 0.8,
    "share": 0.8,
    "follow_author": 0.7,
    "click": 0.6,
    "profile_click": 0.5,
    "video_view": 0.5,
    "photo_expand": 0.5,
    "dwell": 0.6,
    "not_interested": -0.9,
    "block_author": -0.7,
    "mute_author": -0.7,
    "report": -0.6,
}
FAMILIARITY_WEIGHT = {"follow_author": 1.0, "reply": 0.6, "profile_click": 0.5}
SPAM_WEIGHT = {**{a: -1.0 for a in POSITIVE}, **{a: 2.5 for a in NEGATIVE}}


VALIDATION_SHARE = 0.1  # of each user's written sessions, between the training and the test ones


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    users: int = 2000
    authors: int = 200
    posts: int = 5000
    topics: int = 16
    sessions: int = 20000
    candidates: int = 8  # shown per session
    history: int = 64  # most recent engaged posts kept in a session's history
    spam_fraction: float = 0.05
    warmup_sessions: int = 4  # per user, before the first written session (they fill histories)
    # The share of posts that are new after training: never shown in a training (or warm-up)
    # session, only in validation and test ones (a cold-start world).
    cold_fraction: float = 0.0
    # The share of each user's written sessions, the last ones, that are test sessions. More than
    # 0.1 where the test split must judge rare actions finely: a 10% calibration band needs a few
    # thousand positives of the rarest action.
    test_share: float = 0.1

    def __post_init__(self):
        if not 0 <= self.cold_fraction <= 0.5:
            raise ConfigError(f"cold_fraction={self.cold_fraction}: must be in [0, 0.5]")
        if not 0 < self.test_share <= 0.5:
            raise ConfigError(f"test_share={self.test_share}: must be in (0, 0.5]")

    def split_bounds(self) -> tuple[float, float]:
        """Each user's written sessions in time order: train below the first, validation below the second."""
        return 1 - VALIDATION_SHARE - self.test_share, 1 - self.test_share


class World:
    """Users, authors and posts, and the true probability function."""

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        k = cfg.topics
        self.interest = rng.dirichlet(np.full(k, 0.3), size=cfg.users)  # [U, K]
        self.author_topic = rng.integers(0, k, cfg.authors)
        self.author_spam = rng.random(cfg.authors) < cfg.spam_fraction
        self.author_quality = rng.normal(0, 1, cfg.authors) - 1.5 * self.author_spam
        author_weight = rng.lognormal(0, 0.75, cfg.authors)  # prolific and rare authors; none dominates
        self.post_author = rng.choice(cfg.authors, cfg.posts, p=author_weight / author_weight.sum())
        on_topic = rng.random(cfg.posts) < 0.85
        self.post_topic = np.where(on_topic, self.author_topic[self.post_author], rng.integers(0, k, cfg.posts))
        self.post_media = rng.choice(3, cfg.posts, p=[0.5, 0.3, 0.2])
        self.post_quality = self.author_quality[self.post_author] + rng.normal(0, 0.5, cfg.posts)
        self.post_popularity = rng.lognormal(0, 1, cfg.posts)
        # Its own stream: the rest of the world is the same whatever the cold fraction.
        self.post_cold = np.random.default_rng([cfg.seed, 1]).random(cfg.posts) < cfg.cold_fraction
        log_pop = np.log(self.post_popularity)
        self.post_log_pop_z = (log_pop - log_pop.mean()) / log_pop.std()
        # Raw 64-bit IDs, as a real system would have.
        self.user_ids = 1_000_000_000 + np.arange(cfg.users, dtype=np.int64)
        self.author_ids = 2_000_000_000 + np.arange(cfg.authors, dtype=np.int64)
        self.post_ids = 1_500_000_000_000_000_000 + 7919 * np.arange(cfg.posts, dtype=np.int64)
        # Posts of each topic, popularity-weighted, for interest-driven candidate sourcing.
        self.topic_posts = [np.nonzero(self.post_topic == t)[0] for t in range(k)]
        self.topic_cdf = [np.cumsum(self.post_popularity[p]) / self.post_popularity[p].sum() for p in self.topic_posts]
        self.pop_cdf = np.cumsum(self.post_popularity) / self.post_popularity.sum()
        self.base = np.array([BASE_LOGIT[a] for a in ACTIONS])
        self.signal_w = np.array([SIGNAL_WEIGHT[a] for a in ACTIONS])
        self.familiar_w = np.array([FAMILIARITY_WEIGHT.get(a, 0.0) for a in ACTIONS])
        self.spam_w = np.array([SPAM_WEIGHT.get(a, 0.0) for a in ACTIONS])

    def probabilities(self, users: np.ndarray, posts: np.ndarray, surface: np.ndarray, familiarity: np.ndarray):
        """[...] user, post and surface indices and familiarity counts -> [..., A] true probabilities."""
        affinity = np.log(self.interest[users, self.post_topic[posts]] * self.cfg.topics + 0.05)
        signal = 0.9 * affinity + 0.6 * self.post_quality[posts] + 0.4 * self.post_log_pop_z[posts]
        spam = self.author_spam[self.post_author[posts]].astype(np.float64)
        logits = (
            self.base
            + self.signal_w * signal[..., None]
            + self.familiar_w * np.log1p(familiarity)[..., None]
            + self.spam_w * spam[..., None]
        )
        logits[..., A["profile_click"]] += 0.5 * (surface == 2)  # the profile surface
        probs = 1 / (1 + np.exp(-logits))
        media = self.post_media[posts]
        probs[..., A["video_view"]] *= media == VIDEO
        probs[..., A["photo_expand"]] *= media == PHOTO
        return probs

    def sample_candidates(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[n] users -> [n, C] shown posts: half from their interests, the rest popular or random."""
        n, c = len(users), self.cfg.candidates
        source = rng.random((n, c))
        posts = rng.integers(0, self.cfg.posts, (n, c))  # random: 20%
        popular = source < 0.8
        posts[popular] = np.searchsorted(self.pop_cdf, rng.random(popular.sum()))
        interested = source < 0.5
        rows = np.nonzero(interested)[0]
        cum = np.cumsum(self.interest[users[rows]], axis=1)
        topics = (rng.random(len(rows))[:, None] > cum).sum(1).clip(0, self.cfg.topics - 1)
        picks = np.empty(len(rows), np.int64)
        for t in np.unique(topics):
            sel = topics == t
            if len(self.topic_posts[t]) == 0:
                picks[sel] = rng.integers(0, self.cfg.posts, sel.sum())
            else:
                picks[sel] = self.topic_posts[t][np.searchsorted(self.topic_cdf[t], rng.random(sel.sum()))]
        posts[interested] = picks
        return np.minimum(posts, self.cfg.posts - 1)


def _bitmask(actions: np.ndarray) -> np.ndarray:
    """[..., A] bool -> [...] int64."""
    return (actions.astype(np.int64) << np.arange(actions.shape[-1], dtype=np.int64)).sum(-1)


@dataclasses.dataclass
class Sessions:
    """Sessions as flat columns: per session, history and candidate slices of the item arrays."""

    session_id: list = dataclasses.field(default_factory=list)
    user: list = dataclasses.field(default_factory=list)
    history: list = dataclasses.field(default_factory=list)  # [(posts, surfaces, masks)]
    cand_posts: list = dataclasses.field(default_factory=list)
    cand_surface: list = dataclasses.field(default_factory=list)
    cand_masks: list = dataclasses.field(default_factory=list)
    cand_probs: list = dataclasses.field(default_factory=list)


def simulate(world: World, progress: bool = True) -> dict[str, Sessions]:
    """Runs every user's sessions in time order; returns the written sessions by split."""
    cfg = world.cfg
    rng = np.random.default_rng(cfg.seed + 1)
    activity = rng.lognormal(0, 0.7, cfg.users)
    per_user = np.maximum(1, np.round(activity / activity.sum() * cfg.sessions)).astype(np.int64)
    while per_user.sum() > cfg.sessions:  # exact total: trim the most active
        per_user[np.argmax(per_user)] -= 1
    per_user[: cfg.sessions - per_user.sum()] += 1
    total_rounds = per_user + cfg.warmup_sessions
    train_below, validation_below = cfg.split_bounds()

    h = cfg.history
    hist_post = np.zeros((cfg.users, h), np.int64)  # engaged posts, most recent last
    hist_surface = np.zeros((cfg.users, h), np.int32)
    hist_mask = np.zeros((cfg.users, h), np.int64)
    hist_len = np.zeros(cfg.users, np.int64)
    positive_bits = _bitmask(np.isin(np.array(ACTIONS), POSITIVE))
    splits = {"train": Sessions(), "validation": Sessions(), "test": Sessions()}
    next_id = 0
    start = time.time()
    for r in range(int(total_rounds.max())):
        users = np.nonzero(total_rounds > r)[0]
        written = r - cfg.warmup_sessions  # this round's index among each user's written sessions
        posts = world.sample_candidates(users, rng)  # [n, C]
        # Cold posts are drawn again in the sessions training sees (warm-up included).
        training = (written < 0) | (written / per_user[users] < train_below)  # [n]
        cold = world.post_cold[posts] & training[:, None]
        while cold.any():
            rows = np.nonzero(cold.any(1))[0]
            posts[rows] = np.where(cold[rows], world.sample_candidates(users[rows], rng), posts[rows])
            cold = world.post_cold[posts] & training[:, None]
        surface = rng.integers(0, NUM_SURFACES, posts.shape).astype(np.int32)
        # Familiarity: positive engagements with the candidate's author in the kept history.
        hist_authors = world.post_author[hist_post[users]]  # [n, H]
        valid = (np.arange(h) >= h - hist_len[users][:, None]) & ((hist_mask[users] & positive_bits) != 0)
        cand_authors = world.post_author[posts]
        familiarity = ((cand_authors[:, :, None] == hist_authors[:, None, :]) & valid[:, None, :]).sum(-1)
        probs = world.probabilities(users[:, None], posts, surface, familiarity)
        actions = rng.random(probs.shape) < probs
        masks = _bitmask(actions)

        for i in range(len(users)) if written >= 0 else ():
            u = users[i]
            frac = written / per_user[u]
            split = "train" if frac < train_below else "validation" if frac < validation_below else "test"
            out, n = splits[split], hist_len[u]
            out.session_id.append(next_id)
            next_id += 1
            out.user.append(u)
            out.history.append(
                (hist_post[u, h - n :].copy(), hist_surface[u, h - n :].copy(), hist_mask[u, h - n :].copy())
            )
            out.cand_posts.append(posts[i])
            out.cand_surface.append(surface[i])
            out.cand_masks.append(masks[i])
            out.cand_probs.append(probs[i])

        engaged = masks != 0  # append engaged candidates to each user's history
        for i in np.nonzero(engaged.any(1))[0]:
            u, e = users[i], engaged[i]
            k = int(e.sum())
            hist_post[u] = np.roll(hist_post[u], -k)
            hist_surface[u] = np.roll(hist_surface[u], -k)
            hist_mask[u] = np.roll(hist_mask[u], -k)
            hist_post[u, h - k :], hist_surface[u, h - k :], hist_mask[u, h - k :] = (
                posts[i][e],
                surface[i][e],
                masks[i][e],
            )
            hist_len[u] = min(h, hist_len[u] + k)
        if progress and (r % 20 == 0):
            print(
                f"\r  simulated round {r + 1}/{total_rounds.max()}, {next_id:,} sessions, {time.time() - start:.0f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if progress:
        print(file=sys.stderr)
    return splits


def _table(world: World, s: Sessions):
    """Sessions -> a pyarrow Table in the raw format (nested lists of structs)."""
    import pyarrow as pa

    def items(posts, surfaces, masks, lengths):
        posts = np.concatenate(posts) if posts else np.zeros(0, np.int64)
        surfaces = np.concatenate(surfaces) if surfaces else np.zeros(0, np.int64)
        masks = np.concatenate(masks) if masks else np.zeros(0, np.int64)
        authors = world.author_ids[world.post_author[posts]]
        return items_column(world.post_ids[posts], authors, surfaces, masks, lengths, ACTIONS)

    hist_lengths = [len(x[0]) for x in s.history]
    history = items([x[0] for x in s.history], [x[1] for x in s.history], [x[2] for x in s.history], hist_lengths)
    candidates = items(s.cand_posts, s.cand_surface, s.cand_masks, [len(p) for p in s.cand_posts])
    return pa.table(
        {
            "session_id": pa.array(np.array(s.session_id, np.int64)),
            "user_id": pa.array(world.user_ids[np.array(s.user, np.int64)]),
            "history": history,
            "candidates": candidates,
        }
    )


class WorldMismatchError(PhoenixError):
    """A folder holds a world written with another WorldConfig than the one asked for."""


def check_world(world_dir: str, cfg: WorldConfig) -> None:
    """Fails unless the world in `world_dir` was written with `cfg`. Fields its world.json
    predates count at their defaults (a world from before `test_share` has the default share)."""
    path = os.path.join(world_dir, "world.json")
    try:
        with open(path) as f:
            saved = json.load(f)["config"]
        saved_cfg = WorldConfig(**saved)
    except (ValueError, KeyError, TypeError) as e:  # JSON, a missing section, an unknown field, a bad value
        raise WorldMismatchError(f"{path}: not a world's parameters ({type(e).__name__}: {e})") from None
    differ = [
        f"{f.name}={getattr(saved_cfg, f.name)!r} (asked {getattr(cfg, f.name)!r})"
        for f in dataclasses.fields(cfg)
        if getattr(saved_cfg, f.name) != getattr(cfg, f.name)
    ]
    if differ:
        raise WorldMismatchError(f"{world_dir} holds another world: {', '.join(differ)}")


def reuse_or_write(world: World, out: str) -> bool:
    """Simulates and writes `world` into `out` unless `out` holds it already (another world there
    fails: `check_world`) -> whether it wrote."""
    if os.path.exists(os.path.join(out, "world.json")):
        check_world(out, world.cfg)
        return False
    write_world(world, simulate(world), out)
    return True


def write_world(world: World, splits: dict[str, Sessions], out: str, fmt: str = "parquet") -> dict[str, str]:
    """Writes the sessions, corpus, test truth and parameters; returns the session files by split."""
    import pyarrow.parquet as pq

    os.makedirs(out, exist_ok=True)
    files = {}
    for split, sessions in splits.items():
        table = _table(world, sessions)
        path = os.path.join(out, f"{split}.{'parquet' if fmt == 'parquet' else 'jsonl'}")
        with replaced(path, "wb" if fmt == "parquet" else "w") as f:
            if fmt == "parquet":
                pq.write_table(table, f, write_page_checksum=True)
            else:
                for record in table.to_pylist():
                    f.write(json.dumps(record) + "\n")
        files[split] = path

    test = splits["test"]
    lengths = np.array([len(p) for p in test.cand_posts], np.int64)
    with replaced(os.path.join(out, "test_truth.npz"), "wb") as f:
        np.savez_compressed(
            f,
            session_id=np.array(test.session_id, np.int64),
            offsets=np.concatenate([[0], np.cumsum(lengths)]),
            probs=np.concatenate(test.cand_probs).astype(np.float32)
            if test.cand_probs
            else np.zeros((0, len(ACTIONS))),
            actions=np.array(ACTIONS),
        )
    with replaced(os.path.join(out, "corpus.jsonl")) as f:
        for p in range(world.cfg.posts):
            a = world.post_author[p]
            f.write(
                json.dumps(
                    {
                        "post_id": int(world.post_ids[p]),
                        "author_id": int(world.author_ids[a]),
                        "topic": int(world.post_topic[p]),
                        "media": ["text", "photo", "video"][world.post_media[p]],
                        "quality": round(float(world.post_quality[p]), 4),
                        "popularity": round(float(world.post_popularity[p]), 4),
                        "spam_author": bool(world.author_spam[a]),
                    }
                )
                + "\n"
            )
    with replaced(os.path.join(out, "world.json")) as f:
        json.dump(
            {
                "config": dataclasses.asdict(world.cfg),
                "actions": list(ACTIONS),
                "sessions": {k: len(v.session_id) for k, v in splits.items()},
                "spam_authors": int(world.author_spam.sum()),
                "largest_author_share": float(np.bincount(world.post_author).max() / world.cfg.posts),
            },
            f,
            indent=2,
        )
    return files
