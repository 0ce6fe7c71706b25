"""Fuse folders of infrared/visible pairs with a DCEvo checkpoint.

Command line::

    python -m evafusion_jax.fuse --checkpoint CKPT --ir DIR --vi DIR --out DIR
    python -m evafusion_jax.fuse --checkpoint CKPT --pairs DIR --out DIR   # DIR/ir and DIR/vi

Behaviour:

* Files are paired by name without extension (``ir/01.png`` with ``vi/01.jpg``);
  a file without its counterpart is an error that lists all of them.
* Any size; the result has the size of the inputs (never resized). Both images
  of a pair must have the same size, unless ``--resize-to ir|vi`` resamples the
  other side (bicubic) to that side's size.
* 8- and 16-bit, grey, RGB, RGBA and palette files (see :mod:`evafusion_jax.data.image_io`).
* Colour: when the visible image is colour (its channels differ), its Y
  channel (full-range BT.601, as the DCEvo release's ``tocolor.py``) is fused
  with the infrared luma and the visible CbCr are kept; the output is RGB.
  Otherwise (or with ``--gray``) the output is grey. Outputs are 8-bit PNG files
  named ``<stem>.png``.
* Shape bucketing: each pair is reflect-padded at the bottom/right to a multiple
  of ``--bucket`` pixels (default 32) and the result cropped back, so a folder
  of mixed sizes compiles once per padded shape, not once per image; pairs of
  the same padded shape are batched (``--batch-size``). ``--bucket 1`` disables
  padding (one compilation per distinct size). DCEvo's attention is global over
  the image, so padding changes the output slightly everywhere, most near the
  padded border (``benchmarks/fuse.py`` measures it).
* Large images: ``--tile T --overlap O`` fuses overlapping T x T tiles (one compiled
  shape, memory bounded by the tile) and blends them with linear ramps over the
  overlaps. DCEvo's attention is global, so a tiled result differs from the untiled
  one (``benchmarks/fuse_tiles.py`` measures the difference on a real pair).
* Everything is validated (pairs, every image decoded, sizes, output folder)
  before any work; outputs are written into a temporary sibling folder that
  is renamed to ``--out`` only when every pair succeeded, so a failure never
  leaves a half-written output folder. An existing non-empty ``--out`` is left
  intact unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evafusion_jax import cli
from evafusion_jax.data import image_io
from evafusion_jax.storage import fileio

log = logging.getLogger(__name__)

__all__ = ["FuseError", "PairJob", "Fuser", "prepare_pair", "fuse_pair", "plan_folder", "fuse_folder",
           "load_model", "main"]


class FuseError(ValueError):
    """Invalid input for fusion (sizes, output folder, options)."""


# ----------------------------------------------------------------------------- model

def load_model(checkpoint: str | None = None, init_random: str | None = None, seed: int = 0):
    """``(params, DCEvoConfig)`` from an Orbax checkpoint folder, or random weights.

    ``init_random``: ``"tiny"`` (``DCEvoConfig.tiny()``) or ``"full"`` (release size).
    """
    import jax

    from evafusion_jax.models import dcevo
    if (checkpoint is None) == (init_random is None):
        raise FuseError("give exactly one of a checkpoint (--checkpoint CKPT) or --init-random tiny|full")
    if checkpoint is not None:
        from evafusion_jax.storage import checkpoints
        params, config_dict = checkpoints.load_params(checkpoint, "dcevo")
        return params, dcevo.DCEvoConfig.from_dict(config_dict)
    if init_random == "tiny":
        config = dcevo.DCEvoConfig.tiny()
    elif init_random == "full":
        config = dcevo.DCEvoConfig()
    else:
        raise FuseError(f"--init-random must be 'tiny' or 'full', got {init_random!r}")
    return dcevo.init_params(config, jax.random.PRNGKey(seed)), config


# ----------------------------------------------------------------------------- one pair

def prepare_pair(ir: np.ndarray, vi: np.ndarray, resize_to: str | None = None, gray: bool = False,
                 name: str = "pair"):
    """Turns decoded images into DCEvo inputs.

    Args:
      ir, vi: ``(H, W, C)`` float images in [0, 1], C 1 or 3.
      resize_to: None (sizes must match), "ir" or "vi" (resample the other image to that size).
      gray: ignore the visible colour.

    Returns:
      ``(ir_y, vi_y, chroma)``: two ``(H, W, 1)`` float32 luma images and the visible
      ``(H, W, 2)`` CbCr, or None when the output is grey.
    """
    if ir.shape[:2] != vi.shape[:2]:
        if resize_to == "ir":
            vi = image_io.resize(vi, *ir.shape[:2])
        elif resize_to == "vi":
            ir = image_io.resize(ir, *vi.shape[:2])
        else:
            raise FuseError(f"{name}: infrared is {ir.shape[1]}x{ir.shape[0]} but visible is "
                            f"{vi.shape[1]}x{vi.shape[0]} (width x height); pass --resize-to ir|vi to resample one side")
    ir_y = image_io.to_gray(ir)
    if not gray and image_io.is_color(vi):
        ycc = image_io.rgb_to_ycbcr(vi)
        return ir_y, ycc[..., :1], ycc[..., 1:]
    return ir_y, image_io.to_gray(vi), None


def _pad_to(x: np.ndarray, hp: int, wp: int) -> np.ndarray:
    h, w = x.shape[:2]
    if (h, w) == (hp, wp):
        return x
    return np.pad(x, ((0, hp - h), (0, wp - w), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")


def padded_shape(h: int, w: int, bucket: int) -> tuple[int, int]:
    """The bucketed size of an ``h x w`` image (next multiples of ``bucket``)."""
    return int(math.ceil(h / bucket) * bucket), int(math.ceil(w / bucket) * bucket)


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``n`` with at least ``overlap`` shared."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _ramp(tile: int, start: int, n: int, overlap: int) -> np.ndarray:
    """Blending weight of a tile along one axis: linear ramps over the overlaps with neighbours."""
    w = np.ones(tile, np.float32)
    if overlap > 0:
        r = np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1)
        if start > 0:
            w[:overlap] = r
        if start + tile < n:
            w[tile - overlap:] = np.minimum(w[tile - overlap:], r[::-1])
    return w


class Fuser:
    """Fuses luma pairs with DCEvo, padding them to bucketed shapes so few shapes get compiled.

    ``compiled_shapes`` records the distinct (batch, height, width) shapes run so far
    (``dcevo.fuse`` is jit-compiled once per shape). With ``tile > 0`` an image larger than
    ``tile`` is fused in overlapping ``tile x tile`` windows blended over ``overlap`` pixels.
    """

    def __init__(self, params: Any, config, bucket: int = 32, batch_size: int = 1,
                 tile: int = 0, overlap: int = 64):
        if bucket < 1 or batch_size < 1:
            raise FuseError("bucket and batch size must be >= 1")
        if tile < 0 or overlap < 0 or (tile and overlap >= tile):
            raise FuseError(f"need --tile >= 0 and 0 <= --overlap < --tile, got tile {tile}, "
                            f"overlap {overlap}")
        self.params, self.config = params, config
        self.bucket, self.batch_size = bucket, batch_size
        self.tile, self.overlap = int(tile), int(overlap)
        self.compiled_shapes: set[tuple[int, int, int]] = set()

    def _run(self, ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
        """``dcevo.fuse`` on ``(n, H, W, 1)`` arrays, padded to ``batch_size`` (one shape per bucket)."""
        from evafusion_jax.models import dcevo
        n = ir.shape[0]
        if n < self.batch_size:  # keep one compiled shape per bucket
            ir = np.concatenate([ir, np.repeat(ir[-1:], self.batch_size - n, axis=0)])
            vi = np.concatenate([vi, np.repeat(vi[-1:], self.batch_size - n, axis=0)])
        self.compiled_shapes.add(tuple(ir.shape[:3]))
        return np.asarray(dcevo.fuse(self.params, ir, vi, self.config))[:n]

    def _fuse_tiled(self, ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
        """One padded ``(H, W, 1)`` pair in overlapping tiles, blended; ``(H, W, 1)``."""
        hp, wp = ir.shape[:2]
        th, tw = min(self.tile, hp), min(self.tile, wp)
        wins = [(y, x) for y in tile_starts(hp, th, self.overlap)
                for x in tile_starts(wp, tw, self.overlap)]
        acc = np.zeros((hp, wp, 1), np.float64)
        norm = np.zeros((hp, wp, 1), np.float64)
        for i in range(0, len(wins), self.batch_size):
            chunk = wins[i:i + self.batch_size]
            a = np.stack([ir[y:y + th, x:x + tw] for y, x in chunk]).astype(np.float32)
            b = np.stack([vi[y:y + th, x:x + tw] for y, x in chunk]).astype(np.float32)
            for (y, x), out in zip(chunk, self._run(a, b)):
                w = (_ramp(th, y, hp, self.overlap)[:, None]
                     * _ramp(tw, x, wp, self.overlap)[None, :])[..., None]
                acc[y:y + th, x:x + tw] += w * out
                norm[y:y + th, x:x + tw] += w
        return (acc / norm).astype(np.float32)

    def padded_shape(self, h: int, w: int) -> tuple[int, int]:
        return padded_shape(h, w, self.bucket)

    def fuse_batch(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Fuses ``(ir_y, vi_y)`` pairs whose padded shapes are equal; returns ``(H, W, 1)`` arrays."""
        if not pairs:
            return []
        shapes = {self.padded_shape(*ir.shape[:2]) for ir, _ in pairs}
        if len(shapes) != 1 or len(pairs) > self.batch_size:
            raise FuseError("fuse_batch wants at most batch_size pairs of one padded shape")
        hp, wp = shapes.pop()
        ir = np.stack([_pad_to(a, hp, wp) for a, _ in pairs]).astype(np.float32)
        vi = np.stack([_pad_to(b, hp, wp) for _, b in pairs]).astype(np.float32)
        if self.tile and (hp > self.tile or wp > self.tile):
            out = np.stack([self._fuse_tiled(a, b) for a, b in zip(ir, vi)])
        else:
            out = self._run(ir, vi)
        return [np.clip(out[i, :a.shape[0], :a.shape[1]], 0.0, 1.0) for i, (a, _) in enumerate(pairs)]

    def __call__(self, ir_y: np.ndarray, vi_y: np.ndarray) -> np.ndarray:
        return self.fuse_batch([(ir_y, vi_y)])[0]


