"""Resumable training checkpoints (:class:`TrainCheckpointer`) for both trainers.

An Orbax ``CheckpointManager`` (keep the last N), each checkpoint holding a pytree of training
state (parameters, optimizer state, step, ...), the data iterator state of every host (JSON) and a
small JSON record (step, metrics, user extras); plus a separate *best* checkpoint kept by a metric.
:meth:`TrainCheckpointer.discard` drops a checkpoint whose parameters gave a non-finite loss
(:func:`evafusion_jax.train.nonfinite.guard_step`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from evafusion_jax.train.metric_writer import json_scalars

logger = logging.getLogger(__name__)

_STATE = "state"
_DATA_ITER = "data_iter"
_META = "meta"


# ----------------------------------------------------------------------------- iterator state

def _encode_iter_state(state: Any) -> dict:
    if state is None:
        return {"format": "none"}
    if isinstance(state, (bytes, bytearray)):
        return {"format": "utf8-bytes", "value": bytes(state).decode("utf-8")}
    json.dumps(state)  # raises TypeError early for a non-JSON state
    return {"format": "json", "value": state}


def _decode_iter_state(rec: dict) -> Any:
    fmt = rec.get("format")
    if fmt == "none":
        return None
    if fmt == "utf8-bytes":
        return rec["value"].encode("utf-8")
    return rec["value"]


def _gather_host_strings(text: str) -> list[str]:
    """All processes' ``text`` (process order); a no-op for one process."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    lengths = lengths.reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    allb = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(allb[i, :lengths[i]]).decode("utf-8") for i in range(len(lengths))]


# ----------------------------------------------------------------------------- checkpointer

class Restored(NamedTuple):
    """What :meth:`TrainCheckpointer.restore` returns."""
    step: int
    state: Any
    iterator_state: Any  # this host's iterator state (bytes for grain DataLoader iterators)
    meta: dict           # {"step", "metrics", "extra", "best_value", "time"}


def _first_diff(a: list, b: list) -> tuple:
    for x, y in zip(a, b):
        if x != y:
            return (x, y)
    return (a[len(b):len(b) + 1], b[len(a):len(a) + 1])


