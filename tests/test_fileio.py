"""evafusion_jax.storage.fileio: atomic file and folder writes."""

import os
import stat

import pytest

from evafusion_jax.storage import fileio


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_path_replaces_and_uses_umask_permissions(tmp_path):
    target = tmp_path / "a" / "x.txt"
    old = os.umask(0o022)
    try:
        with fileio.atomic_path(target) as tmp:
            assert not target.exists()
            open(tmp, "w").write("one")
        assert target.read_text() == "one" and _mode(target) == 0o644
        with pytest.raises(RuntimeError):
            with fileio.atomic_path(target) as tmp:
                open(tmp, "w").write("half")
                raise RuntimeError("boom")
    finally:
        os.umask(old)
    assert target.read_text() == "one"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.txt"]  # no temp file left


def test_staging_and_commit_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    old = os.umask(0o022)
    try:
        tmp = fileio.staging_dir(out)
    finally:
        os.umask(old)
    assert _mode(tmp) == 0o755 and tmp.parent == tmp_path
    (tmp / "new.txt").write_text("y")
    fileio.commit_dir(tmp, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a file in the way is replaced too
    f = tmp_path / "f"
    f.write_text("z")
    tmp = fileio.staging_dir(f)
    fileio.commit_dir(tmp, f)
    assert f.is_dir()


def test_append_durable_starts_a_new_line_after_a_torn_one(tmp_path):
    p = tmp_path / "sub" / "log.jsonl"
    fileio.append_durable(p, b'{"a": 1}\n')
    fileio.append_durable(p, b'{"b": 2}\n')
    with open(p, "ab") as f:
        f.write(b'{"torn')  # a crash in the middle of a write
    fileio.append_durable(p, b'{"c": 3}\n')
    assert p.read_bytes() == b'{"a": 1}\n{"b": 2}\n{"torn\n{"c": 3}\n'
    q = fileio.write_durable(tmp_path / "x.json", b"new")
    assert q.read_bytes() == b"new" and _mode(q) == 0o666 & ~_umask_now()
    assert sorted(os.listdir(tmp_path)) == ["sub", "x.json"]  # no temporary file left


def _umask_now():
    m = os.umask(0)
    os.umask(m)
    return m


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = fileio.host_name()
    stale_dir = tmp_path / f".out.tmp-{host}-{dead.pid}-abc"
    stale_dir.mkdir()
    stale_file = tmp_path / f".x.tmp-{host}-{dead.pid}-abc.npz"
    stale_file.write_bytes(b"")
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-abc"  # this process: in use
    live.mkdir()
    other = tmp_path / ".out.tmp-elsewhere-1-abc"  # another host, recent: kept
    other.mkdir()
    old_other = tmp_path / ".y.tmp-elsewhere-1-abc.png"
    old_other.write_bytes(b"")
    t = time.time() - fileio.STALE_OTHER_HOST_SECONDS - 10
    os.utime(old_other, (t, t))
    mine = fileio.staging_dir(tmp_path / "out")  # a new staging folder cleans up its name only
    assert not stale_dir.exists() and stale_file.exists() and live.exists() and other.exists()
    assert mine.name.startswith(f".out.tmp-{host}-{os.getpid()}-")
    fileio.remove_stale_temporaries(tmp_path)
    assert not stale_file.exists() and not old_other.exists() and live.exists()
