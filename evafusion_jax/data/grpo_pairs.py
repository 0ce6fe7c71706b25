"""The GRPO training-pair pipeline: IR/visible crops with their region masks (grain).

Data folder layout: ``DATA/ir/<name>`` and ``DATA/vi/<name>`` with the same file
names (PNG, JPEG, BMP, TIFF: anything Pillow reads). Images are read with
``evafusion_jax.data.image_io`` as grayscale float32 in [0, 1]: 8-bit images are
divided by 255, 16-bit ones by 65535, and colour images are converted to their
BT.601 luma ``Y = 0.299 R + 0.587 G + 0.114 B``.

Each record gives one random ``crop_size`` x ``crop_size`` window of a pair and
the K region masks cropped with the same window. Region sources:

* ``"sam"`` (alias ``"cache"``): a region cache from ``precompute_regions``
  (any precomputed source), read without torch; masks are full-image masks
  cropped to the window;
* ``"random_crops"``, ``"grid"``, ``"superpixels"``: computed on the fly on
  the cropped window (so they always lie inside it), deterministic from the
  seed; superpixels segment ``superpixel_image`` (``"mean"`` of IR and visible
  by default, or ``"ir"`` / ``"vi"``).

A slot is valid in a crop when the source marked it valid and at least
``min_region_pixels`` of its pixels lie inside the window; invalid slots have
all-zero masks. A crop with fewer than ``min_valid_regions`` valid slots is
rejected and another window is drawn, up to ``max_crop_tries`` windows; a
sample without an acceptable window is skipped (filtered out of the epoch).

Images smaller than the crop are an error naming the file unless
``pad_small=True``: then the pair is padded at the bottom/right to the crop
size by symmetric (mirror) reflection and the masks by zeros (padding belongs
to no region).

Batches: ``{"ir": (B, c, c, 1) float32, "vi": (B, c, c, 1) float32,
"masks": (B, K, c, c) float32 in {0, 1}, "valid": (B, K) bool}``; ``B`` is the
per-host batch size. Sharding splits the records across hosts
(``shard_index`` / ``shard_count``, by default this JAX process of all of
them); because rejected samples are filtered, hosts may see different numbers
of batches per epoch, so multi-host runs should use ``num_epochs=None`` and
stop after a number of steps.

The loader is a ``grain.python.DataLoader``: ``iter(loader)`` gives an
iterator with ``get_state()`` / ``set_state(state)`` (bytes) for checkpoints.
Each sample's crop and on-the-fly regions depend only on the seed and the
record, so the stream is reproducible; with ``worker_count > 0`` grain groups
samples into batches per worker, so the batches (and a saved iterator state)
depend on ``worker_count`` too: resume with the same value. Grain worker
processes need absl flags to be parsed (run under ``absl.app.run``, or call
``absl.flags.FLAGS.mark_as_parsed()``) and a ``__main__`` guard.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain.python as grain
import numpy as np

from evafusion_jax.data import image_io
from evafusion_jax.data import regions as regions_lib

log = logging.getLogger(__name__)

SAM_SOURCES = ("sam", "cache")
REGION_SOURCES = SAM_SOURCES + regions_lib.ON_THE_FLY_SOURCES


class PairDataError(ValueError):
    """The IR/visible folder or one of its images is unusable (names the file)."""


# --------------------------------------------------------------------------
# images


def _on_image(fn, path: Path):
    """``fn(path)``, with a missing or unreadable file as a :class:`PairDataError` naming it."""
    try:
        return fn(path)
    except FileNotFoundError:
        raise PairDataError(f"image {path} does not exist") from None
    except Exception as e:
        raise PairDataError(f"cannot read image {path}: {e}") from e


def _read(path: Path) -> np.ndarray:
    return _on_image(image_io.read_image, path)


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as ``(H, W)`` float32 in [0, 1] (colour -> BT.601 luma)."""
    return image_io.to_gray(_read(Path(path)))[..., 0]


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as ``(H, W, 3)`` float32 in [0, 1] (grayscale repeated)."""
    img = _read(Path(path))
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` from the file header (no full decode)."""
    return _on_image(image_io.image_size, Path(path))


