"""Infrared/visible image fusion (IVIF) metrics, vectorised NumPy in float64.

Conventions (those of the "Evaluator" class that CDDFuse-style IVIF repositories
share, and that the EVAFusion/DCEvo tables follow):

* Every function takes images with values in ``[0, 1]`` (the project-wide
  convention), as ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` arrays. Three-channel
  images are reduced to BT.601 luma ``0.299 R + 0.587 G + 0.114 B``. Internally
  everything is computed in float64 on the **0-255 scale** (``x255 = 255 x``), so
  SD, SF, AG, MSE have the magnitudes papers report.
* The reference code reads 8-bit files, so its images hold whole 0-255 levels.
  Functions here do not round, except EN and MI, which histogram
  ``round(x255)`` (clipped to 0..255). ``evafusion_jax.evaluate`` rounds all three
  images to 8-bit levels before calling these, like the reference.
* Reference-based metrics take ``(fused, ir, vi)``, i.e. F, A = infrared,
  B = visible, and combine the two source terms as the reference does: a **sum**
  for MI, SCD, VIF, SSIM (so their maximum is 2 for VIF/SSIM); a **mean** for CC
  and MSE; Qabf is the edge-strength-weighted combination of both.
* SSIM has two conventions: the ``SSIM`` column is :func:`ssim_evaluator`, the
  Evaluator's (scikit-image 0.19 on float 0-255 images without ``data_range``,
  i.e. ``data_range=2``; the numbers of published tables), ``SSIM_255`` is
  :func:`ssim` (``data_range=255``).
* PSNR has two conventions in IVIF papers; both are provided and named:
  :func:`psnr_maxf` (``10 log10(max(F)^2 / MSE)`` on 0-255, the Evaluator's; values
  around 10-20 dB) and :func:`psnr_unit` (``10 log10(255^2 / MSE_01)`` where
  ``MSE_01`` is the MSE of the images scaled to [0, 1]; the one behind the ~60 dB
  values in the EVAFusion tables).
* No-reference NIQE and BRISQUE live in :mod:`evafusion_jax.eval.metrics_nr` and are
  re-exported here: the ``NIQE`` column is :func:`niqe_matlab` (MATLAB's ``niqe``,
  as BasicSR), ``NIQE_skvideo`` is :func:`niqe` (scikit-video's), ``BRISQUE`` is
  :func:`brisque` (the ``brisque`` package's, whose fitted parameters it uses).

``compute_metrics(fused, ir, vi, names)`` computes a dict of any subset of
``ALL_METRIC_NAMES`` (the default columns ``METRIC_NAMES`` and ``VARIANT_METRICS``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
from scipy import ndimage

from evafusion_jax.eval.metrics_nr import brisque, niqe, niqe_matlab

__all__ = [
    "entropy", "standard_deviation", "spatial_frequency", "average_gradient", "mutual_information",
    "mutual_information_pair", "scd", "vif", "vif_pair", "qabf", "ssim", "ssim_evaluator", "ssim_pair",
    "correlation_coefficient", "correlation_pair", "mse", "psnr_maxf", "psnr_unit", "niqe", "niqe_matlab", "brisque",
    "METRIC_NAMES", "VARIANT_METRICS", "ALL_METRIC_NAMES", "SIZE_LIMITED_METRICS", "REFERENCE_METRICS",
    "NO_REFERENCE_METRICS", "HIGHER_IS_BETTER", "compute_metrics", "as_gray255",
]

_LUMA = np.array([0.299, 0.587, 0.114])


def as_gray255(image: np.ndarray, name: str = "image") -> np.ndarray:
    """``[0, 1]`` image ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` -> float64 ``(H, W)`` on the 0-255 scale."""
    x = np.asarray(image, dtype=np.float64)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    elif x.ndim == 3 and x.shape[-1] == 3:
        x = x @ _LUMA
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {x.shape}")
    return x * 255.0


def _triplet(fused, ir, vi):
    f, a, b = as_gray255(fused, "fused"), as_gray255(ir, "ir"), as_gray255(vi, "vi")
    if not (f.shape == a.shape == b.shape):
        raise ValueError(f"fused {f.shape}, ir {a.shape} and vi {b.shape} must have the same height and width")
    return f, a, b


def _levels(x255: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x255), 0, 255).astype(np.int64)


# ----------------------------------------------------------------------------- no-reference, fused only

def entropy(fused: np.ndarray) -> float:
    """EN, Shannon entropy in bits of the 256-level histogram.

    ``EN = -sum_l p_l log2 p_l`` with ``p_l`` the fraction of pixels at level
    ``l = round(255 x)`` (clipped to 0..255). Range [0, 8]; 0 for a constant image.
    """
    lv = _levels(as_gray255(fused, "fused")).ravel()
    p = np.bincount(lv, minlength=256) / lv.size
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p)))


def standard_deviation(fused: np.ndarray) -> float:
    """SD, population standard deviation on 0-255: ``sqrt(mean((F - mean F)^2))``."""
    return float(np.std(as_gray255(fused, "fused")))


def spatial_frequency(fused: np.ndarray) -> float:
    """SF = ``sqrt(RF^2 + CF^2)`` on 0-255.

    ``RF^2 = mean((F[i, j+1] - F[i, j])^2)`` over the H x (W-1) horizontal
    differences, ``CF^2 = mean((F[i+1, j] - F[i, j])^2)`` over the (H-1) x W
    vertical ones (each mean over its own count, as the Evaluator).
    """
    f = as_gray255(fused, "fused")
    return float(np.sqrt(np.mean(np.diff(f, axis=1) ** 2) + np.mean(np.diff(f, axis=0) ** 2)))


def average_gradient(fused: np.ndarray) -> float:
    """AG = ``mean(sqrt((Gx^2 + Gy^2) / 2))`` on 0-255.

    ``Gx, Gy`` are ``numpy.gradient`` derivatives: central differences
    ``(F[j+1] - F[j-1]) / 2`` inside, one-sided differences on the first and
    last row/column; the mean is over all H x W pixels.
    """
    f = as_gray255(fused, "fused")
    gy, gx = np.gradient(f)
    return float(np.mean(np.sqrt((gx ** 2 + gy ** 2) / 2.0)))


# ----------------------------------------------------------------------------- information / correlation

def mutual_information_pair(x: np.ndarray, y: np.ndarray) -> float:
    """Mutual information in nats between the 256-level quantisations of two images.

    ``MI(X, Y) = sum_{l,m} p(l, m) ln(p(l, m) / (p(l) p(m)))`` over the joint
    histogram of ``round(255 x)`` and ``round(255 y)``; equal to
    ``sklearn.metrics.mutual_info_score`` on those integer levels (natural log,
    as the Evaluator; divide by ``ln 2`` for bits).
    """
    a, b = _levels(as_gray255(x, "x")).ravel(), _levels(as_gray255(y, "y")).ravel()
    if a.shape != b.shape:
        raise ValueError("mutual_information_pair: images differ in size")
    joint = np.bincount(a * 256 + b, minlength=256 * 256).reshape(256, 256).astype(np.float64) / a.size
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    outer = np.outer(pa, pb)
    return float(max(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])), 0.0))


def mutual_information(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """MI = ``MI(F, A) + MI(F, B)`` in nats (A = ir, B = vi); see :func:`mutual_information_pair`."""
    _triplet(fused, ir, vi)
    return mutual_information_pair(fused, ir) + mutual_information_pair(fused, vi)


def correlation_pair(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation ``sum(dx dy) / sqrt(sum(dx^2) sum(dy^2))`` with ``d = v - mean(v)``.

    Returns 0 when either image is constant (the reference divides by zero).
    """
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b) / den) if den > 0 else 0.0


def correlation_coefficient(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """CC = ``(r(A, F) + r(B, F)) / 2``, the mean Pearson correlation with the two sources."""
    f, a, b = _triplet(fused, ir, vi)
    return 0.5 * (correlation_pair(a, f) + correlation_pair(b, f))


def scd(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """SCD, sum of the correlations of differences: ``r(F - B, A) + r(F - A, B)``.

    Range [-2, 2]; a constant difference image contributes 0.
    """
    f, a, b = _triplet(fused, ir, vi)
    return correlation_pair(f - b, a) + correlation_pair(f - a, b)


# ----------------------------------------------------------------------------- error-based

def mse(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """MSE = ``(mean((A - F)^2) + mean((B - F)^2)) / 2`` on the 0-255 scale (the Evaluator's)."""
    f, a, b = _triplet(fused, ir, vi)
    return float((np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2.0)


def psnr_maxf(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """PSNR, convention (a): ``10 log10(max(F)^2 / MSE)`` with F and MSE on 0-255 (:func:`mse`).

    The Evaluator's definition (peak = brightest fused pixel, not 255). ``inf``
    when MSE is 0.
    """
    f = as_gray255(fused, "fused")
    m = mse(fused, ir, vi)
    return float("inf") if m == 0 else float(10.0 * np.log10(np.max(f) ** 2 / m))


def psnr_unit(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """PSNR, convention (b): ``10 log10(255^2 / MSE_01)`` with ``MSE_01`` the :func:`mse` of [0, 1] images.

    ``MSE_01 = MSE / 255^2``, so this equals ``10 log10(255^4 / MSE)`` and gives the
    ~60 dB values of the EVAFusion tables. ``inf`` when MSE is 0.
    """
    m01 = mse(fused, ir, vi) / 255.0 ** 2
    return float("inf") if m01 == 0 else float(10.0 * np.log10(255.0 ** 2 / m01))


# ----------------------------------------------------------------------------- SSIM

def ssim_pair(x: np.ndarray, y: np.ndarray, data_range: float = 255.0, win_size: int = 7) -> float:
    """Mean SSIM of two images on the 0-255 scale, identical to ``skimage.metrics.structural_similarity``
    with its defaults (uniform ``win_size`` x ``win_size`` window, K1 = 0.01, K2 = 0.03, sample
    covariances with ``N / (N - 1)``, reflect borders, mean over the interior that excludes
    ``(win_size - 1) / 2`` pixels per side) and ``data_range=255``.

    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``,
    ``C1 = (K1 L)^2, C2 = (K2 L)^2, L = data_range``.
    """
    a, b = as_gray255(x, "x"), as_gray255(y, "y")
    if a.shape != b.shape:
        raise ValueError("ssim_pair: images differ in size")
    if min(a.shape) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {a.shape}")
    n = win_size * win_size
    cov_norm = n / (n - 1.0)
    filt = lambda z: ndimage.uniform_filter(z, size=win_size, mode="reflect")
    ux, uy = filt(a), filt(b)
    vx = cov_norm * (filt(a * a) - ux * ux)
    vy = cov_norm * (filt(b * b) - uy * uy)
    vxy = cov_norm * (filt(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


#: The Evaluator's SSIM range: ``structural_similarity`` on float images without ``data_range``
#: takes it from the dtype under scikit-image 0.19 (the version CDDFuse pins), ``1 - (-1) = 2``.
EVALUATOR_SSIM_RANGE = 2.0


def ssim_evaluator(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """SSIM as the IVIF Evaluator (the ``SSIM`` column): ``SSIM(F, A) + SSIM(F, B)`` on 0-255 with ``data_range=2``.

    The CDDFuse ``Evaluator`` calls ``skimage.metrics.structural_similarity(F, A)``
    on float 0-255 images without ``data_range``; under scikit-image 0.19 the range
    is then the float dtype's, 2, so ``C1 = (0.02)^2`` and ``C2 = (0.06)^2`` are
    negligible against 0-255 statistics. Published IVIF SSIM tables (about 1.0 on
    TNO) use this. Otherwise as :func:`ssim_pair`. At most 2.
    """
    _triplet(fused, ir, vi)
    return ssim_pair(fused, ir, EVALUATOR_SSIM_RANGE) + ssim_pair(fused, vi, EVALUATOR_SSIM_RANGE)


def ssim(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """SSIM with the image's true range (the ``SSIM_255`` column): ``SSIM(F, A) + SSIM(F, B)``, ``data_range=255``.

    Each term as :func:`ssim_pair` (scikit-image's ``structural_similarity`` with
    ``data_range=255``); sum, so at most 2. This is not the number IVIF papers
    print: their ``SSIM`` column is :func:`ssim_evaluator`.
    """
    _triplet(fused, ir, vi)
    return ssim_pair(fused, ir) + ssim_pair(fused, vi)


# ----------------------------------------------------------------------------- VIF

def _gauss_window_1d(n: int) -> np.ndarray:
    sd = n / 5.0
    r = np.arange(n) - (n - 1) / 2.0
    g = np.exp(-(r * r) / (2 * sd * sd))
    return g / g.sum()


def _valid_filter(x: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """2-D 'valid' correlation with the separable kernel ``outer(w1, w1)``."""
    k = len(w1)
    y = ndimage.correlate1d(x, w1, axis=0, mode="constant")
    y = ndimage.correlate1d(y, w1, axis=1, mode="constant")
    h = k // 2
    return y[h:x.shape[0] - h, h:x.shape[1] - h]


def vif_pair(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float = 2.0) -> float:
    """Pixel-domain multi-scale VIF (VIFP, Sheikh & Bovik 2006) of ``dist`` against ``ref`` on 0-255.

    Four scales; at scale s = 1..4 a Gaussian window of size ``N = 2^(5-s) + 1``
    (17, 9, 5, 3) and std ``N / 5``; from scale 2 on, the images are first
    low-passed with that scale's window ('valid') and subsampled by 2. With local
    'valid' moments ``mu, sigma_r^2, sigma_d^2, sigma_rd``:
    ``g = sigma_rd / (sigma_r^2 + eps)``, ``sv^2 = sigma_d^2 - g sigma_rd`` (with the
    usual corrections: negative variances -> 0; ``g = 0, sv^2 = sigma_d^2`` where
    ``sigma_r^2 < eps``; ``g = 0, sv^2 = 0`` where ``sigma_d^2 < eps``; ``sv^2 = sigma_d^2,
    g = 0`` where ``g < 0``; ``sv^2 >= eps``), ``eps = 1e-10``,
    ``VIF = sum log10(1 + g^2 sigma_r^2 / (sv^2 + sigma_n^2)) / sum log10(1 + sigma_r^2 / sigma_n^2)``
    with ``sigma_n^2 = 2``, sums over all positions and scales. 1 when the
    denominator is 0 (constant reference), as the Evaluator (which returns 1 for NaN).
    """
    r, d = as_gray255(ref, "ref"), as_gray255(dist, "dist")
    if r.shape != d.shape:
        raise ValueError("vif_pair: images differ in size")
    eps = 1e-10
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        w = _gauss_window_1d(n)
        if scale > 1:
            r = _valid_filter(r, w)[::2, ::2]
            d = _valid_filter(d, w)[::2, ::2]
        if min(r.shape) < n:
            raise ValueError(f"VIF needs images of at least about 41x41 pixels, got {ref.shape[:2]}")
        mu1, mu2 = _valid_filter(r, w), _valid_filter(d, w)
        s1 = np.maximum(_valid_filter(r * r, w) - mu1 * mu1, 0.0)
        s2 = np.maximum(_valid_filter(d * d, w) - mu2 * mu2, 0.0)
        s12 = _valid_filter(r * d, w) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        low1 = s1 < eps
        g[low1] = 0.0
        sv[low1] = s2[low1]
        s1[low1] = 0.0
        low2 = s2 < eps
        g[low2] = 0.0
        sv[low2] = 0.0
        neg = g < 0
        sv[neg] = s2[neg]
        g[neg] = 0.0
        sv[sv <= eps] = eps
        num += float(np.sum(np.log10(1.0 + g * g * s1 / (sv + sigma_nsq))))
        den += float(np.sum(np.log10(1.0 + s1 / sigma_nsq)))
    return 1.0 if den == 0 else num / den


def vif(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """VIF (the "VIFF" column of IVIF papers) = ``VIFP(A -> F) + VIFP(B -> F)``; see :func:`vif_pair`."""
    _triplet(fused, ir, vi)
    return vif_pair(ir, fused) + vif_pair(vi, fused)


# ----------------------------------------------------------------------------- Qabf

_SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)


def _edge_strength_orientation(x: np.ndarray):
    sx = ndimage.convolve(x, _SOBEL_X, mode="constant")
    sy = ndimage.convolve(x, _SOBEL_Y, mode="constant")
    g = np.sqrt(sx * sx + sy * sy)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(sx == 0, math.pi / 2, np.arctan(sy / np.where(sx == 0, 1.0, sx)))
    return g, a


def _edge_preservation(ga, aa, gf, af):
    tg, kg, dg = 0.9994, -15.0, 0.5
    ta, ka, da = 0.9879, -22.0, 0.8
    with np.errstate(divide="ignore", invalid="ignore"):
        gaf = np.where(ga > gf, gf / np.where(ga > gf, ga, 1.0),
                       np.where(ga < gf, ga / np.where(ga < gf, gf, 1.0), gf))
    aaf = 1.0 - np.abs(aa - af) / (math.pi / 2)
    return tg / (1 + np.exp(kg * (gaf - dg))) * ta / (1 + np.exp(ka * (aaf - da)))


def qabf(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """Qabf (Xydeas & Petrovic 2000), edge-information preservation, on 0-255.

    Sobel responses ``sx, sy`` (zero-padded 'same' convolution, so the image
    border itself counts as an edge, as in the reference), strength
    ``g = sqrt(sx^2 + sy^2)``, orientation ``a = arctan(sy / sx)`` (``pi/2`` where
    ``sx = 0``). For a source S: ``G = min(g_S, g_F) / max(g_S, g_F)`` (the Evaluator
    sets ``G = g_F`` where the strengths are equal), ``A = 1 - |a_S - a_F| / (pi/2)``,
    ``Q_SF = Tg / (1 + e^{kg (G - Dg)}) * Ta / (1 + e^{ka (A - Da)})`` with
    ``Tg = 0.9994, kg = -15, Dg = 0.5, Ta = 0.9879, ka = -22, Da = 0.8``;
    ``Qabf = sum(Q_AF g_A + Q_BF g_B) / sum(g_A + g_B)`` (weights with L = 1).
    0 when both sources are all zero (no edges at all).
    """
    f, a, b = _triplet(fused, ir, vi)
    ga, aa = _edge_strength_orientation(a)
    gb, ab = _edge_strength_orientation(b)
    gf, af = _edge_strength_orientation(f)
    den = float(np.sum(ga + gb))
    if den == 0:
        return 0.0
    q = _edge_preservation(ga, aa, gf, af) * ga + _edge_preservation(gb, ab, gf, af) * gb
    return float(np.sum(q) / den)


# ----------------------------------------------------------------------------- registry

REFERENCE_METRICS: dict[str, Callable[..., float]] = {
    "MI": mutual_information,
    "SCD": scd,
    "VIF": vif,
    "Qabf": qabf,
    "SSIM": ssim_evaluator,
    "SSIM_255": ssim,
    "CC": correlation_coefficient,
    "PSNR_maxF": psnr_maxf,
    "PSNR_unit": psnr_unit,
    "MSE": mse,
}
NO_REFERENCE_METRICS: dict[str, Callable[..., float]] = {
    "EN": entropy,
    "SD": standard_deviation,
    "SF": spatial_frequency,
    "AG": average_gradient,
    "NIQE": niqe_matlab,
    "NIQE_skvideo": niqe,
    "BRISQUE": brisque,
}
#: The default columns, with the conventions of published IVIF tables.
METRIC_NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC", "PSNR_maxF", "PSNR_unit",
                "MSE", "NIQE", "BRISQUE")
#: Other conventions of two of them, on request: SSIM with data_range 255, scikit-video's NIQE.
VARIANT_METRICS = ("SSIM_255", "NIQE_skvideo")
ALL_METRIC_NAMES = METRIC_NAMES + VARIANT_METRICS
#: No-reference metrics that raise ``ValueError`` for images too small (or too flat) for them.
SIZE_LIMITED_METRICS = ("NIQE", "NIQE_skvideo", "BRISQUE")
HIGHER_IS_BETTER = {n: n not in ("MSE", "NIQE", "NIQE_skvideo", "BRISQUE") for n in ALL_METRIC_NAMES}


def compute_metrics(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray,
                    names: Iterable[str] | None = None) -> dict[str, float]:
    """Computes the named metrics (default ``METRIC_NAMES``; any of ``ALL_METRIC_NAMES``) for one fused image.

    Raises ``ValueError`` for an unknown name or mismatched sizes; NIQE/BRISQUE
    raise ``ValueError`` for images that are too small and ``ImportError`` when
    the package holding their parameters is missing.
    """
    names = tuple(METRIC_NAMES if names is None else names)
    unknown = [n for n in names if n not in ALL_METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRIC_NAMES)}")
    f, a, b = _triplet(fused, ir, vi)
    f, a, b = f / 255.0, a / 255.0, b / 255.0
    out = {}
    for n in names:
        if n in REFERENCE_METRICS:
            out[n] = REFERENCE_METRICS[n](f, a, b)
        else:
            out[n] = NO_REFERENCE_METRICS[n](f)
    return out
