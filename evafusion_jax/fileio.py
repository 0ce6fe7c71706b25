"""Atomic writes of files and folders: write a temporary sibling, then rename it into place.

A reader never sees a half-written file, and an interrupted or failed write
leaves the destination as it was. The new file gets the usual permissions
(``0666`` minus the umask) rather than the ``0600`` of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(out: str | os.PathLike) -> Path:
    """A fresh temporary folder next to ``out`` (same file system, usual permissions rather
    than the ``0700`` of ``tempfile.mkdtemp``), to be moved there by :func:`commit_dir`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def commit_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Moves the finished staging folder ``tmp`` to ``out``, replacing what is there.

    An existing ``out`` (folder or file) is first renamed aside, then deleted, so
    ``out`` is never missing or half-written at any moment a reader could see.
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
