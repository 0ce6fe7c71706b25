"""Tests for evafusion_jax.train.utils."""

import textwrap

import grain.python as gp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evafusion_jax.train import utils as tu


class _Source:
    def __repr__(self):  # grain checks repr(data_source) when restoring an iterator
        return "_Source(12)"

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"x": np.float32(i)}


def _loader(seed=0):
    sampler = gp.IndexSampler(12, shard_options=gp.NoSharding(), shuffle=True, seed=seed,
                              num_epochs=2)
    return gp.DataLoader(data_source=_Source(), sampler=sampler, operations=[gp.Batch(3)],
                         worker_count=0)


def _state():
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.zeros(3)}}
    opt = optax.adamw(1e-3, weight_decay=2e-3)
    return {"params": params, "opt_state": opt.init(params), "step": jnp.asarray(0, jnp.int32)}


def test_check_finite():
    assert tu.check_finite(jnp.float32(1.5), 3) == 1.5
    with pytest.raises(tu.NonFiniteLossError, match="step 7"):
        tu.check_finite(jnp.float32(np.nan), 7)
    with pytest.raises(tu.NonFiniteLossError, match="heat"):
        tu.check_finite({"loss": 1.0, "heat": np.inf}, 2)


def test_tree_fingerprint():
    a = {"w": np.ones((2, 2), np.float32)}
    b = {"w": np.ones((2, 2), np.float32)}
    assert tu.tree_fingerprint(a) == tu.tree_fingerprint(b)
    b["w"][0, 0] = 2
    assert tu.tree_fingerprint(a) != tu.tree_fingerprint(b)
    assert tu.tree_fingerprint(a) != tu.tree_fingerprint({"w": a["w"].astype(np.float16)})
    assert tu.tree_fingerprint(a, {"k": 1}) != tu.tree_fingerprint(a, {"k": 2})


def test_checkpointer_roundtrip_iterator_and_best(tmp_path):
    state = _state()
    it = iter(_loader())
    next(it)
    ck = tu.TrainCheckpointer(tmp_path / "run", max_to_keep=2, best_mode="max")
    assert ck.latest_step() is None
    assert ck.save(1, state, it.get_state(), metrics={"loss": 0.5}, best_metric=0.3)
    # Not better: no new best; older steps are rotated out.
    state2 = jax.tree_util.tree_map(lambda x: x + 1, state)
    assert not ck.save(2, state2, None, best_metric=0.1)
    assert ck.save(3, state2, None, best_metric=0.9, best_state={"params": state2["params"]})
    assert ck.all_steps() == [2, 3]
    ck.close()

    ck = tu.TrainCheckpointer(tmp_path / "run", max_to_keep=2)
    assert ck.latest_step() == 3 and ck.best_step() == 3 and ck.best_value == pytest.approx(0.9)
    with pytest.raises(FileNotFoundError, match="step 1"):
        ck.restore(1)
    # Restore with a target keeps optax's structure.
    r = ck.restore(2, target=_state())
    assert r.step == 2 and r.iterator_state is None
    assert isinstance(r.state["opt_state"], type(state["opt_state"]))
    np.testing.assert_array_equal(np.asarray(r.state["params"]["dense"]["kernel"]),
                                  np.asarray(state2["params"]["dense"]["kernel"]))
    best = ck.restore_best()
    assert set(best.state) == {"params"} and best.meta["best_value"] == pytest.approx(0.9)
    ck.close()


def test_checkpointer_iterator_state_resumes(tmp_path):
    it = iter(_loader())
    next(it)
    next(it)
    ck = tu.TrainCheckpointer(tmp_path / "r")
    ck.save(2, _state(), it.get_state(), metrics={"loss": float("nan")})
    expected = [next(it)["x"] for _ in range(3)]
    ck.close()
    ck = tu.TrainCheckpointer(tmp_path / "r")
    r = ck.restore()  # no target: NumPy leaves in plain containers
    assert r.meta["metrics"]["loss"] is None  # non-finite recorded as null
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(r.state))
    it2 = iter(_loader())
    it2.set_state(r.iterator_state)
    got = [next(it2)["x"] for _ in range(3)]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    ck.close()


def test_restore_wrong_shapes_is_clear(tmp_path):
    ck = tu.TrainCheckpointer(tmp_path / "r")
    ck.save(1, {"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="different structure or shapes"):
        ck.restore(target={"w": np.zeros((4, 3), np.float32)})
    ck.close()


def test_metric_writer(tmp_path):
    with tu.MetricWriter(tmp_path / "logs") as w:
        w.scalars(1, {"loss": jnp.float32(0.25), "bad": float("inf")}, prefix="train/")
        w.scalars(2, {"loss": 0.125}, prefix="train/")
        w.images(2, {"heat": np.random.rand(8, 8)})
    recs = tu.read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["train/loss"] == 0.25 and recs[0]["train/bad"] is None
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").iterdir())
    off = tu.MetricWriter(tmp_path / "off", enabled=False)
    off.scalars(1, {"a": 1})
    assert not (tmp_path / "off").exists()


def test_parse_cli_config(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            c = ml_collections.ConfigDict()
            c.lr = 0.1
            c.sub = ml_collections.ConfigDict({"n": 2})
            return c
    """))
    cfg = tu.parse_cli_config(["prog", "--config.lr=0.5", "--config.sub.n=7"], str(cfg_file))
    assert cfg.lr == 0.5 and cfg.sub.n == 7
    cfg = tu.parse_cli_config(["prog"], str(cfg_file))
    assert cfg.lr == 0.1
    with pytest.raises(BaseException):
        tu.parse_cli_config(["prog", "--config.nope=1"], str(cfg_file))


def test_metric_writer_drops_steps_after_the_resumed_checkpoint(tmp_path):
    with tu.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
        for step in range(1, 6):
            w.scalars(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line cut by the kill
    with tu.MetricWriter(tmp_path, enabled=True, tensorboard=False, resume_step=3) as w:
        w.scalars(4, {"loss": 40.0})
    rows = tu.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 40.0


def test_guard_step_never_keeps_non_finite_state_and_drops_poisoned_checkpoint(tmp_path):
    ck = tu.TrainCheckpointer(tmp_path / "ck")
    good = {"w": np.ones(3, np.float32), "opt": np.zeros(2, np.float32)}
    ck.save(1, good)
    ck.save(2, {"w": np.full(3, 1e30, np.float32), "opt": np.zeros(2, np.float32)})
    assert tu.guard_step(ck, np.float32(0.5), good, 2) == 0.5
    bad_state = {"w": np.array([1.0, np.inf, 0.0], np.float32), "opt": np.zeros(2, np.float32)}
    with pytest.raises(tu.NonFiniteLossError, match=r"after step 3.*\['w'\]"):
        tu.guard_step(ck, np.float32(0.5), bad_state, 2)
    # a NaN loss on a NaN batch blames the data: the checkpoint of that step is kept
    with pytest.raises(tu.NonFiniteLossError, match="input batch"):
        tu.guard_step(ck, np.float32(np.nan), good, 2, {"ir": np.full(2, np.nan, np.float32)})
    assert ck.latest_step() == 2
    # a NaN loss on finite inputs: the parameters of checkpoint 2 gave it, it is deleted
    with pytest.raises(tu.NonFiniteLossError, match="checkpoint 2.*deleted"):
        tu.guard_step(ck, np.float32(np.nan), good, 2, {"ir": np.zeros(2, np.float32)})
    assert ck.latest_step() == 1
    ck.close()
