"""Compute dtypes and matmul precisions of the model configs, by name, and the configs' field checks.

Configs store them as strings (JSON- and Orbax-friendly); these maps resolve them.
A precision of ``None`` leaves the choice to JAX's default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRECISIONS = {None: None, "default": jax.lax.Precision.DEFAULT,
              "high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}


def check(owner: str, dtype: str, precision: str | None) -> None:
    """Raises ValueError naming ``owner``'s field when ``dtype`` or ``precision`` is unknown."""
    if dtype not in DTYPES:
        raise ValueError(f"{owner}.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if precision not in PRECISIONS:
        names = [p for p in PRECISIONS if p is not None]
        raise ValueError(f"{owner}.precision must be one of {names} or None, got {precision!r}")


def known_fields(cls: type, d: Mapping, what: str) -> dict:
    """``dict(d)`` after checking that every key is a field of the dataclass ``cls`` (the one
    ``from_dict`` check of every config); else ValueError ``"{what}(s) [...]; known: [...]"``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{what}(s) {unknown}; known: {sorted(names)}")
    return dict(d)


class ComputeSettings:
    """Mixin of the model configs with ``dtype`` and ``precision`` name fields: the resolved values."""

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def lax_precision(self):
        return PRECISIONS[self.precision]
