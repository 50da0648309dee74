"""An exclusive lock on a training workdir, so two runs never write the same checkpoints.

The lock is an ``flock`` on ``DIR/.lock``: the kernel releases it when the holding process
exits in any way (a crash or SIGKILL included), so a dead run never leaves it stuck. The
file's text names the holder (pid, host, start time) for the message a second run prints.
Multi-host runs: only the coordinator (process 0) takes it; the other hosts write nothing.
Local file systems only: a lock on a network or object store path is not attempted.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Take the lock or raise ``WorkdirBusy`` at once (never waits)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusy(
                f"{self.path.parent} is in use by another glocal run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to finish or "
                f"stop it, or train into another --workdir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.datetime.now().isoformat(timespec="seconds")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
