"""Reading, writing and colour-converting fusion images.

Every reader returns ``float32`` arrays of shape ``(H, W, C)`` with values in
``[0, 1]`` and ``C`` in ``{1, 3}``, whatever the file stored:

* 8-bit images (``L``, ``RGB``, ``P``, ``1``, ``CMYK``, ...) are divided by 255;
* 16-bit images (``I;16`` PNG/TIFF, common for thermal cameras) by 65535;
  32-bit integer images (Pillow mode ``I``, which is how Pillow opens some
  16-bit PNGs) are divided by 65535 when their values fit in 16 bits, else by
  their own maximum; float images (mode ``F``) are taken as ``[0, 1]`` when
  their maximum is at most 1, else divided by 255 or 65535, the smallest that
  fits, and clipped;
* palette images are expanded through their palette;
* alpha channels (``RGBA``, ``LA``, palettes with transparency) are dropped:
  the colour values are used as stored, not composited.

Colour conventions follow the DCEvo release (its ``tocolor.py`` uses Pillow's
``YCbCr`` mode, i.e. full-range ITU-R BT.601 / JPEG YCbCr):

    Y  = 0.299 R + 0.587 G + 0.114 B
    Cb = 0.5 + (-0.168736 R - 0.331264 G + 0.5 B)
    Cr = 0.5 + ( 0.5 R - 0.418688 G - 0.081312 B)

with R, G, B, Y in ``[0, 1]`` and the chroma offset 128/255 (Pillow's integer
offset 128 on the 0-255 scale). The conversions here are exact floating-point
versions; Pillow's own integer arithmetic differs by at most one 8-bit level.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from evafusion_jax.storage.fileio import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Full-range BT.601 (JPEG) coefficients, as Pillow's "YCbCr" mode.
_CHROMA_OFFSET = 128.0 / 255.0
_RGB_TO_YCBCR = np.array([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
], dtype=np.float64)
_YCBCR_TO_RGB = np.array([
    [1.0, 0.0, 1.402],
    [1.0, -0.344136, -0.714136],
    [1.0, 1.772, 0.0],
], dtype=np.float64)


class ImageReadError(ValueError):
    """A file could not be read as an image."""


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a folder")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _pil_to_array(img: Image.Image, path: str) -> np.ndarray:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La", "PA"):
        img = img.convert("RGB" if mode not in ("1", "La") else "L")
        mode = img.mode
    if mode == "LA":
        arr = np.asarray(img)[..., :1].astype(np.float32) / 255.0
    elif mode == "RGBA":
        arr = np.asarray(img)[..., :3].astype(np.float32) / 255.0
    elif mode in ("L", "RGB"):
        arr = np.asarray(img).astype(np.float32) / 255.0
    elif mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(img).astype(np.float64)
        if raw.size and raw.min() < 0:
            raise ImageReadError(f"{path}: 32-bit integer image with negative values is not supported")
        peak = 65535.0 if (raw.size == 0 or raw.max() <= 65535) else float(raw.max())
        arr = (raw / peak).astype(np.float32)
    elif mode == "F":
        raw = np.asarray(img).astype(np.float64)
        peak = float(np.nanmax(raw)) if raw.size else 1.0
        scale = 1.0 if peak <= 1.0 else (255.0 if peak <= 255.0 else 65535.0)
        arr = np.clip(raw / scale, 0.0, 1.0).astype(np.float32)
    else:
        raise ImageReadError(f"{path}: unsupported image mode {mode!r}; convert it to an 8- or 16-bit PNG")
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.ascontiguousarray(arr)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as ``float32 (H, W, C)`` in ``[0, 1]``, ``C`` 1 or 3 (see module doc)."""
    path = str(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_array(img, path)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise ImageReadError(f"cannot read image {path!r}: {e}") from e


def _decode_size(path: str) -> tuple[int, int]:
    return image_size(path, decode=True)


def check_images(paths, decode: bool = True, workers: int | None = None,
                 max_listed: int = 20) -> dict[Path, tuple[int, int]]:
    """The pre-pass of the folder CLIs: ``{path: (height, width)}`` of every file.

    With ``decode`` every image is fully decoded (in threads), so a truncated or corrupt
    file is found before any work starts; otherwise only the headers are read. Raises
    :class:`ImageReadError` listing every unreadable file.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = list(dict.fromkeys(Path(p) for p in paths))
    fn = _decode_size if decode else image_size

    def one(p):
        try:
            return fn(str(p)), None
        except (ImageReadError, OSError) as e:
            return None, str(e)
    n = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, n)) as pool:
        results = list(pool.map(one, paths))
    bad = [err for _, err in results if err is not None]
    if bad:
        more = f"\n  ... ({len(bad)} in all)" if len(bad) > max_listed else ""
        raise ImageReadError(f"{len(bad)} unreadable file(s) (nothing was written):\n  "
                             + "\n  ".join(bad[:max_listed]) + more)
    return {p: size for p, (size, _) in zip(paths, results)}


SAME_SIZE_RULE = ("fused, infrared and visible images must have the same size (width x height); "
                  "a fused image of another size than its sources is rejected, never resized")


def size_mismatches(groups, sizes: dict) -> list[str]:
    """The one rule of ``evaluate`` and ``score``: every image of a ``(label, {role: path})``
    group must have the same size. Returns one line per group that breaks it
    (``"label: fused 10x10, ir 64x48, vi 64x48"``); ``sizes`` maps paths to ``(H, W)``."""
    out = []
    for label, paths in groups:
        hw = {role: sizes[Path(p)] for role, p in paths.items()}
        if len(set(hw.values())) != 1:
            out.append(f"{label}: " + ", ".join(f"{r} {s[1]}x{s[0]}" for r, s in hw.items()))
    return out


def image_size(path: str | os.PathLike, decode: bool = False) -> tuple[int, int]:
    """``(height, width)`` of an image from its header, without decoding the pixels; with
    ``decode=True`` every pixel is decoded, so that a truncated or corrupt file fails here."""
    path = str(path)
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
            w, h = img.size
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ImageReadError(f"cannot read image {path!r}: {e}") from e
    return h, w


def is_color(image: np.ndarray, tol: float = 1.0 / 512) -> bool:
    """True when ``image`` has 3 channels that are not all equal (a grey image stored as RGB is not colour)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        return False
    return bool(np.max(np.abs(image[..., 0] - image[..., 1])) > tol
                or np.max(np.abs(image[..., 0] - image[..., 2])) > tol)


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RGB in [0, 1] -> full-range BT.601 YCbCr in [0, 1] (chroma offset 128/255)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_ycbcr expects 3 channels in the last axis, got shape {rgb.shape}")
    out = rgb @ _RGB_TO_YCBCR.T
    out[..., 1:] += _CHROMA_OFFSET
    return out.astype(np.float32)


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr`, clipped to [0, 1]."""
    ycbcr = np.asarray(ycbcr, dtype=np.float64).copy()
    if ycbcr.shape[-1] != 3:
        raise ValueError(f"ycbcr_to_rgb expects 3 channels in the last axis, got shape {ycbcr.shape}")
    ycbcr[..., 1:] -= _CHROMA_OFFSET
    return np.clip(ycbcr @ _YCBCR_TO_RGB.T, 0.0, 1.0).astype(np.float32)


def to_gray(image: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` or ``(H, W)`` in [0, 1] -> ``(H, W, 1)`` luma (BT.601 Y for 3 channels)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        return image[..., None]
    if image.shape[-1] == 1:
        return image
    if image.shape[-1] == 3:
        return (image.astype(np.float64) @ _RGB_TO_YCBCR[0])[..., None].astype(np.float32)
    raise ValueError(f"expected 1 or 3 channels, got shape {image.shape}")


# OpenCV's 8-bit colour -> grey rules, as integer arithmetic on (R, G, B) levels:
# ((R, G, B) coefficients, right shift, round (add half before shifting) or truncate).
_OPENCV_GRAY_RULES = {
    # cv2.cvtColor(BGR2GRAY) on uint8 (also IMREAD_GRAYSCALE of WebP): 15-bit coefficients, rounded.
    "cvtcolor": ((9798, 19235, 3735), 15, True),
    # IMREAD_GRAYSCALE of PNG: libpng's png_set_rgb_to_gray(0.299, 0.587), truncated.
    "libpng": ((9797, 19234, 3737), 15, False),
    # IMREAD_GRAYSCALE of BMP, TIFF, PPM: OpenCV's own 14-bit coefficients, rounded.
    "opencv14": ((4899, 9617, 1868), 14, True),
}
GRAY_CONVENTIONS = ("cvtcolor", "imread", "float")


def gray_levels_opencv(rgb: np.ndarray, rule: str = "cvtcolor") -> np.ndarray:
    """8-bit ``(H, W, 3)`` RGB levels -> ``uint8 (H, W)`` grey levels, bit-exact to OpenCV's fixed point.

    ``rule``: ``"cvtcolor"`` (``cv2.cvtColor(bgr, COLOR_BGR2GRAY)`` on uint8:
    ``(9798 R + 19235 G + 3735 B + 2^14) >> 15``), ``"libpng"`` (``cv2.imread(png,
    IMREAD_GRAYSCALE)``: ``(9797 R + 19234 G + 3737 B) >> 15``, truncated) or
    ``"opencv14"`` (``IMREAD_GRAYSCALE`` of BMP/TIFF/PPM: ``(4899 R + 9617 G + 1868 B + 2^13) >> 14``).
    ``rgb`` holds whole levels 0..255 (any integer or float dtype). All three rules
    give ``v`` for a grey pixel ``R = G = B = v``; they differ from rounding the exact
    BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` at (and for ``libpng`` below) ``.5`` ties.
    """
    if rule not in _OPENCV_GRAY_RULES:
        raise ValueError(f"unknown grey rule {rule!r}; choose from {sorted(_OPENCV_GRAY_RULES)}")
    x = np.asarray(rgb)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"gray_levels_opencv expects (H, W, 3) RGB levels, got shape {x.shape}")
    (cr, cg, cb), shift, rounded = _OPENCV_GRAY_RULES[rule]
    x = x.astype(np.int32)  # at most 32768 * 255 + 2^14: fits
    acc = cr * x[..., 0] + cg * x[..., 1] + cb * x[..., 2] + ((1 << (shift - 1)) if rounded else 0)
    return (acc >> shift).astype(np.uint8)


