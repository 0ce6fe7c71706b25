"""Reward functions (evafusion_jax.rl.rewards) with a tiny random reward model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evafusion_jax.models import reward_model
from evafusion_jax.rl import grpo, rewards


@pytest.fixture(scope="module")
def tiny():
    cfg = reward_model.RewardConfig.tiny()
    params = reward_model.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    img = lambda *s: jnp.asarray(rng.random(s), jnp.float32)  # noqa: E731
    ir, vi, fused = img(2, 16, 16, 1), img(2, 16, 16, 1), img(2, 16, 16, 1)
    masks = jnp.asarray(rng.random((2, 3, 16, 16)) > 0.5, jnp.float32)
    return cfg, params, ir, vi, fused, masks


def test_regions_match_direct_model_call_and_shared_equals_reencoded(tiny):
    cfg, params, ir, vi, fused, masks = tiny
    fn = rewards.ModelReward(cfg)
    total, terms = jax.jit(fn.regions)(params, fused, ir, vi, masks)
    assert total.shape == (2, 3) and set(terms) == set(rewards.REWARD_TERMS)
    # region 1 by hand: score the masked fused image with the public API
    out = reward_model.score_images(params, ir, vi, fused * masks[:, 1, :, :, None], cfg)
    exp, _ = grpo.aggregate_reward(out["scores"], out["heatmaps"])
    np.testing.assert_allclose(np.asarray(total[:, 1]), np.asarray(exp), rtol=1e-4, atol=1e-5)
    naive = rewards.ModelReward(cfg, share_tokens=False)
    t2, _ = jax.jit(naive.regions)(params, fused, ir, vi, masks)
    np.testing.assert_allclose(np.asarray(t2), np.asarray(total), rtol=1e-4, atol=1e-5)


def test_region_rewards_carry_no_gradient_but_image_reward_does(tiny):
    cfg, params, ir, vi, fused, masks = tiny
    fn = rewards.ModelReward(cfg)
    g = jax.jit(jax.grad(lambda f: fn.regions(params, f, ir, vi, masks)[0].sum()))(fused)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    g = jax.jit(jax.grad(lambda f: fn.image(params, f, ir, vi)[0].sum()))(fused)
    assert float(jnp.abs(g).sum()) > 0


def test_bf16_close_and_released_bug_changes_preprocessing(tiny):
    cfg, params, ir, vi, fused, masks = tiny
    f32 = jax.jit(rewards.ModelReward(cfg).regions)(params, fused, ir, vi, masks)[0]
    bf16 = jax.jit(rewards.ModelReward(cfg, dtype="bfloat16").regions)(
        params, fused, ir, vi, masks)[0]
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.1)
    pix = rewards.ModelReward(cfg).pixel_values(fused)
    pix_bug = rewards.ModelReward(cfg, released_preprocessing_bug=True).pixel_values(fused)
    assert pix.shape == (2, cfg.vit.image_size, cfg.vit.image_size, 3)
    assert float(pix.min()) < -0.5 and float(pix_bug.min()) >= 0.0
    np.testing.assert_allclose(np.asarray(pix_bug), (np.asarray(pix) + 1) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="dtype"):
        rewards.ModelReward(cfg, dtype="float16")


def test_contrast_reward_hand_value():
    f = jnp.zeros((1, 4, 4, 1)).at[0, :, 2:, 0].set(1.0)  # vertical edge between columns 1 and 2
    masks = jnp.zeros((1, 2, 4, 4)).at[0, 0, 1:3, 0].set(1.0).at[0, 1, 1:3, 1].set(1.0)
    fn = rewards.ContrastReward()
    total, terms = fn.regions({}, f, f, f, masks)
    # column 0 (interior rows): only zeros around -> 0; column 1: gx = 1 + 2 + 1 = 4
    np.testing.assert_allclose(np.asarray(total), [[0.0, 4.0]], atol=1e-5)
    assert set(terms) == {"contrast"}
    img, _ = fn.image({}, f, f, f)
    assert img.shape == (1,) and float(img[0]) > 0
    with pytest.raises(ValueError, match="unknown reward kind"):
        rewards.make_reward_fn("clip")


@pytest.mark.parametrize("kind", ["model", "contrast"])
def test_sample_regions_equal_regions_of_each_sample(tiny, kind):
    cfg, params, ir, vi, fused, masks = tiny
    fn = rewards.ModelReward(cfg) if kind == "model" else rewards.ContrastReward()
    samples = jnp.stack([fused, 1.0 - fused, fused * 0.5], axis=1)  # (B, G=3, H, W, 1)
    total, terms = jax.jit(fn.sample_regions)(params, samples, ir, vi, masks)
    assert total.shape == (2, 3, 3) and set(terms) == set(fn.term_names)
    for g in range(3):
        exp, _ = jax.jit(fn.regions)(params, samples[:, g], ir, vi, masks)
        np.testing.assert_allclose(np.asarray(total[:, g]), np.asarray(exp), rtol=1e-4, atol=1e-5)


def test_reward_functions_satisfy_the_reward_fn_protocol(tiny):
    cfg = tiny[0]
    assert isinstance(rewards.make_reward_fn("model", cfg), rewards.RewardFn)
    assert isinstance(rewards.make_reward_fn("contrast"), rewards.RewardFn)
    assert not isinstance(object(), rewards.RewardFn)  # the check can fail