def list_pairs(data_dir: str | os.PathLike) -> list[str]:
    """Sorted file names present in both ``DATA/ir`` and ``DATA/vi``.

    Pairs follow ``image_io.match_folders`` by whole file name (``key="name"``): one name
    names both images of a pair, and region caches are keyed by it. Raises
    :class:`PairDataError` when a folder is missing, empty, or when a file has no partner
    (all unpaired names are listed).
    """
    data_dir = Path(data_dir)
    for sub in ("ir", "vi"):
        if not (data_dir / sub).is_dir():
            raise PairDataError(f"{data_dir / sub} is not a folder; the data folder needs "
                                "ir/ and vi/ sub-folders with the same file names")
    m = image_io.match_folders({"ir": data_dir / "ir", "vi": data_dir / "vi"}, key="name")
    only_ir, only_vi = m.missing["vi"], m.missing["ir"]
    if only_ir or only_vi:
        parts = []
        if only_ir:
            parts.append(f"in ir/ without a vi/ partner: {', '.join(only_ir[:20])}"
                         + (" ..." if len(only_ir) > 20 else ""))
        if only_vi:
            parts.append(f"in vi/ without an ir/ partner: {', '.join(only_vi[:20])}"
                         + (" ..." if len(only_vi) > 20 else ""))
        raise PairDataError(f"unpaired images in {data_dir}: " + "; ".join(parts))
    if not m.pairs:
        raise PairDataError(f"no images found in {data_dir / 'ir'} (suffixes {image_io.IMAGE_EXTENSIONS})")
    return [name for name, _ in m.pairs]


class PairDataSource(grain.RandomAccessDataSource):
    """Random access to IR/visible pairs: record i = ``{"name", "ir", "vi"}``.

    ``ir`` and ``vi`` are ``(H, W)`` float32 in [0, 1]. The constructor checks
    that every pair exists and that both images of a pair have the same size
    (from the file headers).
    """

    def __init__(self, data_dir: str | os.PathLike, names: Sequence[str] | None = None):
        self.data_dir = Path(data_dir)
        self.names = list(names) if names is not None else list_pairs(self.data_dir)
        self.sizes: dict[str, tuple[int, int]] = {}
        mismatched = []
        for name in self.names:
            s_ir = image_size(self.data_dir / "ir" / name)
            s_vi = image_size(self.data_dir / "vi" / name)
            if s_ir != s_vi:
                mismatched.append(f"{name} (ir {s_ir[0]}x{s_ir[1]}, vi {s_vi[0]}x{s_vi[1]})")
            self.sizes[name] = s_ir
        if mismatched:
            raise PairDataError(f"IR and visible sizes differ in {self.data_dir} for: "
                                + ", ".join(mismatched[:20])
                                + (" ..." if len(mismatched) > 20 else ""))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        ir = read_gray(self.data_dir / "ir" / name)
        vi = read_gray(self.data_dir / "vi" / name)
        if ir.shape != vi.shape:
            raise PairDataError(f"IR and visible sizes differ for {name} in {self.data_dir}: "
                                f"{ir.shape} vs {vi.shape}")
        return {"name": name, "ir": ir, "vi": vi}

    def __repr__(self) -> str:
        return f"PairDataSource({str(self.data_dir)!r}, {len(self)} pairs)"


# --------------------------------------------------------------------------
# transforms