def _imread_rule(fmt: str | None) -> str:
    return {"PNG": "libpng", "BMP": "opencv14", "TIFF": "opencv14", "PPM": "opencv14"}.get(fmt or "", "cvtcolor")


def read_gray_levels(path: str | os.PathLike, convention: str = "cvtcolor") -> np.ndarray:
    """Reads an image as grey levels ``float64 (H, W)`` on the 0-255 scale, the way OpenCV-based code does.

    ``convention``:

    * ``"cvtcolor"``: ``cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2GRAY)`` (bit-exact for 8-bit files);
    * ``"imread"``: ``cv2.imread(path, cv2.IMREAD_GRAYSCALE)``, whose rule depends on the format:
      PNG through libpng (truncating), BMP/TIFF/PPM with OpenCV's 14-bit rule, JPEG as the decoder's
      own luma (Pillow's grey JPEG decoding, the same libjpeg path), others as ``cvtcolor``;
    * ``"float"``: :func:`read_image` + :func:`to_gray` (exact BT.601 luma), rounded to levels
      (half to even).

    Single-channel files are returned as stored (8-bit levels; 16-bit ones scaled to 0-255 and
    rounded). Colour files that are not 8-bit fall back to ``"float"``.
    """
    if convention not in GRAY_CONVENTIONS:
        raise ValueError(f"unknown grey convention {convention!r}; choose from {list(GRAY_CONVENTIONS)}")
    path = str(path)
    if convention != "float":
        try:
            with Image.open(path) as img:
                fmt = img.format
                if convention == "imread" and fmt == "JPEG" and img.mode in ("RGB", "YCbCr"):
                    img.draft("L", img.size)  # the decoder's luma, as libjpeg's grey output
                    img.load()
                    if img.mode == "L":
                        return np.asarray(img).astype(np.float64)
                img.load()
                if img.mode == "L":
                    return np.asarray(img).astype(np.float64)
                if img.mode in ("RGB", "RGBA", "P", "RGBX", "CMYK", "YCbCr"):
                    rgb = np.asarray(img.convert("RGB"))
                    rule = "cvtcolor" if convention == "cvtcolor" else _imread_rule(fmt)
                    return gray_levels_opencv(rgb, rule).astype(np.float64)
        except FileNotFoundError:
            raise
        except Exception:  # read_image below reports unreadable files with their name
            pass
    g = to_gray(read_image(path))[..., 0].astype(np.float64)
    return np.round(g * 255.0)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resampling of an ``(H, W, C)`` float image (per channel, Pillow ``F`` mode), clipped to [0, 1]."""
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32), mode="F")
                        .resize((width, height), Image.BICUBIC)) for c in range(image.shape[-1])]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 with rounding (values outside [0, 1] are clipped)."""
    return np.round(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_image(path: str | os.PathLike, image: np.ndarray, bit_depth: int = 8) -> Path:
    """Writes an ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` [0, 1] image atomically (temp file + rename).

    ``bit_depth`` 8 (any format Pillow writes) or 16 (grey PNG/TIFF only).
    The format follows the file extension.
    """
    path = Path(path)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f"cannot save an image of shape {image.shape} to {path}")
    if bit_depth == 8:
        pil = Image.fromarray(to_uint8(image))
    elif bit_depth == 16:
        if image.ndim != 2 or path.suffix.lower() not in (".png", ".tif", ".tiff"):
            raise ValueError("16-bit output is supported for grey PNG/TIFF only")
        arr = np.round(np.clip(image.astype(np.float64), 0, 1) * 65535.0).astype(np.uint16)
        pil = Image.fromarray(arr)
    else:
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    with atomic_path(path) as tmp:
        pil.save(tmp, format=Image.registered_extensions().get(path.suffix.lower()))
    return path


