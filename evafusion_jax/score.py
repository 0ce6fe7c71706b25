"""Score fused images with a trained reward model.

    python -m evafusion_jax.score --checkpoint runs/reward/best_model \
        --fused results/MyMethod --ir data/TNO/ir --vi data/TNO/vi --output scores/MyMethod

Every image in ``--fused`` is paired by file stem with ``--ir`` and ``--vi``
(``0001.png`` pairs with ``0001.jpg``; extra source images are ignored). The
output folder gets

* ``scores.csv``: one row per fused image: ``fused, ir, vi`` file names and the
  five scores on the human 1-5 scale (the model predicts score / 5, multiplied
  back here), plus ``mean_artifact_heat`` (mean of the predicted heatmap);
* ``heatmaps/<stem>.png``: the predicted artifact heatmap, resized to the fused
  image and overlaid on it (``--alpha``, colormap ``--cmap``);
* with ``--raw_heatmaps``, ``heatmaps_raw/<stem>.png``: the heatmap itself as
  8-bit grayscale at the model's resolution.

Everything is checked (pairs, every image decoded, sizes, checkpoint) before anything
is written; a fused image must have the size of its sources (the rule of ``evaluate``,
``image_io.size_mismatches``), and the output is written to a temporary folder renamed into place.
Preprocessing is ``reward_model.preprocess`` (PIL-bilinear resize, then the [-1, 1]
normalisation of training), the same as ``evaluate --reward`` and the GRPO reward functions.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import jax
import numpy as np

logger = logging.getLogger(__name__)


class ScoreInputError(ValueError):
    """Missing or unreadable inputs for scoring."""


def match_sources(fused_dir, ir_dir, vi_dir) -> list[tuple[Path, Path, Path]]:
    """``[(fused, ir, vi)]`` for every image in ``fused_dir``, sources matched by stem."""
    from evafusion_jax.data import image_io

    if not image_io.list_images(fused_dir):
        raise ScoreInputError(f"fused folder {str(fused_dir)!r} holds no images "
                              f"({', '.join(image_io.IMAGE_EXTENSIONS)})")
    m = image_io.match_folders({"fused": fused_dir, "ir": ir_dir, "vi": vi_dir}, key="stem",
                               primary="fused")
    for role, stem, first, second in m.duplicates:
        d = ir_dir if role == "ir" else vi_dir
        raise ScoreInputError(f"{role} folder {str(d)!r} has two files with the stem "
                              f"{stem!r}: {first.name}, {second.name}")
    if any(m.missing.values()):
        fused = image_io.list_images(fused_dir)
        missing = {role: [f.name for f in fused if f.stem in set(m.missing[role])] for role in ("ir", "vi")}
        lines = [f"  no {role} image in {str(d)!r} for: {', '.join(x[:20])}"
                 + (f", ... ({len(x)} in all)" if len(x) > 20 else "")
                 for (role, x), d in zip(missing.items(), (ir_dir, vi_dir)) if x]
        raise ScoreInputError("fused images without a source image (matched by file stem):\n"
                              + "\n".join(lines))
    return [(p["fused"], p["ir"], p["vi"]) for _, p in m.pairs]


def _read(path: Path) -> np.ndarray:
    """[0, 1] float image (H, W, C) of ``path``."""
    from evafusion_jax.data import image_io
    try:
        return image_io.read_image(path)
    except Exception as e:  # noqa: BLE001 - reported with the file name
        raise ScoreInputError(f"cannot read image {path}: {e}") from e


def overlay(fused: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """``fused`` (H, W, C) in [0, 1] blended with ``heat`` (h, w) in [0, 1] -> uint8 (H, W, 3).

    The heatmap is resized bilinearly to the fused image; each pixel's blend
    weight is ``alpha * heat`` so areas without predicted artifacts keep the
    fused image unchanged.
    """
    from matplotlib import colormaps
    from PIL import Image

    f = np.asarray(fused, np.float32)
    if f.ndim == 2:
        f = f[..., None]
    if f.shape[-1] == 1:
        f = np.repeat(f, 3, axis=-1)
    h, w = f.shape[:2]
    hm = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize((w, h), Image.BILINEAR))
    hm = np.clip(hm, 0.0, 1.0)
    color = colormaps[cmap](hm)[..., :3].astype(np.float32)
    a = (alpha * hm)[..., None]
    out = (1.0 - a) * f + a * color
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def score_folder(checkpoint, fused_dir, ir_dir, vi_dir, output, *, batch_size: int = 8,
                 alpha: float = 0.5, cmap: str = "jet", raw_heatmaps: bool = False,
                 overwrite: bool = False, dtype: str | None = None, progress: bool = True) -> Path:
    """Scores every fused image; writes ``scores.csv`` and heatmap overlays to ``output``."""
    from PIL import Image
    from tqdm import tqdm

    from evafusion_jax.data import image_io
    from evafusion_jax.models import reward_model as rm
    from evafusion_jax.models import score_names
    from evafusion_jax.storage import checkpoints, fileio
    from evafusion_jax.train import parallel as par
    from evafusion_jax.train import reward_training as rt

    if batch_size < 1:
        raise ScoreInputError(f"--batch_size must be >= 1, got {batch_size}")
    triples = match_sources(fused_dir, ir_dir, vi_dir)
    out = image_io.check_output_dir(output, inputs=(fused_dir, ir_dir, vi_dir), overwrite=overwrite)
    groups = [(f.stem, {"fused": f, "ir": i, "vi": v}) for f, i, v in triples]
    try:  # decodes every file: a truncated image is found before any work
        sizes = image_io.check_images([p for _, g in groups for p in g.values()])
    except image_io.ImageReadError as e:
        raise ScoreInputError(str(e)) from None
    bad = image_io.size_mismatches(groups, sizes)
    if bad:
        raise ScoreInputError(image_io.SAME_SIZE_RULE + ":\n  " + "\n  ".join(bad[:20])
                              + (f"\n  ... ({len(bad)} in all)" if len(bad) > 20 else ""))
    params, cfg_dict = checkpoints.load_params(checkpoint, "reward")
    config = rm.RewardConfig.from_dict(cfg_dict)
    if dtype:
        config = config.replace(dtype=dtype)
    mesh = par.data_mesh(jax.local_devices())
    predict = rt.make_predict_fn(config, mesh)
    p = par.replicate(params, mesh)
    bs = batch_size + (-batch_size) % mesh.devices.size

    tmp = fileio.staging_dir(out)
    try:
        (tmp / "heatmaps").mkdir()
        if raw_heatmaps:
            (tmp / "heatmaps_raw").mkdir()
        rows = []
        bar = tqdm(total=len(triples), desc="scoring", disable=not progress)
        for start in range(0, len(triples), bs):
            chunk = triples[start:start + bs]
            exs, fused_imgs = [], []
            for f, i, vv in chunk:
                imgs = {"ir": _read(i), "vi": _read(vv), "fused": _read(f)}
                exs.append({k: np.asarray(rm.preprocess(x[None], config))[0]
                            for k, x in imgs.items()})
                fused_imgs.append(imgs["fused"])
            batch = {k: np.stack([e[k] for e in exs]) for k in ("ir", "vi", "fused")}
            padded, n = rt.pad_batch(batch, bs)
            res = jax.device_get(predict(p, par.shard_batch(padded, mesh)))
            scores = np.asarray(res["scores"])[:n] * score_names.SCORE_MAX
            heats = np.asarray(res["heatmaps"])[:n]
            for (f, i, vv), sc, hm, fimg in zip(chunk, scores, heats, fused_imgs):
                row = {"fused": f.name, "ir": i.name, "vi": vv.name}
                row.update({t: f"{float(x):.4f}" for t, x in zip(config.score_types, sc)})
                row["mean_artifact_heat"] = f"{float(hm.mean()):.4f}"
                rows.append(row)
                Image.fromarray(overlay(fimg, hm, alpha, cmap)).save(tmp / "heatmaps" / f"{f.stem}.png")
                if raw_heatmaps:
                    Image.fromarray(np.round(np.clip(hm, 0, 1) * 255).astype(np.uint8)).save(
                        tmp / "heatmaps_raw" / f"{f.stem}.png")
            bar.update(len(chunk))
        bar.close()
        fields = ["fused", "ir", "vi", *config.score_types, "mean_artifact_heat"]
        with open(tmp / "scores.csv", "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=fields)
            wr.writeheader()
            wr.writerows(rows)
        fileio.commit_dir(tmp, out)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d scores to %s", len(rows), out / "scores.csv")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evafusion_jax.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="reward checkpoint folder (kind 'reward')")
    ap.add_argument("--fused", required=True, help="folder of fused images to score")
    ap.add_argument("--ir", required=True, help="folder of infrared sources (matched by stem)")
    ap.add_argument("--vi", required=True, help="folder of visible sources (matched by stem)")
    ap.add_argument("--output", required=True, help="output folder (scores.csv, heatmaps/)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.5, help="heatmap overlay opacity")
    ap.add_argument("--cmap", default="jet", help="matplotlib colormap of the overlay")
    ap.add_argument("--raw_heatmaps", action="store_true", help="also write grayscale heatmaps")
    ap.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"],
                    help="compute dtype (default: the checkpoint's)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from evafusion_jax import cli

    def body():
        score_folder(args.checkpoint, args.fused, args.ir, args.vi, args.output,
                     batch_size=args.batch_size, alpha=args.alpha, cmap=args.cmap,
                     raw_heatmaps=args.raw_heatmaps, overwrite=args.overwrite, dtype=args.dtype,
                     progress=not args.no_progress)
    return cli.run(body, prog="score", oom_hint="use a smaller --batch_size, or --dtype bfloat16")


if __name__ == "__main__":
    sys.exit(main())
