"""The one hash function mapping 64-bit IDs to embedding-table rows.

Pure numpy on uint64 arithmetic, so the same ID gives the same rows in every process and on
every machine. Row 0 is never produced: it is reserved for padding.
"""

from __future__ import annotations

import numpy as np

# Per-hash-function seeds (odd 64-bit constants); hash k uses _SEEDS[k % 8] and a rotation by k.
_SEEDS = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xA0761D6478BD642F,
        0xE7037ED1A0B428DB,
        0x8EBC6AF09C88C6E3,
        0x589965CC75374CC3,
    ],
    dtype=np.uint64,
)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on uint64 with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def pair_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`[n]` int64 >= 0: 63 bits of a mix of two int64 arrays (a user and a session's place among
    the user's sessions). Unique in practice, and the same on any machine in any order."""
    with np.errstate(over="ignore"):
        z = _mix64(_mix64(np.asarray(a).astype(np.uint64)) + np.asarray(b).astype(np.uint64))
    return (z >> np.uint64(1)).astype(np.int64)


def hash_ids(ids, num_hashes: int, num_rows: int) -> np.ndarray:
    """Hashes int64 IDs into `num_hashes` rows each, in [1, num_rows).

    Args:
      ids: integer array-like of any shape `[...]`; any int64 value is a valid ID.
      num_hashes: number of hash functions.
      num_rows: rows of the embedding table, row 0 included.

    Returns:
      int32 array `[..., num_hashes]`.
    """
    if num_rows < 2:
        raise ValueError(f"num_rows={num_rows}: a table needs row 0 (padding) and at least one more")
    if num_rows - 1 > np.iinfo(np.int32).max:
        raise ValueError(f"num_rows={num_rows} does not fit int32 row indices")
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
    x = ids.astype(np.int64).astype(np.uint64)  # two's complement: every int64 is distinct
    rows = np.empty((*ids.shape, num_hashes), dtype=np.int32)
    with np.errstate(over="ignore"):
        for k in range(num_hashes):
            seed = _SEEDS[k % len(_SEEDS)] + np.uint64(k // len(_SEEDS))
            z = _mix64(_mix64(x ^ seed) + seed)
            rows[..., k] = (z % np.uint64(num_rows - 1)).astype(np.int64) + 1
    return rows


FINGERPRINT_ROWS = 2**31 - 1


def fingerprint(ids) -> np.ndarray:
    """64-bit IDs -> int32 fingerprints in [1, 2^31 - 1): equal IDs are equal on device.

    Used where a step must tell items apart (accidental hits of the sampled softmax) without
    int64 on the device; distinct IDs collide with probability about 2^-31 per pair.
    """
    return hash_ids(ids, 1, FINGERPRINT_ROWS)[..., 0]
