"""Tests for evafusion_jax.train.reward_training (pure functions, data parallelism)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from evafusion_jax.models import reward_model as rm
from evafusion_jax.train import parallel as par
from evafusion_jax.train import reward_training as rt

CFG = rm.RewardConfig.tiny()


@pytest.fixture(scope="module")
def params():
    return jax.tree_util.tree_map(np.asarray, rm.init_params(CFG, jax.random.PRNGKey(0)))


def _token_batch(b=4, seed=0):
    rng = np.random.default_rng(seed)
    n, d, s = CFG.vit.num_patches, CFG.vit.hidden_size, CFG.vit.image_size
    heat = (rng.random((b, s, s)) > 0.8).astype(np.float32)
    heat[0] = 0
    return {"tok_ir": rng.normal(size=(b, n, d)).astype(np.float32),
            "tok_vi": rng.normal(size=(b, n, d)).astype(np.float32),
            "tok_fused": rng.normal(size=(b, n, d)).astype(np.float32),
            "heatmap": heat, "scores": rng.uniform(0.2, 1.0, (b, 5)).astype(np.float32)}


def test_split_params_and_optimizer_state_only_for_trained(params):
    trained, frozen = rt.split_params(params)
    assert set(trained) == {"projection", "heatmap_predictor", "score_predictor"}
    assert set(frozen) == {"vit", "vit_fusion"}
    t2, f2 = rt.split_params(params, train_mixer=True)
    assert "vit_fusion" in t2 and set(f2) == {"vit"}
    assert rt.merge_params(trained, frozen).keys() == params.keys()
    opt = rt.make_optimizer(steps_per_epoch=3)
    state = rt.init_train_state(trained, opt)
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]))
    n_trained = sum(x.size for x in jax.tree_util.tree_leaves(trained))
    n_frozen = sum(x.size for x in jax.tree_util.tree_leaves(frozen))
    # Adam moments (2x trained) and counters; nothing for the frozen ViTs.
    assert 2 * n_trained <= n_opt < 2 * n_trained + 10 < 2 * n_trained + n_frozen
    with pytest.raises(ValueError, match="top-level"):
        rt.split_params({"vit": {}})


def test_released_schedule():
    lr = rt.make_schedule(2e-5, 1e-5, num_epochs=30, steps_per_epoch=10)
    # epochs 0 and 1 train at init_lr (torch's CosineAnnealingLR.step(epoch) after each epoch)
    assert float(lr(0)) == pytest.approx(2e-5) and float(lr(19)) == pytest.approx(2e-5)
    e = 5  # epoch 6 uses the closed form at 5
    want = 1e-5 + 1e-5 * 0.5 * (1 + np.cos(np.pi * e / 30))
    assert float(lr(60)) == pytest.approx(want, rel=1e-5)
    assert float(lr(299)) < float(lr(60))
    with pytest.raises(ValueError, match="schedule"):
        rt.make_schedule(1, 1, 1, 1, "nope")


def test_loss_matches_manual_and_step_learns_only_trained(params):
    batch = _token_batch()
    trained, frozen = rt.split_params(params)
    out = rt.forward(params, batch, CFG)
    loss, terms = rt.loss_terms(out, batch, CFG, score_weight=2.0, heatmap_weight=3.0)
    pred = np.stack([np.asarray(out["scores"][t]) for t in CFG.score_types], -1)
    manual = 2.0 * np.sum(np.mean((pred - batch["scores"]) ** 2, axis=0))
    manual += 3.0 * np.mean((np.asarray(out["heatmaps"]["artifact_heatmap"]) - batch["heatmap"]) ** 2)
    assert float(loss) == pytest.approx(manual, rel=1e-5)

    mesh = par.data_mesh(jax.devices()[:1])
    opt = rt.make_optimizer(1e-3, 1e-4, 1, 10, schedule="constant")
    step = rt.make_train_step(CFG, opt, mesh)
    state = rt.init_train_state(trained, opt)
    losses = []
    fr = {"vit_fusion": frozen["vit_fusion"]}  # cached tokens: the backbone is not needed
    for _ in range(5):
        state, m = step(state, fr, par.shard_batch(batch, mesh))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    assert int(state["step"]) == 5
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                   state["params"], trained)
    assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_pixel_batch_equals_token_batch(params):
    rng = np.random.default_rng(1)
    s = CFG.vit.image_size
    pix = {k: rng.uniform(-1, 1, (2, s, s, 3)).astype(np.float32) for k in ("ir", "vi", "fused")}
    toks = {f"tok_{k}": np.asarray(rm.encode(params, pix[k], CFG)) for k in pix}
    a = rt.forward(params, pix, CFG)
    b = rt.forward(params, toks, CFG)
    np.testing.assert_allclose(np.asarray(a["scores"]["Overall_Score"]),
                               np.asarray(b["scores"]["Overall_Score"]), rtol=1e-5, atol=1e-6)


def test_evaluate_batches_perfect_prediction_metrics(params):
    """With a predict function returning the targets, PLCC is 1 and CC is 1."""
    mesh = par.data_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        b = _token_batch(3, seed=int(rng.integers(100)))
        b["heatmap"][1] = 0
        batches.append(b)

    def fake_predict(p, batch):
        return {"scores": batch["scores"], "heatmaps": batch["heatmap"]}

    m = rt.evaluate_batches(fake_predict, None, batches, mesh, CFG)
    assert m["score/plcc/Overall_Score"] == pytest.approx(1.0)
    assert m["heatmap/cc/artifact_heatmap"] == pytest.approx(1.0, abs=1e-4)
    assert m["loss/val"] == pytest.approx(0.0, abs=1e-9)


def test_four_device_step_equals_one_device_step():
    code = textwrap.dedent("""
        import jax, numpy as np
        from evafusion_jax.train import parallel as par, reward_training as rt
        from evafusion_jax.models import reward_model as rm
        assert jax.device_count() == 4
        from evafusion_jax.models.vit import ViTConfig
        # 8 channels before the score MLP: RewardConfig.tiny() ends with 1 channel, whose RMS norm
        # is a sign function with huge, rounding-sensitive gradients near 0.
        cfg = rm.RewardConfig.tiny(vit=ViTConfig.tiny(hidden_size=64),
                                   score_conv_divisors=(1, 2, 4, 8, 8, 8))
        params = jax.tree_util.tree_map(np.asarray, rm.init_params(cfg, jax.random.PRNGKey(0)))
        trained, frozen = rt.split_params(params)
        rng = np.random.default_rng(0)
        s = cfg.vit.image_size
        batch = {k: rng.uniform(-1, 1, (8, s, s, 3)).astype(np.float32) for k in ("ir", "vi", "fused")}
        batch["heatmap"] = (rng.random((8, s, s)) > 0.7).astype(np.float32)
        batch["scores"] = rng.uniform(0.2, 1, (8, 5)).astype(np.float32)
        # SGD: Adam's first steps divide by sqrt(v) ~ |g| and so blow float rounding of tiny
        # gradients up to +-lr; SGD shows the gradients themselves are the same.
        import optax
        opt = optax.sgd(0.5)
        res = {}
        for n in (4, 1):
            mesh = par.data_mesh(jax.devices()[:n])
            step = rt.make_train_step(cfg, opt, mesh)
            state = par.replicate(rt.init_train_state(trained, opt), mesh)
            fr = par.replicate(frozen, mesh)
            for _ in range(2):
                state, m = step(state, fr, par.shard_batch(batch, mesh))
            res[n] = (par.unreplicate(state["params"]), float(m["loss"]))
        a, b = res[4][0], res[1][0]
        diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: float(np.abs(x - y).max()), a, b))
        moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: float(np.abs(x - y).max()), a, trained))
        assert max(moved) > 1e-5, max(moved)
        assert max(diffs) < 2e-6, max(diffs)
        assert abs(res[4][1] - res[1][1]) < 1e-5
        print("OK", max(diffs))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
