"""Nested parameter trees (dicts of arrays): flattening and shape checks, pure NumPy.

Used by the models (a backbone given to ``reward_model.init_params``) and by the checkpoint
converters (``convert/``), which pass their own error class.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class ParamTreeError(ValueError):
    """Two parameter trees differ in keys or leaf shapes."""


def flatten_tree(tree: Mapping, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for a nested mapping (keys joined with ``sep``)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, name, sep))
        else:
            out[name] = v
    return out


def check_tree_shapes(expected: Mapping, got: Mapping, what: str,
                      error: type[Exception] = ParamTreeError) -> None:
    """Raises ``error`` when two parameter trees differ in keys or leaf shapes."""
    fe, fg = flatten_tree(expected), flatten_tree(got)
    missing = sorted(set(fe) - set(fg))
    extra = sorted(set(fg) - set(fe))
    if missing or extra:
        raise error(f"{what}: parameter tree mismatch; missing {missing[:5]}, "
                    f"unexpected {extra[:5]}")
    for k in fe:
        if tuple(np.shape(fe[k])) != tuple(np.shape(fg[k])):
            raise error(f"{what}: parameter {k} has shape {np.shape(fg[k])}, "
                        f"model expects {np.shape(fe[k])}")
