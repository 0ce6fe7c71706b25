"""Training metrics: JSONL records and TensorBoard events.

:class:`MetricWriter` writes them, :func:`read_jsonl` reads the JSONL file back.

:func:`json_scalars` turns a metrics dict (arrays, NumPy scalars, NaN) into JSON values; the
checkpointer's records use it too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)


def json_scalars(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_scalars(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_scalars(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        f = float(np.asarray(jax.device_get(value)))
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


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
            f = json_scalars(v)
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
