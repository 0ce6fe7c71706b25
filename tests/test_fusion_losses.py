"""Released fusion losses against NumPy re-computations (evafusion_jax.rl.fusion_losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evafusion_jax.rl import fusion_losses as fl


def _np_sobel(x):  # (H, W) cross-correlation with zero padding
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
    ky = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float64)
    p = np.pad(x, 1)
    h, w = x.shape
    gx = np.zeros((h, w))
    gy = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            gx[i, j] = np.sum(p[i:i + 3, j:j + 3] * kx)
            gy[i, j] = np.sum(p[i:i + 3, j:j + 3] * ky)
    return np.abs(gx) + np.abs(gy)


def test_sobel_matches_reference_and_hand_value():
    rng = np.random.default_rng(0)
    x = rng.random((2, 5, 6, 1)).astype(np.float32)
    got = np.asarray(fl.sobel_gradient(jnp.asarray(x)))
    for b in range(2):
        np.testing.assert_allclose(got[b, ..., 0], _np_sobel(x[b, ..., 0]), atol=1e-5)
    step = np.zeros((1, 3, 3, 1), np.float32)
    step[..., 2, 0] = 1.0  # right column = 1
    # centre: gx = 1 + 2 + 1 = 4, gy = 1 - 1 = 0
    assert float(fl.sobel_gradient(jnp.asarray(step))[0, 1, 1, 0]) == pytest.approx(4.0)


def test_fusion_loss_matches_numpy():
    rng = np.random.default_rng(1)
    vi = rng.random((2, 6, 6, 3)).astype(np.float32)
    ir = rng.random((2, 6, 6, 1)).astype(np.float32)
    f = rng.random((2, 6, 6, 1)).astype(np.float32)
    total, l_in, l_grad = fl.fusion_loss(jnp.asarray(vi), jnp.asarray(ir), jnp.asarray(f))
    y = vi[..., :1]
    exp_in = np.mean(np.abs(np.maximum(y, ir) - f))
    g = lambda a: np.stack([_np_sobel(a[b, ..., 0]) for b in range(2)])[..., None]  # noqa: E731
    exp_grad = np.mean(np.abs(np.maximum(g(y), g(ir)) - g(f)))
    assert float(l_in) == pytest.approx(exp_in, rel=1e-5)
    assert float(l_grad) == pytest.approx(exp_grad, rel=1e-5)
    assert float(total) == pytest.approx(exp_in + 10 * exp_grad, rel=1e-5)


def test_correlation_and_decomposition_loss():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    b = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    exp = np.mean([[np.corrcoef(a[n, ..., c].ravel(), b[n, ..., c].ravel())[0, 1]
                    for c in range(3)] for n in range(2)])
    assert float(fl.correlation(jnp.asarray(a), jnp.asarray(b))) == pytest.approx(exp, abs=1e-5)
    assert float(fl.correlation(jnp.asarray(a), jnp.asarray(2 * a + 1))) == pytest.approx(1.0, abs=1e-5)
    # cc_B = 1 (identical bases), cc_D = -1 (opposite details): 1 / 2.01
    d = fl.decomposition_loss(jnp.asarray(a), jnp.asarray(a), jnp.asarray(b), jnp.asarray(-b))
    assert float(d) == pytest.approx(1 / 2.01, rel=1e-5)


def test_pseudo_fusion_targets():
    ir = jnp.full((1, 8, 8, 1), 0.2)
    vi = jnp.full((1, 8, 8, 1), 0.6)
    np.testing.assert_allclose(np.asarray(fl.pseudo_fusion_target(ir, vi, "max")), 0.6)
    # both flat: the saliency blend is the average
    np.testing.assert_allclose(np.asarray(fl.pseudo_fusion_target(ir, vi, "saliency")), 0.4,
                               atol=1e-5)
    # textured IR, flat visible: the target follows the IR away from the border
    rng = np.random.default_rng(3)
    ir_tex = jnp.asarray(rng.random((1, 16, 16, 1)), jnp.float32)
    t = np.asarray(fl.pseudo_fusion_target(ir_tex, vi[:, :1, :1].repeat(16, 1).repeat(16, 2),
                                           "saliency"))
    np.testing.assert_allclose(t[0, 4:12, 4:12], np.asarray(ir_tex)[0, 4:12, 4:12], atol=0.05)
    assert float(fl.pseudo_fusion_loss(ir, ir, vi)) == pytest.approx(0.16, rel=1e-5)
    with pytest.raises(ValueError, match="pseudo-fusion mode"):
        fl.pseudo_fusion_target(ir, vi, "median")
    g = jax.grad(lambda f: fl.pseudo_fusion_loss(f, ir, vi))(ir)
    assert np.all(np.asarray(g) < 0)  # pushes F up towards the max target
