"""A lock on a run folder (workdir, region cache): one run at a time, never blocked by a dead one.

:class:`WorkdirLock` holds ``<folder>/.lock`` for the lifetime of a run:

* the lock is an exclusive ``flock`` on that file, which the operating system releases
  when the holding process ends in any way (exit, exception, SIGKILL, crash), so a lock
  left by a killed run never blocks the next one;
* the file records who holds it (host, pid, start time, command line) for the message a
  second run gets (:class:`WorkdirBusyError`, exit code 4);
* where the file system does not support ``flock`` (some network file systems), the
  recorded owner decides: a lock whose process is gone on this host is stale and taken
  over; one held by another host is respected (the message says how to remove it).

A folder that the lock created and in which the run wrote nothing else is removed
again on release (a run refused for bad input leaves nothing behind).

In a multi-process (multi-host) run only process 0 takes the lock (``primary=True``):
the other processes of the same run write to the same folder by design.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from evafusion_jax.storage.fileio import host_name, pid_alive

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another live run holds the folder's lock."""


def _describe(owner: dict) -> str:
    if not owner:
        return "another process"
    started = owner.get("time")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"process {owner.get('pid')} on host {owner.get('host')} (started {when}: "
            f"{owner.get('command', '?')})")


class WorkdirLock:
    """``with WorkdirLock(folder, what="train_grpo"):`` (see the module docstring).

    Args:
      folder: the run folder (created if missing).
      what: the program, named in the error message.
      primary: whether this process takes the lock (pass ``jax.process_index() == 0``);
        a non-primary process does nothing.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run", primary: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self.primary = bool(primary)
        self._fd: int | None = None
        self._created = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy(self, owner: dict) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"{self.folder} is in use by another {self.what} run: {_describe(owner)}. Wait for it "
            "to finish, stop it, or use another folder. (A lock left by a killed run on this host "
            f"is released automatically; if none is running, delete {self.path}.)")

    def acquire(self) -> "WorkdirLock":
        if not self.primary or self._fd is not None:
            return self
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(self._owner()) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._check_recorded_owner()
        except BaseException:
            os.close(fd)
            raise
        rec = {"host": host_name(), "pid": os.getpid(), "time": time.time(),
               "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(rec).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _check_recorded_owner(self) -> None:
        """No flock here: respect a recorded owner unless it is a dead process on this host."""
        owner = self._owner()
        if not owner or owner.get("pid") == os.getpid() and owner.get("host") == host_name():
            return
        if owner.get("host") == host_name() and not pid_alive(int(owner.get("pid", 0))):
            log.warning("taking over the stale lock %s of %s (the process is gone)", self.path,
                        _describe(owner))
            return
        raise self._busy(owner)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file = not held (also without flock)
        except OSError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None
        if self._created:
            try:
                if [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
                    self.path.unlink()
                    self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
