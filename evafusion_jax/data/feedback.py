"""Human-feedback datasets for reward-model training: preprocessing and loaders.

The datasets themselves (three layouts, validation, ``open_split``) are read by
``feedback_readers``; the values of a record (images, circles, scores) are decoded by
``feedback_decode``. Their public names are re-exported here, so ``feedback.open_split`` and
``feedback.FeedbackDataError`` stay the one entry point for users.

Preprocessing (``preprocess_example``) follows the released training script: images to RGB, bilinear
resize (PIL) to the ViT input size, /255, normalise with the ViT mean/std (0.5, i.e. to [-1, 1]);
the heatmap as an 8-bit grayscale image resized the same way and divided by 255; scores / 5.
``make_loader`` builds a deterministic, shardable grain ``DataLoader`` whose iterator state can be
saved and restored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from evafusion_jax.data.feedback_decode import FeedbackDataError, render_circles  # noqa: F401
from evafusion_jax.data.feedback_readers import (  # noqa: F401 - the public API
    FOLDER_LAYOUT_DOC,
    IMAGE_COLUMNS,
    REQUIRED_COLUMNS,
    SPLITS,
    VALIDATE_LEVELS,
    FeedbackSource,
    detect_layout,
    open_split,
)
from evafusion_jax.models.score_names import (  # noqa: F401 - re-exported
    DATASET_SCORE_NAMES,
    HEATMAP_TYPES,
    SCORE_COLUMNS,
    SCORE_MAX,
    SCORE_MIN,
    SCORE_TYPES,
)

# --------------------------------------------------------------------------------------------
# Preprocessing and loaders
# --------------------------------------------------------------------------------------------

def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(arr)
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def preprocess_example(record: Mapping[str, Any], image_size: int = 384,
                       mean: Sequence[float] = (0.5, 0.5, 0.5),
                       std: Sequence[float] = (0.5, 0.5, 0.5)) -> dict[str, np.ndarray]:
    """Turns a raw record into model inputs as the released training script does.

    Returns ``{"ir", "vi", "fused": float32 (S, S, 3) normalised ((x/255 - mean) / std),
    "heatmap": float32 (S, S) in [0, 1], "scores": float32 (5,) = ratings / 5,
    "heatmap_empty": bool (the resized heatmap is all zero), "index": int32}``.
    Images are resized with PIL's bilinear filter on 8-bit data (as ``ViTImageProcessor`` and
    ``torchvision.transforms.Resize`` do for PIL images).
    """
    m = np.asarray(mean, np.float32).reshape(1, 1, -1)
    s = np.asarray(std, np.float32).reshape(1, 1, -1)
    out: dict[str, np.ndarray] = {}
    for k in ("ir", "vi", "fused"):
        a = np.asarray(record[k])
        if a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 1):
            a = np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
        x = _resize(np.ascontiguousarray(a, np.uint8), image_size)
        out[k] = ((x - m) / s).astype(np.float32)
    heat = _resize(np.asarray(record["heatmap"], np.uint8), image_size)
    out["heatmap"] = heat
    out["scores"] = (np.asarray(record["scores"], np.float32) / SCORE_MAX).astype(np.float32)
    out["heatmap_empty"] = np.bool_(not np.any(heat > 0))
    out["index"] = np.int32(record.get("index", -1))
    return out


class _Preprocess(grain.transforms.Map):
    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size = int(image_size)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)

    def map(self, record):
        return preprocess_example(record, self.image_size, self.mean, self.std)


class _CallableMap(grain.transforms.Map):
    def __init__(self, fn: Callable[[dict], Any]):
        self.fn = fn

    def map(self, record):
        return self.fn(record)


def make_loader(source: Any, batch_size: int, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = 1, shard_index: int | None = None,
                shard_count: int | None = None, image_size: int = 384,
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                drop_remainder: bool = True, *, worker_count: int = 0,
                map_fn: Callable[[dict], Any] | None = None, read_threads: int = 4,
                prefetch: int = 16) -> grain.DataLoader:
    """A deterministic, sharded, checkpointable grain ``DataLoader`` over a ``FeedbackSource``.

    Batches are dicts of stacked arrays as ``preprocess_example`` returns them (or whatever
    ``map_fn(record)`` returns when given). ``iter(loader)`` gives an iterator with
    ``get_state()`` (bytes) / ``set_state(state)``; restoring a state resumes with exactly the
    batches that would have followed.

    Batches are cut from the stream of all epochs: with ``drop_remainder`` only the very end is
    dropped, so when the per-shard record count is not a multiple of ``batch_size`` a batch can
    hold the end of one epoch and the start of the next (``num_epochs=1`` loaders, one per epoch,
    avoid that). The order depends on ``seed``, the sharding and ``worker_count`` (workers
    interleave their batches); restore a state into a loader built with the same arguments.
    With ``worker_count > 0``, ``map_fn`` must be picklable (a module-level function).

    Args:
      source: a ``FeedbackSource`` (any grain RandomAccessDataSource of raw records works).
      batch_size: per-host batch size.
      seed: shuffle seed (the order depends only on seed, epoch and sharding).
      shuffle: shuffle records (reshuffled every epoch).
      num_epochs: passes over the data; None = repeat forever.
      shard_index, shard_count: this host's shard; both None = ``grain.sharding.ShardByJaxProcess``
        (jax.process_index() of jax.process_count()).
      image_size, mean, std: preprocessing (``preprocess_example``).
      drop_remainder: drop the last incomplete batch, and make shards equally long.
      worker_count: grain worker processes (0 = read in this process; the default).
      map_fn: replaces ``preprocess_example`` (e.g. to load cached features).
      read_threads, prefetch: grain ``ReadOptions`` (threads reading records, buffered records).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither")
    if shard_index is None:
        shard = grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    else:
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        shard = grain.sharding.ShardOptions(shard_index=int(shard_index),
                                            shard_count=int(shard_count),
                                            drop_remainder=drop_remainder)
    n = len(source)
    if n == 0:
        raise FeedbackDataError(f"{source!r}: empty dataset")
    per_shard = n // shard.shard_count
    if drop_remainder and per_shard < batch_size:
        raise FeedbackDataError(
            f"{source!r}: {n} records over {shard.shard_count} shard(s) give {per_shard} per "
            "shard, "
            f"fewer than batch_size={batch_size}; with drop_remainder no batch would be produced")
    if worker_count:
        # grain's worker processes read absl flags; outside an absl app they are unparsed.
        from absl import flags  # noqa: PLC0415
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    sampler = grain.samplers.IndexSampler(
        num_records=n, shard_options=shard, shuffle=shuffle, num_epochs=num_epochs,
        seed=int(seed) if shuffle else None)
    op = _CallableMap(map_fn) if map_fn is not None else _Preprocess(image_size, mean, std)
    return grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[op, grain.transforms.Batch(batch_size=batch_size,
                                               drop_remainder=drop_remainder)],
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))

