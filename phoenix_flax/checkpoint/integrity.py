"""Integrity records: every file of a saved step, its size and SHA-256, checked before a restore.

Written once a save is complete (`integrity.json` in the step's directory); a truncated, missing or
altered file is then found before anything is trained on or served.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from phoenix_flax.errors import DamagedCheckpointError
from phoenix_flax.files import replaced

INTEGRITY_FILE = "integrity.json"


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, hex, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_integrity(step_dir: str) -> str:
    """Records every file of the step's items (size, SHA-256); returns the step's digest."""
    files = {}
    for item in sorted(os.listdir(step_dir)):
        if not os.path.isdir(os.path.join(step_dir, item)):
            continue
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            for name in sorted(names):
                path = os.path.join(root, name)
                files[os.path.relpath(path, step_dir)] = [os.path.getsize(path), file_sha256(path)]
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    with replaced(os.path.join(step_dir, INTEGRITY_FILE)) as f:  # never a half-written record
        json.dump({"format": 1, "digest": digest, "files": files}, f)
    return digest


def check_integrity(step: int, step_dir: str, items: Sequence[str]) -> str | None:
    """The step's digest, after checking the files of `items` against the record; None when the
    step has no record (its run stopped before writing it). Raises DamagedCheckpointError."""
    if not os.path.isdir(step_dir):
        raise DamagedCheckpointError(step, "checkpoint", f"its directory {step_dir} is missing")
    path = os.path.join(step_dir, INTEGRITY_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        files, digest = record["files"], record["digest"]
    except (OSError, ValueError, KeyError) as e:
        raise DamagedCheckpointError(step, INTEGRITY_FILE, f"unreadable ({e})") from None
    for item in items:
        if not any(rel.split(os.sep)[0] == item for rel in files):
            raise DamagedCheckpointError(step, item, "no files of it were recorded when it was saved")
    for rel, (size, sha) in files.items():
        item = rel.split(os.sep)[0]
        if item not in items:
            continue
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            raise DamagedCheckpointError(step, item, f"file {rel} is missing")
        actual = os.path.getsize(full)
        if actual != size:
            raise DamagedCheckpointError(step, item, f"file {rel} has {actual} bytes; {size} were written")
        if file_sha256(full) != sha:
            raise DamagedCheckpointError(step, item, f"file {rel} differs from what was written (SHA-256)")
    return digest
