"""evafusion_jax.storage.locks: a second run on a busy workdir refuses; a killed run's lock does not block."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evafusion_jax import cli, train_grpo
from evafusion_jax.data import synthetic
from evafusion_jax.storage import fileio, locks

REPO = Path(__file__).resolve().parent.parent
HOLD = ("import sys, time; from evafusion_jax.storage import locks; "
        "l = locks.WorkdirLock(sys.argv[1], 'train_grpo').acquire(); print('held', flush=True); "
        "time.sleep(600)")


@pytest.fixture(autouse=True)
def _restore_root_logging():
    import logging
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_busy_workdir_refuses_and_a_killed_holder_does_not_block(tmp_path, capsys):
    work = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = json.loads((work / locks.LOCK_FILE).read_text())
        assert owner["pid"] == holder.pid and owner["host"] == fileio.host_name()
        # a second train_grpo on the busy workdir: refused before any work, naming the holder
        data = synthetic.write_pairs_folder(tmp_path / "data", 2, 16, 16, 0)
        rc = train_grpo.main(["prog", f"--config.data.data_dir={data}",
                              "--config.reward_kind=contrast", f"--config.workdir={work}"])
        assert rc == cli.EXIT_BUSY
        err = capsys.readouterr().err
        assert "in use by another train_grpo run" in err and f"process {holder.pid}" in err
        assert sorted(p.name for p in work.iterdir()) == [locks.LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder was killed: its lock is stale and the next run takes it
    with locks.WorkdirLock(work, "train_grpo") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(locks.WorkdirBusyError):  # and holds it against others
            locks.WorkdirLock(work, "train_grpo").acquire()
    assert work.is_dir()  # not created by this lock: kept


def test_recorded_owner_rule_without_flock(tmp_path, monkeypatch):
    """Where flock is unsupported, a dead pid on this host is stale; another host's lock holds."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(37, "No locks available")  # ENOLCK
    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / locks.LOCK_FILE).write_text(json.dumps(
        {"host": fileio.host_name(), "pid": dead.pid, "time": time.time()}))
    locks.WorkdirLock(tmp_path).acquire().release()  # stale: taken over
    (tmp_path / locks.LOCK_FILE).write_text(json.dumps(
        {"host": "another-host", "pid": 1, "time": time.time()}))
    with pytest.raises(locks.WorkdirBusyError, match="another-host"):
        locks.WorkdirLock(tmp_path).acquire()
    assert locks.WorkdirLock(tmp_path, primary=False).acquire()._fd is None  # not process 0


def test_lock_of_a_refused_run_leaves_no_folder(tmp_path):
    with locks.WorkdirLock(tmp_path / "new"):
        assert (tmp_path / "new" / locks.LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists()
