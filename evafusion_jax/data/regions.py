"""Region masks for GRPO: region sources and the on-disk region cache.

Every region source gives the same output for an image of size (H, W):

* ``masks``: ``(K, H, W)`` bool, one binary region per slot;
* ``valid``: ``(K,)`` bool, whether the slot holds a region (a source that finds
  fewer than K regions leaves the remaining slots all-False and invalid).

Sources:

* ``sam`` (offline, see ``evafusion_jax.precompute_regions``): the masks of
  ``segment_anything.SamAutomaticMaskGenerator``; :func:`select_sam_masks` keeps
  the K best by the ranking *largest area first, ties broken by the higher
  ``stability_score``, then the higher ``predicted_iou``, then generator order*.
* ``random_crops``: K random axis-aligned rectangles (the paper's "w/o SAM"
  ablation), :func:`random_crop_regions`.
* ``grid``: a regular tiling into K tiles, :func:`grid_regions`.
* ``superpixels``: the K largest SLIC or Felzenszwalb segments of scikit-image,
  :func:`superpixel_regions`.

The region cache (written by ``precompute_regions``, read by the GRPO input
pipeline without torch) is a folder::

    CACHE/
      index.json            format, K, source and its parameters, the images
      masks/<image name>.npz  one file per image (np.savez_compressed, written atomically):
          packed  uint8 (K, H, ceil(W / 8))  np.packbits(masks, axis=-1)
          valid   bool  (K,)
          shape   int64 (3,) = (K, H, W)
          area    int64 (K,)   pixels of each slot's full-image mask
          score   float32 (K,) stability_score for SAM slots, 0 otherwise

``index.json`` holds ``{"format_version": 1, "num_regions": K, "source":
{...parameters that produced the cache...}, "images": {name: {"file":
"masks/<name>.npz", "height": H, "width": W, "num_valid": n}}, "complete":
bool}``. Each image entry also records ``ir_sha256`` and ``vi_sha256``, the SHA-256 of
the two source files the masks were computed from (the source's own parameters, SAM
checkpoint hash and DCEvo parameter hash, are in ``source``): ``precompute_regions``
recomputes an image whose files changed, and the GRPO pipeline refuses a cache whose
recorded hashes differ from the data folder's files (:meth:`RegionCache.check_contents`).
Masks are packed along the width, so a crop can select its rows
before unpacking (:meth:`RegionCache.load_window`).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from evafusion_jax.storage.fileio import atomic_path

CACHE_FORMAT_VERSION = 1
INDEX_FILE = "index.json"
MASKS_DIR = "masks"
SOURCES = ("sam", "random_crops", "grid", "superpixels")
ON_THE_FLY_SOURCES = ("random_crops", "grid", "superpixels")


class RegionError(ValueError):
    """A region source or region cache got bad input (names the file / field)."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes (streamed)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def pair_hashes(data_dir: str | os.PathLike, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{name: {"ir_sha256", "vi_sha256"}}`` of the pairs ``DATA/ir/<name>``, ``DATA/vi/<name>``
    (hashed in threads)."""
    from concurrent.futures import ThreadPoolExecutor

    data_dir = Path(data_dir)
    jobs = [(n, role, data_dir / role / n) for n in names for role in ("ir", "vi")]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda j: file_sha256(j[2]), jobs))
    out: dict[str, dict[str, str]] = {}
    for (n, role, _), d in zip(jobs, digests):
        out.setdefault(n, {})[f"{role}_sha256"] = d
    return out


# --------------------------------------------------------------------------
# packing


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Packs ``(K, H, W)`` bool masks into ``(K, H, ceil(W/8))`` uint8 (bits along W)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise RegionError(f"masks must have shape (K, H, W), got {masks.shape}")
    return np.packbits(masks.astype(bool), axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_masks`: ``(..., ceil(W/8))`` uint8 -> ``(..., W)`` bool."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != (width + 7) // 8:
        raise RegionError(
            f"packed masks have {packed.shape[-1]} bytes per row, expected "
            f"{(width + 7) // 8} for width {width}")
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


def _empty(k: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((k, height, width), bool), np.zeros((k,), bool)


# --------------------------------------------------------------------------
# region sources


def select_sam_masks(records: Sequence[Mapping[str, Any]], num_regions: int,
                     height: int, width: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keeps the K best masks of ``SamAutomaticMaskGenerator.generate``.

    Ranking: largest ``area`` first; ties by higher ``stability_score``, then by
    higher ``predicted_iou``, then by generator order. Masks with zero area are
    dropped. Returns ``(masks (K,H,W) bool, valid (K,) bool, area (K,) int64,
    score (K,) float32)`` where ``score`` is the stability score.
    """
    masks, valid = _empty(num_regions, height, width)
    area = np.zeros((num_regions,), np.int64)
    score = np.zeros((num_regions,), np.float32)
    cands = []
    for order, rec in enumerate(records):
        seg = np.asarray(rec["segmentation"], dtype=bool)
        if seg.shape != (height, width):
            raise RegionError(
                f"SAM mask {order} has shape {seg.shape}, expected ({height}, {width}); "
                "use output_mode='binary_mask'")
        a = int(seg.sum())
        if a == 0:
            continue
        cands.append((-a, -float(rec.get("stability_score", 0.0)),
                      -float(rec.get("predicted_iou", 0.0)), order, seg))
    cands.sort(key=lambda c: c[:4])
    for slot, (neg_a, neg_s, _, _, seg) in enumerate(cands[:num_regions]):
        masks[slot] = seg
        valid[slot] = True
        area[slot] = -neg_a
        score[slot] = -neg_s
    return masks, valid, area, score