def _abstract_target(target: Any) -> Any:
    """Restore targets: jax.Arrays keep their sharding; host values restore as NumPy."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        arr = np.asarray(x)
        return np.zeros(arr.shape, arr.dtype)
    return jax.tree_util.tree_map(leaf, target)


class TrainCheckpointer:
    """Resumable training checkpoints: the last ``max_to_keep`` steps plus the best one.

    Layout under ``directory``::

        checkpoints/<step>/state/      Orbax StandardSave of the state pytree
        checkpoints/<step>/data_iter/  JSON: every host's data iterator state
        checkpoints/<step>/meta/       JSON: step, metrics, extra, best_value
        best/<step>/...                the same items for the best step so far

    Saving is synchronous by default, so a process killed after ``save``
    returns always finds that checkpoint complete; Orbax writes each step to a
    temporary folder and renames it, so a kill during ``save`` leaves the
    previous checkpoints intact.

    Args:
      directory: run folder (created).
      max_to_keep: how many recent checkpoints to keep (older ones are deleted).
      best_mode: "max" or "min": which ``best_value`` passed to :meth:`save` is better.
      async_save: let Orbax write in the background (call :meth:`wait`
        before reading the files or exiting).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3,
                 best_mode: str = "max", async_save: bool = False):
        import orbax.checkpoint as ocp
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self.best_mode = best_mode
        self._ocp = ocp

        def manager(sub: str, keep: int | None):
            opts = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
            return ocp.CheckpointManager(
                self.directory / sub, options=opts,
                item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                               _DATA_ITER: ocp.JsonCheckpointHandler(),
                               _META: ocp.JsonCheckpointHandler()})

        self._mgr = manager("checkpoints", max_to_keep)
        self._best = manager("best", 1)
        self._best_value: float | None = None
        best_step = self._best.latest_step()
        if best_step is not None:
            meta = self._restore_json(self._best, best_step, _META)
            self._best_value = meta.get("best_value")

    # -- queries
    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def best_step(self) -> int | None:
        return self._best.latest_step()

    @property
    def best_value(self) -> float | None:
        """The best ``best_value`` saved so far (also after reopening the folder)."""
        return self._best_value

    def is_better(self, value: float | None) -> bool:
        if value is None or not math.isfinite(float(value)):
            return False
        if self._best_value is None:
            return True
        return value > self._best_value if self.best_mode == "max" else value < self._best_value

    # -- saving
    def save(self, step: int, state: Any, iterator_state: Any = None,
             metrics: dict | None = None, best_metric: float | None = None,
             best_state: Any = None, extra: dict | None = None) -> bool:
        """Saves a checkpoint for ``step``; also the best checkpoint when ``best_metric`` improves.

        Args:
          step: the number of completed training steps (the checkpoint's name).
          state: pytree of arrays (params, optimizer state, ...).
          iterator_state: this host's data iterator state (``it.get_state()``:
            bytes or a JSON-serialisable value). Every host must call ``save``.
          metrics: scalars recorded in the checkpoint's JSON record.
          best_metric: the value that ranks checkpoints (see ``best_mode``);
            if it beats the best so far, ``best_state`` (default: ``state``)
            is also written as the best checkpoint.
          best_state: what to keep as the best checkpoint (e.g. params only).
          extra: JSON-serialisable record saved with the checkpoint (e.g. the
            config, a fingerprint of frozen weights).

        Returns:
          True when a new best checkpoint was written.
        """
        ocp = self._ocp
        step = int(step)
        enc = _encode_iter_state(iterator_state)
        hosts = _gather_host_strings(json.dumps(enc))
        data_iter = {"process_count": len(hosts),
                     "states": {str(i): json.loads(s) for i, s in enumerate(hosts)}}
        improved = self.is_better(best_metric)
        best_value = float(best_metric) if improved else self._best_value
        meta = {"step": step, "metrics": json_scalars(metrics or {}),
                "extra": json_scalars(extra or {}),
                "best_value": best_value, "time": time.time()}

        def args_for(tree, meta_rec):
            return ocp.args.Composite(**{
                _STATE: ocp.args.StandardSave(tree),
                _DATA_ITER: ocp.args.JsonSave(data_iter),
                _META: ocp.args.JsonSave(meta_rec)})

        if step in self._mgr.all_steps():
            logger.warning("checkpoint for step %d already exists in %s; not overwritten",
                           step, self.directory)
        else:
            self._mgr.save(step, args=args_for(state, meta), force=True)
            self._mgr.wait_until_finished()
        if improved:
            for old in self._best.all_steps():
                if old == step:
                    self._best.delete(old)
            self._best.save(step, args=args_for(state if best_state is None else best_state,
                                                meta), force=True)
            self._best.wait_until_finished()
            self._best_value = best_value
        return improved

    # -- restoring
    def _restore_json(self, mgr, step, item):
        return mgr.restore(step, args=self._ocp.args.Composite(
            **{item: self._ocp.args.JsonRestore()}))[item]

    def _restore_from(self, mgr, step: int | None, target: Any, kind: str) -> Restored:
        ocp = self._ocp
        if step is None:
            step = mgr.latest_step()
            if step is None:
                raise FileNotFoundError(f"no {kind} checkpoint in {mgr.directory}")
        elif step not in mgr.all_steps():
            raise FileNotFoundError(f"no {kind} checkpoint for step {step} in {mgr.directory}; "
                                    f"available: {sorted(mgr.all_steps())}")
        meta_tree = mgr.item_metadata(step)[_STATE]
        meta_tree = getattr(meta_tree, "tree", meta_tree)
        if target is None:
            abstract = jax.tree_util.tree_map(
                lambda m: np.zeros(tuple(m.shape), m.dtype), meta_tree)
        else:
            abstract = _abstract_target(target)
            saved = sorted(tuple(m.shape) for m in jax.tree_util.tree_leaves(meta_tree))
            wanted = sorted(tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(abstract))
            if saved != wanted:
                raise ValueError(
                    f"cannot restore the {kind} checkpoint {mgr.directory}/{step}: the saved state "
                    f"has a different structure or shapes than the target ({len(saved)} saved "
                    f"arrays vs {len(wanted)} wanted; first differing shapes "
                    f"{_first_diff(saved, wanted)}). Was it written by a run with another model "
                    "size or config?")
        try:
            out = mgr.restore(step, args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(abstract),
                _DATA_ITER: ocp.args.JsonRestore(),
                _META: ocp.args.JsonRestore()}))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"cannot restore the {kind} checkpoint {mgr.directory}/{step} into the given "
                f"target (the saved state has a different structure or shapes: was it written by "
                f"a run with another model size or config?): {e}") from e
        data_iter = out[_DATA_ITER] or {}
        states = data_iter.get("states", {})
        n_saved = data_iter.get("process_count", len(states))
        if n_saved != jax.process_count():
            logger.warning("checkpoint was written by %s processes, this run has %d; the data "
                           "iterator state of process %d is used if present",
                           n_saved, jax.process_count(), jax.process_index())
        rec = states.get(str(jax.process_index()))
        it_state = _decode_iter_state(rec) if rec is not None else None
        state = out[_STATE]
        if target is None:
            state = jax.tree_util.tree_map(lambda x: np.asarray(x), state)
        return Restored(int(step), state, it_state, dict(out[_META] or {}))

    def restore(self, step: int | None = None, target: Any = None) -> Restored:
        """Restores checkpoint ``step`` (default: the latest).

        Args:
          step: which step; None for the latest.
          target: a pytree like the saved state (arrays or
            ``jax.ShapeDtypeStruct`` s) giving structure, dtypes and placement:
            ``jax.Array`` leaves restore with their sharding, NumPy leaves as
            NumPy. With None, every leaf comes back as a NumPy array in nested
            dicts/lists (works on any machine, whatever devices wrote it).

        Returns:
          :class:`Restored` ``(step, state, iterator_state, meta)``.
        """
        return self._restore_from(self._mgr, step, target, "training")

    def restore_best(self, target: Any = None) -> Restored:
        """Restores the best checkpoint (see :meth:`restore`)."""
        return self._restore_from(self._best, None, target, "best")

    def discard(self, step: int) -> bool:
        """Deletes the training checkpoint ``step`` if it exists (e.g. its parameters gave a
        non-finite loss, so a rerun must not resume from it); returns whether it existed."""
        if int(step) not in self._mgr.all_steps():
            return False
        self._mgr.delete(int(step))
        logger.warning("deleted checkpoint %d of %s: its parameters gave a non-finite loss",
                       int(step), self.directory)
        return True

    def wait(self) -> None:
        self._mgr.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._mgr.close()
        self._best.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
