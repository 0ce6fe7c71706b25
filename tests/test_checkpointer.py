"""Tests for evafusion_jax.train.checkpointer."""

import grain.python as gp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evafusion_jax.train import checkpointer


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


def test_checkpointer_roundtrip_iterator_and_best(tmp_path):
    state = _state()
    it = iter(_loader())
    next(it)
    ck = checkpointer.TrainCheckpointer(tmp_path / "run", max_to_keep=2, best_mode="max")
    assert ck.latest_step() is None
    assert ck.save(1, state, it.get_state(), metrics={"loss": 0.5}, best_metric=0.3)
    # Not better: no new best; older steps are rotated out.
    state2 = jax.tree_util.tree_map(lambda x: x + 1, state)
    assert not ck.save(2, state2, None, best_metric=0.1)
    assert ck.save(3, state2, None, best_metric=0.9, best_state={"params": state2["params"]})
    assert ck.all_steps() == [2, 3]
    ck.close()

    ck = checkpointer.TrainCheckpointer(tmp_path / "run", max_to_keep=2)
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
    ck = checkpointer.TrainCheckpointer(tmp_path / "r")
    ck.save(2, _state(), it.get_state(), metrics={"loss": float("nan")})
    expected = [next(it)["x"] for _ in range(3)]
    ck.close()
    ck = checkpointer.TrainCheckpointer(tmp_path / "r")
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
    ck = checkpointer.TrainCheckpointer(tmp_path / "r")
    ck.save(1, {"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="different structure or shapes"):
        ck.restore(target={"w": np.zeros((4, 3), np.float32)})
    ck.close()
