"""Additions beyond X's Phoenix release, each opt-in (off in `ModelConfig()`'s defaults).

The core modules (phoenix_flax/model/ranker.py, retrieval.py, embeddings.py, layers.py, attention.py)
are the original architecture alone; what this package adds reaches them through one seam,
`PhoenixRanker.extra_parts` and `probabilities`, overridden by `ExtendedRanker`:

- `model.action_bias` (`action_bias.ActionBias`): per-action logit offsets from the candidate's
  post and author rows, and with `model.affinity_rank` a user x candidate affinity;
  `optimizer.action_bias_offsets="newton"` learns the offsets by Newton steps (`optimizer.py`).
- `loss.exposure_weight` (`exposure.py`): a softmax of the shown authors against the user's
  affinity factors, beside the ranking loss.
- `model.calibration`, `model.count_blend`, `model.count_gate` (`ranker.py`, `calibration.py`):
  post-hoc heads fit on validation while training (the shifts that calibrate the logits, and the
  weights that blend the logits' parts with counted post rates, phoenix_flax/data/counting.py).

`configs/demo.py` turns them on; docs/extensions.md has what each was measured to add.
"""

from phoenix_flax.extensions.ranker import ExtendedRanker, build_ranker, fits_post_hoc, scores_with_counts

__all__ = ["ExtendedRanker", "build_ranker", "fits_post_hoc", "scores_with_counts"]
