"""A content hash of a pytree of arrays (:func:`tree_fingerprint`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np


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
