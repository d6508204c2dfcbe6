"""`ExtendedRanker`: the Phoenix ranker with the additions a config turns on.

Beside the original's one logit path it adds the action bias's (`ActionBias.parts`); after the
logits, the post-hoc heads evaluation and serving report with: the count blend's per-action
weights over the logits' parts and the candidate post's counted log-odds (`blend_features`), and
the calibration shifts. Both heads are fit on validation while training (`fit_post_hoc`), never by
the optimizer, and saved with the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phoenix_flax.config import EvalConfig, ModelConfig
from phoenix_flax.data.counting import PostCounts
from phoenix_flax.extensions.action_bias import ActionBias
from phoenix_flax.extensions.calibration import fit_logit_blend, fit_logit_shifts, shifts_to_rates
from phoenix_flax.model.embeddings import HashEmbeddings
from phoenix_flax.model.ranker import PhoenixRanker


class CalibrationShift(nnx.Variable):
    """Per-action logit shifts `[A]` fit on validation (extensions/calibration.py): not trained
    by the optimizer, saved with the model."""


class LogitBlend(nnx.Variable):
    """Per-action weights `[F, A]` of the count blend's F features (`ExtendedRanker.blend_features`),
    fit on validation with the calibration shifts (extensions/calibration.py): not trained by the
    optimizer, saved with the model. `blend_start`'s weights give the logits themselves."""


def uses_extensions(cfg: ModelConfig) -> bool:
    """Whether `cfg` turns on any addition to the original ranker."""
    return cfg.action_bias or cfg.calibration or cfg.count_blend


def build_ranker(cfg: ModelConfig, *, rngs: nnx.Rngs, embeddings: HashEmbeddings | None = None) -> PhoenixRanker:
    """The ranker `cfg` describes: the original's (`PhoenixRanker`), or an `ExtendedRanker`."""
    cls = ExtendedRanker if uses_extensions(cfg) else PhoenixRanker
    return cls(cfg, rngs=rngs, embeddings=embeddings)


def scores_with_counts(ranker: PhoenixRanker | None) -> bool:
    """Whether `ranker` (any, or None) reads its candidates' post counts: the count blend's."""
    return isinstance(ranker, ExtendedRanker) and ranker.blend is not None


def fits_post_hoc(ranker: PhoenixRanker | None) -> bool:
    """Whether training fits heads of `ranker` (any, or None) on validation (`fit_post_hoc`)."""
    return isinstance(ranker, ExtendedRanker) and ranker.calibration is not None


def logit_part_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The keys of `logit_parts`, in order."""
    if not cfg.action_bias:
        return ("transformer",)
    return ("transformer", "post", "author") + (("affinity",) if cfg.affinity_rank > 0 else ())


def blend_start(num_parts: int, num_actions: int, gated: bool) -> np.ndarray:
    """`LogitBlend`'s weights before any fit `[F, A]`: ones for the parts, zero for the counts and
    the gated parts (the logits themselves); the blend's prior is centred on them."""
    extra = 1 + (num_parts if gated else 0)
    return np.concatenate([np.ones((num_parts, num_actions)), np.zeros((extra, num_actions))]).astype(np.float32)


