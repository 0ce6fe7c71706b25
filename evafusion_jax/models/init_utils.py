"""Fast, compile-free random initialisation of parameter trees.

Flax's ``Module.init`` runs (and, under ``jit``, compiles) the whole forward
pass; for the larger networks that costs far more than drawing the numbers.
Instead, the shapes come from ``jax.eval_shape`` (tracing only) and each leaf is
drawn with NumPy from a generator seeded by (key data, crc32(leaf path)), so a
leaf's value does not depend on which other leaves exist.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def seed_words(rng: Any) -> list[int]:
    """A JAX PRNG key (new- or old-style) or an int seed -> a list of uint32 seed words."""
    if isinstance(rng, (int, np.integer)):
        return [int(rng) & 0xFFFFFFFF]
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    return [int(v) for v in np.asarray(data, np.uint32).ravel()]


def init_tree(shapes: Mapping, rng: Any,
              leaf_init: Callable[[np.random.Generator, str, tuple[int, ...]], np.ndarray]) -> dict:
    """Builds a parameter tree of float32 arrays with the structure of ``shapes``.

    ``leaf_init(generator, path, shape)`` draws one leaf; ``path`` is the
    slash-joined key path (``"vit/encoder/layer_0/attention/query/kernel"``).
    """
    seed = seed_words(rng)

    def build(tree, prefix):
        out = {}
        for k, v in tree.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                out[k] = build(v, path)
            else:
                gen = np.random.default_rng(seed + [zlib.crc32(path.encode())])
                out[k] = jnp.asarray(np.asarray(leaf_init(gen, path, tuple(v.shape)), np.float32))
        return out

    return build(shapes, "")


def truncated_normal(gen: np.random.Generator, shape, std: float) -> np.ndarray:
    """Normal(0, std) truncated to two standard deviations (redrawn, not clipped)."""
    x = gen.standard_normal(shape)
    bad = np.abs(x) > 2
    while bad.any():
        x[bad] = gen.standard_normal(int(bad.sum()))
        bad = np.abs(x) > 2
    return std * x
