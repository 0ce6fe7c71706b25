"""Reward-model validation metrics against independent computations and hand-built heatmaps."""

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from evafusion_jax.data.feedback import SCORE_TYPES
from evafusion_jax.eval import reward_metrics as rmet

# ------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("seed", [0, 1])
def test_plcc_srcc_match_scipy(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(1, 6, 200) / 5.0  # many ties, like 1-5 ratings
    pred = 0.5 * gt + rng.normal(0, 0.2, 200)
    assert rmet.plcc(pred, gt) == pytest.approx(pearsonr(pred, gt)[0], abs=1e-12)
    assert rmet.srcc(pred, gt) == pytest.approx(spearmanr(pred, gt)[0], abs=1e-12)
    pred_tied = np.round(pred, 1)
    assert rmet.srcc(pred_tied, gt) == pytest.approx(spearmanr(pred_tied, gt)[0], abs=1e-12)
    assert rmet.plcc(-pred, gt) == pytest.approx(-rmet.plcc(pred, gt))


def test_correlations_of_constant_are_nan_and_shapes_checked():
    assert math.isnan(rmet.plcc(np.ones(5), np.arange(5)))
    assert math.isnan(rmet.srcc(np.arange(5), np.zeros(5)))
    with pytest.raises(ValueError, match="pred has 3 values but gt has 4"):
        rmet.plcc(np.ones(3), np.ones(4))


# ------------------------------------------------------------------------------ heatmaps

def _mask16():
    g = np.zeros((4, 4))
    g[1:3, 1:3] = 1.0  # N = 4 fixations out of P = 16 pixels
    return g


def test_hand_built_perfect_prediction():
    g = _mask16()[None]
    # NSS: pred = indicator, mean 1/4, unbiased var = 4*12/(16*15) = 0.2 -> (1 - 0.25)/sqrt(0.2)
    assert rmet.nss(g, g)[0] == pytest.approx(0.75 / math.sqrt(0.2), rel=1e-6)
    assert rmet.cc(g, g)[0] == pytest.approx(1.0, abs=1e-6)
    assert rmet.cc(2 * g + 3, g)[0] == pytest.approx(1.0, abs=1e-6)
    assert rmet.cc(-g, g)[0] == pytest.approx(-1.0, abs=1e-6)
    assert rmet.similarity(g, g)[0] == pytest.approx(1.0, abs=1e-6)
    assert rmet.kld(g, g)[0] == pytest.approx(0.0, abs=1e-6)
    # AUC-Judd with jitter (ties broken): #{S >= t_k} = k + 1, so the released formula gives
    # fp = 1/(P - N) at every interior point: area = 1 - 1/12 + 1/(2*4*12)
    assert rmet.auc_judd(g, g)[0] == pytest.approx(1 - 1 / 12 + 1 / 96, abs=1e-9)
    assert rmet.auc_judd(g, g, exact_release=False)[0] == pytest.approx(1.0, abs=1e-9)


def test_hand_built_uniform_and_disjoint():
    g = _mask16()[None]
    u = np.full((1, 4, 4), 0.3)
    # KL(gt || uniform) = log(P / N) = log 4
    assert rmet.kld(u, g)[0] == pytest.approx(math.log(4.0), abs=1e-6)
    assert rmet.similarity(u, g)[0] == pytest.approx(4 * (1 / 16), abs=1e-6)
    assert rmet.cc(u, g)[0] == pytest.approx(0.0, abs=1e-6)
    assert rmet.nss(u, g)[0] == pytest.approx(0.0, abs=1e-6)
    disjoint = 1.0 - g
    assert rmet.similarity(disjoint, g)[0] == pytest.approx(0.0, abs=1e-9)
    # NSS of the complement: (0 - 0.75)/sqrt(0.2) at every fixation
    assert rmet.nss(disjoint, g)[0] == pytest.approx(-0.75 / math.sqrt(0.2), rel=1e-6)
    # half overlap: g = [.5 .5 0 0], p = [.5 0 .5 0] -> sum(min) = 0.5
    assert rmet.similarity(np.array([[[1.0, 0, 1, 0]]]), np.array([[[1.0, 1, 0, 0]]]))[0] == \
        pytest.approx(0.5, abs=1e-6)


def test_auc_judd_hand_computed_graded_map():
    sal = np.array([[0.9, 0.8, 0.1], [0.5, 0.3, 0.0]])
    fix = np.array([[0, 1, 0], [0, 1, 0]])
    # thresholds 0.8 and 0.3 (normalised), #{S >= t} = 2 and 4, P - N = 4.
    # released: fp = (2-0)/4, (4-1)/4 -> ROC (0,0) (.5,.5) (.75,1) (1,1): area 0.5625
    assert rmet.auc_judd_single(sal, fix, jitter=False) == pytest.approx(0.5625)
    # MATLAB-correct: fp = (2-1)/4, (4-2)/4 -> (0,0) (.25,.5) (.5,1) (1,1): area 0.75
    assert rmet.auc_judd_single(sal, fix, jitter=False, exact_release=False) == pytest.approx(0.75)
    # a constant saliency map without jitter has no ROC
    assert math.isnan(rmet.auc_judd_single(np.ones((2, 3)), fix, jitter=False))
    assert math.isnan(rmet.auc_judd_single(sal, np.zeros((2, 3)), jitter=False))


def test_auc_judd_matches_brute_force_loop():
    """The vectorised AUC equals a direct one-threshold-at-a-time evaluation, ties included."""
    rng = np.random.default_rng(3)
    sal = np.round(rng.random((9, 11)) * 6) / 6  # many ties
    fix = rng.random((9, 11)) > 0.7
    s = (sal - sal.min()) / (sal.max() - sal.min())
    S, F = s.ravel(), fix.ravel()
    th = sorted(S[F], reverse=True)
    n, p = len(th), S.size
    tp, fp = [0.0], [0.0]
    for i, t in enumerate(th):
        tp.append((i + 1) / n)
        fp.append(((S >= t).sum() - i) / (p - n))
    tp.append(1.0)
    fp.append(1.0)
    ref = sum((fp[k + 1] - fp[k]) * (tp[k] + tp[k + 1]) / 2 for k in range(len(tp) - 1))
    assert rmet.auc_judd_single(sal, fix, jitter=False) == pytest.approx(ref, abs=1e-12)


def test_nss_empty_ground_truth_is_nan_and_mse():
    z = np.zeros((1, 4, 4))
    assert math.isnan(rmet.nss(np.random.default_rng(0).random((1, 4, 4)), z)[0])
    p = np.full((1, 4, 4), 0.5)
    assert rmet.heatmap_mse(p, z)[0] == pytest.approx(0.25)


# ------------------------------------------------------------------------- aggregation

def _eval_set(n=12, s=8, seed=0):
    rng = np.random.default_rng(seed)
    gt_s = rng.integers(1, 6, (n, 5)) / 5.0
    pr_s = gt_s + rng.normal(0, 0.1, (n, 5))
    gt_h = np.zeros((n, s, s), np.float32)
    for i in range(0, n, 2):  # odd samples keep an empty ground truth
        gt_h[i, 2:5, 1 + i % 3:5 + i % 3] = 1.0
    pr_h = np.clip(gt_h * 0.7 + rng.random((n, s, s)) * 0.3, 0, 1).astype(np.float32)
    return pr_s, gt_s, pr_h, gt_h


def test_evaluate_predictions_keys_and_values():
    pr_s, gt_s, pr_h, gt_h = _eval_set()
    m = rmet.evaluate_predictions(pr_s, gt_s, pr_h, gt_h)
    for k, name in enumerate(SCORE_TYPES):
        assert m[f"score/plcc/{name}"] == pytest.approx(pearsonr(pr_s[:, k], gt_s[:, k])[0])
        assert m[f"score/srcc/{name}"] == pytest.approx(spearmanr(pr_s[:, k], gt_s[:, k])[0])
    empty = gt_h.sum(axis=(1, 2)) == 0
    assert m["count/mse/artifact_heatmap"] == empty.sum() == 6
    assert m["heatmap/mse/artifact_heatmap"] == pytest.approx(
        np.mean((pr_h[empty] - gt_h[empty]) ** 2), rel=1e-6)
    assert m["heatmap/cc/artifact_heatmap"] == pytest.approx(
        np.mean([np.corrcoef(pr_h[i].ravel(), gt_h[i].ravel())[0, 1] for i in np.where(~empty)[0]]),
        abs=1e-6)
    h = sum(m[f"heatmap/{k}/artifact_heatmap"] for k in ("nss", "cc", "similarity", "AUC_Judd"))
    s = sum(m[f"score/{t}/{n}"] for t in ("plcc", "srcc") for n in SCORE_TYPES)
    assert m["avg_metric"] == pytest.approx(s / 10 + h / 4)
    assert "heatmap/kld/artifact_heatmap" in m and "loss/Overall_Score" in m
    # dict inputs give the same numbers
    m2 = rmet.evaluate_predictions({n: pr_s[:, k] for k, n in enumerate(SCORE_TYPES)},
                                   {n: gt_s[:, k] for k, n in enumerate(SCORE_TYPES)},
                                   {"artifact_heatmap": pr_h}, {"artifact_heatmap": gt_h})
    assert m2 == pytest.approx(m)


def test_accumulator_is_batching_invariant():
    pr_s, gt_s, pr_h, gt_h = _eval_set(n=10)
    one = rmet.evaluate_predictions(pr_s, gt_s, pr_h, gt_h, seed=5)
    acc = rmet.MetricAccumulator(seed=5)
    for a, b in ((0, 3), (3, 4), (4, 10)):
        acc.add(pr_s[a:b], gt_s[a:b], pr_h[a:b], gt_h[a:b])
    assert acc.result() == pytest.approx(one, abs=1e-12)


def test_avg_metric_missing_heatmap_metrics_and_bad_shapes():
    pr_s, gt_s, pr_h, _ = _eval_set(n=6)
    m = rmet.evaluate_predictions(pr_s, gt_s, pr_h, np.zeros_like(pr_h))  # all GT empty
    assert "heatmap/nss/artifact_heatmap" not in m
    assert m["avg_metric"] == pytest.approx(
        sum(m[f"score/{t}/{n}"] for t in ("plcc", "srcc") for n in SCORE_TYPES) / 10)
    with pytest.raises(KeyError, match="heatmap/nss/artifact_heatmap"):
        rmet.avg_metric(m, strict=True)
    with pytest.raises(ValueError, match="differ"):
        rmet.evaluate_predictions(pr_s, gt_s, pr_h, np.zeros((6, 4, 4)))
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        rmet.evaluate_predictions(pr_s[:, :4], gt_s, pr_h, pr_h)


def test_heatmap_count_must_match_scores():
    pr_s, gt_s, pr_h, gt_h = _eval_set(n=6)
    with pytest.raises(ValueError, match=r"expected \(6, H, W\)"):
        rmet.evaluate_predictions(pr_s, gt_s, pr_h[:5], gt_h[:5])
    small = rmet.evaluate_predictions(pr_s, gt_s, pr_h, gt_h, chunk=2)
    assert small == pytest.approx(rmet.evaluate_predictions(pr_s, gt_s, pr_h, gt_h), abs=1e-12)
