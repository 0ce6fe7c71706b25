"""evafusion_jax.cli: exit codes, one-line errors, signals, out-of-memory messages; and the
read-only-output / config-typo / --help behaviour of the CLIs that share it."""

import os
import signal
import textwrap
from pathlib import Path

import pytest

from evafusion_jax import (
    cli,
    evaluate,
    fuse,
    precompute_regions,
    score,
    train_grpo,
    train_reward,
)
from evafusion_jax import config as config_lib
from evafusion_jax.data import image_io, synthetic
from evafusion_jax.train import nonfinite

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """train_grpo.main calls logging.basicConfig(force=True), which would leave a handler on
    this test's (then closed) captured stderr for the following tests."""
    import logging
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class XlaRuntimeError(RuntimeError):  # stands in for jaxlib's class (matched by name)
    pass


def test_exit_codes_are_distinct_and_documented():
    codes = [cli.EXIT_OK, cli.EXIT_UNEXPECTED, cli.EXIT_INPUT, cli.EXIT_NONFINITE, cli.EXIT_BUSY,
             cli.EXIT_OOM, cli.EXIT_INTERRUPTED, cli.EXIT_TERMINATED]
    assert len(set(codes)) == len(codes) and set(cli.EXIT_CODES) == set(codes)
    readme = (REPO / "README.md").read_text()
    for code in codes:
        assert f"| {code} |" in readme


def test_run_maps_exceptions_to_codes_and_messages(capsys):
    def raising(exc):
        def body():
            raise exc
        return body
    assert cli.run(lambda: None, prog="p") == 0
    assert cli.run(raising(image_io.ImageReadError("cannot read x.png")), prog="p") == 2
    assert capsys.readouterr().err == "p: error: cannot read x.png\n"
    assert cli.run(raising(nonfinite.NonFiniteLossError("nan")), prog="p") == 3
    assert cli.run(raising(KeyboardInterrupt()), prog="p") == 130
    assert "interrupted" in capsys.readouterr().err
    assert cli.run(raising(NotADirectoryError(20, "Not a directory", "/a/file/out")), prog="p") == 2
    assert "/a/file/out" in capsys.readouterr().err
    oom = XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 37.02GiB.")
    assert cli.run(raising(oom), prog="fuse", oom_hint=fuse.OOM_HINT) == cli.EXIT_OOM
    err = capsys.readouterr().err
    assert "out of memory" in err and "37.02GiB" in err and "--tile" in err
    assert cli.run(raising(MemoryError()), prog="p") == cli.EXIT_OOM
    assert cli.run(raising(ZeroDivisionError("bug")), prog="p") == 1
    assert "Traceback" in capsys.readouterr().err  # a bug keeps its traceback


def test_sigterm_unwinds_like_ctrl_c(tmp_path, capsys):
    cleaned = []

    def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**7):  # the handler raises at the next bytecode
                pass
        finally:
            cleaned.append(True)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.run(body, prog="p") == cli.EXIT_TERMINATED
    assert cleaned == [True] and "interrupted (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored


@pytest.mark.parametrize("exc, code, late", [(KeyboardInterrupt, cli.EXIT_INTERRUPTED, False),
                                             (cli.Terminated, cli.EXIT_TERMINATED, False),
                                             (cli.Terminated, cli.EXIT_TERMINATED, True)])
def test_an_interrupt_raised_inside_a_gc_callback_is_not_lost(exc, code, late, capsys,
                                                              monkeypatch):
    """Ctrl-C / SIGTERM landing in a garbage-collection callback (JAX registers one) is only
    printed and ignored by Python; the runner must deliver it again so the program stops.
    ``late``: the re-delivered signal arrives while the runner's hook is still starting its
    helper thread (seen on a loaded machine): raised inside the hook, it must not be lost."""
    import threading
    if late:
        starts = []

        class LateTimer(threading.Timer):
            def start(self):
                if not starts:  # as if the signal had been handled during start()
                    starts.append(True)
                    raise exc()
                super().start()
        monkeypatch.setattr(cli.threading, "Timer", LateTimer)
    import gc
    import sys
    import time

    fired = []

    def callback(phase, info):  # the gc callback signature
        if not fired:
            fired.append(True)
            raise exc()

    def body():
        gc.callbacks.append(callback)
        try:
            gc.collect()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the re-delivered signal raises here
                pass
        finally:
            gc.callbacks.remove(callback)
        return 0

    hook = sys.unraisablehook
    # Python's Ctrl-C handler, even where the test runner inherited SIGINT ignored (a shell's
    # background job): interrupt_main re-delivers only signals that Python handles
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.run(body, prog="p") == code
    finally:
        signal.signal(signal.SIGINT, old)
    assert fired == [True] and "interrupted" in capsys.readouterr().err
    assert sys.unraisablehook is hook  # hook restored


