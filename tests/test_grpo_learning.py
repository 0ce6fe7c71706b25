"""GRPO learns: on a small fixed problem a few GRPO steps raise the whole-image reward of
HELD-OUT pairs (not the surrogate objective, not the training crops)."""

import jax
import jax.numpy as jnp
import numpy as np

from evafusion_jax.data import synthetic
from evafusion_jax.models import dcevo
from evafusion_jax.rl import rewards
from evafusion_jax.train import grpo_training as gt
from evafusion_jax.train import parallel

CFG = dcevo.DCEvoConfig.tiny()
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


def _train(rf, rparams, steps, lr, seed=0):
    params = dcevo.init_params(CFG, jax.random.PRNGKey(seed))
    ir, vi = _pairs(seed, 4)
    batch = {"ir": ir, "vi": vi, "masks": _quadrants(4), "valid": np.ones((4, 4), bool)}
    hp = gt.TrainHParams(objective="grpo", group_size=4, exploration_std=0.05, beta=0.01,
                         noise_seed=seed)
    tx, sched = gt.make_optimizer(lr, steps, weight_decay=0.0)
    mesh = parallel.data_mesh()
    step = gt.make_train_step(hp, CFG, tx, rf, mesh, sched)
    state = parallel.replicate(gt.create_train_state(params, tx), mesh)
    rp = parallel.replicate(rparams, mesh)
    for _ in range(steps):
        state, metrics = step(state, rp, parallel.shard_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    return params, parallel.unreplicate(state)["params"]


def _heldout_reward(rf, rparams, params_list):
    test_ir, test_vi = (jnp.asarray(x) for x in _pairs(1000, 4))  # other scenes, never trained on

    @jax.jit
    def reward(p):
        fused = dcevo.apply_model(p, test_ir, test_vi, CFG)["fused"]
        return rf.image(rparams, fused, test_ir, test_vi)[0]
    return [np.asarray(reward(p)) for p in params_list]


def test_grpo_steps_raise_the_heldout_reward():
    """Analytic reward (local contrast): 12 GRPO steps on 4 training pairs raise the reward of
    the fusion of 4 held-out pairs, every one of them (measured: +0.6% to +0.8% each)."""
    rf = rewards.ContrastReward()
    before, after = _heldout_reward(rf, {}, _train(rf, {}, 12, 2e-3))
    assert np.all(after > before), (before, after)
    assert float(np.mean(after)) > 1.003 * float(np.mean(before)), (before, after)