def fuse_pair(fuser: Fuser, ir: np.ndarray, vi: np.ndarray, resize_to: str | None = None,
              gray: bool = False) -> np.ndarray:
    """Fuses one decoded pair; ``(H, W, 1)`` grey or ``(H, W, 3)`` RGB in [0, 1] (see module doc)."""
    ir_y, vi_y, chroma = prepare_pair(ir, vi, resize_to, gray)
    return _finish(fuser(ir_y, vi_y), chroma)


def _finish(fused_y: np.ndarray, chroma: np.ndarray | None) -> np.ndarray:
    if chroma is None:
        return fused_y
    return image_io.ycbcr_to_rgb(np.concatenate([fused_y, chroma], axis=-1))


# ----------------------------------------------------------------------------- folders

@dataclasses.dataclass(frozen=True)
class PairJob:
    name: str
    ir_path: Path
    vi_path: Path
    size: tuple[int, int]  # (H, W) of the output


def plan_folder(ir_dir, vi_dir, resize_to: str | None = None, max_listed: int = 20) -> list[PairJob]:
    """Pairs the files, decodes every one (a truncated file is found here) and checks the
    sizes, before any model work."""
    pairs = image_io.pair_files({"ir": ir_dir, "vi": vi_dir}, max_listed=max_listed)
    sizes = image_io.check_images([p for _, paths in pairs for p in paths.values()],
                                  max_listed=max_listed)  # decodes every file
    mismatched, jobs = [], []
    for stem, paths in pairs:
        ir_hw, vi_hw = sizes[paths["ir"]], sizes[paths["vi"]]
        if ir_hw != vi_hw and resize_to is None:
            mismatched.append(f"{stem}: ir {ir_hw[1]}x{ir_hw[0]}, vi {vi_hw[1]}x{vi_hw[0]}")
        size = vi_hw if resize_to == "vi" else ir_hw
        jobs.append(PairJob(stem, paths["ir"], paths["vi"], size))
    if mismatched:
        more = f"\n  ... ({len(mismatched)} in all)" if len(mismatched) > max_listed else ""
        raise FuseError(f"{len(mismatched)} pair(s) differ in size (width x height):\n  "
                        + "\n  ".join(mismatched[:max_listed]) + more
                        + "\npass --resize-to ir or --resize-to vi to resample the other image of each pair")
    return jobs


