"""Decoding and checking the values of human-feedback records: images, heatmap circles, scores.

Image values may be PIL images, ``datasets.Image`` dicts (``{"bytes", "path"}``), encoded bytes,
file paths or arrays. Every problem is a :class:`FeedbackDataError` that names the record
(``where``). Used by the readers of every layout (``feedback_readers``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from evafusion_jax.models.score_names import (
    DATASET_SCORE_NAMES,
    SCORE_COLUMNS,
    SCORE_MAX,
    SCORE_MIN,
)


class FeedbackDataError(ValueError):
    """A human-feedback dataset is missing, malformed, or inconsistent (the message says where)."""



def open_image(value: Any, where: str) -> Image.Image:
    """Opens an image value (PIL image, datasets.Image dict, bytes, path, array), lazily."""
    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, np.ndarray):
            arr = value
            if arr.dtype != np.uint8:
                raise FeedbackDataError(
                    f"{where}: image array has dtype {arr.dtype}; expected uint8")
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[..., 0]
            return Image.fromarray(arr)
        if isinstance(value, Mapping):
            data = value.get("bytes")
            if data is not None:
                return Image.open(io.BytesIO(data))
            p = value.get("path")
            if p:
                return Image.open(p)
            raise FeedbackDataError(f"{where}: image value has neither bytes nor path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(value)))
        if isinstance(value, (str, os.PathLike)):
            return Image.open(value)
        if value is None:
            raise FeedbackDataError(f"{where}: image is missing (None)")
    except FeedbackDataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise FeedbackDataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from e
    raise FeedbackDataError(f"{where}: unsupported image value of type {type(value).__name__}")


def decode_image(value: Any, where: str, mode: str) -> np.ndarray:
    """Fully decodes an image value and converts it to ``mode`` ("RGB" or "L"); returns uint8."""
    img = open_image(value, where)
    try:
        img.load()
        if img.mode != mode:
            img = img.convert(mode)
        return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise FeedbackDataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from e


def header_size(value: Any, where: str, full: bool) -> tuple[int, int]:
    """(height, width) from the header (``full=False``) or after a full decode."""
    img = open_image(value, where)
    if full:
        try:
            img.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise FeedbackDataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from e
    w, h = img.size
    return h, w


def render_circles(circles: Sequence[Mapping[str, float]], height: int, width: int,
                   value: int = 255) -> np.ndarray:
    """Renders filled discs into a (height, width) uint8 map.

    A pixel (row i, column j) is inside a circle if ``(j - x)**2 + (i - y)**2 <= r**2`` (pixel
    centres at integer coordinates, x = column, y = row, all in pixels of the fused image).
    """
    out = np.zeros((height, width), np.uint8)
    if not circles:
        return out
    yy, xx = np.mgrid[0:height, 0:width]
    for c in circles:
        x, y, r = float(c["x"]), float(c["y"]), float(c["r"])
        out[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = value
    return out


def check_scores(raw: Any, where: str) -> np.ndarray:
    """Validates one score dict and returns float32 (5,) raw scores in SCORE_TYPES order."""
    if not isinstance(raw, Mapping):
        raise FeedbackDataError(
            f"{where}: 'scores' must be a dict with keys {list(DATASET_SCORE_NAMES)}, got "
            f"{type(raw).__name__}")
    out = np.zeros(len(DATASET_SCORE_NAMES), np.float32)
    for k, (name, alt) in enumerate(SCORE_COLUMNS.items()):
        v = raw.get(name, raw.get(alt))
        if v is None:
            raise FeedbackDataError(
                f"{where}: score '{name}' is missing; every sample needs the five scores "
                f"{list(DATASET_SCORE_NAMES)} in [1, 5]")
        if isinstance(v, (bool, np.bool_, str, bytes)):  # "4" or true are not ratings
            raise FeedbackDataError(
                f"{where}: score '{name}' = {v!r} is a {type(v).__name__}, not a number; write "
                "the rating as a JSON number (e.g. 4)")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise FeedbackDataError(f"{where}: score '{name}' = {v!r} is not a number") from None
        if not math.isfinite(f) or f < SCORE_MIN or f > SCORE_MAX:
            raise FeedbackDataError(
                f"{where}: score '{name}' = {v!r} is outside [1, 5] (scores are the 1-5 ratings, "
                "not rescaled values)")
        out[k] = f
    return out

