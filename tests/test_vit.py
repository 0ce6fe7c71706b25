"""evafusion_jax.models.vit: configuration and shape checks (parity lives in test_convert_vit.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evafusion_jax.models import vit


def test_config_round_trip_and_validation():
    cfg = vit.ViTConfig.tiny()
    assert vit.ViTConfig.from_dict(cfg.to_dict()) == cfg
    assert vit.ViTConfig.vit_l16_384().num_patches == 576
    with pytest.raises(ValueError, match="not divisible"):
        vit.ViTConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="not a multiple"):
        vit.ViTConfig(image_size=100, patch_size=16)
    with pytest.raises(ValueError, match="unknown field"):
        vit.ViTConfig.from_dict({"hidden": 3})


def test_hf_config_mapping():
    hf = {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "image_size": 64, "patch_size": 16, "layer_norm_eps": 1e-6,
          "qkv_bias": False, "hidden_dropout_prob": 0.1}
    cfg = vit.ViTConfig.from_hf_config(hf, {"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]})
    assert (cfg.hidden_size, cfg.layer_norm_eps, cfg.qkv_bias) == (64, 1e-6, False)
    assert cfg.image_mean == (0.4, 0.4, 0.4)


def test_forward_shapes_and_input_check():
    cfg = vit.ViTConfig.tiny()
    params = vit.init_params(cfg, jax.random.PRNGKey(0))
    x = jnp.zeros((2, 32, 32, 3))
    out = vit.apply(params, x, cfg)
    assert out.shape == (2, 17, 32)
    # final LayerNorm: each token is normalised (scale 1, bias 0 at init)
    np.testing.assert_allclose(np.asarray(out).mean(-1), 0, atol=1e-5)
    with pytest.raises(ValueError, match="pixel_values of shape"):
        vit.apply(params, jnp.zeros((1, 48, 48, 3)), cfg)


def test_bfloat16_compute_is_close():
    cfg = vit.ViTConfig.tiny()
    params = vit.init_params(cfg, jax.random.PRNGKey(1))
    x = jax.random.uniform(jax.random.PRNGKey(2), (1, 32, 32, 3), minval=-1, maxval=1)
    a = vit.apply(params, x, cfg)
    b = vit.apply(params, x, cfg, dtype=jnp.bfloat16)
    assert b.dtype == jnp.bfloat16
    assert float(jnp.abs(a - b.astype(jnp.float32)).max()) < 0.1
