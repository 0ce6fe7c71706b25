import importlib
import importlib.util
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.signal import convolve2d

from evafusion_jax.eval import metrics, metrics_nr


def _smooth(seed, shape=(48, 56), sigma=2.0):
    """A textured [0, 1] image quantised to 8-bit levels."""
    r = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(r.random(shape), sigma)
    x = (x - x.min()) / (x.max() - x.min())
    return np.round(x * 255) / 255


@pytest.fixture(scope="module")
def triplet():
    a, b = _smooth(1), _smooth(2)
    f = np.round((a + b) / 2 * 255) / 255
    return f, a, b


# ----------------------------------------------------------------------------- against libraries

def test_ssim_matches_skimage(triplet):
    from skimage.metrics import structural_similarity
    f, a, b = triplet
    for x, y in ((f, a), (f, b), (a, b)):
        ref = structural_similarity(x * 255, y * 255, data_range=255)
        assert metrics.ssim_pair(x, y) == pytest.approx(ref, abs=1e-10)
    assert metrics.ssim(f, a, b) == pytest.approx(metrics.ssim_pair(f, a) + metrics.ssim_pair(f, b))
    assert metrics.ssim(a, a, a) == pytest.approx(2.0)


def test_mi_matches_sklearn(triplet):
    from sklearn.metrics import mutual_info_score
    f, a, b = triplet
    lv = lambda x: np.round(x * 255).astype(int).ravel()
    ref = mutual_info_score(lv(f), lv(a)) + mutual_info_score(lv(f), lv(b))
    assert metrics.mutual_information(f, a, b) == pytest.approx(ref, rel=1e-10)
    # MI(X, X) = H(X) in nats; symmetric
    assert metrics.mutual_information_pair(a, a) == pytest.approx(metrics.entropy(a) * math.log(2), rel=1e-10)
    assert metrics.mutual_information_pair(a, b) == pytest.approx(metrics.mutual_information_pair(b, a))


def test_cc_and_scd_against_numpy(triplet):
    f, a, b = triplet
    r = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]
    assert metrics.correlation_coefficient(f, a, b) == pytest.approx((r(a, f) + r(b, f)) / 2, rel=1e-10)
    assert metrics.scd(f, a, b) == pytest.approx(r(f - b, a) + r(f - a, b), rel=1e-10)


# ----------------------------------------------------------------------------- closed forms

def test_entropy_closed_forms():
    assert metrics.entropy(np.full((8, 8), 0.5)) == 0.0
    half = np.zeros((8, 8))
    half[:4] = 1.0
    assert metrics.entropy(half) == pytest.approx(1.0)
    all_levels = (np.arange(256 * 4) % 256).reshape(32, 32) / 255.0
    assert metrics.entropy(all_levels) == pytest.approx(8.0)


def test_sd_sf_ag_closed_forms():
    c = 2.0 / 255.0  # 2 levels per column
    ramp = np.tile(np.arange(20) * c, (10, 1))
    assert metrics.standard_deviation(ramp) == pytest.approx(np.std(ramp * 255))
    assert metrics.spatial_frequency(ramp) == pytest.approx(2.0)  # only horizontal differences of 2
    assert metrics.average_gradient(ramp) == pytest.approx(2.0 / math.sqrt(2))
    assert metrics.spatial_frequency(ramp.T) == pytest.approx(2.0)  # transpose-invariant
    const = np.full((10, 12), 0.3)
    assert metrics.standard_deviation(const) == pytest.approx(0.0, abs=1e-10)
    assert metrics.spatial_frequency(const) == pytest.approx(0.0, abs=1e-10)
    assert metrics.average_gradient(const) == pytest.approx(0.0, abs=1e-10)


def test_mse_psnr_closed_forms(triplet):
    _, a, _ = triplet
    f = a + 10 / 255  # +10 levels everywhere (values above 1 are fine for the formula)
    assert metrics.mse(f, a, a) == pytest.approx(100.0)
    assert metrics.psnr_unit(f, a, a) == pytest.approx(10 * math.log10(255.0 ** 4 / 100.0))
    assert metrics.psnr_maxf(f, a, a) == pytest.approx(10 * math.log10((f.max() * 255) ** 2 / 100.0))
    # MSE is the mean of the two source terms
    assert metrics.mse(f, a, f) == pytest.approx(50.0)
    assert metrics.psnr_unit(a, a, a) == math.inf and metrics.mse(a, a, a) == 0.0


def test_cc_scd_identities(triplet):
    f, a, b = triplet
    assert metrics.correlation_coefficient(a, a, a) == pytest.approx(1.0)
    # F = A: CC = (1 + r(A, B)) / 2 ; invariant to an affine change of F
    r_ab = metrics.correlation_pair(a, b)
    assert metrics.correlation_coefficient(a, a, b) == pytest.approx((1 + r_ab) / 2)
    assert metrics.correlation_coefficient(0.5 * a + 0.1, a, b) == pytest.approx((1 + r_ab) / 2)
    # F = A + B: SCD = r(A, A) + r(B, B) = 2 ; swapping the sources leaves SCD and CC unchanged
    assert metrics.scd(a + b, a, b) == pytest.approx(2.0)
    assert metrics.scd(f, a, b) == pytest.approx(metrics.scd(f, b, a))
    assert metrics.correlation_coefficient(f, a, b) == pytest.approx(metrics.correlation_coefficient(f, b, a))
    assert metrics.correlation_coefficient(np.full_like(a, 0.5), a, b) == 0.0


