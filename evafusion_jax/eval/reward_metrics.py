"""Validation metrics of the reward model, as the released EVAFusion training script computes them.

Scores: PLCC (Pearson) and SRCC (Spearman, average ranks for ties) per score type, over the whole
evaluation set (targets are ratings / 5; both correlations are scale-invariant).

Heatmaps (per sample, arrays (B, H, W) of predicted and ground-truth heatmaps in [0, 1]); a
ground truth is *empty* if it sums to 0:

* ``mse``: mean over pixels of (pred - gt)^2, reported on the samples with an empty ground truth;
* on the others (``gt.sum() > 0``):
  ``kld``  KL(gt || pred) of the maps normalised to sum 1:
           sum(g * log(g / (p + eps) + eps)), p = pred / (sum(pred) + eps),
           g = gt / (sum(gt) + eps);
  ``nss``  prediction standardised by its mean and *unbiased* (ddof=1) std (+ eps), averaged over
           the pixels where gt > 0;
  ``cc``   Pearson correlation of the two maps: cov / (std_p * std_g + 1e-8) with sums, not means;
  ``similarity`` sum(min(p, g)) of the normalised maps;
  ``AUC_Judd`` the Judd ROC area with gt > 0 as fixations. The saliency map gets a jitter of
           uniform [0, 1e-7) noise (from a seeded generator here; unseeded in the release) and is
           min-max normalised; for the k-th highest fixation value t (k = 0..N-1),
           tp = (k + 1) / N and, as in the release, fp = (#{S >= t} - k) / (P - N)
           (one more than the false positives above t: the released code ports a 1-based
           MATLAB loop to a 0-based one; ``exact_release=False`` uses #{S >= t} - (k + 1)).
           NaN when the saliency map is constant (without jitter).
  ``eps`` = 1e-8 everywhere, as released.
  Each reported heatmap metric is the mean of the per-sample values over all qualifying samples
  of the evaluation set (the release concatenates per-batch values, then takes the mean).

``avg_metric`` (released ``avg_metric``): the mean of the ten score correlations (PLCC and SRCC of
the five scores) plus the mean of four heatmap metrics (NSS, CC, similarity, AUC-Judd) of the
artifact heatmap::

    avg_metric = (sum of 10 correlations) / 10 + (nss + cc + similarity + AUC_Judd) / 4

KLD and MSE are reported but not part of it (the released line reads ``s / 10 + + h / 4``; the
doubled ``+`` is a unary plus). The release selects the best checkpoint by the largest value.

Metric keys are the released ones: ``score/plcc/<score>``, ``score/srcc/<score>``,
``heatmap/<mse|kld|nss|cc|similarity|AUC_Judd>/artifact_heatmap``, ``avg_metric``; plus
``loss/<score>`` and ``loss/artifact_heatmap`` (per-sample MSE averaged over the set; the release
averages per-batch means, equal when all batches have the same size) and ``count/...`` entries.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from evafusion_jax.models.score_names import HEATMAP_TYPES, SCORE_TYPES

log = logging.getLogger(__name__)

EPS = 1e-8
HEATMAP_METRICS = ("kld", "nss", "cc", "similarity", "AUC_Judd")
AVG_HEATMAP_METRICS = ("nss", "cc", "similarity", "AUC_Judd")


# ----------------------------------------- scores ------------------------------------------

def plcc(pred: Any, gt: Any) -> float:
    """Pearson linear correlation of two 1-D sequences (NaN if either is constant)."""
    x = np.asarray(pred, np.float64).ravel()
    y = np.asarray(gt, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"plcc: pred has {x.size} values but gt has {y.size}")
    if x.size < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    if den == 0.0:
        return float("nan")
    return float(np.clip(np.dot(xc, yc) / den, -1.0, 1.0))


def srcc(pred: Any, gt: Any) -> float:
    """Spearman rank correlation (average ranks for ties; NaN if either is constant)."""
    x = np.asarray(pred, np.float64).ravel()
    y = np.asarray(gt, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"srcc: pred has {x.size} values but gt has {y.size}")
    return plcc(rankdata(x), rankdata(y))


# ---------------------------------------- heatmaps -----------------------------------------

def _b(a: Any) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"heatmaps must be (B, H, W) or (H, W), got shape {a.shape}")
    return a


def heatmap_mse(pred: Any, gt: Any) -> np.ndarray:
    """Per-sample mean squared error, (B,)."""
    p, g = _b(pred), _b(gt)
    return np.mean((p - g) ** 2, axis=(1, 2))


def kld(pred: Any, gt: Any, eps: float = EPS) -> np.ndarray:
    """Per-sample KL divergence of the normalised maps, as released, (B,)."""
    p, g = _b(pred), _b(gt)
    p = p / (p.sum(axis=(1, 2), keepdims=True) + eps)
    g = g / (g.sum(axis=(1, 2), keepdims=True) + eps)
    return np.sum(g * np.log(g / (p + eps) + eps), axis=(1, 2))


def cc(pred: Any, gt: Any) -> np.ndarray:
    """Per-sample Pearson correlation of the maps, as released, (B,)."""
    p, g = _b(pred), _b(gt)
    pc = p - p.mean(axis=(1, 2), keepdims=True)
    gc = g - g.mean(axis=(1, 2), keepdims=True)
    num = np.sum(pc * gc, axis=(1, 2))
    den = np.sqrt(np.sum(pc ** 2, axis=(1, 2))) * np.sqrt(np.sum(gc ** 2, axis=(1, 2)))
    return num / (den + 1e-8)


def nss(pred: Any, gt: Any, eps: float = EPS) -> np.ndarray:
    """Per-sample Normalized Scanpath Saliency (unbiased std), as released, (B,).

    NaN for a sample whose ground truth has no positive pixel (0 / 0), as released."""
    p, g = _b(pred), _b(gt)
    z = (p - p.mean(axis=(1, 2), keepdims=True)) / (p.std(axis=(1, 2), ddof=1, keepdims=True) + eps)
    z = np.where(g > 0, z, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return z.sum(axis=(1, 2)) / (g > 0).sum(axis=(1, 2))


def similarity(pred: Any, gt: Any, eps: float = EPS) -> np.ndarray:
    """Per-sample histogram intersection of the normalised maps, as released, (B,)."""
    p, g = _b(pred), _b(gt)
    p = p / (p.sum(axis=(1, 2), keepdims=True) + eps)
    g = g / (g.sum(axis=(1, 2), keepdims=True) + eps)
    return np.sum(np.minimum(p, g), axis=(1, 2))


def auc_judd_single(saliency: Any, fixations: Any, jitter: bool = True,
                    rng: np.random.Generator | None = None, exact_release: bool = True) -> float:
    """AUC-Judd of one map (see the module docstring). ``fixations > 0`` marks fixated pixels.

    Vectorised (sorting instead of one pass over the image per fixation), same values."""
    s = np.asarray(saliency, np.float64)
    f = np.asarray(fixations)
    if s.shape != f.shape:
        raise ValueError(f"auc_judd: saliency {s.shape} and fixation map {f.shape} differ")
    if not np.any(f):
        return float("nan")
    if jitter:
        rng = rng if rng is not None else np.random.default_rng(0)
        s = s + rng.random(s.shape) / 10 ** 7
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (s - s.min()) / (s.max() - s.min())
    if np.isnan(s).all():
        return float("nan")
    s = s.ravel()
    fx = f.ravel() > 0
    sth = np.sort(s[fx])[::-1]
    n_fix, n_pix = sth.size, s.size
    if n_pix == n_fix:
        return float("nan")
    s_sorted = np.sort(s)
    above = n_pix - np.searchsorted(s_sorted, sth, side="left")  # #{S >= t}
    k = np.arange(n_fix)
    tp = np.concatenate([[0.0], (k + 1) / n_fix, [1.0]])
    fp_mid = (above - k) if exact_release else (above - k - 1)
    fp = np.concatenate([[0.0], fp_mid / (n_pix - n_fix), [1.0]])
    trapz = getattr(np, "trapezoid", None) or np.trapz
    return float(trapz(tp, x=fp))


def auc_judd(pred: Any, gt: Any, jitter: bool = True, rng: np.random.Generator | None = None,
             exact_release: bool = True) -> np.ndarray:
    """Per-sample AUC-Judd, (B,). The jitter of sample i uses the i-th draw of ``rng``
    (default: ``np.random.default_rng(0)``)."""
    p, g = _b(pred), _b(gt)
    rng = rng if rng is not None else np.random.default_rng(0)
    return np.array([auc_judd_single(pi, gi, jitter, rng, exact_release) for pi, gi in zip(p, g)],
                    np.float64)


HEATMAP_FUNCS = {"kld": kld, "nss": nss, "cc": cc, "similarity": similarity}


# --------------------------------------- aggregation ---------------------------------------

def avg_metric(metrics: Mapping[str, float], heatmap_types: Sequence[str] = HEATMAP_TYPES,
               strict: bool = False) -> float:
    """The released ``avg_metric`` (module docstring).

    A missing heatmap metric (an evaluation set without any non-empty ground-truth heatmap, where
    the release fails with a KeyError) counts as 0 with a logged warning; ``strict=True`` raises.
    """
    s = 0.0
    for sc in SCORE_TYPES:
        for mt in ("plcc", "srcc"):
            s += float(metrics[f"score/{mt}/{sc}"])
    h = 0.0
    for hm in heatmap_types:
        for mt in AVG_HEATMAP_METRICS:
            key = f"heatmap/{mt}/{hm}"
            if key not in metrics:
                if strict:
                    raise KeyError(f"avg_metric needs {key!r} (no non-empty ground-truth heatmap?)")
                log.warning("avg_metric: %s is missing (no non-empty ground-truth heatmap); "
                            "counted as 0", key)
                continue
            h += float(metrics[key])
    return s / 10 + h / 4


def _scores_dict(x: Any, what: str) -> dict[str, np.ndarray]:
    if isinstance(x, Mapping):
        missing = [s for s in SCORE_TYPES if s not in x]
        if missing:
            raise ValueError(
                f"{what}: missing score(s) {missing}; expected keys {list(SCORE_TYPES)}")
        return {s: np.asarray(x[s], np.float64).reshape(-1) for s in SCORE_TYPES}
    a = np.asarray(x, np.float64)
    if a.ndim != 2 or a.shape[1] != len(SCORE_TYPES):
        raise ValueError(f"{what}: expected (N, {len(SCORE_TYPES)}) scores in {list(SCORE_TYPES)} "
                         f"order or a dict of (N,) arrays, got shape {a.shape}")
    return {s: a[:, k] for k, s in enumerate(SCORE_TYPES)}


def _heatmaps_dict(x: Any, what: str) -> dict[str, np.ndarray]:
    if isinstance(x, Mapping):
        return {k: np.asarray(v) for k, v in x.items()}
    return {HEATMAP_TYPES[0]: np.asarray(x)}


class MetricAccumulator:
    """Collects predictions batch by batch and computes the released validation metrics.

    Heatmap metrics are computed per batch (so memory stays small) and kept per sample; the
    result does not depend on how the set is split into batches (the AUC jitter is drawn from one
    generator seeded with ``seed`` in sample order).
    """

    def __init__(self, seed: int = 0, auc_jitter: bool = True, exact_release: bool = True):
        self.rng = np.random.default_rng(seed)
        self.auc_jitter = auc_jitter
        self.exact_release = exact_release
        self.pred: dict[str, list[np.ndarray]] = defaultdict(list)
        self.gt: dict[str, list[np.ndarray]] = defaultdict(list)
        self.hm: dict[str, list[np.ndarray]] = defaultdict(list)
        self.n = 0

    def add(self, pred_scores: Any, gt_scores: Any, pred_heatmaps: Any, gt_heatmaps: Any) -> None:
        """Adds one batch. Scores: dict name -> (B,) or an array (B, 5) in SCORE_TYPES order.
        Heatmaps: dict name -> (B, H, W) or one array (B, H, W) (the artifact heatmap)."""
        ps, gs = _scores_dict(pred_scores, "pred_scores"), _scores_dict(gt_scores, "gt_scores")
        b = None
        for s in SCORE_TYPES:
            if ps[s].shape != gs[s].shape:
                raise ValueError(f"score {s}: {ps[s].size} predictions but {gs[s].size} targets")
            b = ps[s].size if b is None else b
            if ps[s].size != b:
                raise ValueError(f"score {s}: {ps[s].size} values, other scores have {b}")
            self.pred[s].append(ps[s])
            self.gt[s].append(gs[s])
        ph, gh = _heatmaps_dict(pred_heatmaps, "pred_heatmaps"), _heatmaps_dict(gt_heatmaps,
                                                                                 "gt_heatmaps")
        if set(ph) != set(gh):
            raise ValueError(f"heatmap names differ: pred {sorted(ph)} vs gt {sorted(gh)}")
        for name in gh:
            p, g = _b(ph[name]), _b(gh[name])
            if p.shape != g.shape:
                raise ValueError(f"heatmap {name}: prediction {p.shape} and ground truth {g.shape} "
                                 "differ (resize the ground truth to the model's heatmap size)")
            if p.shape[0] != b:
                raise ValueError(f"heatmap {name}: {p.shape[0]} maps for {b} score rows")
            self.hm[f"loss/{name}"].append(heatmap_mse(p, g))
            nonzero = g.sum(axis=(1, 2)) > 0
            if np.any(~nonzero):
                self.hm[f"mse/{name}"].append(heatmap_mse(p[~nonzero], g[~nonzero]))
            if np.any(nonzero):
                pn, gn = p[nonzero], g[nonzero]
                for key, fn in HEATMAP_FUNCS.items():
                    self.hm[f"{key}/{name}"].append(fn(pn, gn))
                self.hm[f"AUC_Judd/{name}"].append(
                    auc_judd(pn, gn, self.auc_jitter, self.rng, self.exact_release))
        self.n += b or 0

    def result(self) -> dict[str, float]:
        """The metric dict (keys in the module docstring), python floats."""
        if self.n == 0:
            raise ValueError("no predictions were added")
        out: dict[str, float] = {}
        for s in SCORE_TYPES:
            p, g = np.concatenate(self.pred[s]), np.concatenate(self.gt[s])
            out[f"score/plcc/{s}"] = plcc(p, g)
            out[f"score/srcc/{s}"] = srcc(p, g)
            out[f"loss/{s}"] = float(np.mean((p - g) ** 2))
        heat_names = []
        for key, vals in self.hm.items():
            v = np.concatenate(vals)
            if key.startswith("loss/"):
                out[key] = float(np.mean(v))
                heat_names.append(key[len("loss/"):])
            else:
                out[f"heatmap/{key}"] = float(np.mean(v))
                out[f"count/{key}"] = float(v.size)
        out["avg_metric"] = avg_metric(out, heatmap_types=tuple(heat_names) or HEATMAP_TYPES)
        return out


def evaluate_predictions(pred_scores: Any, gt_scores: Any, pred_heatmaps: Any, gt_heatmaps: Any,
                         *, seed: int = 0, auc_jitter: bool = True,
                         exact_release: bool = True, chunk: int = 64) -> dict[str, float]:
    """All validation metrics of a whole evaluation set at once (see ``MetricAccumulator``).

    Args:
      pred_scores, gt_scores: dict score name (``SCORE_TYPES``) -> (N,), or (N, 5) arrays.
      pred_heatmaps, gt_heatmaps: dict name -> (N, H, W), or (N, H, W) arrays (artifact heatmap).
      seed: seed of the AUC-Judd jitter.
      chunk: samples per internal batch (bounds the float64 working memory; results do not
        depend on it).
    """
    ps, gs = _scores_dict(pred_scores, "pred_scores"), _scores_dict(gt_scores, "gt_scores")
    ph = _heatmaps_dict(pred_heatmaps, "pred_heatmaps")
    gh = _heatmaps_dict(gt_heatmaps, "gt_heatmaps")
    n = len(ps[SCORE_TYPES[0]])
    for name, arr in list(ph.items()) + list(gh.items()):
        if arr.ndim != 3 or arr.shape[0] != n:
            raise ValueError(f"heatmap {name}: expected ({n}, H, W) maps for {n} score rows, got "
                             f"shape {arr.shape}")
    acc = MetricAccumulator(seed=seed, auc_jitter=auc_jitter, exact_release=exact_release)
    for a in range(0, max(n, 1), chunk):
        sl = slice(a, a + chunk)
        acc.add({k: v[sl] for k, v in ps.items()}, {k: v[sl] for k, v in gs.items()},
                {k: v[sl] for k, v in ph.items()}, {k: v[sl] for k, v in gh.items()})
    return acc.result()
