"""Tests of evafusion_jax.models.dcevo: golden parity with PyTorch DCEvo, batching, validation, dtypes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_utils import dcevo_checkpoint, load_npz, rel_l2

from evafusion_jax.convert.dcevo_from_torch import torch_to_params
from evafusion_jax.models import dcevo
from evafusion_jax.models.dcevo import DCEvoConfig

TINY = DCEvoConfig.tiny()
GOLDEN_KEYS = ("vi_base", "vi_detail", "fused_base", "fused_detail", "fused")


def nchw_to_nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def tiny_params():
    return dcevo.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def odd_batch():
    rng = np.random.default_rng(0)
    ir = rng.uniform(0, 1, (3, 37, 53, 1)).astype(np.float32)
    vi = rng.uniform(0, 1, (3, 37, 53, 1)).astype(np.float32)
    return ir, vi


def test_golden_parity_full_size():
    """Seeded released-layout weights -> converter -> fuse_with_features equals PyTorch DCEvo."""
    config = DCEvoConfig()
    params = torch_to_params(dcevo_checkpoint(), config)
    inputs, golden = load_npz("dcevo", "inputs"), load_npz("dcevo", "outputs")
    out = dcevo.fuse_with_features(params, nchw_to_nhwc(inputs["ir"]), nchw_to_nhwc(inputs["vi"]),
                                   config)
    for key in GOLDEN_KEYS:
        got = nchw_to_nhwc(golden[key])
        assert out[key].shape == got.shape, key
        assert out[key].dtype == jnp.float32, key
        err = rel_l2(out[key], got)
        assert err <= 1e-5, f"{key}: relative L2 error {err:.3g}"
    max_abs = float(np.max(np.abs(np.asarray(out["fused"]) - nchw_to_nhwc(golden["fused"]))))
    assert max_abs <= 1e-5, max_abs
    # ir features exist, have the same shape as the vi ones and differ from them.
    assert out["ir_base"].shape == out["vi_base"].shape
    assert not np.allclose(out["ir_detail"], out["vi_detail"])


def test_batch_samples_independent_odd_size(tiny_params, odd_batch):
    """Batch 3 at 37x53 equals each sample fused alone (residual is per sample)."""
    ir, vi = odd_batch
    batched = dcevo.fuse_with_features(tiny_params, ir, vi, TINY)
    assert batched["fused"].shape == (3, 37, 53, 1)
    assert batched["fused_base"].shape == (3, 37, 53, TINY.dim)
    for i in range(3):
        single = dcevo.fuse_with_features(tiny_params, ir[i:i + 1], vi[i:i + 1], TINY)
        for key in ("fused", "fused_base", "fused_detail", "ir_base", "vi_detail"):
            np.testing.assert_allclose(batched[key][i:i + 1], single[key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"sample {i}, {key}")
    fused = np.asarray(batched["fused"])
    assert np.all((fused > 0) & (fused < 1))
    # The samples differ, so a batch-shared residual (the reference's bug) would be caught above.
    assert not np.allclose(fused[0], fused[1])


def test_jit_grad_through_fuse(tiny_params):
    """fuse works inside an outer jit and is differentiable w.r.t. the parameters."""
    ir = jnp.linspace(0, 1, 2 * 6 * 7).reshape(2, 6, 7, 1)
    vi = 1.0 - ir

    @jax.jit
    def loss_and_grad(p):
        return jax.value_and_grad(lambda q: jnp.mean(dcevo.fuse(q, ir, vi, TINY)))(p)

    loss, grads = loss_and_grad(tiny_params)
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves(grads)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(tiny_params)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


def test_bfloat16_compute_close_to_float32(tiny_params, odd_batch):
    """`fuse` with a bf16 compute dtype returns float32 close to the float32 result."""
    ir, vi = odd_batch[0][:1], odd_batch[1][:1]
    f32 = dcevo.fuse_with_features(tiny_params, ir, vi, TINY)  # shape shared with the batch test
    cfg16 = dataclasses.replace(TINY, dtype="bfloat16", precision="default")
    bf16 = dcevo.fuse(tiny_params, ir, vi, cfg16)
    assert bf16.dtype == jnp.float32 and bf16.shape == (1, 37, 53, 1)
    err = float(jnp.max(jnp.abs(bf16 - f32["fused"])))
    assert 0 < err < 0.05, err


def test_init_params_deterministic_and_torch_style(tiny_params):
    again = dcevo.init_params(TINY, jax.random.key(0))
    other = dcevo.init_params(TINY, jax.random.key(1))
    shapes = dcevo.param_shapes(TINY)
    flat = jax.tree_util.tree_leaves_with_path(tiny_params)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(shapes)
    for (path, a), b, c, s in zip(flat, jax.tree_util.tree_leaves(again),
                                  jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(shapes)):
        assert a.shape == s.shape and a.dtype == jnp.float32, path
        np.testing.assert_array_equal(a, b)
        name = jax.tree_util.keystr(path)
        if "temperature" in name:
            np.testing.assert_array_equal(a, 1.0)
        elif "body" in name:
            np.testing.assert_array_equal(a, 0.0)
        else:
            fan_in = np.prod(a.shape[:3]) if a.ndim == 4 else a.shape[0]
            assert float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(fan_in) + 1e-7, name
            assert not np.array_equal(a, c), name


def test_param_tree_matches_torch_layout():
    shapes = dcevo.param_shapes(DCEvoConfig())
    assert sorted(shapes) == sorted(["DE_Encoder", "DE_Decoder", "LowFreqExtractor",
                                     "HighFreqExtractor"])
    enc = shapes["DE_Encoder"]
    assert enc["patch_embed"]["proj"]["kernel"].shape == (3, 3, 1, 64)
    assert enc["encoder_level1_4"]["net2"]["m_5"]["cv2"]["conv"]["kernel"].shape == (3, 3, 1, 32)
    assert "encoder_level1_5" not in enc
    dec = shapes["DE_Decoder"]["output_0"]
    assert dec["attn"]["temperature"].shape == (8, 1, 1)
    assert dec["ffn"]["project_in"]["kernel"].shape == (1, 1, 64, 256)
    hfe = shapes["HighFreqExtractor"]
    assert sorted(hfe) == ["net_0", "net_1", "net_2"]
    assert hfe["net_0"]["shffleconv"]["bias"].shape == (64,)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n_params > 0


def test_tiny_config_uses_half_dim_detail_channels(tiny_params):
    dwb = tiny_params["DE_Encoder"]["detailFeature"]["net_0"]["theta_phi"]
    assert dwb["bottleneckBlock_0"]["kernel"].shape == (1, 1, TINY.dim // 2, TINY.dim // 2)
    assert tiny_params["HighFreqExtractor"]["net_0"]["shffleconv"]["kernel"].shape == \
        (1, 1, TINY.dim, TINY.dim)


@pytest.mark.parametrize("ir_shape,vi_shape,match", [
    ((1, 8, 8), (1, 8, 8), "must have shape"),
    ((1, 8, 8, 3), (1, 8, 8, 3), "must have shape"),
    ((1, 1, 8, 8), (1, 1, 8, 8), "must have shape"),  # NCHW by mistake
    ((1, 8, 8, 1), (1, 8, 9, 1), "same shape"),
    ((2, 8, 8, 1), (1, 8, 8, 1), "same shape"),
    ((1, 1, 8, 1), (1, 1, 8, 1), ">= 2"),
    ((0, 8, 8, 1), (0, 8, 8, 1), "empty batch"),
])
def test_input_validation(tiny_params, ir_shape, vi_shape, match):
    with pytest.raises(ValueError, match=match):
        dcevo.fuse(tiny_params, np.zeros(ir_shape, np.float32), np.zeros(vi_shape, np.float32), TINY)


def test_integer_images_rejected(tiny_params):
    with pytest.raises(ValueError, match="dtype"):
        dcevo.fuse_with_features(tiny_params, np.zeros((1, 8, 8, 1), np.uint8),
                                 np.zeros((1, 8, 8, 1), np.uint8), TINY)


def test_config_round_trip_and_validation():
    cfg = DCEvoConfig(dim=16, num_blocks=2, c2f_n=3, detail_layers=2, heads=4,
                      ffn_expansion_factor=1.5)
    assert DCEvoConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(DCEvoConfig.from_dict(cfg.to_dict()))
    assert DCEvoConfig.from_dict({"dim": 64}) == DCEvoConfig()
    assert DCEvoConfig().to_dict()["ffn_expansion_factor"] == 2.0
    with pytest.raises(ValueError, match="unknown DCEvoConfig field"):
        DCEvoConfig.from_dict({"dim": 64, "depth": 3})
    with pytest.raises(ValueError, match="divisible by heads"):
        DCEvoConfig(dim=12, heads=8)
    with pytest.raises(ValueError, match="even"):
        DCEvoConfig(dim=7, heads=7)
    with pytest.raises(ValueError, match="num_blocks"):
        DCEvoConfig(num_blocks=0)
    with pytest.raises(ValueError, match="dtype"):
        DCEvoConfig(dtype="float64")
    with pytest.raises(TypeError, match="DCEvoConfig"):
        dcevo.fuse({}, np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 4, 4, 1), np.float32),
                   {"dim": 8})


@pytest.mark.parametrize("k,padding,batch", [(3, 1, 2), (3, 0, 3), (5, 1, 1), (3, 3, 2),
                                             (3, 1, 17)])
def test_depthwise_conv_matches_lax_conv_and_its_gradients(k, padding, batch):
    """depthwise_conv (custom VJP) == grouped lax.conv in value, input and kernel gradient."""
    rng = np.random.default_rng(k * 10 + padding + batch)
    x = jnp.asarray(rng.standard_normal((batch, 9, 7, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 6)), jnp.float32)
    ct_shape = (batch, 9 + 2 * padding - k + 1, 7 + 2 * padding - k + 1, 6)
    ct = jnp.asarray(rng.standard_normal(ct_shape), jnp.float32)

    def ref(x, w):
        return jax.lax.conv_general_dilated(
            x, w[:, :, None], (1, 1), [(padding, padding)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6,
            precision=jax.lax.Precision.HIGHEST)

    got, got_vjp = jax.vjp(lambda x, w: dcevo.depthwise_conv(x, w, padding), x, w)
    want, want_vjp = jax.vjp(ref, x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_vjp(ct), want_vjp(ct)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_gradients_in_bfloat16():
    """bfloat16 inputs: gradients keep the input dtypes and agree with float32 to bfloat16 rounding."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 12, 10, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 12, 10, 4)), jnp.float32)
    _, vjp32 = jax.vjp(lambda x, w: dcevo.depthwise_conv(x, w, 1), x, w)
    _, vjp16 = jax.vjp(lambda x, w: dcevo.depthwise_conv(x, w, 1), x.astype(jnp.bfloat16),
                       w.astype(jnp.bfloat16))
    (dx32, dw32), (dx16, dw16) = vjp32(ct), vjp16(ct.astype(jnp.bfloat16))
    assert dx16.dtype == jnp.bfloat16 and dw16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw16, np.float32), dw32, rtol=2e-2, atol=0.3)
    np.testing.assert_allclose(np.asarray(dx16, np.float32), dx32, rtol=5e-2, atol=0.1)
