"""The ID hash: range, determinism across processes, spread."""

import subprocess
import sys

import numpy as np
import pytest

from phoenix_flax.data.hashing import hash_ids

IDS = np.array([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345, 42], dtype=np.int64)


def test_range_shape_and_dtype():
    rows = hash_ids(IDS, num_hashes=3, num_rows=100)
    assert rows.shape == (7, 3) and rows.dtype == np.int32
    assert rows.min() >= 1 and rows.max() < 100
    assert hash_ids(IDS.reshape(7, 1), 2, 10).shape == (7, 1, 2)
    assert (hash_ids(np.arange(1000), 1, 2) == 1).all()  # a table of one usable row


@pytest.mark.slow
def test_deterministic_across_processes():
    code = (
        "import numpy as np; from phoenix_flax.data.hashing import hash_ids;"
        f"print(hash_ids(np.array({IDS.tolist()}, dtype=np.int64), 4, 1000003).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == hash_ids(IDS, 4, 1000003).tolist()


def test_collision_rate_matches_a_uniform_hash():
    rng = np.random.default_rng(0)
    n, rows = 20000, 10001
    for ids in (rng.integers(-(2**62), 2**62, size=n), np.arange(n) * 1024):  # random and structured IDs
        hashed = hash_ids(ids, num_hashes=2, num_rows=rows)
        m = rows - 1
        expected_collisions = n - m * (1 - (1 - 1 / m) ** n)
        for k in range(2):
            collisions = n - len(np.unique(hashed[:, k]))
            assert abs(collisions - expected_collisions) < 0.2 * expected_collisions
        # The hash functions are independent: pairs collide in both about as often as chance says.
        pair_collisions = n - len(np.unique(hashed[:, 0].astype(np.int64) * rows + hashed[:, 1]))
        assert pair_collisions < 10


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_rows=1"):
        hash_ids(IDS, 2, 1)
    with pytest.raises(TypeError, match="float"):
        hash_ids(np.array([1.5]), 2, 10)
