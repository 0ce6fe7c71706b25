"""One runner for every command-line program: exit codes, one-line errors, signals.

Every CLI (``train_reward``, ``train_grpo``, ``fuse``, ``evaluate``, ``score``,
``precompute_regions``, ``demo``) runs its body through :func:`run`, so all of them

* exit with the same codes (:data:`EXIT_CODES`, documented in README.md);
* turn a known bad input (a missing or unreadable file, a bad config field, an
  output folder that cannot be written, a region cache made for other images, ...)
  into one ``error: ...`` line on stderr instead of a traceback;
* treat SIGTERM like Ctrl-C: the :class:`Terminated` exception unwinds the stack,
  so every ``try/except BaseException`` / ``finally`` cleanup runs (staging folders
  are removed, checkpoints closed), then the program says ``interrupted`` and exits
  with 130 (Ctrl-C) or 143 (SIGTERM);
* report running out of memory (host or accelerator) with what to do.

A bug still prints its traceback (exit code 1).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
import threading
import traceback
from typing import Callable, Iterator, Sequence

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_INPUT = 2
EXIT_NONFINITE = 3
EXIT_BUSY = 4
EXIT_OOM = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

#: code -> meaning (the README table is written from this).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_UNEXPECTED: "unexpected error (a bug: the traceback is printed)",
    EXIT_INPUT: "bad command line, config, input data or output location (one-line message)",
    EXIT_NONFINITE: "training stopped on a NaN/inf loss or state; the last good checkpoint is kept",
    EXIT_BUSY: "the workdir is in use by another run (lock held)",
    EXIT_OOM: "out of memory (host or accelerator); the message says what to try",
    EXIT_INTERRUPTED: "interrupted by Ctrl-C (SIGINT); temporary files removed",
    EXIT_TERMINATED: "terminated by SIGTERM; temporary files removed",
}


class UsageError(ValueError):
    """A bad command line or config (unknown key, bad value)."""


class Terminated(BaseException):
    """SIGTERM was received (raised from the signal handler, like KeyboardInterrupt)."""


# Exception classes that mean "bad input" (exit 2). Named as "module:Class" and only
# looked up in modules that are already imported, so the runner imports nothing heavy.
_INPUT_ERRORS = (
    "evafusion_jax.cli:UsageError",
    "evafusion_jax.storage.checkpoints:CheckpointError",
    "evafusion_jax.data.image_io:ImageReadError",
    "evafusion_jax.data.image_io:PairingError",
    "evafusion_jax.data.image_io:OutputFolderError",
    "evafusion_jax.fuse:FuseError",
    "evafusion_jax.evaluate:EvaluationError",
    "evafusion_jax.score:ScoreInputError",
    "evafusion_jax.data.regions:RegionError",
    "evafusion_jax.data.grpo_pairs:PairDataError",
    "evafusion_jax.data.feedback_decode:FeedbackDataError",
    "evafusion_jax.config:ConfigError",
    "evafusion_jax.demo:DemoError",
    "evafusion_jax.convert.common:ConversionError",
    "evafusion_jax.models.param_tree:ParamTreeError",
)
_NONFINITE = ("evafusion_jax.train.nonfinite:NonFiniteLossError",)
_BUSY = ("evafusion_jax.storage.locks:WorkdirBusyError",)
# OS errors about a path the user named (a read-only or missing folder, a full disk, ...).
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC, errno.EISDIR,
                errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.EDQUOT, errno.ENOTEMPTY}
_PATH_ERROR_TYPES = (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError,
                     FileExistsError)
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM when allocating")


def _is_instance(exc: BaseException, names: Sequence[str]) -> bool:
    for spec in names:
        mod, _, cls = spec.partition(":")
        module = sys.modules.get(mod)
        klass = getattr(module, cls, None) if module is not None else None
        if isinstance(klass, type) and isinstance(exc, klass):
            return True
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a host ``MemoryError`` or an XLA allocation failure (RESOURCE_EXHAUSTED)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return (type(exc).__name__ in ("XlaRuntimeError", "JaxRuntimeError", "RuntimeError")
            and any(m in text for m in _OOM_MARKERS))


def classify(exc: BaseException, oom_hint: str = "") -> tuple[int, str]:
    """``(exit code, message)`` for an exception escaping a CLI (see :data:`EXIT_CODES`)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C); temporary files were removed"
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED, "interrupted (SIGTERM); temporary files were removed"
    if _is_instance(exc, _NONFINITE):
        return EXIT_NONFINITE, str(exc)
    if _is_instance(exc, _BUSY):
        return EXIT_BUSY, str(exc)
    if is_out_of_memory(exc):
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return EXIT_OOM, ("out of memory: " + first + ". " + (oom_hint or
                          "Use smaller inputs or batches, or a machine with more memory."))
    if _is_instance(exc, _INPUT_ERRORS):
        return EXIT_INPUT, str(exc)
    if isinstance(exc, OSError) and exc.errno is None and isinstance(exc, _PATH_ERROR_TYPES):
        return EXIT_INPUT, str(exc)  # raised by our code with a full message
    if isinstance(exc, OSError) and exc.errno in _PATH_ERRNOS:
        where = exc.filename if exc.filename is not None else ""
        what = f"{exc.strerror or exc}: {where!s}" if where else str(exc)
        hint = {errno.ENOSPC: "free some disk space",
                errno.EDQUOT: "free some disk space",
                errno.ENOENT: "check the path"}.get(
            exc.errno, "choose a location you can write to (is a parent a file, or read-only?)")
        return EXIT_INPUT, f"cannot use {where!s}: {what}; {hint}" if where else f"{what}; {hint}"
    return EXIT_UNEXPECTED, f"unexpected {type(exc).__name__}: {exc}"


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated()