def test_output_under_a_file_is_a_clear_error_in_every_cli(tmp_path, capsys):
    data = synthetic.write_pairs_folder(tmp_path / "data", 2, 16, 16, 0)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    out = blocker / "out"
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in (data / "vi").iterdir():
        (fused / f.name).write_bytes((data / "ir" / f.name).read_bytes())
    runs = {
        "fuse": lambda: fuse.main(["--init-random", "tiny", "--pairs", str(data), "--out", str(out),
                                   "--quiet"]),
        "evaluate": lambda: evaluate.main(["--ir", str(data / "ir"), "--vi", str(data / "vi"),
                                           "--fused", f"m={fused}", "--out", str(out), "--quiet"]),
        "score": lambda: score.main(["--checkpoint", str(tmp_path / "none"), "--fused", str(fused),
                                     "--ir", str(data / "ir"), "--vi", str(data / "vi"),
                                     "--output", str(out), "--no_progress"]),
        "precompute_regions": lambda: precompute_regions.main(
            ["--data", str(data), "--cache", str(out), "--source", "grid", "--no-progress"]),
        "train_grpo": lambda: train_grpo.main(
            ["prog", f"--config.data.data_dir={data}", "--config.reward_kind=contrast",
             f"--config.workdir={out}"]),
        "train_reward": lambda: train_reward.main(
            ["prog", f"--config.data.path={data}", f"--config.workdir={out}"]),
    }
    for name, run in runs.items():
        capsys.readouterr()
        assert run() == cli.EXIT_INPUT, name
        err = capsys.readouterr().err
        assert str(blocker) in err and "Traceback" not in err, (name, err)
    assert blocker.read_text() == "x"


def test_read_only_folder_is_refused_without_relying_on_root_permissions(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    image_io.check_writable(ro / "out")  # writable: fine
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a non-root user sees
    with pytest.raises(image_io.OutputFolderError, match="read-only"):
        image_io.check_output_dir(ro / "out")


@pytest.mark.parametrize("module, config, typo, right", [
    (train_grpo, "grpo.py", "--config.learnin_rate=1", "learning_rate"),
    (train_grpo, "grpo.py", "--config.data.cach_dir=x", "data.cache_dir"),
    (train_reward, "reward.py", "--config.init_lr2=1", "init_lr"),
])
def test_config_key_typo_names_the_key_and_the_closest(module, config, typo, right, capsys):
    assert module.main(["prog", typo]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert typo.split("=")[0][len("--config."):] in err and f"did you mean '{right}'" in err
    assert "Traceback" not in err


def test_precompute_config_file_with_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "regions.py"
    text = (REPO / "configs" / "regions.py").read_text()
    cfg.write_text(text.replace("cfg.index_every = 20", "cfg.index_evry = 20"))
    data = synthetic.write_pairs_folder(tmp_path / "data", 1, 16, 16, 0)
    rc = precompute_regions.main(["--config", str(cfg), "--data", str(data), "--cache",
                                  str(tmp_path / "c"), "--source", "grid"])
    assert rc == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "index_evry" in err and "did you mean 'index_every'" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("module, field", [(train_reward, "--config.init_lr="),
                                           (train_grpo, "--config.learning_rate=")])
def test_trainer_help(module, field, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["prog", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert field in out and "usage:" in out


def test_config_help_lists_nested_fields(tmp_path):
    f = tmp_path / "c.py"
    f.write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict({"a": 1, "sub": {"b": "x"}})
    """))
    text = config_lib.config_help("prog", "Doc.", config_lib.load_config_file(str(f)), str(f))
    assert "--config.a=1" in text and "--config.sub.b='x'" in text
