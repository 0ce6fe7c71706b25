"""Saving and restoring parameter pytrees with their JSON model config.

A model checkpoint is a folder::

    CKPT/
      config.json   {"kind": "dcevo" | "vit" | "reward", "format_version": 1, "config": {...}}
      params/       an Orbax StandardCheckpointer tree of float arrays

Restoring never needs the device the checkpoint was written on: arrays are
restored as host NumPy arrays (or placed on an explicit sharding when asked),
so a checkpoint written on a GPU restores on a CPU-only machine.

Writes go to a temporary sibling folder first and are renamed into place at
the end, so an interrupted or failed save never leaves a half-written
checkpoint under the requested name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from evafusion_jax.storage.fileio import commit_dir, staging_dir

FORMAT_VERSION = 1
KINDS = ("dcevo", "vit", "reward")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or of the wrong kind."""


def _to_numpy_tree(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)


def _process_local_checkpointer():
    """An Orbax checkpointer that involves only this process.

    ``save_params`` / ``load_params`` handle host-local NumPy trees, and in a multi-process
    run only one process exports (process 0), so Orbax's default barriers across all
    processes would wait forever for the others.
    """
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"evafusion_p{me}"))


def save_params(path: str | os.PathLike, params: Any, config: dict, kind: str,
                overwrite: bool = False, extra: dict | None = None) -> Path:
    """Saves ``params`` and the JSON-serialisable ``config`` to the folder ``path``.

    Args:
      path: destination folder (created; its parent must be writable).
      params: a pytree of arrays (nested dicts, as Flax returns them).
      config: the model config as a plain dict (``SomeConfig.to_dict()``).
      kind: one of ``KINDS``; checked again when the checkpoint is restored.
      overwrite: replace an existing checkpoint at ``path``.
      extra: optional JSON-serialisable metadata stored next to the config
        (for example the converter's list of skipped keys).

    In a multi-process run, call it from one process only (the others must not write
    to the same ``path``): it synchronises with no other process.

    Returns:
      The checkpoint path.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"checkpoint folder {path} already exists; pass overwrite=True "
            "(or --overwrite on the command line) to replace it")
    try:
        meta_text = json.dumps({"kind": kind, "format_version": FORMAT_VERSION,
                                "config": config, "extra": extra or {}},
                               indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"config for {kind!r} checkpoint is not JSON-serialisable: {e}") from e
    tmp = staging_dir(path)
    try:
        ckptr = _process_local_checkpointer()
        ckptr.save(tmp / "params", _to_numpy_tree(params))
        ckptr.wait_until_finished()
        (tmp / "config.json").write_text(meta_text)
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | os.PathLike, expected_kind: str | None = None) -> dict:
    """Returns the metadata dict (``kind``, ``config``, ``extra``) of a checkpoint."""
    path = Path(path)
    meta_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (it does not exist or is a file)."
                              " Convert a PyTorch checkpoint first with python -m evafusion_jax.convert.<name>.")
    if not meta_file.is_file() or not (path / "params").is_dir():
        raise CheckpointError(f"{path} is not a complete evafusion_jax checkpoint: it needs "
                              "config.json and params/ (was it written by an interrupted run?)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is not valid JSON: {e}") from e
    if expected_kind is not None and meta.get("kind") != expected_kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, "
                              f"but a {expected_kind!r} checkpoint is needed here")
    return meta


def load_params(path: str | os.PathLike, expected_kind: str | None = None,
                sharding: Any = None) -> tuple[Any, dict]:
    """Restores ``(params, config_dict)`` from a folder written by :func:`save_params`.

    Arrays come back as host NumPy arrays unless ``sharding`` (a
    ``jax.sharding.Sharding`` applied to every leaf) is given. Without ``sharding``
    each process reads on its own (no synchronisation between processes).
    """
    import orbax.checkpoint as ocp

    meta = read_config(path, expected_kind)
    ckptr = ocp.StandardCheckpointer() if sharding is not None else _process_local_checkpointer()
    params_dir = Path(path).absolute() / "params"
    metadata = ckptr.metadata(params_dir)
    tree_meta = getattr(metadata, "item_metadata", metadata)
    tree_meta = getattr(tree_meta, "tree", tree_meta)

    def target(m):
        if sharding is not None:
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)
        return np.zeros(tuple(m.shape), m.dtype)

    abstract = jax.tree_util.tree_map(target, tree_meta)
    params = ckptr.restore(params_dir, abstract)
    if sharding is None:
        params = _to_numpy_tree(params)
    return params, meta["config"]