class ExtendedRanker(PhoenixRanker):
    """`PhoenixRanker` with `model.action_bias`, `model.calibration`, `model.count_blend` and
    `model.count_gate` as `cfg` sets them."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, embeddings: HashEmbeddings | None = None):
        super().__init__(cfg, rngs=rngs, embeddings=embeddings)
        self.action_bias = ActionBias(cfg, rngs=rngs) if cfg.action_bias else None
        self.calibration = CalibrationShift(jnp.zeros((cfg.num_actions,), jnp.float32)) if cfg.calibration else None
        self.part_names = logit_part_names(cfg)
        self.count_gate = cfg.count_gate
        start = blend_start(len(self.part_names), cfg.num_actions, cfg.count_gate)
        self.blend = LogitBlend(jnp.asarray(start)) if cfg.count_blend else None

    def extra_parts(
        self, post_hashes: jax.Array, author_hashes: jax.Array, user_hashes: jax.Array
    ) -> dict[str, jax.Array]:
        """With the action bias, its "post", "author" and "affinity" parts (`ActionBias.parts`)."""
        if self.action_bias is None:
            return {}
        return self.action_bias.parts(post_hashes, author_hashes, user_hashes)

    def blend_features(self, parts: Mapping[str, jax.Array], count_logits: jax.Array) -> list[jax.Array]:
        """The logits' parts (`logit_parts`) and the candidates' counted log-odds, `[..., A]` each ->
        what the count blend weighs, `[..., A]` each: the parts (`part_names` order), the counts
        and, with `model.count_gate`, each part times sigmoid(counts).

        The gated parts let held-out data decide per action how much the user's parts move a post
        that counting says rarely gets the action: where a post's media decides an action
        (video_view), a linear blend can only add the user's parts to every post alike, which blurs
        the media's separation (docs/extensions.md)."""
        named = [parts[name] for name in self.part_names]
        features = [*named, count_logits]
        if self.count_gate:
            gate = jax.nn.sigmoid(count_logits)
            features += [p * gate for p in named]
        return features

    def calibrated_logits(self, parts: Mapping[str, jax.Array], count_logits: jax.Array | None = None) -> jax.Array:
        """The logits' parts `[..., A]` each and, with `model.count_blend`, the candidates' counted
        log-odds `[..., A]` -> the logits evaluation and serving report: the parts summed (with the
        blend, `blend_features` weighted per action), plus the calibration shifts."""
        if self.blend is None:
            logits = sum(parts.values())
        else:
            if count_logits is None:
                raise ValueError("a ranker with model.count_blend scores with the candidates' counts (PostCounts)")
            features = self.blend_features(parts, count_logits)
            w = self.blend[...]  # [F, A]
            logits = sum(w[f] * feature for f, feature in enumerate(features))
        if self.calibration is not None:
            logits = logits + self.calibration[...]
        return logits

    def probabilities(self, parts: Mapping[str, jax.Array], count_logits: jax.Array | None = None) -> jax.Array:
        """sigmoid(`calibrated_logits`): what evaluation and serving report."""
        return jax.nn.sigmoid(self.calibrated_logits(parts, count_logits))

    def fit_post_hoc(
        self, gathered: Mapping[str, np.ndarray], counts: PostCounts | None, eval_cfg: EvalConfig
    ) -> np.ndarray:
        """Fits the blend's weights (with `model.count_blend`) and the calibration shifts on
        validation candidates, sets them, and returns the logits `[N, A]` they report.

        `gathered`: host arrays `[N, A]` of the candidates' `"labels"` and, with the blend, their
        logit parts (by `part_names`) and `"counts"` (their counted log-odds), else their `"logits"`;
        `counts`: the training split's `PostCounts` (the blend's shifts match its rates too);
        `eval_cfg`: the priors (`EvalConfig`)."""
        labels = gathered["labels"]
        if self.blend is not None:
            features = np.stack(self.blend_features(gathered, gathered["counts"]))  # [F, N, A]
            std = eval_cfg.blend_prior_std
            unblended = sum(gathered[k] for k in self.part_names)  # the logits: the blend's start
            deviations, _ = fit_logit_blend(unblended, labels, features, std, std)
            weights = blend_start(len(self.part_names), labels.shape[1], self.count_gate) + deviations
            _set(self.blend, weights)
            logits = np.einsum("kna,ka->na", features, weights)
            rates = (labels.sum(0) + counts.positives.sum(0)) / (len(labels) + counts.shown.sum())
            shifts = shifts_to_rates(logits, rates)
        else:
            logits = gathered["logits"]
            shifts = fit_logit_shifts(logits, labels, eval_cfg.calibration_prior_std)
        _set(self.calibration, shifts)
        return logits + shifts


def _set(variable: nnx.Variable, value: np.ndarray) -> None:
    """Sets a variable fit on the host, keeping its sharding (the steps do not recompile)."""
    current = variable[...]
    variable[...] = jax.make_array_from_callback(current.shape, current.sharding, value.astype(np.float32).__getitem__)
