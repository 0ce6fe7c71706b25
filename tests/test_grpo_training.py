"""GRPO / direct / fusion update steps (evafusion_jax.train.grpo_training): gradients, learning,
data parallelism on 4 fake CPU devices and over 2 processes (jax.distributed)."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evafusion_jax.models import dcevo
from evafusion_jax.rl import rewards
from evafusion_jax.train import grpo_training as gt
from evafusion_jax.train import parallel

CFG = dcevo.DCEvoConfig.tiny()
REPO = Path(__file__).resolve().parent.parent


def _batch(seed=0, b=2, h=16, k=4):
    rng = np.random.default_rng(seed)
    masks = np.zeros((b, k, h, h), np.float32)
    half = h // 2
    for j in range(k):  # 2 x 2 quadrants
        masks[:, j, (j // 2) * half:(j // 2 + 1) * half, (j % 2) * half:(j % 2 + 1) * half] = 1
    valid = np.ones((b, k), bool)
    valid[-1, -1] = False
    masks[-1, -1] = 0
    return {"ir": rng.random((b, h, h, 1)).astype(np.float32),
            "vi": rng.random((b, h, h, 1)).astype(np.float32), "masks": masks, "valid": valid}


def _surrogate_grads(hp, params, old):
    batch = jax.tree_util.tree_map(jnp.asarray, _batch())
    rf = rewards.ContrastReward()
    state = {"old_params": old, "ref_params": params, "step": jnp.zeros((), jnp.int32)}
    g = jax.jit(jax.grad(lambda p: gt.loss_fn(p, state, {}, batch, hp=hp, model_config=CFG,
                                              reward_fn=rf)[0]))(params)
    return jax.tree_util.tree_leaves(g)


def test_l1_ratio_gradient_is_zero_without_lag_and_nonzero_with_lag():
    params = dcevo.init_params(CFG, jax.random.PRNGKey(0))
    hp = gt.TrainHParams(objective="grpo", ratio="l1", beta=0.0)
    same = _surrogate_grads(hp, params, params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in same)
    lagging = jax.tree_util.tree_map(lambda x: x * 0.98, params)
    g = _surrogate_grads(hp, params, lagging)
    assert sum(float(jnp.abs(x).sum()) for x in g) > 0


def test_sampled_group_gradient_is_nonzero_at_the_old_policy():
    # The default (ratio="gaussian") has a policy gradient at theta_old == theta; the
    # direction flips with the sign of the advantages (reward negated = gradient negated).
    params = dcevo.init_params(CFG, jax.random.PRNGKey(0))
    hp = gt.TrainHParams(objective="grpo", beta=0.0)
    assert hp.ratio == "gaussian" and hp.group_size == 4
    g = _surrogate_grads(hp, params, params)
    assert sum(float(jnp.abs(x).sum()) for x in g) > 0
    batch = jax.tree_util.tree_map(jnp.asarray, _batch())
    state = {"old_params": params, "ref_params": params, "step": jnp.zeros((), jnp.int32)}
    neg = rewards.ContrastReward(scale=-1.0)
    g_neg = jax.tree_util.tree_leaves(jax.jit(jax.grad(
        lambda p: gt.loss_fn(p, state, {}, batch, hp=hp, model_config=CFG,
                             reward_fn=neg)[0]))(params))
    for a, b in zip(g, g_neg):
        np.testing.assert_allclose(np.asarray(a), -np.asarray(b), rtol=1e-4, atol=1e-7)


def _run(objective, steps, lag=None, **hp_kw):
    params = dcevo.init_params(CFG, jax.random.PRNGKey(1))
    rf = rewards.ContrastReward()
    hp = gt.TrainHParams(objective=objective, beta=0.01, reward_loss_weight=1.0,
                         fusion_loss_weight=0.0, decomp_loss_weight=0.0, pseudo_fusion_weight=0.0,
                         **hp_kw)
    tx, sched = gt.make_optimizer(2e-3, steps, weight_decay=0.01)
    mesh = parallel.data_mesh()
    step = gt.make_train_step(hp, CFG, tx, rf, mesh, sched)
    state = gt.create_train_state(params, tx, objective=objective)
    if lag is not None:
        state["old_params"] = jax.tree_util.tree_map(lambda x: x * lag, params)
    state = parallel.replicate(state, mesh)
    batches = [_batch(s) for s in range(3)]
    history = []
    for i in range(steps):
        state, m = step(state, {}, parallel.shard_batch(batches[i % 3], mesh))
        history.append({k: float(v) for k, v in m.items()})
    return params, parallel.unreplicate(state), batches, history, rf


def _mean_reward_before_after(objective, steps):
    params, state, batches, history, rf = _run(objective, steps)
    evaluate = gt.make_eval_fn(CFG, rf)

    def mean_reward(p):
        return float(np.mean([np.asarray(evaluate(p, {}, b)["reward"])[b["valid"]].mean()
                              for b in batches]))

    assert np.isfinite(history[-1]["loss"])
    return mean_reward(params), mean_reward(state["params"]), history


def test_direct_objective_raises_the_mean_reward():
    before, after, _ = _mean_reward_before_after("direct", 24)
    assert after > before * 1.05, (before, after)


def test_grpo_objective_raises_the_mean_reward():
    # The default GRPO (a group of 4 sampled fusions per pair, antithetic, advantages per
    # region over the samples): the mean region reward of the deterministic output F rises.
    before, after, history = _mean_reward_before_after("grpo", 30)
    assert after > before * 1.03, (before, after)
    h = history[-1]
    assert h["adv_mean"] == pytest.approx(0.0, abs=1e-5)
    assert h["regions_per_image"] == pytest.approx(3.5)


def test_l1_ratio_step_raises_the_clipped_surrogate_and_logs_statistics():
    # The paper's ratio, theta_old fixed (interval > steps) and lagging: the update must
    # increase mean min(r A, clip(r) A), the quantity GRPO maximises.
    _, state, _, history, _ = _run("grpo", 12, lag=0.98, old_policy_interval=1000, ratio="l1")
    first = np.mean([h["surrogate"] for h in history[:3]])
    last = np.mean([h["surrogate"] for h in history[-3:]])
    assert last > first, (first, last)
    h = history[-1]
    assert 0.0 <= h["clip_fraction"] <= 1.0
    assert h["regions_per_image"] == pytest.approx(3.5)
    assert h["adv_mean"] == pytest.approx(0.0, abs=1e-5)
    assert h["adv_std"] == pytest.approx(1.0, abs=0.05)
    assert h["ratio_max"] >= 1.0 and h["kl"] >= 0.0
    assert int(state["step"]) == 12


def test_fusion_objective_needs_no_reward_and_lowers_fusion_loss():
    params = dcevo.init_params(CFG, jax.random.PRNGKey(2))
    hp = gt.TrainHParams(objective="fusion")
    tx, _ = gt.make_optimizer(2e-3, 8)
    mesh = parallel.data_mesh()
    step = gt.make_train_step(hp, CFG, tx, None, mesh)
    state = parallel.replicate(gt.create_train_state(params, tx), mesh)
    b = parallel.shard_batch(_batch(5), mesh)
    losses = []
    for _ in range(8):
        state, m = step(state, {}, b)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="needs a reward function"):
        gt.make_train_step(gt.TrainHParams(objective="grpo"), CFG, tx, None, mesh)
    with pytest.raises(ValueError, match="objective"):
        gt.TrainHParams(objective="reinforce")


WORKER = textwrap.dedent('''
    import os, sys, numpy as np
    mode, out = sys.argv[1], sys.argv[2]
    objective = os.environ.get("GRPO_TEST_OBJECTIVE", "grpo")
    import jax
    if mode == "dist":
        from evafusion_jax.train import parallel
        parallel.maybe_initialize_distributed(f"127.0.0.1:{sys.argv[3]}", 2, int(sys.argv[4]))
    from evafusion_jax.models import dcevo
    from evafusion_jax.train import grpo_training as gt, parallel
    from evafusion_jax.rl import rewards
    sys.path.insert(0, sys.argv[-1])
    from test_grpo_training import _batch, CFG
    params = dcevo.init_params(CFG, jax.random.PRNGKey(3))
    hp = gt.TrainHParams(objective=objective, beta=0.1, whole_image_region=True,
                         old_policy_interval=100)
    import optax
    tx, sched = optax.sgd(1e-2), None  # SGD: the comparison is not blurred by Adam's normalisation
    rf = rewards.ContrastReward()
    batches = [_batch(s, b=4) for s in range(3)]

    def run(mesh, local_rows):
        step = gt.make_train_step(hp, CFG, tx, rf, mesh, sched)
        state = gt.create_train_state(params, tx, objective=objective)
        state["old_params"] = jax.tree_util.tree_map(lambda x: x * 0.98, params)
        state = parallel.replicate(state, mesh)
        for b in batches:
            local = {k: v[local_rows] for k, v in b.items()}
            state, m = step(state, {}, parallel.shard_batch(local, mesh))
        return parallel.unreplicate(state["params"]), float(parallel.unreplicate(m["loss"]))

    if mode == "local4":
        p4, l4 = run(parallel.data_mesh(), slice(None))
        p1, l1 = run(parallel.data_mesh(jax.devices()[:1]), slice(None))
        flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
        np.savez(out, p4=flat(p4), p1=flat(p1), l4=l4, l1=l1, n=jax.device_count(),
                 p0=flat(params))
    else:
        pid = jax.process_index()
        p, l = run(parallel.data_mesh(), slice(2 * pid, 2 * pid + 2))
        flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
        np.savez(out, p=flat(p), l=l, n=jax.device_count())
''')


def _env(n_devices, objective="grpo"):
    env = dict(os.environ)
    env["GRPO_TEST_OBJECTIVE"] = objective
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory):
    """4 fake devices and 1 device on the same global batches (one subprocess)."""
    d = tmp_path_factory.mktemp("dp")
    script = d / "worker.py"
    script.write_text(WORKER)
    out = d / "local4.npz"
    r = subprocess.run([sys.executable, str(script), "local4", str(out),
                        str(Path(__file__).parent)], env=_env(4), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return script, dict(np.load(out))


@pytest.mark.slow
def test_four_devices_equal_one_device(single_process_reference):
    _, ref = single_process_reference
    assert int(ref["n"]) == 4
    np.testing.assert_allclose(ref["p4"], ref["p1"], atol=2e-5, rtol=1e-4)
    # the loss is a sum of r*A terms that cancel (sum A = 0): compare at round-off scale
    assert float(ref["l4"]) == pytest.approx(float(ref["l1"]), abs=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "ppo"])
def test_four_devices_equal_one_device_for_dpo_and_ppo(objective, single_process_reference,
                                                       tmp_path):
    # The same worker as for grpo (DPO: best-vs-worst pairs counted over the global batch;
    # PPO: the running baseline from the global batch's reward statistics).
    script, _ = single_process_reference
    out = tmp_path / "local4.npz"
    r = subprocess.run([sys.executable, str(script), "local4", str(out),
                        str(Path(__file__).parent)], env=_env(4, objective),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = dict(np.load(out))
    assert int(ref["n"]) == 4
    assert np.abs(ref["p1"] - ref["p0"]).max() > 1e-6  # the objective moved the parameters
    np.testing.assert_allclose(ref["p4"], ref["p1"], atol=2e-5, rtol=1e-4)
    assert float(ref["l4"]) == pytest.approx(float(ref["l1"]), abs=2e-5, rel=1e-5)


@pytest.mark.slow
def test_two_processes_equal_one_process(single_process_reference, tmp_path):
    script, ref = single_process_reference
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, outs = [], []
    for pid in range(2):
        out = tmp_path / f"dist{pid}.npz"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, str(script), "dist", str(out), str(port), str(pid),
             str(Path(__file__).parent)], env=_env(2), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    for out in outs:
        got = dict(np.load(out))
        assert int(got["n"]) == 4
        np.testing.assert_allclose(got["p"], ref["p1"], atol=2e-5, rtol=1e-4)
