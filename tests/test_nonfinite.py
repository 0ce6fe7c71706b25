"""Tests for evafusion_jax.train.nonfinite."""

import jax.numpy as jnp
import numpy as np
import pytest

from evafusion_jax.train import checkpointer, nonfinite


def test_check_finite():
    assert nonfinite.check_finite(jnp.float32(1.5), 3) == 1.5
    with pytest.raises(nonfinite.NonFiniteLossError, match="step 7"):
        nonfinite.check_finite(jnp.float32(np.nan), 7)
    with pytest.raises(nonfinite.NonFiniteLossError, match="heat"):
        nonfinite.check_finite({"loss": 1.0, "heat": np.inf}, 2)


def test_guard_step_never_keeps_non_finite_state_and_drops_poisoned_checkpoint(tmp_path):
    ck = checkpointer.TrainCheckpointer(tmp_path / "ck")
    good = {"w": np.ones(3, np.float32), "opt": np.zeros(2, np.float32)}
    ck.save(1, good)
    ck.save(2, {"w": np.full(3, 1e30, np.float32), "opt": np.zeros(2, np.float32)})
    assert nonfinite.guard_step(ck, np.float32(0.5), good, 2) == 0.5
    bad_state = {"w": np.array([1.0, np.inf, 0.0], np.float32), "opt": np.zeros(2, np.float32)}
    with pytest.raises(nonfinite.NonFiniteLossError, match=r"after step 3.*\['w'\]"):
        nonfinite.guard_step(ck, np.float32(0.5), bad_state, 2)
    # a NaN loss on a NaN batch blames the data: the checkpoint of that step is kept
    with pytest.raises(nonfinite.NonFiniteLossError, match="input batch"):
        nonfinite.guard_step(ck, np.float32(np.nan), good, 2, {"ir": np.full(2, np.nan, np.float32)})
    assert ck.latest_step() == 2
    # a NaN loss on finite inputs: the parameters of checkpoint 2 gave it, it is deleted
    with pytest.raises(nonfinite.NonFiniteLossError, match="checkpoint 2.*deleted"):
        nonfinite.guard_step(ck, np.float32(np.nan), good, 2, {"ir": np.zeros(2, np.float32)})
    assert ck.latest_step() == 1
    ck.close()
