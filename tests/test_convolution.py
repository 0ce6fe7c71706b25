import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evafusion_jax.models import convolution


def _lax(x, k, pads, dil):
    return jax.lax.conv_general_dilated(x, k, (1, 1), pads, lhs_dilation=dil,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("xs, ks, padding, pads, dil", [
    ((2, 9, 7, 5), (3, 3, 5, 4), "SAME", ((1, 1), (1, 1)), (1, 1)),
    ((1, 8, 6, 3), (3, 2, 3, 2), "VALID", ((0, 0), (0, 0)), (1, 1)),
    ((1, 8, 8, 3), (5, 5, 3, 2), 3, ((3, 3), (3, 3)), (1, 1)),
    ((2, 7, 6, 3), (3, 2, 3, 4), ((2, 0), (0, 1)), ((2, 0), (0, 1)), (1, 1)),
    ((2, 5, 6, 3), (3, 3, 3, 4), ((1, 2), (1, 2)), ((1, 2), (1, 2)), (2, 2)),   # UpConv
    ((1, 5, 6, 3), (3, 3, 3, 4), ((3, 0), (2, 4)), ((3, 0), (2, 4)), (2, 3)),
])
def test_conv2d_matches_lax_values_and_gradients(xs, ks, padding, pads, dil):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    k = jnp.asarray(rng.standard_normal(ks), jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    y = convolution.conv2d(x, k, padding, dil, precision=hp)
    want = _lax(x, k, pads, dil)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))  # forward is XLA's
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    got = jax.vjp(lambda a, b: convolution.conv2d(a, b, padding, dil, precision=hp), x, k)[1](dy)
    ref = jax.vjp(lambda a, b: _lax(a, b, pads, dil), x, k)[1](dy)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(got[1]))) > 0.1


@pytest.mark.parametrize("padding", ["SAME", "VALID", 0, ((0, 0), (0, 0))])
def test_pointwise_conv2d_is_a_matrix_product_equal_to_lax(padding):
    """1x1 without padding: a matrix product over the pixels, same values and gradients."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 6)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 6, 3)), jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    text = jax.jit(lambda a, b: convolution.conv2d(a, b, padding, precision=hp)).lower(x, k).as_text()
    assert "convolution" not in text and "dot_general" in text
    y, vjp = jax.vjp(lambda a, b: convolution.conv2d(a, b, padding, precision=hp), x, k)
    want, vjp_ref = jax.vjp(lambda a, b: _lax(a, b, ((0, 0), (0, 0)), (1, 1)), x, k)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6, atol=1e-6)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for g, r in zip(vjp(dy), vjp_ref(dy)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_padded_pointwise_conv2d_stays_a_convolution():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 4, 4, 2)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 2, 2)), jnp.float32)
    y = convolution.conv2d(x, k, 1)
    assert y.shape == (1, 6, 6, 2)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_lax(x, k, ((1, 1), (1, 1)), (1, 1))))


def test_conv_module_is_a_drop_in_for_flax_conv():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 3)), jnp.float32)
    ours = convolution.Conv(4, (3, 3))
    theirs = nn.Conv(4, (3, 3), padding="SAME")
    p = ours.init(jax.random.PRNGKey(0), x)
    p_ref = theirs.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, p) == jax.tree_util.tree_map(jnp.shape, p_ref)
    p = jax.tree_util.tree_map(lambda a: a + 0.1, p)  # a non-zero bias
    np.testing.assert_allclose(ours.apply(p, x), theirs.apply(p, x), rtol=1e-6, atol=1e-6)


def test_conv2d_rejects_bad_shapes():
    with pytest.raises(ValueError, match="matching channels"):
        convolution.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 2, 1)))
    with pytest.raises(ValueError, match="explicit"):
        convolution.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 1)), "SAME", (2, 2))
