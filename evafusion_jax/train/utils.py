"""Training infrastructure shared by the reward-model and GRPO trainers.

* :class:`TrainCheckpointer`: resumable training checkpoints on an Orbax
  ``CheckpointManager`` (keep the last N), each holding a pytree of training
  state (parameters, optimizer state, step, ...), the data iterator state of
  every host (JSON) and a small JSON record (step, metrics, user extras); plus
  a separate *best* checkpoint kept by a metric.
* :func:`check_finite` / :func:`check_finite_state` / :class:`NonFiniteLossError`: stop a
  run on a NaN/inf loss or parameters / optimizer state (nothing non-finite is saved);
  :meth:`TrainCheckpointer.discard_after` drops checkpoints whose parameters gave it.
* :class:`MetricWriter`: JSONL metrics and TensorBoard event files.
* :func:`parse_cli_config` / :func:`default_config_path`: the
  ``--config configs/x.py --config.field=value`` command-line pattern.
* :func:`tree_fingerprint`: a content hash of a pytree of arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

logger = logging.getLogger(__name__)

_STATE = "state"
_DATA_ITER = "data_iter"
_META = "meta"


class NonFiniteLossError(FloatingPointError):
    """The loss (or another monitored value) became NaN or infinite."""


_NONFINITE_ADVICE = (
    "The run was stopped without saving. Rerun the same command with a lower learning rate "
    "(--config.learning_rate / --config.init_lr) or fixed input data: it resumes from the last good "
    "checkpoint")


def check_finite(loss: Any, step: int, what: str = "loss") -> float:
    """Returns ``float(loss)``; raises :class:`NonFiniteLossError` if it is NaN or inf.

    ``loss`` may be a scalar array or a dict of scalars (every entry is checked
    and the message names the bad ones). The caller should stop without saving,
    so that the last checkpoint on disk stays the last good one.
    """
    if isinstance(loss, dict):
        values = {k: float(np.asarray(jax.device_get(v))) for k, v in loss.items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(f"non-finite {what} at step {step}: {bad}. {_NONFINITE_ADVICE}.")
        return values.get("loss", next(iter(values.values()), float("nan")))
    value = float(np.asarray(jax.device_get(loss)))
    if not math.isfinite(value):
        raise NonFiniteLossError(f"non-finite {what} ({value}) at step {step}. {_NONFINITE_ADVICE}.")
    return value


@jax.jit
def _finite_leaves(tree):
    import jax.numpy as jnp
    leaves = [x for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def check_finite_state(state: Any, step: int, what: str = "training state") -> None:
    """Raises :class:`NonFiniteLossError` when any float leaf of ``state`` (the updated
    parameters, optimizer state, ...) holds a NaN or inf; the message names the first ones."""
    flags = check_finite_leaves(state)
    if all(flags):
        return
    paths = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
             if np.issubdtype(np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype),
                              np.inexact)]
    bad = [p for p, f in zip(paths, flags) if not bool(f)]
    raise NonFiniteLossError(
        f"non-finite values in the {what} after step {step} ({len(bad)} arrays, e.g. "
        f"{', '.join(bad[:3])}). {_NONFINITE_ADVICE}.")


def guard_step(checkpointer: "TrainCheckpointer", loss: Any, new_state: Any, step: int,
               batch: Any = None) -> float:
    """The trainers' NaN guard after the update of step ``step`` (0-based) -> ``step + 1``.

    * A non-finite ``loss`` on a finite input ``batch`` was computed with the parameters of
      checkpoint ``step`` (if one was saved at that step): finite but useless parameters
      (e.g. 1e30 after a huge learning rate) must not be resumed from, so that checkpoint is
      deleted and a rerun (with a lower learning rate) resumes from the one before it. When
      the batch itself holds NaN/inf, the data is to blame and the checkpoint is kept.
    * A non-finite ``new_state`` (updated parameters / optimizer state) is never saved.

    Raises :class:`NonFiniteLossError` (the CLIs exit with code 3); returns ``float(loss)``.
    """
    try:
        value = check_finite(loss, step)
    except NonFiniteLossError as e:
        if batch is not None and not all(check_finite_leaves(batch)):
            raise NonFiniteLossError(f"{e} The input batch of this step holds NaN/inf values: "
                                     "check the input data.") from None
        if checkpointer.discard(step):
            raise NonFiniteLossError(f"{e} (checkpoint {step}, whose parameters gave this loss, "
                                     "was deleted)") from None
        raise
    check_finite_state(new_state, step + 1)
    return value


def check_finite_leaves(tree: Any) -> list[bool]:
    """Whether each float leaf of ``tree`` is all finite (one device round trip)."""
    return [bool(f) for f in jax.device_get(_finite_leaves(tree))]


def tree_fingerprint(tree: Any, extra: Any = None) -> str:
    """SHA-256 hex digest of a pytree's structure, leaf shapes, dtypes and bytes.

    ``extra`` (any JSON-serialisable value) is mixed in, e.g. a config dict.
    Two trees with equal values give equal fingerprints on any device.
    """
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in leaves:
        arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        f = float(np.asarray(jax.device_get(value)))
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


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
        meta = {"step": step, "metrics": _jsonable(metrics or {}), "extra": _jsonable(extra or {}),
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


# ----------------------------------------------------------------------------- metrics

class MetricWriter:
    """Writes scalars to ``logdir/metrics.jsonl`` and TensorBoard events in ``logdir``.

    Only process 0 writes by default (``enabled=None``). Non-finite values are
    written as ``null`` in the JSONL file. ``resume_step``: the step a run resumes
    from (0 for a fresh start); records of later steps, written by an interrupted
    run after its last checkpoint, are dropped from the JSONL file so that no step
    appears twice.
    """

    def __init__(self, logdir: str | os.PathLike, enabled: bool | None = None,
                 tensorboard: bool = True, jsonl_name: str = "metrics.jsonl",
                 resume_step: int | None = None):
        self.logdir = Path(logdir)
        self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_jsonl(self.logdir / jsonl_name, int(resume_step))
        self._jsonl = open(self.logdir / jsonl_name, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=str(self.logdir))

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": time.time()}
        for k, v in values.items():
            name = f"{prefix}{k}"
            f = _jsonable(v)
            rec[name] = f
            if self._tb is not None and isinstance(f, (int, float)) and not isinstance(f, bool):
                self._tb.add_scalar(name, f, int(step))
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()

    def images(self, step: int, images: dict) -> None:
        """``images``: name -> (H, W), (H, W, 1) or (H, W, 3) array in [0, 1]."""
        if not self.enabled or self._tb is None:
            return
        for name, img in images.items():
            a = np.clip(np.asarray(jax.device_get(img), np.float32), 0.0, 1.0)
            if a.ndim == 2:
                a = a[..., None]
            if a.shape[-1] == 1:
                a = np.repeat(a, 3, axis=-1)
            self._tb.add_image(name, a, int(step), dataformats="HWC")

    def text(self, step: int, name: str, value: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(name, value, int(step))

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the records of ``path`` with ``step <= last_step`` (atomic rewrite)."""
    if not path.is_file():
        return
    from evafusion_jax.storage.fileio import atomic_path
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= last_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(keep), encoding="utf-8")
        logger.info("%s: dropped %d records after step %d (written after the last checkpoint "
                    "of an interrupted run)", path, len(lines) - len(keep), last_step)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSONL metrics file written by :class:`MetricWriter`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- CLI configs