def _redeliver_swallowed_interrupts(previous_hook):
    """An ``sys.unraisablehook`` that does not let Python swallow an interruption.

    A signal's exception is raised wherever the main thread happens to be, and that can be
    a place whose exceptions Python only prints and ignores: a ``gc.callbacks`` function
    (JAX registers one, run at every garbage collection), a ``__del__`` method, a weakref
    callback. Ctrl-C or SIGTERM would then be lost and the program would run on to the
    end. This hook drops such an ignored ``KeyboardInterrupt`` / :class:`Terminated` and,
    from a helper thread once the hook has returned (raised within the hook, it would be
    ignored again), signals the main thread again (``_thread.interrupt_main``): the handler
    raises once more, in ordinary code. Anything else goes to ``previous_hook``.
    """
    import _thread

    def hook(unraisable):
        kind = unraisable.exc_type
        if isinstance(kind, type) and issubclass(kind, (KeyboardInterrupt, Terminated)):
            signum = signal.SIGINT if issubclass(kind, KeyboardInterrupt) else signal.SIGTERM
            while True:
                try:
                    timer = threading.Timer(0.001, _thread.interrupt_main, args=(signum,))
                    timer.daemon = True
                    timer.start()
                    return
                except (KeyboardInterrupt, Terminated):
                    # the re-delivered signal (or another one) arrived before this hook
                    # returned, e.g. while a loaded machine was starting the timer's thread:
                    # raised here it would be ignored again, so deliver it once more
                    continue
        previous_hook(unraisable)

    return hook


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`Terminated` in the main thread,
    and neither it nor Ctrl-C's ``KeyboardInterrupt`` can be swallowed by a garbage-collection
    callback or a finaliser (see :func:`_redeliver_swallowed_interrupts`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    old_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_swallowed_interrupts(old_hook)
    try:
        yield
    finally:
        sys.unraisablehook = old_hook
        signal.signal(signal.SIGTERM, old)


def run(body: Callable[[], int | None], *, prog: str, oom_hint: str = "") -> int:
    """Runs a CLI ``body`` and returns its exit code (see the module docstring).

    ``SystemExit`` (argparse usage errors, ``--help``) passes through unchanged.
    """
    log = logging.getLogger(prog)
    try:
        with sigterm_as_exception():
            rc = body()
        return EXIT_OK if rc is None else int(rc)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every way out gets a code and a message
        code, message = classify(e, oom_hint)
        if code == EXIT_UNEXPECTED:
            traceback.print_exc()
            message += " (exit code 1: this is a bug, please report it)"
        _report(log, code, prog, message)
        return code


def _logs_to_terminal() -> bool:
    """Whether the root logger already prints to this process's stderr/stdout."""
    streams = {id(sys.stderr), id(sys.__stderr__), id(sys.stdout), id(sys.__stdout__)}
    return any(isinstance(h, logging.StreamHandler) and id(getattr(h, "stream", None)) in streams
               for h in logging.getLogger().handlers)


def _report(log: logging.Logger, code: int, prog: str, message: str) -> None:
    """One line through logging (the CLI's format) or, if logging does not reach the
    terminal, straight to stderr; an interruption is a warning, anything else an error."""
    interrupted = code in (EXIT_INTERRUPTED, EXIT_TERMINATED)
    log.log(logging.WARNING if interrupted else logging.ERROR, "%s", message)
    if not _logs_to_terminal():
        sys.stderr.write(f"{prog}: {message}\n" if interrupted else f"{prog}: error: {message}\n")
        sys.stderr.flush()


def suggest(word: str, candidates: Sequence[str], prefix: str = "") -> str:
    """``"; did you mean 'x'?"`` for the closest candidate (shown with ``prefix``), or ``""``."""
    import difflib

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""