def fuse_folder(params: Any, config, ir_dir, vi_dir, out_dir, *, bucket: int = 32, batch_size: int = 1,
                resize_to: str | None = None, gray: bool = False, overwrite: bool = False,
                progress: bool = True, tile: int = 0, overlap: int = 64,
                jobs: list[PairJob] | None = None) -> dict:
    """Fuses every pair of ``ir_dir``/``vi_dir`` into ``out_dir`` (``<stem>.png``); see the module doc.

    Returns a summary dict: ``images``, ``seconds``, ``images_per_s``, ``compiled_shapes``, ``out``.
    """
    if resize_to not in (None, "ir", "vi"):
        raise FuseError(f"resize_to must be None, 'ir' or 'vi', got {resize_to!r}")
    out_dir = Path(out_dir)
    image_io.check_output_dir(out_dir, [Path(ir_dir), Path(vi_dir)], overwrite)
    if jobs is None:
        jobs = plan_folder(ir_dir, vi_dir, resize_to)
    fuser = Fuser(params, config, bucket=bucket, batch_size=batch_size, tile=tile, overlap=overlap)

    groups: dict[tuple[int, int], list[PairJob]] = {}
    for job in jobs:
        groups.setdefault(fuser.padded_shape(*job.size), []).append(job)

    tmp = fileio.staging_dir(out_dir)
    start = time.perf_counter()
    try:
        from tqdm import tqdm
        with tqdm(total=len(jobs), desc="fuse", unit="img", disable=not progress) as bar:
            for shape in sorted(groups):
                group = groups[shape]
                for i in range(0, len(group), batch_size):
                    chunk = group[i:i + batch_size]
                    prepared = []
                    for job in chunk:
                        ir = image_io.read_image(job.ir_path)
                        vi = image_io.read_image(job.vi_path)
                        prepared.append(prepare_pair(ir, vi, resize_to, gray, name=job.name))
                    fused = fuser.fuse_batch([(a, b) for a, b, _ in prepared])
                    for job, y, (_, _, chroma) in zip(chunk, fused, prepared):
                        image_io.save_image(tmp / f"{job.name}.png", _finish(y, chroma))
                    bar.update(len(chunk))
        seconds = time.perf_counter() - start
        fileio.commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"images": len(jobs), "seconds": seconds, "images_per_s": len(jobs) / seconds if seconds > 0 else 0.0,
            "compiled_shapes": len(fuser.compiled_shapes), "out": str(out_dir)}


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evafusion_jax.fuse", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="DCEvo checkpoint folder (checkpoints.save_params, kind 'dcevo')")
    src.add_argument("--init-random", choices=("tiny", "full"),
                     help="random weights instead of a checkpoint (tests, demos, timing)")
    src.add_argument("--seed", type=int, default=0, help="seed for --init-random")
    p.add_argument("--ir", help="folder of infrared images")
    p.add_argument("--vi", help="folder of visible images (same file names)")
    p.add_argument("--pairs", help="folder holding ir/ and vi/ (instead of --ir/--vi)")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--resize-to", choices=("ir", "vi"), help="resample the other image when a pair differs in size")
    p.add_argument("--gray", action="store_true", help="grey output even for colour visible images")
    p.add_argument("--bucket", type=int, default=32,
                   help="pad sizes up to multiples of this (default 32; 1 = no padding, one compile per size)")
    p.add_argument("--batch-size", type=int, default=1, help="pairs per forward pass within a size bucket")
    p.add_argument("--tile", type=int, default=0,
                   help="fuse images larger than this in overlapping TILE x TILE windows (bounded memory; "
                        "0 = whole images, the default)")
    p.add_argument("--overlap", type=int, default=64, help="overlap of neighbouring tiles in pixels (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


OOM_HINT = ("fuse large images in overlapping tiles, e.g. --tile 512 --overlap 64 (memory bounded "
            "by the tile), use --batch-size 1, or run on a device with more memory")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit codes as documented in :mod:`evafusion_jax.cli`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.pairs:
        if args.ir or args.vi:
            print("error: give either --pairs or --ir/--vi, not both", file=sys.stderr)
            return cli.EXIT_INPUT
        ir_dir, vi_dir = Path(args.pairs) / "ir", Path(args.pairs) / "vi"
    else:
        if not (args.ir and args.vi):
            print("error: give --ir and --vi (or --pairs DIR holding ir/ and vi/)", file=sys.stderr)
            return cli.EXIT_INPUT
        ir_dir, vi_dir = Path(args.ir), Path(args.vi)

    def body():
        # Validate the inputs before loading the model, so input errors come fast.
        image_io.check_output_dir(args.out, [ir_dir, vi_dir], args.overwrite)
        Fuser(None, None, args.bucket, args.batch_size, args.tile, args.overlap)  # option check
        jobs = plan_folder(ir_dir, vi_dir, args.resize_to)
        params, config = load_model(args.checkpoint, args.init_random, args.seed)
        summary = fuse_folder(params, config, ir_dir, vi_dir, args.out, bucket=args.bucket,
                              batch_size=args.batch_size, resize_to=args.resize_to, gray=args.gray,
                              overwrite=args.overwrite, progress=not args.quiet, tile=args.tile,
                              overlap=args.overlap, jobs=jobs)
        print(f"fused {summary['images']} images in {summary['seconds']:.2f} s "
              f"({summary['images_per_s']:.2f} images/s, {summary['compiled_shapes']} compiled shape(s)) "
              f"-> {summary['out']}")
    return cli.run(body, prog="fuse", oom_hint=OOM_HINT)


if __name__ == "__main__":
    sys.exit(main())
