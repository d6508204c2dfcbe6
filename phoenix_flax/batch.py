"""The batch schema: every field a step reads, validity, and padding to a fixed size.

A batch is a dict of arrays. Shapes: B rows, S history items, C candidates, A actions, and Hu,
Hp, Ha hashes per user, post and author. A user, history item or candidate is valid where its
*first* hash is non-zero (row 0 of every table is padding).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# The model's inputs (hash rows already computed by `phoenix_flax.hashing.hash_ids`).
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
}
# Fields sent to the devices; the pipeline's other fields (raw IDs, session IDs) stay on the host.
DEVICE_FIELDS = (*INPUT_FIELDS, *TARGET_FIELDS)

Batch = Mapping[str, jax.Array]


def is_valid(hashes: jax.Array) -> jax.Array:
    """[..., H] hashes -> [...] bool: the entity is present (its first hash is not padding)."""
    return hashes[..., 0] != 0


def prefix_valid(batch: Batch) -> jax.Array:
    """[B, 1 + S] validity of the [user, history] prefix of the sequence."""
    return jnp.concatenate([is_valid(batch["user_hashes"])[:, None], is_valid(batch["history_post_hashes"])], axis=1)


def pad_rows(x: np.ndarray, rows: int, fill=0) -> np.ndarray:
    """`x` with `fill` rows appended along axis 0 up to `rows` (a fixed shape: no recompilation)."""
    if len(x) > rows:
        raise ValueError(f"{len(x)} rows do not fit in {rows}")
    return np.concatenate([x, np.full((rows - len(x), *x.shape[1:]), fill, x.dtype)])


def pad_batch(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Every field padded with empty rows (no user, history, candidates or positive) to `rows`."""
    return {k: pad_rows(np.asarray(v), rows) for k, v in batch.items()}
