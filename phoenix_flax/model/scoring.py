"""The final score: a weighted sum of action probabilities, and the feed scorer of X's release.

The plain score is `probs @ weights`. `FeedScoring` adds the steps X's home mixer applies after
it, each a small pure function over one request's candidates (numpy, float64):
1. `offset_negatives`: the weighted terms are split into positive and negative parts, and a net
   negative score is mapped into [0, offset) while a positive one is shifted up by `offset`, so
   every candidate with a net negative score ranks below every positive one.
2. `author_diversity`: in score order, an author's k-th post (k = 0, 1, ...) is multiplied by
   `(1 - floor) * decay**k + floor`, so one author cannot fill a feed.
3. `out_of_network`: candidates marked `"in_network": false` are multiplied by `factor`.
The multipliers scale non-negative scores only; a negative score (possible only without the
offset) is left as it is, as X's scorer does on its pre-offset path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phoenix_flax.config import DEFAULT_ACTION_WEIGHTS
from phoenix_flax.errors import PhoenixError


class WeightsError(PhoenixError, ValueError):
    """Score weights that name unknown actions or are not finite numbers."""


# Scores are float32 sums of up to 63 weighted probabilities: a weight this size cannot overflow one.
MAX_WEIGHT = float(np.finfo(np.float32).max) / 64


def action_weights(actions: Sequence[str], overrides: Mapping[str, float] | None = None) -> np.ndarray:
    """Weights `[A]` in the order of `actions`: the defaults, replaced by `overrides`."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(actions))
    if unknown:
        raise WeightsError(f"weights given for actions not in the vocabulary: {unknown}; vocabulary: {list(actions)}")
    out_of_range = {a: w for a, w in overrides.items() if not abs(w) <= MAX_WEIGHT}  # NaN too
    if out_of_range:
        raise WeightsError(
            f"weights must be finite numbers of at most {MAX_WEIGHT:.3g} in size (float32): {out_of_range}"
        )
    weights = {**DEFAULT_ACTION_WEIGHTS, **overrides}
    missing = [a for a in actions if a not in weights]
    if missing:
        raise WeightsError(f"no default weight for actions {missing}: give one for each")
    return np.array([weights[a] for a in actions], dtype=np.float32)


def parse_weights(text: str | None) -> dict[str, float]:
    """'favorite=1,report=-20' (a `--weights` argument) -> {'favorite': 1.0, 'report': -20.0}."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            raise WeightsError(f"--weights: bad entry {part!r}; expected action=number") from None
        if not eq:
            raise WeightsError(f"--weights: bad entry {part!r}; expected action=number")
        out[name.strip()] = weight
    return out


def weighted_score(probs: jax.Array, weights: jax.Array) -> jax.Array:
    """`[..., A]` probabilities and `[A]` weights -> `[...]` scores."""
    return jnp.einsum("...a,a->...", probs.astype(jnp.float32), jnp.asarray(weights, jnp.float32))


@dataclasses.dataclass(frozen=True)
class FeedScoring:
    """The feed scorer's options; the defaults give the plain weighted sum."""

    negative_offset: float | None = None  # None: no positive/negative split
    author_decay: float | None = None  # None: no author diversity
    author_floor: float = 0.0
    out_of_network_factor: float = 1.0

    def __post_init__(self):
        bad = []
        if self.negative_offset is not None and not (math.isfinite(self.negative_offset) and self.negative_offset > 0):
            bad.append(f"negative offset must be a positive number, got {self.negative_offset}")
        if self.author_decay is not None and not 0 < self.author_decay <= 1:
            bad.append(f"author diversity decay must lie in (0, 1], got {self.author_decay}")
        if not 0 <= self.author_floor <= 1:
            bad.append(f"author diversity floor must lie in [0, 1], got {self.author_floor}")
        if not 0 <= self.out_of_network_factor <= 1e6 or not math.isfinite(self.out_of_network_factor):
            bad.append(f"out-of-network factor must be a finite number >= 0, got {self.out_of_network_factor}")
        if bad:
            raise WeightsError("; ".join(bad))

    @property
    def is_plain(self) -> bool:
        return self == FeedScoring()


def weighted_parts(probs: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[N, A]` probabilities, `[A]` weights -> (positive part, negative part as a magnitude), `[N]`
    each; their difference is the weighted sum."""
    terms = np.asarray(probs, np.float64) * np.asarray(weights, np.float64)
    return np.where(terms > 0, terms, 0).sum(-1), -np.where(terms < 0, terms, 0).sum(-1)


def offset_negatives(combined: np.ndarray, weights: np.ndarray, offset: float) -> np.ndarray:
    """Net scores `[N]` -> scores where every net negative one lies in [0, offset) and every
    non-negative one in [offset, inf). A net score is at least -(sum of the negative weights'
    magnitudes), so negatives map onto [0, offset) in order; with all weights 0, max(0, score)."""
    weights = np.asarray(weights, np.float64)
    negative_sum = -weights[weights < 0].sum()
    total_sum = weights[weights > 0].sum() + negative_sum
    combined = np.asarray(combined, np.float64)
    if total_sum == 0:
        return np.maximum(combined, 0.0)
    return np.where(combined < 0, (combined + negative_sum) / total_sum * offset, combined + offset)


def author_diversity(scores: np.ndarray, author_ids: np.ndarray, decay: float, floor: float) -> np.ndarray:
    """Multiplies an author's k-th candidate in descending score order (ties: input order) by
    `(1 - floor) * decay**k + floor`."""
    scores = np.asarray(scores, np.float64)
    k = np.zeros(len(scores), np.int64)
    seen: dict[int, int] = {}
    for j in np.argsort(-scores, kind="stable"):
        author = int(author_ids[j])
        k[j] = seen.get(author, 0)
        seen[author] = k[j] + 1
    return _scale_non_negative(scores, (1.0 - floor) * decay**k + floor)


def out_of_network(scores: np.ndarray, in_network: np.ndarray, factor: float) -> np.ndarray:
    """Multiplies the scores of candidates outside the user's network by `factor`."""
    return _scale_non_negative(scores, np.where(np.asarray(in_network, bool), 1.0, factor))


def _scale_non_negative(scores: np.ndarray, multipliers: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    return np.where(scores >= 0, scores * multipliers, scores)


def feed_scores(
    probs: np.ndarray,
    weights: np.ndarray,
    author_ids: np.ndarray,
    in_network: np.ndarray,
    options: FeedScoring | None = None,
) -> np.ndarray:
    """One request's candidates `[N, A]` -> final scores `[N]`, the steps in the module's order."""
    options = options or FeedScoring()
    positive, negative = weighted_parts(probs, weights)
    scores = positive - negative
    if options.negative_offset is not None:
        scores = offset_negatives(scores, weights, options.negative_offset)
    if options.author_decay is not None:
        scores = author_diversity(scores, author_ids, options.author_decay, options.author_floor)
    if options.out_of_network_factor != 1.0:
        scores = out_of_network(scores, in_network, options.out_of_network_factor)
    return scores
