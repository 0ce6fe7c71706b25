"""Compute dtypes and matmul precisions of the model configs, by name.

Configs store them as strings (JSON- and Orbax-friendly); these maps resolve them.
A precision of ``None`` leaves the choice to JAX's default.
"""

from __future__ import annotations

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