class PairingError(ValueError):
    """Files in paired folders do not correspond one to one."""


#: What :func:`match_folders` matches files by: ``"stem"`` (``01.png`` pairs with ``01.jpg``)
#: or ``"name"`` (the whole file name; ``01.png`` pairs only with ``01.png``).
PAIR_KEYS = ("stem", "name")


@dataclasses.dataclass(frozen=True)
class FolderMatch:
    """How the image files of several folders correspond (see :func:`match_folders`).

    Attributes:
      pairs: ``[(key, {role: path})]`` for every matched key (sorted by key; with a primary
        folder, one entry per primary file in its order).
      missing: role -> the keys that role's folder lacks (in the order of ``pairs``).
      duplicates: ``(role, key, first, second)`` for two files of one folder with the same key.
      empty: the roles whose folder holds no images.
    """
    pairs: list
    missing: dict
    duplicates: list
    empty: list


def match_folders(folders: dict[str, str | os.PathLike], key: str = "stem",
                  primary: str | None = None) -> FolderMatch:
    """The one pairing rule for ir/vi/fused folders: files correspond when their ``key`` is equal.

    Only images directly in each folder count (:func:`list_images`: the extensions of
    :data:`IMAGE_EXTENSIONS`, hidden files skipped). Without ``primary`` every key must be in
    every folder; with ``primary`` the primary folder's files drive the pairing, files of the
    other folders without a primary partner are ignored, and two primary files with one key
    are both kept. Nothing is raised for problems: callers word their own errors from the
    returned :class:`FolderMatch` (``pair_files`` does for ``fuse`` / ``evaluate``).

    Raises:
      FileNotFoundError: a folder does not exist.
      ValueError: ``key`` is not one of :data:`PAIR_KEYS` or ``primary`` not a role.
    """
    if key not in PAIR_KEYS:
        raise ValueError(f"key must be one of {PAIR_KEYS}, got {key!r}")
    if primary is not None and primary not in folders:
        raise ValueError(f"primary {primary!r} is not one of the roles {list(folders)}")
    key_of = (lambda p: p.stem) if key == "stem" else (lambda p: p.name)
    index: dict[str, dict[str, Path]] = {}
    listed: dict[str, list[Path]] = {}
    duplicates, empty = [], []
    for role, folder in folders.items():
        files = listed[role] = list_images(folder)
        if not files:
            empty.append(role)
        seen: dict[str, Path] = {}
        for f in files:
            k = key_of(f)
            if k in seen and role != primary:
                duplicates.append((role, k, seen[k], f))
            seen.setdefault(k, f)
        index[role] = seen
    if primary is None:
        keys = sorted(set().union(*[set(s) for s in index.values()]))
        rows = [(k, {}) for k in keys]
    else:
        rows = [(key_of(f), {primary: f}) for f in listed[primary]]
    missing = {role: [k for k, _ in rows if k not in index[role]] for role in folders if role != primary}
    pairs = [(k, {**fixed, **{r: index[r][k] for r in folders if r not in fixed}})
             for k, fixed in rows if all(k in index[r] for r in folders if r not in fixed)]
    return FolderMatch(pairs=pairs, missing=missing, duplicates=duplicates, empty=empty)


