"""The batch schema: every field a step reads, validity, and padding to a fixed size.

A batch is a dict of arrays. Shapes: B rows, S history items, C candidates, A actions, and Hu,
Hp, Ha hashes per user, post and author. A user, history item or candidate is valid where its
*first* hash is non-zero (row 0 of every table is padding).

A *packed* batch (`data.pack_prefix`, training only) holds up to G sessions a row, each in its
own segment (`PACKED_FIELDS`): the session fields (`user_hashes`, `labeled`, `positive_*`) are
`[B, G, ...]`, the history fields are the row's P prefix positions, each session's `[user,
history]` one after another (the user's position holds no history item), and the candidate
fields are the row's C candidate slots, each session's after the previous session's.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# The model's inputs (hash rows already computed by `phoenix_flax.data.hashing.hash_ids`).
INPUT_FIELDS = {
    "user_hashes": "[B, Hu]",
    "history_post_hashes": "[B, S, Hp]",
    "history_author_hashes": "[B, S, Ha]",
    "history_actions": "[B, S, A] multi-hot",
    "history_product_surface": "[B, S]",
    "candidate_post_hashes": "[B, C, Hp]",
    "candidate_author_hashes": "[B, C, Ha]",
    "candidate_product_surface": "[B, C]",
}
# What the training and evaluation steps read besides the inputs.
TARGET_FIELDS = {
    "candidate_actions": "[B, C, A] labels",
    "labeled": "[B] the session's candidates carry labels",
    "positive_post_hashes": "[B, Hp] the retrieval positive",
    "positive_author_hashes": "[B, Ha]",
    "positive_id": "[B] int32 fingerprint of its post ID (accidental hits)",
    "positive_valid": "[B] the example has a retrieval positive",
    "candidate_author_fingerprint": "[B, C] int32 fingerprint of each candidate's author ID (the exposure softmax)",
}
# What the training step reads: the pipeline's batches hold these.
STEP_FIELDS = (*INPUT_FIELDS, *TARGET_FIELDS)
# A packed batch's layout besides: sessions numbered 1..G along each row, 0 for padding.
PACKED_FIELDS = {
    "prefix_segment": "[B, P] the session of each prefix position",
    "prefix_position": "[B, P] its position in the session's [user, history]: 0 is the user",
    "candidate_segment": "[B, C] the session of each candidate slot",
    "candidate_position": "[B, C] its place among the session's candidates",
}
# What evaluation adds with model.count_blend (PostCounts.with_log_odds).
COUNT_FIELDS = {"candidate_count_logits": "[B, C, A] float32 counted log-odds of each candidate's post"}
# Fields sent to the devices; the pipeline's other fields (raw IDs, session IDs) stay on the host.
DEVICE_FIELDS = (*STEP_FIELDS, *COUNT_FIELDS, *PACKED_FIELDS)

Batch = Mapping[str, jax.Array]


def batch_shapes(cfg, batch_size: int, data=None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every device field of a batch of `batch_size` rows for a `ModelConfig`;
    packed (`PACKED_FIELDS`) where the `DataConfig` `data` packs sessions."""
    rows, s, c, a = batch_size, cfg.history_len, cfg.num_candidates, cfg.num_actions
    hu, hp, ha = cfg.num_user_hashes, cfg.num_post_hashes, cfg.num_author_hashes
    i32, flag = np.dtype(np.int32), np.dtype(bool)
    sessions = (rows,)  # the shape of a session field's leading axes
    if data is not None and data.packed:
        s, c, sessions = data.pack_prefix, data.pack_candidates, (rows, data.pack_sessions)
    shapes = {
        "user_hashes": ((*sessions, hu), i32),
        "history_post_hashes": ((rows, s, hp), i32),
        "history_author_hashes": ((rows, s, ha), i32),
        "history_actions": ((rows, s, a), i32),
        "history_product_surface": ((rows, s), i32),
        "candidate_post_hashes": ((rows, c, hp), i32),
        "candidate_author_hashes": ((rows, c, ha), i32),
        "candidate_product_surface": ((rows, c), i32),
        "candidate_actions": ((rows, c, a), i32),
        "labeled": ((*sessions,), flag),
        "positive_post_hashes": ((*sessions, hp), i32),
        "positive_author_hashes": ((*sessions, ha), i32),
        "positive_id": ((*sessions,), i32),
        "positive_valid": ((*sessions,), flag),
        "candidate_author_fingerprint": ((rows, c), i32),
    }
    if len(sessions) > 1:
        shapes |= {k: ((rows, s if k.startswith("prefix") else c), i32) for k in PACKED_FIELDS}
    return shapes


def is_valid(hashes: jax.Array) -> jax.Array:
    """[..., H] hashes -> [...] bool: the entity is present (its first hash is not padding)."""
    return hashes[..., 0] != 0


def is_packed(batch: Batch) -> bool:
    return "prefix_segment" in batch


def of_candidates(batch: Batch, x: jax.Array) -> jax.Array:
    """A session field `x` ([B, ...] or, packed, [B, G, ...]) -> each candidate's session's, [B, C, ...]
    (unpacked: [B, 1, ...], for every candidate of the row)."""
    if not is_packed(batch):
        return x[:, None]
    session = jnp.maximum(batch["candidate_segment"] - 1, 0)  # [B, C]
    return jnp.take_along_axis(x, session.reshape(*session.shape, *([1] * (x.ndim - 2))), axis=1)


def labeled_candidates(batch: Batch) -> jax.Array:
    """[B, C] the candidates a loss or metric counts: present, in a session with labels."""
    return is_valid(batch["candidate_post_hashes"]) & of_candidates(batch, batch["labeled"])


def prefix_valid(batch: Batch) -> jax.Array:
    """[B, P] validity of the [user, history] prefix of the sequence (unpacked, P = 1 + S)."""
    if is_packed(batch):
        return batch["prefix_segment"] > 0
    return jnp.concatenate([is_valid(batch["user_hashes"])[:, None], is_valid(batch["history_post_hashes"])], axis=1)


def pad_rows(x: np.ndarray, rows: int, fill=0) -> np.ndarray:
    """`x` with `fill` rows appended along axis 0 up to `rows` (a fixed shape: no recompilation)."""
    if len(x) > rows:
        raise ValueError(f"{len(x)} rows do not fit in {rows}")
    return np.concatenate([x, np.full((rows - len(x), *x.shape[1:]), fill, x.dtype)])


def pad_batch(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Every field padded with empty rows (no user, history, candidates or positive) to `rows`."""
    return {k: pad_rows(np.asarray(v), rows) for k, v in batch.items()}
