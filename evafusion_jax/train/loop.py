"""The training loop of both trainers (``train_reward`` and ``train_grpo``).

:func:`session` is how a trainer's ``train(cfg)`` starts: multi-host start-up
(:func:`start_processes`, from ``cfg.distributed`` or the environment), then the workdir lock
(a second run on the same workdir refuses). :func:`run` then runs the steps of a
:class:`Trainer` (the trainer supplies its jitted step, what it logs, its evaluation and what its
checkpoints record); the loop owns everything else, the same for both:

* **Checkpoints** (:class:`~evafusion_jax.train.checkpointer.TrainCheckpointer` under
  ``workdir/checkpoints``: state, every host's data iterator state, a JSON record), saved when
  :meth:`Trainer.should_save` says so, after the last step and after an evaluation that beats
  every earlier one (the **best checkpoint**: ``TrainCheckpointer`` keeps it and its value under
  ``workdir/checkpoints/best``, and :meth:`Trainer.on_best` may export the model).
* **Resume**: when ``workdir/checkpoints`` holds a checkpoint, the state, the step and the data
  iterator are restored from the newest one (:meth:`Trainer.on_resume` may refuse it), so a
  resumed run continues bit-exactly where the interrupted one saved.
* **Non-finite policy** (:func:`~evafusion_jax.train.nonfinite.guard_step`, after every update and
  before anything is saved): a NaN/inf loss or updated state stops the run with
  :class:`~evafusion_jax.train.nonfinite.NonFiniteLossError` (exit code 3); nothing non-finite is
  saved; a non-finite loss on finite input data deletes the checkpoint whose parameters gave it,
  so that a rerun (with a lower learning rate) resumes from the one before.
* **Metrics**: ``workdir/logs`` (:class:`~evafusion_jax.train.metric_writer.MetricWriter`: JSONL +
  TensorBoard); records written after the checkpoint a run resumes from are dropped. Every
  ``log_every`` steps (and at the last) the trainer turns the metrics of the steps since the last
  record into scalars (:meth:`Trainer.log_values`).
* A tqdm progress bar (process 0 only), and ``exit_after_steps`` (tests: a simulated kill,
  ``os._exit(75)`` without a final save, after that many steps).

Both CLIs run through :func:`main` (the config command line, then :func:`evafusion_jax.cli.run`:
exit codes, one-line errors); a bad config field raises :class:`evafusion_jax.config.ConfigError`
(exit code 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax

from evafusion_jax import cli
from evafusion_jax import config as config_lib
from evafusion_jax.storage import locks
from evafusion_jax.train import nonfinite, parallel
from evafusion_jax.train.checkpointer import Restored, TrainCheckpointer
from evafusion_jax.train.metric_writer import MetricWriter

logger = logging.getLogger(__name__)

#: the exit status of a simulated kill (``exit_after_steps``)
KILLED_EXIT = 75


def main(argv: Sequence[str] | None, *, prog: str, config_name: str, description: str,
         oom_hint: str, body: Callable[[Any], Any]) -> int:
    """A trainer's command line: ``--config`` (default ``configs/<config_name>``) and
    ``--config.FIELD=VALUE`` overrides, then ``body(cfg)`` under :func:`evafusion_jax.cli.run`
    (exit codes, one-line errors, signals, out-of-memory advice); returns the exit code."""
    argv = list(sys.argv if argv is None else argv)

    def run_body():
        cfg = config_lib.parse_cli_config(argv, config_lib.default_config_path(config_name),
                                          description=description)
        body(cfg)
    return cli.run(run_body, prog=prog, oom_hint=oom_hint)


def start_processes(cfg) -> bool:
    """Multi-host start-up: ``jax.distributed`` from ``cfg.distributed`` (``coordinator_address``,
    ``num_processes``, ``process_id``; empty / 0 / -1 = unset) or the environment (see
    :func:`parallel.maybe_initialize_distributed`). Call before anything touches the devices;
    a single process does nothing. Returns whether several processes run."""
    d = cfg.get("distributed") if hasattr(cfg, "get") else None
    if d is None:
        return parallel.maybe_initialize_distributed()
    return parallel.maybe_initialize_distributed(
        str(d.coordinator_address) or None, int(d.num_processes) or None,
        int(d.process_id) if int(d.process_id) >= 0 else None)


@contextlib.contextmanager
def session(cfg, prog: str) -> Iterator[Path]:
    """Multi-host start-up (:func:`start_processes`), then ``cfg.workdir`` locked for ``prog``
    (:class:`locks.WorkdirLock`) while the block runs; yields the absolute workdir."""
    start_processes(cfg)
    workdir = Path(str(cfg.workdir)).absolute()
    with locks.WorkdirLock(workdir, prog, primary=jax.process_index() == 0):
        yield workdir


class Trainer:
    """What a trainer supplies to :func:`run` (subclass it; the defaults suit a simple trainer).

    ``step`` is required; the other methods are hooks with defaults.
    """

    #: the progress bar's label
    desc: str = "train"

    def place(self, state: Any) -> Any:
        """The host state (fresh or restored) placed for :meth:`step` (e.g. replicated)."""
        return state

    def step(self, state: Any, batch: Any, step: int) -> tuple[Any, dict, Any]:
        """Update ``step`` (0-based) on the loader's ``batch``: ``(new state, metrics with a
        "loss", the input batch as the step saw it: the non-finite guard inspects it)``."""
        raise NotImplementedError

    def on_resume(self, restored: Restored) -> None:
        """Called with the restored checkpoint before training resumes (may refuse it)."""

    def on_start(self, writer: MetricWriter, step: int) -> None:
        """Called once the metric writer is open, before the first step."""

    def log_values(self, step: int, window: list[dict]) -> tuple[dict, dict]:
        """``(scalars to write at step, progress-bar postfix)`` from the metrics of the steps
        since the last record (``window``, oldest first). Default: the last step's, as floats."""
        import numpy as np
        values = {k: float(np.asarray(v)) for k, v in
                  parallel.unreplicate(window[-1]).items()}
        return values, {"loss": f"{values['loss']:.4g}"}

    def evaluate(self, step: int, state: Any, writer: MetricWriter) -> float | None:
        """Called after update ``step`` (1-based count) was logged: evaluation, images, ...
        Returns the value of the metric that ranks checkpoints (higher is better) when this
        step was evaluated, else None."""
        return None

    def on_best(self, step: int, state: Any, value: float) -> None:
        """Called when :meth:`evaluate`'s value beats every earlier one (e.g. export the model);
        that step is then checkpointed, with the best (``TrainCheckpointer.best_value``)."""

    def should_save(self, step: int, total_steps: int) -> bool:
        """Whether to write a checkpoint after ``step`` updates (the last step always is)."""
        return step == total_steps

    def checkpoint(self, step: int, state: Any) -> dict:
        """Keyword arguments of :meth:`TrainCheckpointer.save` besides the step, the iterator
        state and the best metric: ``state`` (what to save; default the placed state),
        ``metrics``, ``extra``, ``best_state`` (what to keep as the best checkpoint)."""
        return {"state": state}


