"""What Orbax says that a user need not hear, and what it says that a user needs in one line.

A failed restore's error names the item and its root cause (`failed_item`, `root_cause`); the reads
Orbax abandons when a restore fails are not reported again (`AbandonedReads`); the notice of every
read-only open is dropped (`without_read_only_notices`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Sequence


class ReadOnlyNotices(logging.Filter):
    """Orbax warns on every read-only open that it is read-only; evaluation and serving always
    open read-only, so the notice is expected, not news. Other warnings pass."""

    PREFIXES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIXES)


@contextlib.contextmanager
def without_read_only_notices():
    logger, notices = logging.getLogger("absl"), ReadOnlyNotices()
    logger.addFilter(notices)
    try:
        yield
    finally:
        logger.removeFilter(notices)


def failed_item(error: Exception, items: Sequence[str]) -> str:
    """Which of `items` an Orbax error is about, from its message ("checkpoint" when none)."""
    text = str(error)
    for item in (*items, "metrics"):
        if f'"{item}"' in text or f"'{item}'" in text or f"/{item}/" in text or text.endswith(f"/{item}"):
            return item
    return "checkpoint"


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: tensorstore's own words (`OUT_OF_RANGE: Error reading ...`)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


class AbandonedReads(logging.Filter):
    """When a restore fails, Orbax closes its event loop with reads still in flight. As they
    finish on tensorstore's threads, amid or after the program's own error, Python reports each:
    a callback finding the loop closed (a traceback or an unraisable exception), a future or task
    whose exception was never retrieved (asyncio's logger, naming the checkpoint's files), a read
    coroutine never awaited (a warning). They say nothing the error did not. Installed once,
    before any restore (some are reported before the error reaches our code), this drops those
    and only those: the checkpoint directories restored from are registered with `watch`."""

    # Orbax's read coroutines (orbax/checkpoint/_src/serialization/serialization.py).
    READS = ("_read_shard", "_read_array_index_and_device_put", "_read_and_create_array", "async_deserialize")
    NEVER_RETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")
    installed: AbandonedReads | None = None

    def __init__(self):
        super().__init__()
        self.directories: set[str] = set()

    @classmethod
    def watch(cls, directory: str) -> None:
        if cls.installed is None:
            cls.installed = cls()
            cls.installed._install()
        cls.installed.directories.add(directory)

    def _install(self) -> None:
        warnings.filterwarnings("ignore", f"coroutine '({'|'.join(self.READS)})' was never awaited", RuntimeWarning)
        logging.getLogger("asyncio").addFilter(self)
        previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

        def unraisable_hook(unraisable) -> None:
            code = getattr(unraisable.object, "cr_code", None)
            abandoned_read = code is not None and code.co_name in self.READS
            if not (_closed_loop(unraisable.exc_value, unraisable.exc_traceback) or abandoned_read):
                previous_unraisable(unraisable)

        def except_hook(kind, error, tb) -> None:
            if not _closed_loop(error, tb):
                previous_except(kind, error, tb)

        sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.NEVER_RETRIEVED) and any(d in message for d in self.directories))


def _closed_loop(error: BaseException | None, tb) -> bool:
    """asyncio's "Event loop is closed", raised where a closed loop is handed work."""
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or tb.tb_frame.f_code.co_name == "_check_closed"
