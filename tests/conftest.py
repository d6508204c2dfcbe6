"""Test set-up. Eight simulated CPU devices, configured before JAX starts, for the sharding tests."""

import json
import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = pathlib.Path(
    os.environ.get("PHOENIX_REFERENCE", REPO.parent / "shared" / "reference" / "phoenix_reference_golden.npz")
)


@pytest.fixture(scope="session")
def golden():
    """The original implementation's reference vectors, split by key prefix."""
    if not REFERENCE.exists():
        pytest.fail(f"reference vectors not found at {REFERENCE} (set PHOENIX_REFERENCE to their path)")
    z = np.load(REFERENCE)

    def section(prefix):
        return {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}

    return {
        "config": json.loads(str(z["config_json"])),
        "ranker_params": section("ranker_params/"),
        "retrieval_params": section("retrieval_params/"),
        "batch": section("batch/"),
        "embeddings": section("embeddings/"),
        "expected": section("expected/"),
    }