def _vif_reference(ref, dist, sigma_nsq=2.0):
    """Straightforward 2-D-kernel VIFP (scipy.signal.convolve2d), written from the formulas."""
    ref, dist = ref * 255.0, dist * 255.0
    eps, num, den = 1e-10, 0.0, 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        sd = n / 5.0
        y, x = np.mgrid[-(n // 2):n // 2 + 1, -(n // 2):n // 2 + 1]
        win = np.exp(-(x * x + y * y) / (2 * sd * sd))
        win /= win.sum()
        if scale > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = np.maximum(convolve2d(ref * ref, win, mode="valid") - mu1 ** 2, 0)
        s2 = np.maximum(convolve2d(dist * dist, win, mode="valid") - mu2 ** 2, 0)
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        m = s1 < eps
        g[m], sv[m], s1[m] = 0, s2[m], 0
        m = s2 < eps
        g[m], sv[m] = 0, 0
        m = g < 0
        sv[m], g[m] = s2[m], 0
        sv = np.maximum(sv, eps)
        num += np.sum(np.log10(1 + g * g * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1 + s1 / sigma_nsq))
    return num / den


def test_vif_against_direct_convolution_and_identities(triplet):
    f, a, b = triplet
    assert metrics.vif_pair(a, f) == pytest.approx(_vif_reference(a, f), rel=1e-9)
    assert metrics.vif(f, a, b) == pytest.approx(_vif_reference(a, f) + _vif_reference(b, f), rel=1e-9)
    assert metrics.vif_pair(a, a) == pytest.approx(1.0)
    assert metrics.vif(a, a, a) == pytest.approx(2.0)
    noisy = np.clip(a + np.random.default_rng(3).normal(0, 0.05, a.shape), 0, 1)
    assert metrics.vif_pair(a, noisy) < 0.9
    assert metrics.vif_pair(np.full_like(a, 0.4), a) == 1.0  # constant reference: 0/0, reference returns 1


def test_qabf_properties(triplet):
    f, a, b = triplet
    # Sobel 'same' convolution as scipy.signal.convolve2d
    g, _ = metrics._edge_strength_orientation(a * 255)
    sx = convolve2d(a * 255, metrics._SOBEL_X, mode="same")
    sy = convolve2d(a * 255, metrics._SOBEL_Y, mode="same")
    np.testing.assert_allclose(g, np.hypot(sx, sy), atol=1e-9)
    # F = A = B: every edge perfectly kept -> Tg/(1+e^{kg(G-Dg)}) * Ta/(1+e^{-22*0.2}) with G = g_F >= 1
    steep = np.tile(np.arange(40) * 6 / 255.0, (40, 1))
    q = metrics.qabf(steep, steep, steep)
    assert q == pytest.approx(0.9994 * 0.9879 / (1 + math.exp(-22 * 0.2)), rel=1e-4)
    assert metrics.qabf(f, a, b) == pytest.approx(metrics.qabf(f, b, a))
    assert 0 < metrics.qabf(f, a, b) < 1
    assert metrics.qabf(np.full_like(a, 0.5), a, b) < metrics.qabf(f, a, b)
    # zero-padded Sobel (as the reference): only all-zero sources have no edges at all -> 0 by convention
    assert metrics.qabf(f, np.zeros_like(a), np.zeros_like(a)) == 0.0


def test_compute_metrics_api(triplet):
    f, a, b = triplet
    names = [n for n in metrics.METRIC_NAMES if n not in ("NIQE", "BRISQUE")]
    out = metrics.compute_metrics(f, a, b, names)
    assert list(out) == names and all(np.isfinite(v) for v in out.values())
    # colour inputs are reduced to BT.601 luma
    rgb = np.repeat(f[..., None], 3, axis=-1)
    assert metrics.compute_metrics(rgb, a, b, ["SSIM"])["SSIM"] == pytest.approx(out["SSIM"])
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute_metrics(f, a, b, ["FOO"])
    with pytest.raises(ValueError, match="same height and width"):
        metrics.compute_metrics(f[:-1], a, b, ["MI"])


# ----------------------------------------------------------------------------- NIQE / BRISQUE

def _natural_like(shape, seed=0):
    r = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(r.random(shape), 3) * 4 + ndimage.gaussian_filter(r.random(shape), 0.7)
    x += np.linspace(0, 1, shape[1])[None, :]
    return np.round((x - x.min()) / (x.max() - x.min()) * 255) / 255


def test_niqe_matches_scikit_video(monkeypatch):
    if importlib.util.find_spec("skvideo") is None:
        pytest.skip("scikit-video not installed")
    import warnings

    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import scipy.misc

    # scikit-video 1.1.11 uses APIs removed from NumPy 2 / SciPy >= 1.3; shim them for the comparison only.
    def imresize(arr, size, interp="bicubic", mode=None):
        im = Image.fromarray(np.asarray(arr, np.float32), mode="F")
        return np.asarray(im.resize(tuple((np.array(im.size) * size).astype(int)), Image.BICUBIC))
    monkeypatch.setattr(scipy.misc, "imresize", imresize, raising=False)
    monkeypatch.setattr(np, "int", int, raising=False)
    sk = importlib.import_module("skvideo.measure.niqe")
    img = _natural_like((200, 300))
    ours = metrics.niqe(img)
    ref = float(sk.niqe(img * 255.0)[0])
    assert ours == pytest.approx(ref, rel=1e-4)
    with pytest.raises(ValueError, match="193"):
        metrics.niqe(img[:150])


def test_brisque_matches_brisque_package():
    for mod in ("brisque", "cv2", "libsvm"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed")
    import cv2
    from brisque import BRISQUE

    img = _natural_like((61, 77), seed=4)
    pkg = BRISQUE(url=False)
    f1 = pkg.calculate_brisque_features(img, kernel_size=7, sigma=7 / 6)
    f2 = pkg.calculate_brisque_features(cv2.resize(img, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC),
                                        kernel_size=7, sigma=7 / 6)
    # brisque 0.2.0 returns some features as 1-element arrays, which its own score() cannot convert
    # under NumPy 2; flatten them and run its scaling + libsvm prediction.
    feats = np.array([float(np.ravel(v)[0]) for v in np.concatenate([f1, f2])])
    np.testing.assert_allclose(metrics_nr.brisque_features(img), feats, rtol=1e-8, atol=1e-10)
    ref = pkg.calculate_image_quality_score(feats)
    assert metrics.brisque(img) == pytest.approx(ref, abs=1e-6)
    assert metrics.brisque(np.repeat(img[..., None], 3, axis=-1)) == pytest.approx(ref, abs=1e-6)


def test_missing_parameter_package_names_pip_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "brisque" else real(name, *a))
    metrics_nr._brisque_model.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install brisque"):
            metrics.brisque(_natural_like((40, 40)))
    finally:
        metrics_nr._brisque_model.cache_clear()


# ----------------------------------------------------------------------------- SSIM conventions

def _ssim_by_windows(x255, y255, data_range, win=7):
    """SSIM from its formula, window by window (no filtering library): mean over all valid 7x7 windows."""
    from numpy.lib.stride_tricks import sliding_window_view
    wx = sliding_window_view(x255, (win, win)).reshape(-1, win * win)
    wy = sliding_window_view(y255, (win, win)).reshape(-1, win * win)
    mx, my = wx.mean(axis=1), wy.mean(axis=1)
    vx, vy = wx.var(axis=1, ddof=1), wy.var(axis=1, ddof=1)
    cxy = ((wx - mx[:, None]) * (wy - my[:, None])).sum(axis=1) / (win * win - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))))


