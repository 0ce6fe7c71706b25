"""Atomic writes of files and folders: write a temporary sibling, then rename it into place.

A reader never sees a half-written file, and an interrupted or failed write
leaves the destination as it was. The new file gets the usual permissions
(``0666`` minus the umask) rather than the ``0600`` of ``tempfile.mkstemp``.

Temporary names carry the writer's host and process id
(``.<name>.tmp-<host>-<pid>-<random>``), so a temporary left by a killed process
(SIGKILL, power loss) is recognised and removed by the next writer into the same
folder (:func:`remove_stale_temporaries`): one whose process is gone on this host,
or, from another host, one untouched for :data:`STALE_OTHER_HOST_SECONDS`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

#: a temporary from another host (shared file system) is stale after this long untouched
STALE_OTHER_HOST_SECONDS = 24 * 3600
_TMP_RE = re.compile(r"^\..*\.(?:tmp|old)-(?P<host>[A-Za-z0-9_-]{1,40})-(?P<pid>\d+)-")


def host_name() -> str:
    """This machine's name as used in temporary and lock names (safe characters only)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")[:40] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _tag() -> str:
    return f"{host_name()}-{os.getpid()}-"


def is_stale_temporary(path: str | os.PathLike) -> bool:
    """True for a temporary of this module whose writer is gone (see the module docstring)."""
    path = Path(path)
    m = _TMP_RE.match(path.name)
    if not m:
        return False
    if m.group("host") == host_name():
        return not pid_alive(int(m.group("pid")))
    try:
        return time.time() - path.lstat().st_mtime > STALE_OTHER_HOST_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Removes the stale temporaries in ``folder`` (of the target ``name`` only, if given)."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return removed
    for p in entries:
        if name is not None and not p.name.startswith(f".{name}."):
            continue
        if is_stale_temporary(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d stale temporary file(s)/folder(s) left by killed runs in %s: %s",
                 len(removed), folder, ", ".join(p.name for p in removed[:5]))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(out: str | os.PathLike) -> Path:
    """A fresh temporary folder next to ``out`` (same file system, usual permissions rather
    than the ``0700`` of ``tempfile.mkdtemp``), to be moved there by :func:`commit_dir`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_tag()}", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def commit_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Moves the finished staging folder ``tmp`` to ``out``, replacing what is there.

    An existing ``out`` (folder or file) is first renamed aside, then deleted, so
    ``out`` is never missing or half-written at any moment a reader could see.
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_tag()}", dir=out.parent))
        os.replace(out, old / "previous")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path next to ``path``; on success it replaces ``path``.

    Usage::

        with atomic_path("out/x.png") as tmp:
            image.save(tmp, format="PNG")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-{_tag()}", suffix=path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a folder's entries (a file just created or renamed in it) to disk (POSIX; a no-op
    where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_durable(path: str | os.PathLike, data: bytes) -> None:
    """Appends ``data`` to ``path`` with one ``O_APPEND`` write and fsyncs it before returning.

    A torn last line left by a crash (a file not ending in a newline) is closed with a newline
    first, so ``data`` always starts a line of its own. Callers that may run concurrently
    serialise calls with a lock (one write per call keeps lines whole, the lock keeps the torn-tail
    check and the write together).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def write_durable(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replaces ``path`` with ``data``: written and fsynced to a temporary sibling,
    renamed into place, and the folder entry fsynced."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON with sorted keys to ``path`` through a temp file + rename."""
    text = json.dumps(obj, indent=2, sort_keys=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def json_safe(x):
    """``x`` with every value standard JSON can hold: dict keys as strings, tuples as lists,
    paths as strings, NumPy scalars as Python numbers and NaN/inf as ``None``."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "item") and getattr(x, "shape", None) == ():  # NumPy / JAX scalars
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
