"""GRPO math against hand-computed values (evafusion_jax.rl.grpo)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evafusion_jax.rl import grpo


def test_group_advantages_hand_values_and_masking():
    rewards = jnp.array([[1.0, 2.0, 3.0, 100.0],
                         [5.0, 5.0, 5.0, 5.0],
                         [0.0, 7.0, -1.0, 2.0]])
    valid = jnp.array([[True, True, True, False],
                       [True, True, True, True],
                       [False, True, False, False]])
    adv = np.asarray(grpo.group_advantages(rewards, valid, eps=0.0))
    s = np.sqrt(2.0 / 3.0)  # population std of 1, 2, 3
    np.testing.assert_allclose(adv[0], [-1 / s, 0.0, 1 / s, 0.0], rtol=1e-6)
    # zero spread -> zero advantages (not NaN); single valid region -> zero
    np.testing.assert_array_equal(adv[1], 0.0)
    np.testing.assert_array_equal(adv[2], 0.0)
    assert np.all(np.isfinite(adv))


def test_group_advantages_eps_and_nearly_equal_values():
    adv = grpo.group_advantages(jnp.array([[0.1, 0.1 + 1e-9, 0.1]]), jnp.ones((1, 3), bool))
    np.testing.assert_array_equal(np.asarray(adv), 0.0)
    adv = np.asarray(grpo.group_advantages(jnp.array([[0.0, 2.0]]), jnp.ones((1, 2), bool), eps=1.0))
    np.testing.assert_allclose(adv, [[-0.5, 0.5]])  # (s - 1) / (1 + 1)


def test_region_ratios_hand_values():
    f_old = jnp.array([[[[0.5], [0.25]], [[1.0], [0.0]]]])  # (1, 2, 2, 1)
    f_new = f_old + jnp.array([[[[0.1], [-0.05]], [[0.0], [0.2]]]])
    masks = jnp.array([[[[1, 1], [0, 0]], [[0, 0], [1, 1]]]], jnp.float32)  # top row, bottom row
    r = np.asarray(grpo.region_ratios(f_new, f_old, masks, alpha=2.0, eps=0.0))
    np.testing.assert_allclose(r, [[1 + 2 * 0.15 / 0.75, 1 + 2 * 0.2 / 1.0]], rtol=1e-5)


def test_ratio_gradient_zero_without_lag_and_nonzero_with_lag():
    rng = np.random.default_rng(0)
    f = jnp.asarray(rng.random((1, 4, 4, 1)), jnp.float32)
    masks = jnp.ones((1, 1, 4, 4), jnp.float32)
    g_same = jax.grad(lambda x: grpo.region_ratios(x, f, masks).sum())(f)
    np.testing.assert_array_equal(np.asarray(g_same), 0.0)
    g_lag = jax.grad(lambda x: grpo.region_ratios(x, f - 0.01, masks).sum())(f)
    assert np.all(np.abs(np.asarray(g_lag)) > 0)


def test_clipped_surrogate_hand_values():
    r = jnp.array([[1.5, 1.1, 1.5, 0.5, 1.0]])
    a = jnp.array([[1.0, 2.0, -1.0, -2.0, 3.0]])
    valid = jnp.array([[True, True, True, True, False]])
    obj, clipped = grpo.clipped_surrogate_terms(r, a, valid, clip_eps=0.2)
    # min(1.5, 1.2) = 1.2 (clipped); min(2.2, 2.2) = 2.2; min(-1.5, -1.2) = -1.5;
    # min(-1.0, -1.6) = -1.6 (clipped); invalid -> 0
    np.testing.assert_allclose(np.asarray(obj), [[1.2, 2.2, -1.5, -1.6, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped), [[1, 0, 0, 1, 0]])
    mean, frac = grpo.clipped_surrogate(r, a, valid, clip_eps=0.2)
    assert float(mean) == pytest.approx((1.2 + 2.2 - 1.5 - 1.6) / 4, rel=1e-6)
    assert float(frac) == pytest.approx(0.5)


def test_gaussian_kl_hand_value():
    f = jnp.array([[[[0.5], [0.0]]]])
    ref = jnp.array([[[[0.0], [0.0]]]])
    assert float(grpo.gaussian_kl(f, ref, sigma=0.5)) == pytest.approx(0.125 / (2 * 0.25))


def test_aggregate_reward_released_weights_and_ablations():
    scores = {"Texture_Preservation": jnp.array([0.5]), "Thermal_Retention": jnp.array([0.25]),
              "Sharpness": jnp.array([1.0]), "Artifacts": jnp.array([0.8]),
              "Overall_Score": jnp.array([0.0])}
    hm = jnp.zeros((1, 4, 4)).at[0, :2, :].set(0.9)  # half the pixels above 0.5
    total, terms = grpo.aggregate_reward(scores, {"artifact_heatmap": hm})
    expected = 2 * 0.5 + 1 * 0.25 + 2 * 1.0 + 0.5 * (1 + 0.5) * 0.8
    assert float(total[0]) == pytest.approx(expected, rel=1e-6)
    assert float(terms["artifact_area"][0]) == pytest.approx(0.5)
    no_hm, _ = grpo.aggregate_reward(scores, {"artifact_heatmap": hm},
                                     grpo.RewardWeights(use_heatmap=False))
    assert float(no_hm[0]) == pytest.approx(expected - 0.5 * 0.5 * 0.8, rel=1e-6)
    hm_only, _ = grpo.aggregate_reward(scores, {"artifact_heatmap": hm},
                                       grpo.RewardWeights(use_scores=False))
    assert float(hm_only[0]) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="unknown reward weight"):
        grpo.RewardWeights.from_dict({"texure": 1.0})


def test_advantage_stats():
    adv = jnp.array([[1.0, -1.0, 5.0]])
    st = grpo.advantage_stats(adv, jnp.array([[True, True, False]]))
    assert float(st["adv_mean"]) == 0.0 and float(st["adv_std"]) == pytest.approx(1.0)
    assert float(st["adv_max"]) == 1.0 and float(st["regions_per_image"]) == 2.0


def test_gaussian_region_ratios_hand_values_and_gradient_at_old_policy():
    f_old = jnp.zeros((1, 1, 2, 1))
    actions = jnp.array([[[[0.1], [0.3]]]])
    f = jnp.array([[[[0.1], [0.1]]]])
    masks = jnp.ones((1, 1, 1, 2))
    r = grpo.gaussian_region_ratios(f, f_old, actions, masks, sigma=0.5)
    # per pixel (a - F_old)^2 - (a - F)^2: 0.01 - 0 and 0.09 - 0.04; mean 0.03; / (2 * 0.25)
    assert float(r[0, 0]) == pytest.approx(np.exp(0.03 / 0.5), rel=1e-5)
    g = jax.grad(lambda x: grpo.gaussian_region_ratios(x, f_old, actions, masks, 0.5).sum())(f_old)
    # at F = F_old: dr/dF = (a - F) / sigma^2 / n_pixels
    np.testing.assert_allclose(np.asarray(g)[0, 0, :, 0], [0.1 / 0.25 / 2, 0.3 / 0.25 / 2],
                               rtol=1e-5)


def test_gaussian_region_ratios_with_a_group_axis_match_one_sample_at_a_time():
    rng = np.random.default_rng(0)
    f, f_old = (jnp.asarray(rng.random((2, 4, 4, 1)), jnp.float32) for _ in range(2))
    actions = jnp.asarray(rng.random((2, 3, 4, 4, 1)), jnp.float32)
    masks = jnp.asarray(rng.random((2, 2, 4, 4)) > 0.5, jnp.float32)
    r = grpo.gaussian_region_ratios(f, f_old, actions, masks, sigma=0.3)
    assert r.shape == (2, 3, 2)
    for g in range(3):
        np.testing.assert_allclose(
            np.asarray(r[:, g]),
            np.asarray(grpo.gaussian_region_ratios(f, f_old, actions[:, g], masks, 0.3)),
            rtol=1e-6)


def test_sampled_group_advantages_hand_values():
    # rewards (B=1, G=2, K=3); region 2 invalid
    rewards = jnp.array([[[1.0, 5.0, 9.0], [3.0, 5.0, 7.0]]])
    valid = jnp.array([[True, True, False]])
    a = np.asarray(grpo.sampled_group_advantages(rewards, valid, "samples"))
    # centred per region over the samples: region 0 (-1, 1), region 1 (0, 0); one std over
    # the pair's valid entries: sqrt((1 + 1 + 0 + 0) / 4); region 2 invalid -> 0
    np.testing.assert_allclose(a[0, :, 0], [-np.sqrt(2), np.sqrt(2)], atol=1e-5)
    assert np.all(a[0, :, 1:] == 0.0)
    np.testing.assert_allclose(a.sum(axis=1), 0.0, atol=1e-6)
    a = np.asarray(grpo.sampled_group_advantages(rewards, valid, "regions"))
    np.testing.assert_allclose(a[0, 0, :2], [-1.0, 1.0], atol=1e-5)  # (1, 5) per sample
    np.testing.assert_allclose(a[0, 1, :2], [-1.0, 1.0], atol=1e-5)  # (3, 5)
    a = np.asarray(grpo.sampled_group_advantages(rewards, valid, "all"))
    vals = np.array([1.0, 5.0, 3.0, 5.0])  # the valid (sample, region) entries
    ref = (vals - vals.mean()) / vals.std()
    np.testing.assert_allclose([a[0, 0, 0], a[0, 0, 1], a[0, 1, 0], a[0, 1, 1]], ref, atol=1e-5)
    assert np.all(a[0, :, 2] == 0.0)
    with pytest.raises(ValueError, match="advantage group"):
        grpo.sampled_group_advantages(rewards, valid, "pairs")


def test_antithetic_actions_mirror_around_the_old_policy():
    f_old = jnp.full((1, 2, 2, 1), 0.5)
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 2, 2, 1)), jnp.float32)
    a = np.asarray(grpo.sample_actions(f_old, noise, 0.1, antithetic=True))
    np.testing.assert_allclose(a[:, :2] - 0.5, -(a[:, 2:] - 0.5), atol=1e-7)
    np.testing.assert_allclose(a[:, :2], 0.5 + 0.1 * np.asarray(noise[:, :2]), atol=1e-7)
    with pytest.raises(ValueError, match="even group size"):
        grpo.sample_actions(f_old, noise[:, :3], 0.1, antithetic=True)


# ----------------------------------------------------------------------------- DPO


def test_gaussian_region_logp_hand_values_and_consistency_with_ratios():
    f = jnp.array([[[[0.5], [0.0]]]])                       # (1, 1, 2, 1)
    actions = jnp.array([[[[[0.6], [0.0]]], [[[0.5], [0.2]]]]])  # (1, G=2, 1, 2, 1)
    masks = jnp.array([[[[1.0, 0.0]], [[1.0, 1.0]]]])      # (1, K=2, 1, 2)
    lp = np.asarray(grpo.gaussian_region_logp(f, actions, masks, sigma=0.1))
    # -mean_{M_k} (a - F)^2 / (2 * 0.01): g0: 0.01 / 0.02, (0.01 + 0) / 2 / 0.02;
    # g1: 0, (0 + 0.04) / 2 / 0.02
    np.testing.assert_allclose(lp[0], [[-0.5, -0.25], [0.0, -1.0]], rtol=1e-5)
    f_old = jnp.array([[[[0.4], [0.1]]]])
    log_r = np.log(np.asarray(grpo.gaussian_region_ratios(f, f_old, actions, masks, 0.1)))
    lp_old = np.asarray(grpo.gaussian_region_logp(f_old, actions, masks, sigma=0.1))
    np.testing.assert_allclose(log_r, lp - lp_old, rtol=1e-4, atol=1e-5)


def test_preference_pairs_best_against_worst_and_no_pair_without_a_gap():
    # rewards (B=2, G=3, K=2)
    rewards = jnp.array([[[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]],
                         [[0.0, 1.0], [4.0, 0.0], [2.0, 2.0]]])
    valid = jnp.array([[True, True], [True, False]])
    win, lose, ok = (np.asarray(x) for x in grpo.preference_pairs(rewards, valid))
    assert win[0, 0] == 1 and lose[0, 0] == 0 and ok[0, 0]
    assert not ok[0, 1]                      # all samples equal: no preference
    assert win[1, 0] == 1 and lose[1, 0] == 0 and ok[1, 0]
    assert not ok[1, 1]                      # invalid region
    _, _, ok1 = grpo.preference_pairs(rewards[:, :1], valid)
    assert not np.asarray(ok1).any()         # a group of one sample has no pair


def test_dpo_loss_hand_values():
    logp = jnp.array([[[-0.5], [-1.0]]])     # (B=1, G=2, K=1)
    logp_ref = jnp.array([[[-1.0], [-0.5]]])
    win, lose = jnp.array([[0]]), jnp.array([[1]])
    loss, margin, acc = grpo.dpo_loss_terms(logp, logp_ref, win, lose, jnp.array([[True]]),
                                            beta=2.0)
    # h = 2 ((-0.5 + 1.0) - (-1.0 + 0.5)) = 2; loss = -log sigmoid(2) = log(1 + e^-2)
    assert float(margin[0, 0]) == pytest.approx(2.0)
    assert float(loss[0, 0]) == pytest.approx(np.log1p(np.exp(-2.0)), rel=1e-6)
    assert float(acc[0, 0]) == 1.0
    loss, margin, acc = grpo.dpo_loss_terms(logp, logp_ref, win, lose, jnp.array([[False]]), 2.0)
    assert float(loss[0, 0]) == 0.0 and float(margin[0, 0]) == 0.0 and float(acc[0, 0]) == 0.0
    # at the reference (logp == logp_ref) the loss is log 2
    loss, _, _ = grpo.dpo_loss_terms(logp, logp, win, lose, jnp.array([[True]]), 0.1)
    assert float(loss[0, 0]) == pytest.approx(np.log(2.0), rel=1e-6)


def test_dpo_step_raises_the_likelihood_of_the_preferred_sample():
    rng = np.random.default_rng(0)
    f_ref = jnp.asarray(rng.random((1, 3, 3, 1)), jnp.float32)
    actions = f_ref[:, None] + 0.05 * jnp.asarray(rng.standard_normal((1, 4, 3, 3, 1)), jnp.float32)
    masks = jnp.ones((1, 1, 3, 3))
    rewards = jnp.array([[[0.2], [0.9], [0.1], [0.5]]])   # preferred: sample 1, rejected: 2
    win, lose, ok = grpo.preference_pairs(rewards, jnp.ones((1, 1), bool))

    def loss(f):
        lp = grpo.gaussian_region_logp(f, actions, masks, 0.05)
        lp_ref = grpo.gaussian_region_logp(f_ref, actions, masks, 0.05)
        return grpo.dpo_loss_terms(lp, lp_ref, win, lose, ok, 0.1)[0].sum()

    f = f_ref - 1e-3 * jax.grad(loss)(f_ref)
    lp0 = np.asarray(grpo.gaussian_region_logp(f_ref, actions, masks, 0.05))[0, :, 0]
    lp1 = np.asarray(grpo.gaussian_region_logp(f, actions, masks, 0.05))[0, :, 0]
    assert lp1[1] > lp0[1] and lp1[2] < lp0[2]
    assert float(loss(f)) < float(loss(f_ref))


# ----------------------------------------------------------------------------- PPO


def test_running_baseline_hand_values():
    b = grpo.init_running_baseline()
    s = jnp.array([[1.0, 3.0]])
    # first step: no history, the batch's own mean 2 and variance 1
    a = grpo.running_baseline_advantages(s, b, jnp.float32(2.0), jnp.float32(1.0), eps=0.0)
    np.testing.assert_allclose(np.asarray(a), [[-1.0, 1.0]], rtol=1e-6)
    b = grpo.update_running_baseline(b, jnp.float32(2.0), jnp.float32(1.0), momentum=0.9)
    assert float(b["mean"]) == 2.0 and float(b["var"]) == 1.0 and int(b["count"]) == 1
    # later steps: the running values, not the batch (batch mean 5 is ignored)
    a = grpo.running_baseline_advantages(jnp.array([[4.0, 6.0]]), b, jnp.float32(5.0),
                                         jnp.float32(1.0), eps=0.0)
    np.testing.assert_allclose(np.asarray(a), [[2.0, 4.0]], rtol=1e-6)
    b = grpo.update_running_baseline(b, jnp.float32(5.0), jnp.float32(4.0), momentum=0.9)
    assert float(b["mean"]) == pytest.approx(0.9 * 2 + 0.1 * 5)
    assert float(b["var"]) == pytest.approx(0.9 * 1 + 0.1 * 4)
    assert int(b["count"]) == 2


def test_ppo_step_raises_the_likelihood_of_positive_advantage_samples():
    rng = np.random.default_rng(1)
    f_old = jnp.asarray(rng.random((1, 3, 3, 1)), jnp.float32)
    actions = f_old[:, None] + 0.05 * jnp.asarray(rng.standard_normal((1, 2, 3, 3, 1)), jnp.float32)
    masks = jnp.ones((1, 1, 3, 3))
    adv = jnp.array([[1.0, -1.0]])                       # sample 0 better than the baseline

    def objective(f):
        r = grpo.gaussian_region_ratios(f, f_old, actions, masks, 0.05)[..., 0]
        return grpo.clipped_surrogate(r, adv, jnp.ones((1, 2), bool), 0.2)[0]

    f = f_old + 1e-4 * jax.grad(objective)(f_old)        # ascent on the surrogate
    lp0 = np.asarray(grpo.gaussian_region_logp(f_old, actions, masks, 0.05))[0, :, 0]
    lp1 = np.asarray(grpo.gaussian_region_logp(f, actions, masks, 0.05))[0, :, 0]
    assert lp1[0] > lp0[0] and lp1[1] < lp0[1]