def default_config_path(name: str) -> str:
    """``configs/<name>`` of this repository (the folder next to the package)."""
    here = Path(__file__).resolve().parents[2] / "configs" / name
    return str(here) if here.exists() else os.path.join("configs", name)


def _flat_fields(cfg, prefix: str = "") -> dict:
    """``{"a.b": value}`` of every leaf field of a ConfigDict."""
    import ml_collections
    out = {}
    for k in sorted(cfg.keys()):
        v = cfg[k]
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_path_of(argv: Sequence[str], default: str, flag_name: str) -> str:
    path = default
    for i, a in enumerate(argv):
        if a == f"--{flag_name}" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith(f"--{flag_name}="):
            path = a.split("=", 1)[1]
    return path


def load_config_file(path: str, flag_name: str = "config"):
    """The ``ml_collections.ConfigDict`` of a config file (no overrides)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(flag_name, default=path, flag_values=fv,
                                             lock_config=False, sys_argv=["prog"])
    fv(["prog"])
    return holder.value


def unknown_key_message(cfg, dotted: str, where: str) -> str | None:
    """A message naming the first component of ``dotted`` that ``cfg`` lacks, with the closest
    existing key; None when the whole path exists."""
    import ml_collections

    from evafusion_jax.cli import suggest
    node, done = cfg, []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return (f"{where}: {'.'.join(done)} is a value, not a group: there is no "
                    f"{'.'.join(done + [part])}")
        if part not in node:
            known = list(node.keys())
            full = ".".join(done + [part])
            prefix = ".".join(done) + "." if done else ""
            return (f"{where}: unknown config key {full!r}"
                    + suggest(part, known, prefix=prefix)
                    + f" (keys here: {', '.join(sorted(known)[:30])})")
        node, done = node[part], done + [part]
    return None


def check_config_keys(cfg, reference, where: str) -> None:
    """Raises ``cli.UsageError`` when ``cfg`` (e.g. a user's config file) has a key the
    ``reference`` config lacks (a typo: the closest key is suggested) or lacks one it has."""
    from evafusion_jax.cli import UsageError, suggest

    have, want = _flat_fields(cfg), _flat_fields(reference)
    extra = [k for k in have if k not in want and not any(k.startswith(w + ".") for w in want)]
    if extra:
        raise UsageError(f"{where}: unknown config key {extra[0]!r}{suggest(extra[0], list(want))}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = [k for k in want if k not in have and not any(k.startswith(h + ".") for h in have)]
    if missing:
        raise UsageError(f"{where}: the config lacks the key(s) {', '.join(missing[:10])} "
                         "(start from the default config file and change values)")


def config_help(argv0: str, description: str, cfg, config_path: str,
                flag_name: str = "config") -> str:
    """``--help`` text: the program's description and every config field with its value."""
    lines = [(description or "").strip(), "",
             f"usage: {argv0} [--{flag_name} FILE] [--{flag_name}.FIELD=VALUE ...]", "",
             f"Config fields (values from {config_path}):"]
    lines += [f"  --{flag_name}.{k}={v!r}" for k, v in _flat_fields(cfg).items()]
    return "\n".join(lines) + "\n"


def parse_cli_config(argv: Sequence[str], default_config_path: str,
                     flag_name: str = "config", description: str | None = None):
    """Parses ``--config PATH --config.a.b=value ...`` into an ``ml_collections.ConfigDict``.

    ``argv[0]`` is the program name (as in ``sys.argv``). Uses absl
    ``config_flags.DEFINE_config_file`` on a private ``FlagValues``, so it
    can be called several times in one process (tests). ``--help`` / ``-h`` prints
    ``description`` and every field, then exits with 0. An unknown field (on the command
    line or in a config file other than the default) raises ``cli.UsageError`` naming it
    and the closest existing one; so does a bad value.
    """
    from absl import flags
    from ml_collections import config_flags

    from evafusion_jax.cli import UsageError

    argv = list(argv)
    path = _config_path_of(argv[1:], default_config_path, flag_name)
    if not os.path.isfile(path.split(":", 1)[0]):
        raise UsageError(f"config file {path} does not exist (--{flag_name} FILE)")
    if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv[1:]):
        import sys
        cfg = load_config_file(path, flag_name)
        sys.stdout.write(config_help(argv[0], description or "", cfg, path, flag_name))
        raise SystemExit(0)
    fv = flags.FlagValues()
    try:
        holder = config_flags.DEFINE_config_file(flag_name, default=default_config_path,
                                                 flag_values=fv, lock_config=False,
                                                 sys_argv=list(argv))
        fv(list(argv))
        cfg = holder.value
    except (AttributeError, KeyError) as e:
        try:
            base = load_config_file(path, flag_name)
        except Exception:  # noqa: BLE001 - the original error is reported below
            base = None
        for a in argv[1:]:
            if a.startswith(f"--{flag_name}.") and base is not None:
                key = a[len(flag_name) + 3:].split("=", 1)[0]
                msg = unknown_key_message(base, key, f"command-line flag {a}")
                if msg:
                    raise UsageError(msg) from None
        raise UsageError(f"error in command-line flags: {e}") from None
    except flags.Error as e:
        raise UsageError(f"error in command-line flags: {e}") from None
    except (FileNotFoundError, OSError, SyntaxError, ImportError) as e:
        raise UsageError(f"cannot load the config file {path}: {e}") from None
    if os.path.abspath(path) != os.path.abspath(default_config_path):
        check_config_keys(load_config_file(path, flag_name), load_config_file(
            default_config_path, flag_name), f"config file {path}")
    return cfg
