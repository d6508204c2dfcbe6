"""A run's directory is one run's: an exclusive lock held while training.

The lock is an OS file lock (`fcntl.flock`) on `WORKDIR/.lock`, so it is released when its
process ends, however it ends. The file names the holder (process, host, start time); a file
left by a process that ended without releasing it is reported when the next run takes over.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys

from phoenix_flax.errors import PhoenixError

LOCK_FILE = ".lock"


class WorkdirLockedError(PhoenixError):
    """Another training run holds the workdir."""


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


class WorkdirLock:
    """`with WorkdirLock(workdir) as lock:` holds the workdir; `lock.stale` describes a lock left
    by a run that died (None otherwise)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.stale: str | None = None
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise WorkdirLockedError(
                f"{self.workdir} is in use by another training run ({_describe(holder)}); "
                "wait for it to end or stop it, or train in another --workdir"
            ) from None
        previous = _read(fd)
        if previous:
            self.stale = f"{_describe(previous)}, ended without releasing its lock on {self.workdir}"
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: released cleanly, not stale
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    data = os.pread(fd, 1 << 16, 0)
    try:
        return json.loads(data) if data.strip() else {}
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?"}