def pair_files(folders: dict[str, str | os.PathLike], max_listed: int = 20) -> list[tuple[str, dict[str, Path]]]:
    """Matches image files across folders by file stem (``01.png`` pairs with ``01.jpg``).

    The strict form of :func:`match_folders` (``key="stem"``, no primary) used by ``fuse``
    and ``evaluate``.

    Args:
      folders: role -> folder, e.g. ``{"ir": ..., "vi": ...}``.
      max_listed: how many unmatched names to list per folder in the error message.

    Returns:
      ``[(stem, {role: path})]`` sorted by stem.

    Raises:
      PairingError: a folder has no images, two files in one folder share a stem,
        or some stems are missing from some folders (all of them are listed).
    """
    m = match_folders(folders, key="stem")
    problems = []
    for role in folders:
        if role in m.empty:
            problems.append(f"{role} folder {str(folders[role])!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        problems += [f"{role} folder has two files with the stem {k!r}: {a.name}, {b.name}"
                     for r, k, a, b in m.duplicates if r == role]
    if problems:
        raise PairingError("; ".join(problems))
    if any(m.missing.values()):
        lines = []
        for role, names in m.missing.items():
            if names:
                shown = ", ".join(names[:max_listed]) + (f", ... ({len(names)} in all)" if len(names) > max_listed else "")
                lines.append(f"  missing in {role} folder {str(folders[role])!r}: {shown}")
        raise PairingError("some images have no counterpart (files are paired by name without extension):\n"
                           + "\n".join(lines))
    return m.pairs


