"""Procedural infrared/visible scenes and a SYNTHETIC human-feedback dataset (for tests and demos).

Nothing here is real data or real human judgement. Scenes are random smooth backgrounds with
textured regions that only the visible image shows and warm objects that only the infrared image
shows. ``write_feedback_folder`` fuses each pair with a simple rule, applies controlled
degradations, and derives the five "human" scores from the degradation parameters with the fixed
rule below, so that a reward model can learn it.

Fusion rule (images float in [0, 1], ``g = luminance(vi)``, ``G_s`` = Gaussian blur of sigma s)::

    fused = 0.6 * G_2(g) + 0.4 * ir_background
            + (1 - ir_loss) * ir_targets          # warm objects (IR only)
            + (1 - texture_loss) * (g - G_2(g))   # visible detail / texture
    fused = G_blur_sigma(fused)                   # blur (skipped when blur_sigma == 0)
    fused = fused + N(0, noise_std**2)            # sensor noise
    fused = artifacts inside each circle          # "ringing" (concentric cosine rings of
                                                  # amplitude 0.3*strength, period 3 px) or
                                                  # "blocking" (4x4 block means plus a random
                                                  # offset in +-0.25*strength per block)
    fused = clip(fused, 0, 1), stored as 8-bit grayscale PNG

Degradation parameters are drawn independently per fused image: ``ir_loss``, ``texture_loss``
~ U(0, 1); ``blur_sigma`` ~ U(0, BLUR_MAX); ``noise_std`` ~ U(0, NOISE_MAX); the number of
artifact circles ~ uniform on {0, 1, 2, 3} (no circle -> an empty heatmap), each with a radius
~ U(0.08, 0.16) * size, a centre inside the image, a strength ~ U(0.4, 1) and a kind.

Score rule (``score_rule``; every score in [1, 5], higher is better)::

    Thermal Retention    = 5 - 4 * ir_loss
    Texture Preservation = 5 - 4 * (1 - texture_retained),
        texture_retained = (1 - texture_loss) * rms(G_blur_sigma(d)) / rms(d),  d = g - G_2(g)
    Sharpness            = 5 - 4 * blur_sigma / BLUR_MAX
    Artifacts            = 5 - 4 * severity,
        severity = 0.4 * noise_std / NOISE_MAX + 0.6 * min(1, sum(circle strengths) / ARTIFACT_CAP)
    Overall Score        = 0.3 * Thermal Retention + 0.3 * Texture Preservation
                           + 0.2 * Sharpness + 0.2 * Artifacts

Each score measures what its factor leaves VISIBLE in the fused image: the blur also removes
fine texture, so Texture Preservation is the fraction of the visible detail layer that survives
the texture loss and the blur together (``texture_retained``; stored in each line's
``degradation``), not ``texture_loss`` alone. (Earlier versions used ``5 - 4 *
texture_loss``, and NOISE_MAX was 0.08: a blurred image then showed no texture but could be
labelled as rich in it, strong noise swamped the texture's high-frequency energy, and the demo's
reward model could not learn Texture Preservation; ``score_rule`` still gives the old texture
rule for parameters without ``texture_retained``.)

The artifact heatmap is the circles rendered as filled discs (``feedback.render_circles``).

Scenes from REAL pairs (``write_feedback_folder(pairs=DIR)``, the demo's ``--pairs``): the same
fusion and score rules on random square crops of real IR/visible pairs (a side of 1/4 to 1/2 of
the shorter image side, resized to ``size`` with PIL bilinear), decomposed by
``scene_from_pair``: ``vi_gray`` = visible luma, ``ir_targets = max(ir - G_s(ir), 0)`` (what is
warmer than its surroundings, s = size / 8) and ``ir_background = ir - ir_targets``.
A crop must show texture: of up to ``REAL_CROP_TRIES`` random crops, the first whose visible
detail layer ``d = g - G_2(g)`` has an rms of at least ``min_detail`` (``REAL_MIN_DETAIL``,
0.03) is kept, else the most detailed one. On a flat crop (sky, road) texture loss and blur
change almost nothing that the noise (std up to ``NOISE_MAX``) does not swamp, so its Texture
and Sharpness labels cannot be learned: on M3FD at 128 px the median crop's detail rms was
0.026 (procedural scenes: 0.081), and the reward model reached test PLCC 0.19 (Texture) and
0.18 (Sharpness); with the rule, 0.88 and 0.71 (seed 1, README).

Masked examples (``masked_fraction``): that fraction of the fused images also appears as
``fused * M`` (M: a random union of 1-3 soft ellipses covering part of the image, as a region
mask does), with the SAME five scores (every degradation is global, so a region shows the
image's quality) and the heatmap times M. For reward models that score masked regions.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from evafusion_jax.data.feedback_decode import render_circles
from evafusion_jax.models.score_names import DATASET_SCORE_NAMES
from evafusion_jax.storage.fileio import commit_dir, staging_dir

BLUR_MAX = 2.0
NOISE_MAX = 0.03
ARTIFACT_CAP = 1.5
MAX_CIRCLES = 3
#: Real-pairs crops (module docstring): the visible detail rms a crop must reach, and how many
#: random crops are drawn to find one.
REAL_MIN_DETAIL = 0.03
REAL_CROP_TRIES = 8
#: Names of the controlled degradations (``write_feedback_folder(degradations=...)``).
DEGRADATIONS = ("ir_loss", "texture_loss", "blur", "noise", "artifacts")
SYNTHETIC_README = """\
SYNTHETIC DATA - NOT REAL IMAGES, NOT REAL HUMAN FEEDBACK.

