"""Writing a file whole or not at all, and naming it when that fails."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO

from phoenix_flax.errors import PhoenixError


class OutputError(PhoenixError):
    """An output that cannot be written: its folder missing or read-only, a full disk, a
    file-size limit."""


@contextlib.contextmanager
def replaced(path: str, mode: str = "w") -> Iterator[IO]:
    """A file to write `path` anew: what is written goes to a temporary file beside it, which
    replaces `path` once complete, so no reader ever sees half a file and a failure leaves
    `path` as it was. A write that fails (a full disk, a file-size limit, a read-only folder)
    raises OutputError naming `path`."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
        raise