class OutputFolderError(ValueError):
    """The requested output folder cannot be used."""


def check_writable(out: str | os.PathLike, error=OSError) -> None:
    """Raises ``error`` when the folder ``out`` cannot be created or written: an ancestor is a
    file, or the nearest existing ancestor is not writable (read-only mount, permissions)."""
    out = Path(out).absolute()
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise error(f"cannot create the output folder {str(out)!r}: {str(anc)!r} is a file, "
                    "not a folder; choose another output location")
    if not os.access(anc, os.W_OK):
        raise error(f"cannot write the output folder {str(out)!r}: {str(anc)!r} is read-only "
                    "for this user; choose another output location")
    try:
        read_only = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        read_only = False
    if read_only:
        raise error(f"cannot write the output folder {str(out)!r}: {str(anc)!r} is on a "
                    "read-only file system; choose another output location")


def check_output_dir(out: str | os.PathLike, inputs=(), overwrite: bool = False) -> Path:
    """Refuses an output folder that is (inside) an input folder, is a file, or is non-empty without ``overwrite``."""
    out = Path(out)
    out_r = out.resolve()
    for d in inputs:
        d = Path(d).resolve()
        if out_r == d or d in out_r.parents:
            raise OutputFolderError(f"output folder {str(out)!r} must not be (inside) the input folder {str(d)!r}")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output {str(out)!r} exists and is not a folder")
    check_writable(out, OutputFolderError)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputFolderError(f"output folder {str(out)!r} exists and is not empty; choose another output "
                                "folder or pass --overwrite to replace it")
    return out
