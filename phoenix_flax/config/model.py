"""Model configuration: plain, frozen data."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from phoenix_flax.validation import Checks

# The default engagement vocabulary, in model output order.
DEFAULT_ACTIONS: tuple[str, ...] = (
    "favorite",
    "reply",
    "repost",
    "quote",
    "share",
    "follow_author",
    "click",
    "profile_click",
    "video_view",
    "photo_expand",
    "dwell",
    "not_interested",
    "block_author",
    "mute_author",
    "report",
)

# Weights of the final score (phoenix_flax/model/scoring.py), by action name.
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


CandidatePositions = Literal["shared", "sequential"]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options shared by the ranker and the retrieval model.

    The defaults are the original architecture, small enough to train on a CPU in minutes.
    """

    # Transformer.
    emb_size: int = 64
    key_size: int = 16
    num_q_heads: int = 4
    num_kv_heads: int = 2
    num_layers: int = 2
    widening_factor: float = 2.0
    attn_output_multiplier: float = 0.25
    # Engagement actions, in output order.
    actions: tuple[str, ...] = DEFAULT_ACTIONS
    # Hash embeddings: rows per table (row 0 is padding) and hashes per ID.
    user_vocab_rows: int = 4096
    post_vocab_rows: int = 16384
    author_vocab_rows: int = 4096
    num_user_hashes: int = 2
    num_post_hashes: int = 2
    num_author_hashes: int = 2
    product_surface_vocab_size: int = 16
    # Sequence shapes the data pipeline produces ([user, S history, C candidates]).
    history_len: int = 32
    num_candidates: int = 8
    # "shared": every candidate takes rotary position 1+S, so a score does not depend on
    # the slot. "sequential": candidate j takes 1+S+j, as the original did.
    candidate_positions: CandidatePositions = "shared"
    # Compute dtype; parameters stay float32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # "blockwise": attention without a [B, T, T] tensor (online softmax over blocks of
    # `attention_block` queries and keys); "dense": the full masked form, the parity reference.
    attention: Literal["blockwise", "dense"] = "blockwise"
    attention_block: int = 256
    # One compiled layer body over stacked parameters (nnx.scan) instead of a loop of layers.
    scan_layers: bool = False
    # What each layer keeps for the backward pass: "none" (everything), "full" (its input only;
    # the rest is recomputed) or "dots" (the outputs of its weight matmuls).
    remat: Literal["none", "full", "dots"] = "none"
    # Additions beyond the original architecture (phoenix_flax/extensions), all off by default.
    # The ranker's memorization path beside the deep one: per-action logit offsets looked up from
    # the candidate's post and author hashes (zero at the start); see ActionBias.
    action_bias: bool = False
    # Its user x candidate affinity, matrix factorization of this rank (0: none).
    affinity_rank: int = 16
    # Per-action logit shifts fit on validation each time training evaluates, added by evaluation
    # and serving (not by the loss), so that mean predictions match observed rates; see
    # extensions/calibration.py.
    calibration: bool = False
    # The reported logits weigh, per action, the logits' parts (transformer, post, author,
    # affinity) and the candidate post's counted log-odds in the training split (its smoothed
    # action rates; phoenix_flax/data/counting.py), the weights fit on validation with the calibration
    # shifts: with few impressions per post counting knows a post's rates better than hashed rows
    # learn them (docs/extensions.md). Needs calibration.
    count_blend: bool = False
    # The blend also weighs each part times sigmoid(the counted log-odds), so that held-out data
    # decides how far the user's parts move a post counting says rarely gets the action
    # (`ExtendedRanker.blend_features`). Needs count_blend.
    count_gate: bool = False
    # Retrieval softmax temperature, and whether it is learned.
    retrieval_temperature: float = 0.05
    learn_temperature: bool = False

    def __post_init__(self):
        object.__setattr__(self, "actions", tuple(self.actions))
        checks = Checks(self)
        checks.at_least(2, "user_vocab_rows", "post_vocab_rows", "author_vocab_rows")  # row 0 is padding
        checks.at_least(1, "emb_size", "num_q_heads", "num_kv_heads", "num_layers", "history_len", "num_candidates")
        checks.at_least(1, "num_user_hashes", "num_post_hashes", "num_author_hashes", "product_surface_vocab_size")
        checks.at_least(2, "key_size").require(self.key_size % 2 == 0, "key_size", "must be even (rotary embeddings)")
        if self.num_kv_heads >= 1:
            checks.require(
                self.num_q_heads % self.num_kv_heads == 0,
                "num_q_heads",
                f"must be a multiple of num_kv_heads={self.num_kv_heads}",
            )
        checks.positive("widening_factor", "attn_output_multiplier", "retrieval_temperature")
        checks.require(bool(self.actions), "actions", "must name at least one action")
        checks.require(len(set(self.actions)) == len(self.actions), "actions", "has duplicates")
        checks.at_least(0, "affinity_rank")
        checks.require(
            self.calibration or not self.count_blend, "count_blend", "needs calibration (fit with its shifts)"
        )
        checks.require(self.count_blend or not self.count_gate, "count_gate", "needs count_blend")
        checks.at_least(1, "attention_block").literals()  # candidate_positions, dtype, attention, remat
        checks.raise_if_any()

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def ffn_size(self) -> int:
        """The original's FFN width: int(widening * D) * 2 // 3, rounded up to a multiple of 8."""
        size = int(self.widening_factor * self.emb_size) * 2 // 3
        return size + (8 - size) % 8

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]