class Result(NamedTuple):
    """What :func:`run` returns."""
    state: Any                # the final placed state
    step: int                 # the number of updates done (total_steps unless interrupted)
    resumed_from: int | None  # the checkpoint step the run resumed from
    best_value: float | None  # the best evaluation value so far (also of earlier sessions)


def run(trainer: Trainer, *, workdir: Path, state: Any, data_iter: Any, total_steps: int,
        keep_checkpoints: int = 3, log_every: int = 1, progress: bool = True,
        exit_after_steps: int = -1, unit: str = "it") -> Result:
    """Runs ``trainer`` from ``state`` (or from the newest checkpoint) to ``total_steps``.

    Args:
      trainer: the step, logging, evaluation and checkpoint record (:class:`Trainer`).
      workdir: the run folder: ``checkpoints/`` and ``logs/`` are written under it.
      state: the fresh host training state; also the target (structure, dtypes) of a restore.
      data_iter: the data iterator (``next``, ``get_state``, ``set_state``: a grain iterator).
      total_steps: the number of updates of the whole run.
      keep_checkpoints: how many recent checkpoints to keep.
      log_every: write metrics every this many steps (and after the last).
      progress: show a progress bar (process 0 only).
      exit_after_steps: >= 0: simulate a kill after that many steps (tests; ``os._exit(75)``).
      unit: the progress bar's unit.

    Returns:
      :class:`Result`. The checkpointer and the metric writer are closed; a non-finite loss or
      state raises :class:`~evafusion_jax.train.nonfinite.NonFiniteLossError` without saving.
    """
    from tqdm import tqdm

    workdir = Path(workdir)
    ckpt = TrainCheckpointer(workdir / "checkpoints", max_to_keep=int(keep_checkpoints))
    step, resumed_from = 0, None
    try:
        if ckpt.latest_step() is not None:
            restored = ckpt.restore(target=state)
            trainer.on_resume(restored)
            state, step = restored.state, restored.step
            if restored.iterator_state is not None:
                data_iter.set_state(restored.iterator_state)
            resumed_from = step
            logger.info("resumed from %s at step %d", workdir / "checkpoints", step)
        state = trainer.place(state)
        writer = MetricWriter(workdir / "logs", resume_step=step)
    except BaseException:
        ckpt.close()
        raise
    bar = tqdm(total=total_steps, initial=step, desc=trainer.desc, unit=unit, leave=True,
               disable=not progress or jax.process_index() != 0)
    window: list[dict] = []
    try:
        trainer.on_start(writer, step)
        while step < total_steps:
            state, metrics, batch = trainer.step(state, next(data_iter), step)
            nonfinite.guard_step(ckpt, metrics["loss"], state, step, batch)  # before any save
            step += 1
            bar.update(1)
            window.append(metrics)
            if step % max(int(log_every), 1) == 0 or step == total_steps:
                values, postfix = trainer.log_values(step, window)
                writer.scalars(step, values)
                bar.set_postfix(**postfix)
                window = []
            value = trainer.evaluate(step, state, writer)
            new_best = ckpt.is_better(value)
            if new_best:
                trainer.on_best(step, state, float(value))
            if new_best or trainer.should_save(step, total_steps) or step == total_steps:
                ckpt.save(step, iterator_state=data_iter.get_state(),
                          best_metric=value if new_best else None,
                          **trainer.checkpoint(step, state))
            if exit_after_steps >= 0 and step == exit_after_steps:
                ckpt.close()
                writer.close()
                os._exit(KILLED_EXIT)  # a simulated kill: no cleanup, no final save
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return Result(state, step, resumed_from, ckpt.best_value)
