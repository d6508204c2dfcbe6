"""The final score: a weighted sum of action probabilities."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phoenix_flax.errors import PhoenixError

# Positive actions count fully, passive ones a little, negative ones against.
DEFAULT_ACTION_WEIGHTS: dict[str, float] = {
    "favorite": 1.0,
    "reply": 2.0,
    "repost": 1.0,
    "quote": 1.5,
    "share": 1.0,
    "follow_author": 2.0,
    "click": 0.1,
    "profile_click": 0.1,
    "video_view": 0.1,
    "photo_expand": 0.1,
    "dwell": 0.2,
    "not_interested": -2.0,
    "block_author": -10.0,
    "mute_author": -5.0,
    "report": -20.0,
}


class WeightsError(PhoenixError, ValueError):
    """Score weights that name unknown actions or are not finite numbers."""


def action_weights(actions: Sequence[str], overrides: Mapping[str, float] | None = None) -> np.ndarray:
    """Weights `[A]` in the order of `actions`: the defaults, replaced by `overrides`."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(actions))
    if unknown:
        raise WeightsError(f"weights given for actions not in the vocabulary: {unknown}; vocabulary: {list(actions)}")
    not_finite = {a: w for a, w in overrides.items() if not math.isfinite(w)}
    if not_finite:
        raise WeightsError(f"weights must be finite numbers: {not_finite}")
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
            out[name.strip()] = float(value)
        except ValueError:
            raise WeightsError(f"--weights: bad entry {part!r}; expected action=number") from None
        if not eq:
            raise WeightsError(f"--weights: bad entry {part!r}; expected action=number")
    return out


def weighted_score(probs: jax.Array, weights: jax.Array) -> jax.Array:
    """`[..., A]` probabilities and `[A]` weights -> `[...]` scores."""
    return jnp.einsum("...a,a->...", probs.astype(jnp.float32), jnp.asarray(weights, jnp.float32))
