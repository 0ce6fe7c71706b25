"""Tests for evafusion_jax.storage.fingerprint."""

import numpy as np

from evafusion_jax.storage import fingerprint


def test_tree_fingerprint():
    a = {"w": np.ones((2, 2), np.float32)}
    b = {"w": np.ones((2, 2), np.float32)}
    assert fingerprint.tree_fingerprint(a) == fingerprint.tree_fingerprint(b)
    b["w"][0, 0] = 2
    assert fingerprint.tree_fingerprint(a) != fingerprint.tree_fingerprint(b)
    assert fingerprint.tree_fingerprint(a) != fingerprint.tree_fingerprint({"w": a["w"].astype(np.float16)})
    assert fingerprint.tree_fingerprint(a, {"k": 1}) != fingerprint.tree_fingerprint(a, {"k": 2})