Generated by evafusion_jax.data.synthetic.{func} (seed={seed}, n={n}, size={size}).
Procedural infrared/visible scenes; fused images made by a fixed rule with controlled
degradations (IR target loss, texture loss, blur, noise, ringing/blocking artifacts inside
circles). The five scores in scores.jsonl are a deterministic function of the degradation
parameters (see the evafusion_jax.data.synthetic module docstring):
  Thermal Retention    = 5 - 4 * ir_loss
  Texture Preservation = 5 - 4 * (1 - texture_retained), texture_retained =
                         (1 - texture_loss) * rms(G_blur(d)) / rms(d), d = vi detail layer
  Sharpness            = 5 - 4 * blur_sigma / {blur_max}
  Artifacts            = 5 - 4 * (0.4 * noise_std / {noise_max}
                                  + 0.6 * min(1, sum(circle strengths) / {cap}))
  Overall Score        = 0.3 * Thermal + 0.3 * Texture + 0.2 * Sharpness + 0.2 * Artifacts
Every line of scores.jsonl carries "synthetic": true and its "degradation" parameters.
Use it only for tests and demonstrations.
"""


def _rng(rng: np.random.Generator | int | Sequence[int]) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _smooth(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Smooth random field normalised to [0, 1]."""
    f = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma, mode="wrap")
    lo, hi = f.min(), f.max()
    return (f - lo) / (hi - lo + 1e-12)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float,
             soft: float = 1.5) -> np.ndarray:
    """Soft-edged filled ellipse mask in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * ca + (yy - cy) * sa) / rx
    v = (-(xx - cx) * sa + (yy - cy) * ca) / ry
    d = (np.sqrt(u * u + v * v) - 1.0) * min(rx, ry)  # ~ signed distance in pixels
    return np.clip(0.5 - d / (2 * soft), 0.0, 1.0)


def make_scene(rng: np.random.Generator | int, height: int = 64,
               width: int = 64) -> dict[str, np.ndarray]:
    """A procedural scene and its components (all float32).

    Returns ``{"ir": (H, W), "vi": (H, W, 3), "vi_gray": (H, W), "ir_background": (H, W),
    "ir_targets": (H, W) (warm-object intensity added to the IR background), "target_mask": (H, W),
    "texture": (H, W) (the visible-only texture layer)}``; images in [0, 1].
    """
    rng = _rng(rng)
    h, w = int(height), int(width)
    s = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # visible base: a gradient (sky/ground like) plus smooth clutter
    ang = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
    grad = (grad - grad.min()) / (np.ptp(grad) + 1e-12)
    vi_base = 0.25 + 0.35 * grad + 0.25 * _smooth(rng, h, w, s / 8)
    # textured regions: visible only
    texture = np.zeros((h, w))
    for _ in range(rng.integers(2, 4)):
        m = _ellipse(h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.15, 0.35) * s,
                     rng.uniform(0.15, 0.35) * s, rng.uniform(0, np.pi), soft=1.0)
        kind = rng.integers(0, 3)
        if kind == 0:  # stripes
            t = rng.uniform(0, np.pi)
            period = rng.uniform(3.0, 6.0)
            pat = np.sin(2 * np.pi * (np.cos(t) * xx + np.sin(t) * yy) / period)
        elif kind == 1:  # checkerboard
            c = int(rng.integers(2, 5))
            pat = ((xx // c + yy // c) % 2) * 2.0 - 1.0
        else:  # fine grain
            pat = np.clip(ndimage.gaussian_filter(rng.standard_normal((h, w)), 0.6) * 2.5, -1, 1)
        texture += m * pat * rng.uniform(0.12, 0.22)
    # warm objects: bright in IR, faint in visible
    targets = np.zeros((h, w))
    for _ in range(rng.integers(1, 4)):
        m = _ellipse(h, w, rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w,
                     rng.uniform(0.08, 0.2) * s, rng.uniform(0.05, 0.12) * s, rng.uniform(0, np.pi))
        targets = np.maximum(targets, m * rng.uniform(0.4, 0.6))
    target_mask = (targets > 0).astype(np.float32)
    vi_gray = np.clip(vi_base + texture - 0.08 * targets + rng.normal(0, 0.01, (h, w)), 0, 1)
    tint = rng.uniform(0.85, 1.15, 3)
    chroma = 0.05 * (_smooth(rng, h, w, s / 6)[..., None] - 0.5) * np.array([1.0, -0.5, -0.5])
    vi = np.clip(vi_gray[..., None] * tint + chroma, 0, 1)
    ir_background = 0.1 + 0.2 * _smooth(rng, h, w, s / 6) + 0.1 * vi_base
    ir = np.clip(ir_background + targets + rng.normal(0, 0.01, (h, w)), 0, 1)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {"ir": f32(ir), "vi": f32(vi), "vi_gray": f32(vi_gray),
            "ir_background": f32(ir_background), "ir_targets": f32(targets),
            "target_mask": f32(target_mask), "texture": f32(texture)}


def make_pair(rng: np.random.Generator | int, height: int = 64,
              width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic pair: ``ir`` (H, W) and ``vi`` (H, W, 3), float32 in [0, 1]."""
    sc = make_scene(rng, height, width)
    return sc["ir"], sc["vi"]


