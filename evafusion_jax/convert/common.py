"""Shared pieces of the checkpoint converters: reading state dicts and checking keys.

Converters map a flat PyTorch state dict (``{"a.b.weight": array}``) onto our
nested Flax parameter tree. A conversion is strict: every key that the forward
pass needs must be present with the expected shape, keys that the forward pass
never uses are skipped *and listed*, and anything else is an error naming the
key. Nothing is downloaded; only local files are read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np


class ConversionError(ValueError):
    """The source checkpoint does not match the model it is converted into."""


def _torch_to_numpy(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").float().numpy() if obj.is_floating_point() else obj.detach().cpu().numpy()
    if isinstance(obj, Mapping):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    return obj


def load_torch_file(path: str | os.PathLike) -> Any:
    """Loads a ``torch.save`` file on the CPU and converts every tensor to NumPy."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConversionError("reading a PyTorch checkpoint needs torch: "
                              "pip install 'evafusion_jax[torch]'") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint "
                              f"(torch.load failed: {type(e).__name__}: {e})") from e
    return _torch_to_numpy(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a flat state dict from ``.safetensors`` (no torch needed) or a torch file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ConversionError(f"{path}: no such file")
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:
            raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e
    obj = load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    # A checkpoint saved as {"state_dict": ...} or {"model": ...} is common.
    for wrapper in ("state_dict", "model"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping) and len(obj) == 1:
            obj = obj[wrapper]
    return dict(obj)


class KeyReader:
    """Hands out state-dict tensors by key and remembers which were used.

    ``take(key, shape)`` returns the array, raising :class:`ConversionError`
    when the key is missing or its shape differs. ``finish()`` then checks
    that every remaining key matches one of the ``skippable`` predicates
    (keys the forward pass never uses) and returns their sorted list;
    any other leftover key is an error.
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], source: str = "checkpoint",
                 prefix: str = ""):
        self.state_dict = state_dict
        self.source = source
        self.prefix = prefix
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return self.prefix + key in self.state_dict

    def take(self, key: str, shape: Iterable[int] | None = None) -> np.ndarray:
        full = self.prefix + key
        if full not in self.state_dict:
            raise ConversionError(f"{self.source}: missing key {full!r}")
        value = np.asarray(self.state_dict[full])
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ConversionError(f"{self.source}: key {full!r} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(shape)}")
        self.used.add(full)
        return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value

    def finish(self, skippable: Callable[[str], bool] = lambda k: False) -> list[str]:
        leftover = sorted(set(self.state_dict) - self.used)
        skipped = [k for k in leftover if skippable(k)]
        unknown = [k for k in leftover if not skippable(k)]
        if unknown:
            shown = ", ".join(repr(k) for k in unknown[:10])
            more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
            raise ConversionError(f"{self.source}: unexpected key(s) {shown}{more}; "
                                  "is this the right checkpoint for this model/config?")
        return skipped


# ---- layout helpers: PyTorch -> Flax --------------------------------------------------------

def linear(w: np.ndarray) -> np.ndarray:
    """``nn.Linear`` weight ``(out, in)`` -> Flax ``Dense`` kernel ``(in, out)``."""
    return np.ascontiguousarray(w.T)


def conv(w: np.ndarray) -> np.ndarray:
    """``nn.Conv2d`` weight ``OIHW`` (I = in / groups) -> Flax ``Conv`` kernel ``HWIO``."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv_transpose(w: np.ndarray) -> np.ndarray:
    """``nn.ConvTranspose2d`` weight ``IOHW`` -> HWIO kernel of the equivalent forward
    convolution over the dilated input (spatially flipped, in/out swapped)."""
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))


# ---- layout helpers: Flax -> PyTorch (exports) ---------------------------------------------

def linear_back(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(k).T)


def conv_back(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(k).transpose(3, 2, 0, 1))


def conv_transpose_back(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(k).transpose(2, 3, 0, 1)[:, :, ::-1, ::-1])


def run_cli(action: Callable[[], Any]) -> int:
    """Runs a converter's ``action`` (returns the written path) as a command: 0 on success,
    2 with a one-line error for a bad input (no traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("convert")
    try:
        path = action()
    except (ConversionError, FileExistsError, ValueError) as e:
        log.error("error: %s", e)
        return 2
    log.info("wrote %s", path)
    return 0
