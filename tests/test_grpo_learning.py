"""GRPO learns: on a small fixed problem a few GRPO steps against a reward MODEL raise the
whole-image reward of HELD-OUT pairs (not the surrogate, not the training crops)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evafusion_jax import dcevo, grpo_training as gt, parallel, reward_fns, synthetic
from evafusion_jax import reward_model as rm

CFG = dcevo.DCEvoConfig.tiny()
RCFG = rm.RewardConfig.tiny()
SIZE = 32


def _pairs(seed, n):
    scenes = [synthetic.make_scene(np.random.default_rng([seed, i]), SIZE, SIZE) for i in range(n)]
    return (np.stack([s["ir"] for s in scenes])[..., None],
            np.stack([s["vi_gray"] for s in scenes])[..., None])


def _quadrants(b, k=4):
    masks = np.zeros((b, k, SIZE, SIZE), np.float32)
    h = SIZE // 2
    for j in range(k):
        masks[:, j, (j // 2) * h:(j // 2 + 1) * h, (j % 2) * h:(j % 2 + 1) * h] = 1
    return masks


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["composite"])
def test_grpo_steps_raise_the_heldout_whole_image_reward(mode):
    params = dcevo.init_params(CFG, jax.random.PRNGKey(0))
    rparams = rm.init_params(RCFG, jax.random.PRNGKey(1))
    rf = reward_fns.ModelReward(RCFG, region_mode=mode)
    ir, vi = _pairs(0, 4)
    batch = {"ir": ir, "vi": vi, "masks": _quadrants(4), "valid": np.ones((4, 4), bool)}
    test_ir, test_vi = _pairs(1000, 4)  # held out: other scenes, never trained on

    steps = 8
    hp = gt.TrainHParams(objective="grpo", group_size=4, exploration_std=0.05, beta=0.01)
    tx, sched = gt.make_optimizer(2e-3, steps, weight_decay=0.0)
    mesh = parallel.data_mesh()
    step = gt.make_train_step(hp, CFG, tx, rf, mesh, sched)
    state = parallel.replicate(gt.create_train_state(params, tx), mesh)
    rp = parallel.replicate(rparams, mesh)
    for _ in range(steps):
        state, metrics = step(state, rp, parallel.shard_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    after_params = parallel.unreplicate(state)["params"]

    @jax.jit
    def heldout_reward(p):
        fused = dcevo.apply_model(p, jnp.asarray(test_ir), jnp.asarray(test_vi), CFG)["fused"]
        return rf.image(rparams, fused, jnp.asarray(test_ir), jnp.asarray(test_vi))[0]

    before, after = np.asarray(heldout_reward(params)), np.asarray(heldout_reward(after_params))
    # every held-out pair gains, and the mean gain is well above float noise
    assert np.all(after > before), (before, after)
    assert float(np.mean(after - before)) > 0.01, (before, after)
