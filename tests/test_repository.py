"""The repository stands alone: declared dependencies, nothing read from outside it."""

import ast
import importlib.metadata
import logging
import re
import sys
import tomllib

import numpy as np
from conftest import REPO

from phoenix_flax.config import ModelConfig
from phoenix_flax.data.batch import INPUT_FIELDS, STEP_FIELDS
from phoenix_flax.testing import model_inputs, random_batch

SOURCES = [p for d in ("phoenix_flax", "train", "serve", "bench", "configs", "tests") for p in (REPO / d).rglob("*.py")]
FIRST_PARTY = {
    "phoenix_flax",
    "train",
    "serve",
    "conftest",
    "numpy_reference",
    "train_step",
    "quality",
    "joint_base",
    "tpu_pod",
}


def imported_modules(path) -> set[str]:
    """Top-level names of every module a file imports (including imports inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {requirement_name(s) for s in project["dependencies"]}
    declared |= {requirement_name(s) for extra in project["optional-dependencies"].values() for s in extra}
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for path in SOURCES:
        for module in imported_modules(path) - FIRST_PARTY - set(sys.stdlib_module_names):
            dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
            assert dists, f"{path.relative_to(REPO)} imports {module!r}, which no installed package provides"
            if not dists & declared:
                undeclared.setdefault(module, []).append(str(path.relative_to(REPO)))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_nothing_reads_outside_the_repository():
    pattern = re.compile(r"\.\./shared|parents?\[?\d*\]? */ *['\"]shared['\"]")
    files = [*SOURCES, REPO / "Makefile", REPO / "pyproject.toml", REPO / ".ci" / "run"]
    offenders = [str(p.relative_to(REPO)) for p in files if pattern.search(p.read_text())]
    assert not offenders


def test_random_batches_hold_every_field_a_step_reads():
    cfg = ModelConfig(history_len=5, num_candidates=3)
    batch = random_batch(cfg, 4, np.random.default_rng(0))
    assert set(batch) == set(STEP_FIELDS)
    assert set(model_inputs(batch)) == set(INPUT_FIELDS)
    # The positive is a real candidate of its row: the retrieval loss trains on consistent data.
    np.testing.assert_array_equal(batch["positive_post_hashes"], batch["candidate_post_hashes"][:, 0])


def test_read_only_checkpoint_notices_are_silenced_and_other_warnings_are_not(tmp_path, caplog):
    from phoenix_flax.checkpoint.manager import Checkpointer
    from phoenix_flax.checkpoint.orbax_workarounds import without_read_only_notices

    caplog.set_level(logging.WARNING)
    Checkpointer(str(tmp_path))  # creates the directory
    Checkpointer(str(tmp_path), read_only=True)
    assert not [r for r in caplog.records if "read only" in r.getMessage() or "read_only" in r.getMessage()]
    with without_read_only_notices():
        logging.getLogger("absl").warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


def test_the_schema_gives_the_shapes_random_batches_have():
    from phoenix_flax.data.batch import batch_shapes

    cfg = ModelConfig(history_len=5, num_candidates=3)
    batch = random_batch(cfg, 4, np.random.default_rng(0))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == batch_shapes(cfg, 4)