def scene_from_pair(ir: np.ndarray, vi: np.ndarray) -> dict[str, np.ndarray]:
    """A scene (``make_scene``'s keys) from a real pair: ``ir`` (H, W[, 1]), ``vi`` (H, W[, C])
    in [0, 1]; the decomposition of the module docstring."""
    ir = np.asarray(ir, np.float64).reshape(ir.shape[0], ir.shape[1])
    vi = np.asarray(vi, np.float64)
    vi_rgb = np.repeat(vi.reshape(vi.shape[0], vi.shape[1], 1), 3, -1) if vi.ndim == 2 or \
        vi.shape[-1] == 1 else vi[..., :3]
    vi_gray = vi_rgb @ np.array([0.299, 0.587, 0.114])
    targets = np.maximum(ir - ndimage.gaussian_filter(ir, max(ir.shape) / 8, mode="reflect"), 0)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {"ir": f32(ir), "vi": f32(vi_rgb), "vi_gray": f32(vi_gray),
            "ir_background": f32(ir - targets), "ir_targets": f32(targets),
            "target_mask": f32(targets > 0.05),
            "texture": f32(vi_gray - ndimage.gaussian_filter(vi_gray, 2.0))}


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))


def _real_scene(pairs: Sequence[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                size: int, min_detail: float = REAL_MIN_DETAIL,
                tries: int = REAL_CROP_TRIES) -> dict[str, np.ndarray]:
    """A random square crop of a random real pair, resized to ``size``: the first of up to
    ``tries`` crops whose detail rms reaches ``min_detail``, else the most detailed one
    (module docstring; ``min_detail`` 0 keeps the first crop)."""
    best, best_detail = None, -1.0
    for _ in range(max(int(tries), 1)):
        ir, vi = pairs[int(rng.integers(len(pairs)))]
        h, w = ir.shape[:2]
        side = int(rng.uniform(0.25, 0.5) * min(h, w))
        side = max(min(side, h, w), 1)
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))

        def crop(a):
            a = a[y:y + side, x:x + side]
            chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c], np.float32), "F")
                                .resize((size, size), Image.BILINEAR)) for c in range(a.shape[-1])]
            return np.clip(np.stack(chans, -1), 0, 1)
        scene = scene_from_pair(crop(ir), crop(vi))
        detail = _rms(scene["texture"])  # the detail layer g - G_2(g) (scene_from_pair)
        if detail >= min_detail:
            return scene
        if detail > best_detail:
            best, best_detail = scene, detail
    return best


