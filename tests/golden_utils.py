"""Rebuilds the seeded state dicts of the golden fixtures (rule in tests/golden/README.md)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "golden"


def seeded_tensor(name: str, shape) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    z = rng.standard_normal(shape)
    leaf = name.rsplit(".", 1)[-1]
    if any(t in name for t in ("cls_token", "position_embeddings", "mask_token")):
        v = 0.02 * z
    elif leaf in ("scale", "temperature") or (len(shape) == 1 and leaf == "weight"):
        v = 1 + 0.1 * z
    elif len(shape) <= 1:
        v = 0.02 * z
    else:
        v = 0.5 * z / np.sqrt(np.prod(shape[1:]))
    return v.astype(np.float32)


def load_manifest(which: str) -> dict:
    return json.loads((GOLDEN / which / "manifest.json").read_text())


def load_npz(which: str, name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / which / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def reward_state_dict() -> dict[str, np.ndarray]:
    """The flat seeded state dict of the golden reward model (keys as in the released file)."""
    m = load_manifest("reward")
    return {t["name"]: seeded_tensor(t["name"], t["shape"]) for t in m["tensors"]}


def dcevo_checkpoint() -> dict[str, dict[str, np.ndarray]]:
    """The seeded ``DCEvo_fusion.pth``-style dict: four groups of ``module.``-prefixed keys."""
    m = load_manifest("dcevo")
    out = {}
    for group, entries in m.items():
        out[group] = {}
        for t in entries:
            seed_name = t["name"]
            key = seed_name.split("/", 1)[1]
            out[group][key] = seeded_tensor(seed_name, t["shape"])
    return out


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