def random_crop_regions(height: int, width: int, num_regions: int,
                        rng: np.random.Generator, min_frac: float = 0.1,
                        max_frac: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """K random rectangles (the "w/o SAM" ablation); all slots valid.

    Each side length is drawn uniformly in ``[min_frac, max_frac]`` of the
    image side (at least one pixel), its position uniformly inside the image.
    """
    if not 0 < min_frac <= max_frac <= 1:
        raise RegionError(f"need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    masks, valid = _empty(num_regions, height, width)
    for k in range(num_regions):
        h = max(1, int(round(rng.uniform(min_frac, max_frac) * height)))
        w = max(1, int(round(rng.uniform(min_frac, max_frac) * width)))
        y = int(rng.integers(0, height - h + 1))
        x = int(rng.integers(0, width - w + 1))
        masks[k, y:y + h, x:x + w] = True
        valid[k] = True
    return masks, valid


def grid_shape(height: int, width: int, num_regions: int) -> tuple[int, int]:
    """The (rows, cols) factorisation of K whose tiles are closest to square."""
    best = None
    for rows in range(1, num_regions + 1):
        if num_regions % rows:
            continue
        cols = num_regions // rows
        if rows > height or cols > width:
            continue
        cost = abs(np.log((height / rows) / (width / cols)))
        if best is None or cost < best[0]:
            best = (cost, rows, cols)
    if best is None:
        raise RegionError(f"cannot tile a {height}x{width} image into {num_regions} tiles")
    return best[1], best[2]


def grid_regions(height: int, width: int, num_regions: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """K regular tiles that partition the image (rows x cols = K, see :func:`grid_shape`).

    Tiles are in row-major order; all slots are valid.
    """
    rows, cols = grid_shape(height, width, num_regions)
    ys = np.linspace(0, height, rows + 1).round().astype(int)
    xs = np.linspace(0, width, cols + 1).round().astype(int)
    masks, valid = _empty(num_regions, height, width)
    for r in range(rows):
        for c in range(cols):
            k = r * cols + c
            masks[k, ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = True
            valid[k] = True
    return masks, valid


def superpixel_regions(image: np.ndarray, num_regions: int, method: str = "slic",
                       n_segments: int = 32, compactness: float = 0.1,
                       felzenszwalb_scale: float = 100.0, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The K largest scikit-image superpixels of a grayscale ``(H, W)`` image in [0, 1].

    ``method`` is ``"slic"`` (``n_segments``, ``compactness``; the compactness
    suits [0, 1] grayscale) or ``"felzenszwalb"`` (``felzenszwalb_scale``).
    Ties in size are broken by label order. Slots beyond the number of
    segments are invalid.
    """
    from skimage import segmentation

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise RegionError(f"superpixel_regions needs a (H, W) grayscale image, got {image.shape}")
    height, width = image.shape
    if method == "slic":
        labels = segmentation.slic(image, n_segments=n_segments, compactness=compactness,
                                   channel_axis=None, start_label=0)
    elif method == "felzenszwalb":
        labels = segmentation.felzenszwalb(image, scale=felzenszwalb_scale, channel_axis=None)
    else:
        raise RegionError(f"superpixel method must be 'slic' or 'felzenszwalb', got {method!r}")
    del seed  # both algorithms are deterministic; kept for a uniform signature
    ids, counts = np.unique(labels, return_counts=True)
    order = np.lexsort((ids, -counts))[:num_regions]
    masks, valid = _empty(num_regions, height, width)
    for slot, j in enumerate(order):
        masks[slot] = labels == ids[j]
        valid[slot] = True
    return masks, valid


def compute_regions(source: str, image: np.ndarray | None, height: int, width: int,
                    num_regions: int, rng: np.random.Generator | None = None,
                    params: Mapping[str, Any] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Dispatches to an on-the-fly source (``random_crops``, ``grid``, ``superpixels``).

    ``image`` (H, W) is needed by ``superpixels`` only; ``rng`` by
    ``random_crops`` only; ``params`` are the source's keyword arguments.
    """
    params = dict(params or {})
    if source == "random_crops":
        if rng is None:
            raise RegionError("random_crops needs an rng")
        return random_crop_regions(height, width, num_regions, rng, **params)
    if source == "grid":
        return grid_regions(height, width, num_regions)
    if source == "superpixels":
        if image is None:
            raise RegionError("superpixels needs the image")
        return superpixel_regions(image, num_regions, **params)
    raise RegionError(f"unknown on-the-fly region source {source!r}; "
                      f"expected one of {ON_THE_FLY_SOURCES} (SAM masks come from a cache)")


def _keyword_defaults(fn, skip: Sequence[str] = ()) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty and n not in skip}


#: The parameters of each on-the-fly source and their defaults: the keyword defaults of its
#: function here (their one home; ``configs/regions.py`` and ``precompute_regions`` read them).
SOURCE_PARAMS: dict[str, dict[str, Any]] = {
    "random_crops": _keyword_defaults(random_crop_regions),
    "grid": {},
    "superpixels": _keyword_defaults(superpixel_regions, skip=("seed",)),
}

#: ``segment_anything.SamAutomaticMaskGenerator`` keyword arguments used for SAM regions (its
#: own defaults; ``configs/regions.py`` and ``precompute_regions`` read them from here).
SAM_GENERATOR_DEFAULTS: dict[str, Any] = {
    "points_per_side": 32, "points_per_batch": 64, "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95, "stability_score_offset": 1.0, "box_nms_thresh": 0.7,
    "crop_n_layers": 0, "crop_nms_thresh": 0.7, "crop_overlap_ratio": 512 / 1500,
    "crop_n_points_downscale_factor": 1, "min_mask_region_area": 0,
}


# --------------------------------------------------------------------------
# region cache


def _atomic_write_bytes(path: Path, write_fn) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_fn(f)


def mask_file_name(image_name: str) -> str:
    """Relative path of an image's mask file inside the cache."""
    if "/" in image_name or "\\" in image_name or image_name.startswith("."):
        raise RegionError(f"image name {image_name!r} must be a plain file name")
    return f"{MASKS_DIR}/{image_name}.npz"


def write_region_file(cache_dir: str | os.PathLike, image_name: str, masks: np.ndarray,
                      valid: np.ndarray, area: np.ndarray | None = None,
                      score: np.ndarray | None = None) -> dict:
    """Writes one image's masks atomically; returns its index entry."""
    masks = np.asarray(masks, bool)
    valid = np.asarray(valid, bool)
    k, h, w = masks.shape
    if valid.shape != (k,):
        raise RegionError(f"valid has shape {valid.shape}, expected ({k},)")
    if area is None:
        area = masks.reshape(k, -1).sum(-1)
    if score is None:
        score = np.zeros((k,), np.float32)
    rel = mask_file_name(image_name)
    arrays = dict(packed=pack_masks(masks), valid=valid, shape=np.array([k, h, w], np.int64),
                  area=np.asarray(area, np.int64), score=np.asarray(score, np.float32))
    _atomic_write_bytes(Path(cache_dir) / rel, lambda f: np.savez_compressed(f, **arrays))
    return {"file": rel, "height": int(h), "width": int(w), "num_valid": int(valid.sum())}


def read_region_file(path: str | os.PathLike) -> dict:
    """Reads a mask file into ``{"packed", "valid", "shape", "area", "score"}``."""
    path = Path(path)
    try:
        with np.load(path) as z:
            out = {name: z[name] for name in ("packed", "valid", "shape", "area", "score")}
    except FileNotFoundError:
        raise RegionError(f"region file {path} does not exist; rerun precompute_regions") from None
    except Exception as e:  # zip/pickle/key errors from a damaged file
        raise RegionError(f"region file {path} is unreadable ({e}); delete it and rerun "
                          "precompute_regions to recompute it") from e
    k, h, w = (int(v) for v in out["shape"])
    if out["packed"].shape != (k, h, (w + 7) // 8) or out["valid"].shape != (k,):
        raise RegionError(f"region file {path} has inconsistent arrays "
                          f"(packed {out['packed'].shape}, shape {(k, h, w)})")
    return out


def read_index(cache_dir: str | os.PathLike) -> dict:
    """Reads and checks ``CACHE/index.json``."""
    path = Path(cache_dir) / INDEX_FILE
    if not path.is_file():
        raise RegionError(f"{path} not found: {cache_dir} is not a region cache; "
                          "create it with `python -m evafusion_jax.precompute_regions`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegionError(f"{path} is not valid JSON ({e})") from e
    if index.get("format_version") != CACHE_FORMAT_VERSION:
        raise RegionError(f"{path} has format_version {index.get('format_version')!r}, "
                          f"this code reads version {CACHE_FORMAT_VERSION}")
    for key in ("num_regions", "source", "images"):
        if key not in index:
            raise RegionError(f"{path} lacks the field {key!r}")
    return index


class RegionCache:
    """Read access to a region cache folder (no torch)."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir)
        self.index = read_index(self.cache_dir)
        self.num_regions = int(self.index["num_regions"])
        self.images: dict[str, dict] = dict(self.index["images"])

    @property
    def source(self) -> dict:
        return self.index["source"]

    def missing(self, names: Iterable[str]) -> list[str]:
        """Names that the cache does not list (or whose file is gone)."""
        return [n for n in names if n not in self.images
                or not (self.cache_dir / self.images[n]["file"]).is_file()]

    def check_covers(self, names: Iterable[str], sizes: Mapping[str, tuple[int, int]] | None = None
                     ) -> None:
        """Raises a :class:`RegionError` listing images the cache lacks or has at another size."""
        names = list(names)
        missing = self.missing(names)
        if missing:
            shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise RegionError(
                f"region cache {self.cache_dir} has no masks for {len(missing)} of {len(names)} "
                f"images: {shown}; run precompute_regions on this data folder (it resumes)")
        if sizes:
            bad = [f"{n} (image {sizes[n][0]}x{sizes[n][1]}, cache "
                   f"{self.images[n]['height']}x{self.images[n]['width']})"
                   for n in names if n in sizes
                   and (self.images[n]["height"], self.images[n]["width"]) != tuple(sizes[n])]
            if bad:
                raise RegionError(f"region cache {self.cache_dir} has masks of another size "
                                  f"for: {', '.join(bad[:20])}; recompute with --overwrite")

    def check_contents(self, data_dir: str | os.PathLike, names: Iterable[str]) -> None:
        """Raises a :class:`RegionError` naming the images whose files differ from the ones
        the cache's masks were computed from (recorded SHA-256). Entries without hashes
        (caches of older versions) cannot be checked: a warning says so."""
        import logging

        names = list(names)
        unchecked = [n for n in names if "ir_sha256" not in self.images.get(n, {})]
        checked = [n for n in names if n not in unchecked]
        have = pair_hashes(data_dir, checked)
        bad = []
        for n in checked:
            roles = [r for r in ("ir", "vi") if have[n][f"{r}_sha256"] != self.images[n][f"{r}_sha256"]]
            if roles:
                bad.append(", ".join(f"{Path(data_dir) / r / n}" for r in roles))
        if bad:
            raise RegionError(
                f"region cache {self.cache_dir} was computed from other image contents than "
                f"{len(bad)} file(s) of {data_dir} (same names, different bytes): "
                + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
                + ". Rerun precompute_regions on this data folder (it recomputes the changed "
                "images), or use the cache made for these images")
        if unchecked:
            logging.getLogger(__name__).warning(
                "region cache %s records no content hashes for %d image(s) (made by an older "
                "version): cannot check that its masks belong to these files; rerun "
                "precompute_regions to record them", self.cache_dir, len(unchecked))

    def _read(self, name: str) -> dict:
        if name not in self.images:
            raise RegionError(f"region cache {self.cache_dir} has no masks for image {name!r}")
        data = read_region_file(self.cache_dir / self.images[name]["file"])
        if int(data["shape"][0]) != self.num_regions:
            raise RegionError(f"{self.images[name]['file']} in {self.cache_dir} has "
                              f"{int(data['shape'][0])} slots, index.json says {self.num_regions}")
        return data

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Full-image ``(masks (K,H,W) bool, valid (K,) bool)`` of ``name``."""
        data = self._read(name)
        return unpack_masks(data["packed"], int(data["shape"][2])), data["valid"].astype(bool)

    def read(self, name: str) -> dict:
        """The stored arrays of ``name`` (``packed``, ``valid``, ``shape``, ``area``, ``score``)."""
        return self._read(name)

    @staticmethod
    def window(data: Mapping[str, np.ndarray], top: int, left: int, height: int, width: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Masks of stored arrays ``data`` (from :meth:`read`) cropped to a window
        (unpacking only its rows); ``valid`` is the stored flag."""
        full_w = int(data["shape"][2])
        rows = data["packed"][:, top:top + height]
        masks = unpack_masks(rows, full_w)[:, :, left:left + width]
        return masks, np.asarray(data["valid"], bool)

    def load_window(self, name: str, top: int, left: int, height: int, width: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks of ``name`` cropped to the window; ``valid`` is the stored flag
        (the caller decides what an empty cropped region means)."""
        return self.window(self._read(name), top, left, height, width)