def test_ssim_column_is_the_evaluators_range_2(triplet):
    from skimage.metrics import structural_similarity
    f, a, b = triplet
    want = _ssim_by_windows(f * 255, a * 255, 2.0) + _ssim_by_windows(f * 255, b * 255, 2.0)
    assert metrics.ssim_evaluator(f, a, b) == pytest.approx(want, rel=1e-10)
    assert metrics.compute_metrics(f, a, b, ["SSIM"])["SSIM"] == pytest.approx(want, rel=1e-10)
    sk = structural_similarity(f * 255, a * 255, data_range=2.0) + structural_similarity(f * 255, b * 255,
                                                                                         data_range=2.0)
    assert want == pytest.approx(sk, rel=1e-10)
    # the 255-range variant keeps its own name, and the two conventions differ
    want255 = _ssim_by_windows(f * 255, a * 255, 255.0) + _ssim_by_windows(f * 255, b * 255, 255.0)
    assert metrics.compute_metrics(f, a, b, ["SSIM_255"])["SSIM_255"] == pytest.approx(want255, rel=1e-10)
    assert abs(want - want255) > 0.01
    assert metrics.EVALUATOR_SSIM_RANGE == 2.0


def test_variant_metric_names():
    assert set(metrics.VARIANT_METRICS) == {"SSIM_255", "NIQE_skvideo"}
    assert set(metrics.ALL_METRIC_NAMES) == set(metrics.REFERENCE_METRICS) | set(metrics.NO_REFERENCE_METRICS)
    assert metrics.NO_REFERENCE_METRICS["NIQE"] is metrics.niqe_matlab
    assert metrics.NO_REFERENCE_METRICS["NIQE_skvideo"] is metrics.niqe
    assert not metrics.HIGHER_IS_BETTER["NIQE_skvideo"] and metrics.HIGHER_IS_BETTER["SSIM_255"]