def _pad_to(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    h, w = x.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if not ph and not pw:
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    if mode == "zeros":
        return np.pad(x, pad)
    return np.pad(x, pad, mode="symmetric")


class CropWithRegions(grain.RandomMapTransform):
    """Random crop of a pair with its K region masks (see the module docstring)."""

    def __init__(self, crop_size: int, num_regions: int, region_source: str,
                 cache_dir: str | os.PathLike | None = None,
                 region_params: Mapping[str, Any] | None = None,
                 superpixel_image: str = "mean", pad_small: bool = False,
                 max_crop_tries: int = 10, min_region_pixels: int = 1,
                 min_valid_regions: int = 1, data_dir: str | os.PathLike | None = None):
        if region_source not in REGION_SOURCES:
            raise ValueError(f"region_source must be one of {REGION_SOURCES}, got {region_source!r}")
        if superpixel_image not in ("mean", "ir", "vi"):
            raise ValueError(f"superpixel_image must be 'mean', 'ir' or 'vi', got {superpixel_image!r}")
        if crop_size < 1 or num_regions < 1 or max_crop_tries < 1:
            raise ValueError("crop_size, num_regions and max_crop_tries must be >= 1")
        self.crop_size = int(crop_size)
        self.num_regions = int(num_regions)
        self.region_source = region_source
        self.region_params = dict(region_params or {})
        self.superpixel_image = superpixel_image
        self.pad_small = bool(pad_small)
        self.max_crop_tries = int(max_crop_tries)
        self.min_region_pixels = int(min_region_pixels)
        self.min_valid_regions = int(min_valid_regions)
        self.data_dir = data_dir
        self.cache = None
        if region_source in SAM_SOURCES:
            if cache_dir is None:
                raise ValueError(f"region_source {region_source!r} needs cache_dir "
                                 "(a folder written by precompute_regions)")
            self.cache = regions_lib.RegionCache(cache_dir)
            if self.cache.num_regions != self.num_regions:
                raise regions_lib.RegionError(
                    f"region cache {cache_dir} holds K={self.cache.num_regions} regions per "
                    f"image but num_regions={self.num_regions} was requested")

    def _where(self, name: str) -> str:
        return f"{name} in {self.data_dir}" if self.data_dir is not None else name

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        name, ir, vi = element["name"], element["ir"], element["vi"]
        c, k = self.crop_size, self.num_regions
        h, w = ir.shape
        full_masks = full_valid = stored = None
        if self.cache is not None:
            stored = self.cache.read(name)
            if tuple(int(v) for v in stored["shape"][1:]) != (h, w):
                raise regions_lib.RegionError(
                    f"region cache masks of {self._where(name)} are "
                    f"{int(stored['shape'][1])}x{int(stored['shape'][2])}, the image is {h}x{w}; "
                    "recompute the cache with --overwrite")
        if h < c or w < c:
            if not self.pad_small:
                raise PairDataError(
                    f"image pair {self._where(name)} is {h}x{w}, smaller than the crop size "
                    f"{c}; use a smaller crop_size or pad_small=True")
            if self.cache is not None:
                full_masks = regions_lib.unpack_masks(stored["packed"], w)
                full_masks = _pad_to(full_masks, c, "zeros")
                full_valid = np.asarray(stored["valid"], bool)
            ir, vi = _pad_to(ir, c, "symmetric"), _pad_to(vi, c, "symmetric")
            h, w = ir.shape
        for _ in range(self.max_crop_tries):
            top = int(rng.integers(0, h - c + 1))
            left = int(rng.integers(0, w - c + 1))
            ir_c = ir[top:top + c, left:left + c]
            vi_c = vi[top:top + c, left:left + c]
            if self.cache is not None:
                if full_masks is not None:
                    masks = full_masks[:, top:top + c, left:left + c]
                    valid = full_valid
                else:
                    masks, valid = self.cache.window(stored, top, left, c, c)
            else:
                sp = {"mean": 0.5 * (ir_c + vi_c), "ir": ir_c, "vi": vi_c}[self.superpixel_image]
                masks, valid = regions_lib.compute_regions(
                    self.region_source, sp, c, c, k, rng=rng, params=self.region_params)
            counts = masks.reshape(k, -1).sum(-1)
            valid = np.asarray(valid, bool) & (counts >= self.min_region_pixels)
            if valid.sum() >= self.min_valid_regions:
                masks = masks.astype(np.float32) * valid[:, None, None]
                return {"ir": np.ascontiguousarray(ir_c[..., None], dtype=np.float32),
                        "vi": np.ascontiguousarray(vi_c[..., None], dtype=np.float32),
                        "masks": masks, "valid": valid, "_keep": True}
        log.debug("skipping %s: no crop with %d valid regions in %d tries",
                  name, self.min_valid_regions, self.max_crop_tries)
        return {"_keep": False}


class _KeepAccepted(grain.FilterTransform):
    def filter(self, element: dict) -> bool:
        return bool(element["_keep"])


class _DropKeepFlag(grain.MapTransform):
    def map(self, element: dict) -> dict:
        return {key: element[key] for key in ("ir", "vi", "masks", "valid")}


# --------------------------------------------------------------------------
# loader


def make_loader(data_dir: str | os.PathLike, *, batch_size: int = 2, seed: int = 0,
                crop_size: int = 128, num_regions: int = 8, region_source: str = "sam",
                cache_dir: str | os.PathLike | None = None,
                region_params: Mapping[str, Any] | None = None,
                superpixel_image: str = "mean", shuffle: bool = True,
                num_epochs: int | None = None, shard_index: int | None = None,
                shard_count: int | None = None, drop_remainder: bool = True,
                pad_small: bool = False, max_crop_tries: int = 10,
                min_region_pixels: int = 1, min_valid_regions: int = 1,
                worker_count: int = 0, read_threads: int = 2,
                prefetch: int = 16) -> grain.DataLoader:
    """A grain DataLoader of GRPO training batches (see the module docstring).

    Args:
      data_dir: folder with ``ir/`` and ``vi/``.
      batch_size: per-host batch size.
      seed: seed of the shuffle and of the crop / region randomness.
      crop_size: side ``c`` of the square crops.
      num_regions: K slots per sample.
      region_source: ``"sam"``/``"cache"`` (needs ``cache_dir``), ``"random_crops"``,
        ``"grid"`` or ``"superpixels"``.
      cache_dir: region cache folder for ``"sam"``; it must hold every image, computed from
        the same file contents (checked by SHA-256, ``RegionCache.check_contents``).
      region_params: keyword arguments of the on-the-fly source
        (``random_crop_regions``: min_frac, max_frac; ``superpixel_regions``:
        method, n_segments, compactness, felzenszwalb_scale).
      superpixel_image: ``"mean"``, ``"ir"`` or ``"vi"``.
      shuffle, num_epochs: record order; ``num_epochs=None`` repeats forever.
      shard_index, shard_count: this host's shard (default: JAX process index/count).
      drop_remainder: drop a last incomplete batch.
      pad_small: pad images smaller than the crop instead of raising.
      max_crop_tries, min_region_pixels, min_valid_regions: empty-crop rejection.
      worker_count: grain worker processes (0 = in this process).
      read_threads, prefetch: grain ``ReadOptions`` (threads reading records and
        how many decoded full-size pairs they may read ahead; grain's own
        default of 500 would hold hundreds of full images in memory).
    """
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    source = PairDataSource(data_dir)
    crop = CropWithRegions(crop_size, num_regions, region_source, cache_dir=cache_dir,
                           region_params=region_params, superpixel_image=superpixel_image,
                           pad_small=pad_small, max_crop_tries=max_crop_tries,
                           min_region_pixels=min_region_pixels,
                           min_valid_regions=min_valid_regions, data_dir=data_dir)
    if crop.cache is not None:
        crop.cache.check_covers(source.names, source.sizes)
        crop.cache.check_contents(data_dir, source.names)
        if all(crop.cache.images[n].get("num_valid", 1) == 0 for n in source.names):
            # Every sample would be skipped: an infinite loader would spin forever.
            raise regions_lib.RegionError(
                f"region cache {cache_dir} has no valid region for any image of {data_dir}; "
                "recompute it (e.g. lower the SAM thresholds) or use another region source")
    if not pad_small:
        small = [f"{n} ({h}x{w})" for n, (h, w) in source.sizes.items()
                 if h < crop_size or w < crop_size]
        if small:
            raise PairDataError(
                f"{len(small)} image pair(s) in {data_dir} are smaller than the crop size "
                f"{crop_size}: {', '.join(small[:20])}; use a smaller crop_size or pad_small=True")
    shard = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                               drop_remainder=True)
    if len(source) // shard_count == 0:
        raise PairDataError(f"{len(source)} pairs in {data_dir} cannot be split over "
                            f"{shard_count} hosts")
    sampler = grain.IndexSampler(num_records=len(source), shard_options=shard,
                                 shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    ops = [crop, _KeepAccepted(), _DropKeepFlag(),
           grain.Batch(batch_size=batch_size, drop_remainder=drop_remainder)]
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                            worker_count=worker_count, read_options=read)


