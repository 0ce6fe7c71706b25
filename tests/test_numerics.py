"""Dtype / precision names of the model configs (evafusion_jax.models.numerics)."""

import jax
import jax.numpy as jnp
import pytest

from evafusion_jax.models import dcevo, numerics, reward_model


def test_names_resolve_and_both_configs_share_them():
    cfg = dcevo.DCEvoConfig.tiny()
    cfg = dcevo.DCEvoConfig.from_dict({**cfg.to_dict(), "dtype": "bfloat16", "precision": "high"})
    assert cfg.compute_dtype == jnp.bfloat16 and cfg.lax_precision == jax.lax.Precision.HIGH
    r = reward_model.RewardConfig.tiny().replace(precision=None)
    assert r.lax_precision is None and r.compute_dtype == jnp.float32


@pytest.mark.parametrize("dtype, precision, field", [
    ("float64", "highest", "DCEvoConfig.dtype"), ("float32", "fast", "DCEvoConfig.precision")])
def test_unknown_names_are_errors_naming_the_field(dtype, precision, field):
    with pytest.raises(ValueError, match=field):
        numerics.check("DCEvoConfig", dtype, precision)
    base = dcevo.DCEvoConfig.tiny().to_dict()
    with pytest.raises(ValueError, match=field):
        dcevo.DCEvoConfig.from_dict({**base, "dtype": dtype, "precision": precision})