def read_pairs(folder: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every (ir, vi) pair of ``folder/ir``, ``folder/vi`` (same file names) as [0, 1] floats."""
    from evafusion_jax.data import image_io
    folder = Path(folder)
    ir_dir, vi_dir = folder / "ir", folder / "vi"
    if vi_dir.is_dir():  # same file names (image_io.match_folders by name); unpaired files skipped
        pairs = image_io.match_folders({"ir": ir_dir, "vi": vi_dir}, key="name", primary="ir").pairs
    else:
        pairs = image_io.list_images(ir_dir) and []
    out = []
    for _, p in pairs:
        ir, vi = image_io.read_image(p["ir"]), image_io.read_image(p["vi"])
        if ir.shape[:2] == vi.shape[:2]:
            out.append((image_io.to_gray(ir), vi))
    if not out:
        raise ValueError(f"{folder} holds no ir/vi pairs of equal size with the same file names")
    return out


def random_region_mask(rng: np.random.Generator | int, size: int) -> np.ndarray:
    """(size, size) float32 mask: a union of 1-3 soft ellipses (a stand-in for a SAM region)."""
    rng = _rng(rng)
    m = np.zeros((size, size))
    for _ in range(int(rng.integers(1, 4))):
        m = np.maximum(m, _ellipse(size, size, rng.uniform(0, size), rng.uniform(0, size),
                                   rng.uniform(0.15, 0.4) * size, rng.uniform(0.15, 0.4) * size,
                                   rng.uniform(0, np.pi), soft=1.0))
    return (m > 0.5).astype(np.float32)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(a) * 255.0), 0, 255).astype(np.uint8)


def _prepare_dir(path: Path, overwrite: bool) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    return staging_dir(path)


def write_pairs_folder(path: str | os.PathLike, n: int, height: int = 64, width: int = 64,
                       seed: int = 0, overwrite: bool = False) -> Path:
    """Writes ``n`` synthetic pairs as ``path/ir/NNNNN.png`` (8-bit gray) and ``path/vi/NNNNN.png``
    (RGB), plus README.txt. Pair i depends only on (seed, i). The folder is written to a temporary
    sibling and renamed into place."""
    path = Path(path)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tmp = _prepare_dir(path, overwrite)
    try:
        (tmp / "ir").mkdir()
        (tmp / "vi").mkdir()
        for i in range(n):
            ir, vi = make_pair(np.random.default_rng([seed, i]), height, width)
            Image.fromarray(_u8(ir), "L").save(tmp / "ir" / f"{i:05d}.png")
            Image.fromarray(_u8(vi), "RGB").save(tmp / "vi" / f"{i:05d}.png")
        (tmp / "README.txt").write_text(
            "SYNTHETIC DATA - procedural infrared/visible pairs, not real images.\n"
            f"Generated by evafusion_jax.data.synthetic.write_pairs_folder (seed={seed}, n={n}, "
            f"size={height}x{width}).\n")
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ----------------------------------------- feedback ----------------------------------------

def sample_degradation(rng: np.random.Generator | int, size: int = 64,
                       degradations: Sequence[str] = DEGRADATIONS) -> dict[str, Any]:
    """Draws degradation parameters (see the module docstring for the distributions).

    Degradations not named in ``degradations`` are switched off (0, no circles); the random
    draws are made all the same, so the enabled ones get the same values as with all enabled."""
    rng = _rng(rng)
    unknown = set(degradations) - set(DEGRADATIONS)
    if unknown:
        raise ValueError(f"unknown degradation(s) {sorted(unknown)}; choose from {DEGRADATIONS}")
    circles = []
    for _ in range(int(rng.integers(0, MAX_CIRCLES + 1))):
        r = float(rng.uniform(0.08, 0.16) * size)
        circles.append({"x": float(rng.uniform(r * 0.5, size - r * 0.5)),
                        "y": float(rng.uniform(r * 0.5, size - r * 0.5)),
                        "r": r, "strength": float(rng.uniform(0.4, 1.0)),
                        "kind": "ringing" if rng.random() < 0.5 else "blocking"})
    p = {"ir_loss": float(rng.uniform(0, 1)), "texture_loss": float(rng.uniform(0, 1)),
         "blur_sigma": float(rng.uniform(0, BLUR_MAX)),
         "noise_std": float(rng.uniform(0, NOISE_MAX)), "circles": circles}
    for name, key in (("ir_loss", "ir_loss"), ("texture_loss", "texture_loss"),
                      ("blur", "blur_sigma"), ("noise", "noise_std")):
        if name not in degradations:
            p[key] = 0.0
    if "artifacts" not in degradations:
        p["circles"] = []
    return p


def texture_retained(scene: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> float:
    """The fraction of the visible detail layer ``d = g - G_2(g)`` that the fused image keeps:
    ``(1 - texture_loss) * rms(G_blur_sigma(d)) / rms(d)`` (1 for a flat ``d``), i.e. what is
    left of the texture after the texture loss AND the blur (module docstring)."""
    g = scene["vi_gray"].astype(np.float64)
    d = g - ndimage.gaussian_filter(g, 2.0)
    keep = 1.0 - float(np.clip(params["texture_loss"], 0, 1))
    rms = _rms(d)
    if params["blur_sigma"] > 0 and rms > 1e-6:
        keep *= float(np.sqrt(np.mean(ndimage.gaussian_filter(d, params["blur_sigma"]) ** 2))) / rms
    return float(np.clip(keep, 0.0, 1.0))


def score_rule(params: Mapping[str, Any]) -> dict[str, float]:
    """The five synthetic scores (dataset spelling, each in [1, 5]) from degradation parameters.

    Texture Preservation uses ``params["texture_retained"]`` (``texture_retained``: texture
    loss and blur together) when present, else ``1 - texture_loss``."""
    thermal = 5.0 - 4.0 * float(np.clip(params["ir_loss"], 0, 1))
    kept = params.get("texture_retained", 1.0 - float(params["texture_loss"]))
    texture = 5.0 - 4.0 * float(np.clip(1.0 - kept, 0, 1))
    sharp = 5.0 - 4.0 * float(np.clip(params["blur_sigma"] / BLUR_MAX, 0, 1))
    strength = sum(float(c["strength"]) for c in params.get("circles", ()))
    severity = (0.4 * float(np.clip(params["noise_std"] / NOISE_MAX, 0, 1))
                + 0.6 * min(1.0, strength / ARTIFACT_CAP))
    artifacts = 5.0 - 4.0 * severity
    overall = 0.3 * thermal + 0.3 * texture + 0.2 * sharp + 0.2 * artifacts
    vals = (thermal, texture, artifacts, sharp, overall)
    return {k: float(np.clip(v, 1.0, 5.0)) for k, v in zip(DATASET_SCORE_NAMES, vals)}


def fuse_degraded(scene: Mapping[str, np.ndarray], params: Mapping[str, Any],
                  rng: np.random.Generator | int) -> np.ndarray:
    """The fused (H, W) float32 image in [0, 1] of ``scene`` under ``params`` (module docstring)."""
    rng = _rng(rng)
    g = scene["vi_gray"].astype(np.float64)
    low = ndimage.gaussian_filter(g, 2.0)
    f = (0.6 * low + 0.4 * scene["ir_background"]
         + (1.0 - params["ir_loss"]) * scene["ir_targets"]
         + (1.0 - params["texture_loss"]) * (g - low))
    if params["blur_sigma"] > 0:
        f = ndimage.gaussian_filter(f, params["blur_sigma"])
    f = f + rng.normal(0.0, params["noise_std"], f.shape)
    h, w = f.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for c in params.get("circles", ()):
        d = np.sqrt((xx - c["x"]) ** 2 + (yy - c["y"]) ** 2)
        inside = d <= c["r"]
        if c["kind"] == "ringing":
            f = f + inside * 0.3 * c["strength"] * np.cos(2 * np.pi * d / 3.0)
        else:
            b = 4
            hp, wp = -(-h // b) * b, -(-w // b) * b
            pad = np.pad(f, ((0, hp - h), (0, wp - w)), mode="edge")
            means = pad.reshape(hp // b, b, wp // b, b).mean(axis=(1, 3))
            means = means + rng.uniform(-0.25, 0.25, means.shape) * c["strength"]
            blocks = np.repeat(np.repeat(means, b, 0), b, 1)[:h, :w]
            f = np.where(inside, blocks, f)
    return np.clip(f, 0.0, 1.0).astype(np.float32)


def make_feedback_sample(rng: np.random.Generator | int, size: int = 64,
                         params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One synthetic annotated sample: ``{"ir", "vi", "fused" (H, W) float32, "heatmap" (H, W)
    uint8 (255 inside circles), "params", "scores" (dataset names -> rating), "circles"}``."""
    rng = _rng(rng)
    scene = make_scene(rng, size, size)
    params = dict(params) if params is not None else sample_degradation(rng, size)
    fused = fuse_degraded(scene, params, rng)
    params.setdefault("texture_retained", texture_retained(scene, params))
    circles = [{"x": round(c["x"], 3), "y": round(c["y"], 3), "r": round(c["r"], 3)}
               for c in params.get("circles", ())]
    return {"ir": scene["ir"], "vi": scene["vi"], "fused": fused,
            "heatmap": render_circles(circles, size, size), "params": params,
            "scores": score_rule(params), "circles": circles}


def write_feedback_folder(path: str | os.PathLike, n: int, seed: int = 0, size: int = 64, *,
                          fused_per_pair: int = 1,
                          split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                          degradations: Sequence[str] = DEGRADATIONS,
                          pairs: str | os.PathLike | None = None, masked_fraction: float = 0.0,
                          min_detail: float = REAL_MIN_DETAIL, overwrite: bool = False) -> Path:
    """Writes a SYNTHETIC human-feedback dataset in the folder layout of ``feedback``.

    ``n`` fused images (``n / fused_per_pair`` source pairs, rounded up; each pair fused
    ``fused_per_pair`` times with independent degradations) of ``size`` x ``size``::

        path/README.txt    says SYNTHETIC and gives the score rule
        path/ir/PPPPP.png, path/vi/PPPPP.png
        path/fused/PPPPP_K.png (8-bit gray), path/heatmap/PPPPP_K.png (circles as discs)
        path/scores.jsonl  {"fused", "ir", "vi", "heatmap", "scores", "circles", "split",
                            "synthetic": true, "degradation": {...}}

    ``degradations`` (a subset of ``DEGRADATIONS``) switches the others off (their scores are
    then constantly 5, so their PLCC/SRCC are NaN), for an easier, more controlled set.
    ``pairs``: a folder of REAL pairs (``ir/``, ``vi/``): scenes are crops of them instead of
    procedural scenes (module docstring), each with a visible-detail rms of at least
    ``min_detail`` when one of ``REAL_CROP_TRIES`` crops has it (0: any crop).
    ``masked_fraction``: that fraction of the fused images is also written masked
    (``PPPPP_K_masked.png``, same scores; module docstring), in the same split as its source.
    Splits: the first round(f_train * pairs) pairs are "train", the next round(f_dev * pairs)
    "dev", the rest "test". Sample (pair p, version k) depends only on (seed, p, k), so a smaller
    ``n`` gives a prefix of a larger one (apart from the split, which depends on ``n``).
    Written to a temporary sibling folder and renamed into place.
    """
    path = Path(path)
    if n < 1 or fused_per_pair < 1:
        raise ValueError(f"need n >= 1 and fused_per_pair >= 1, got n={n}, "
                         f"fused_per_pair={fused_per_pair}")
    fr = [float(x) for x in split_fractions]
    if len(fr) != 3 or any(x < 0 for x in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got "
                         f"{split_fractions}")
    n_pairs = -(-n // fused_per_pair)
    n_train = int(round(fr[0] * n_pairs))
    n_dev = int(round(fr[1] * n_pairs))
    tmp = _prepare_dir(path, overwrite)
    try:
        for sub in ("ir", "vi", "fused", "heatmap"):
            (tmp / sub).mkdir()
        lines = []
        done = 0
        real = read_pairs(pairs) if pairs else None
        for p in range(n_pairs):
            scene = (make_scene(np.random.default_rng([seed, p]), size, size) if real is None
                     else _real_scene(real, np.random.default_rng([seed, p]), size, min_detail))
            pname = f"{p:05d}.png"
            Image.fromarray(_u8(scene["ir"]), "L").save(tmp / "ir" / pname, compress_level=1)
            Image.fromarray(_u8(scene["vi"]), "RGB").save(tmp / "vi" / pname, compress_level=1)
            split = "train" if p < n_train else "dev" if p < n_train + n_dev else "test"
            for k in range(fused_per_pair):
                if done >= n:
                    break
                rng = np.random.default_rng([seed, p, k, 1])
                params = sample_degradation(rng, size, degradations)
                fused = fuse_degraded(scene, params, rng)
                params["texture_retained"] = texture_retained(scene, params)
                circles = [{"x": round(c["x"], 3), "y": round(c["y"], 3), "r": round(c["r"], 3)}
                           for c in params["circles"]]
                fname = f"{p:05d}_{k}.png"
                Image.fromarray(_u8(fused), "L").save(tmp / "fused" / fname, compress_level=1)
                Image.fromarray(render_circles(circles, size, size), "L").save(
                    tmp / "heatmap" / fname, compress_level=1)
                scores = score_rule(params)
                if masked_fraction > 0 and rng.random() < masked_fraction:
                    m = random_region_mask(rng, size)
                    mname = f"{p:05d}_{k}_masked.png"
                    Image.fromarray(_u8(fused * m), "L").save(tmp / "fused" / mname,
                                                              compress_level=1)
                    Image.fromarray(_u8(render_circles(circles, size, size) / 255.0 * m), "L").save(
                        tmp / "heatmap" / mname, compress_level=1)
                    lines.append({"fused": mname, "ir": pname, "vi": pname, "heatmap": mname,
                                  "scores": {k2: round(v, 4) for k2, v in scores.items()},
                                  "split": split, "synthetic": True, "masked": True})
                lines.append({
                    "fused": fname, "ir": pname, "vi": pname, "heatmap": fname,
                    "scores": {k2: round(v, 4) for k2, v in scores.items()},
                    "circles": circles, "split": split, "synthetic": True,
                    "degradation": {kk: (round(v, 5) if isinstance(v, float) else v)
                                    for kk, v in params.items() if kk != "circles"}
                                   | {"circle_strengths": [round(c["strength"], 5)
                                                           for c in params["circles"]],
                                      "circle_kinds": [c["kind"] for c in params["circles"]]},
                })
                done += 1
        with open(tmp / "scores.jsonl", "w", encoding="utf-8") as f:
            for ln in lines:
                f.write(json.dumps(ln) + "\n")
        (tmp / "README.txt").write_text(SYNTHETIC_README.format(
            func="write_feedback_folder", seed=seed, n=n, size=size, blur_max=BLUR_MAX,
            noise_max=NOISE_MAX, cap=ARTIFACT_CAP)
            + f"Enabled degradations: {', '.join(d for d in DEGRADATIONS if d in degradations)}\n"
            + (f"Scenes: crops of the real pairs in {Path(pairs).absolute()} with a visible-detail "
               f"rms >= {min_detail} (of up to {REAL_CROP_TRIES} random crops; else the most "
               "detailed)\n" if pairs else ""))
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