def default_config():
    """Data fields for a training config (``ml_collections.ConfigDict``): ``data_dir`` and the
    keyword arguments of :func:`make_loader` with their defaults (stated once, there), except the
    sharding, which comes from the JAX processes."""
    import inspect

    import ml_collections

    cfg = ml_collections.ConfigDict()
    cfg.data_dir = ""
    for name, p in inspect.signature(make_loader).parameters.items():
        if p.default is inspect.Parameter.empty or name in ("shard_index", "shard_count"):
            continue
        if name == "cache_dir":
            cfg.cache_dir = ""                                        # "" = none
        elif name == "region_params":
            cfg.region_params = ml_collections.ConfigDict()           # the source's defaults
        elif name == "num_epochs":
            cfg.num_epochs = ml_collections.config_dict.placeholder(int)  # None = repeat
        else:
            cfg[name] = p.default
    return cfg


def make_loader_from_config(cfg, shard_index: int | None = None,
                            shard_count: int | None = None) -> grain.DataLoader:
    """:func:`make_loader` with the fields of :func:`default_config`."""
    if not cfg.data_dir:
        raise ValueError("config field data_dir is empty: set it to a folder with ir/ and vi/")
    return make_loader(
        cfg.data_dir, batch_size=cfg.batch_size, seed=cfg.seed, crop_size=cfg.crop_size,
        num_regions=cfg.num_regions, region_source=cfg.region_source,
        cache_dir=cfg.cache_dir or None, region_params=dict(cfg.region_params),
        superpixel_image=cfg.superpixel_image, shuffle=cfg.shuffle,
        num_epochs=cfg.num_epochs, shard_index=shard_index, shard_count=shard_count,
        drop_remainder=cfg.drop_remainder, pad_small=cfg.pad_small,
        max_crop_tries=cfg.max_crop_tries, min_region_pixels=cfg.min_region_pixels,
        min_valid_regions=cfg.min_valid_regions, worker_count=cfg.worker_count,
        read_threads=cfg.read_threads, prefetch=cfg.prefetch)
