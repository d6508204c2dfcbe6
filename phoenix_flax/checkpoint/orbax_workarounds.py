"""What Orbax says that a user need not hear, and what it says that a user needs in one line.

A failed restore's error names the item and its root cause (`failed_item`, `root_cause`), a failed
save why it could not write (`write_failure`); the reads and writes Orbax abandons when a restore or
a save fails are not reported again (`AbandonedIO`); the notice of every read-only open is dropped
(`without_read_only_notices`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
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


# tensorstore's words for a failed write, with the OS's error code: "Failed to write 2013 bytes
# to file 11: File too large [os_error_code='27']".
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def write_failure(error: BaseException) -> str | None:
    """Why a save could not write, from its root cause ('No space left on device: PATH'); None
    when the error is not a failed write (a bug, or something else to report as it is)."""
    if isinstance(error, OSError):
        return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    text = str(error)
    code = _OS_ERROR_CODE.search(text)
    if code and ("Failed writing" in text or "Failed to write" in text or "Error writing" in text):
        return os.strerror(int(code.group(1)))
    return None


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: tensorstore's own words (`OUT_OF_RANGE: Error reading ...`)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


class AbandonedIO(logging.Filter):
    """When a restore or a save fails, Orbax closes its event loop with reads or writes still in
    flight. As they finish on tensorstore's threads, amid or after the program's own error,
    Python reports each: a callback finding the loop closed (a traceback or an unraisable
    exception), a future or task whose exception was never retrieved (asyncio's logger, naming
    the checkpoint's files), the failure of a save's threads (absl's errors, naming them or a
    failed write), a read or write coroutine never awaited (a warning). They say nothing the
    error did not. Installed once, before any restore or save (some are reported before the
    error reaches our code), this drops those and only those: the checkpoint directories read
    or written are registered with `watch`."""

    # Orbax's read and write coroutines (orbax/checkpoint/_src/serialization/serialization.py).
    COROUTINES = (
        "_read_shard",
        "_read_array_index_and_device_put",
        "_read_and_create_array",
        "async_deserialize",
        "write_fragment",
        "async_serialize_from_host",
    )
    NEVER_RETRIEVED = "exception was never retrieved"  # of a Task, a Future, a _GatheringFuture
    installed: AbandonedIO | None = None

    def __init__(self):
        super().__init__()
        self.directories: set[str] = set()
        self.save_failed = False  # set once the program has said so

    @classmethod
    def watch(cls, directory: str) -> None:
        if cls.installed is None:
            cls.installed = cls()
            cls.installed._install()
        cls.installed.directories.add(directory)

    def _install(self) -> None:
        names = "|".join(self.COROUTINES)
        warnings.filterwarnings("ignore", rf"coroutine '([\w.<>]*\.)?({names})' was never awaited", RuntimeWarning)
        logging.getLogger("asyncio").addFilter(self)
        logging.getLogger("absl").addFilter(self)
        previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

        def unraisable_hook(unraisable) -> None:
            code = getattr(unraisable.object, "cr_code", None)
            abandoned = code is not None and code.co_name in self.COROUTINES
            if not (_closed_loop(unraisable.exc_value, unraisable.exc_traceback) or abandoned):
                previous_unraisable(unraisable)

        def except_hook(kind, error, tb) -> None:
            if not _closed_loop(error, tb):
                previous_except(kind, error, tb)

        sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "absl":  # a failed save's threads, each with the error that reaches our code
            if record.levelno >= logging.ERROR and self.save_failed:
                return False  # after it: its threads finding their executors shut down
            error = record.exc_info[1] if record.exc_info else None
            if record.levelno >= logging.ERROR and error is not None and write_failure(root_cause(error)):
                return False  # a failed write: the save reports it (CheckpointSaveError)
            message = f"{message} {error}"
            abandoned = record.levelno >= logging.ERROR
        else:
            abandoned = self.NEVER_RETRIEVED in message.partition("\n")[0]
        return not (abandoned and any(d in message for d in self.directories))


def _closed_loop(error: BaseException | None, tb) -> bool:
    """asyncio's "Event loop is closed", raised where a closed loop is handed work."""
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or tb.tb_frame.f_code.co_name == "_check_closed"
