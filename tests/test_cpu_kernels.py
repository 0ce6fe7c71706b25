import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evafusion_jax.models import cpu_kernels, dcevo

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="no C++ compiler: the CPU kernels are not built")


def _grouped_conv_kernel_grad(x, dy, k, padding):
    c = x.shape[-1]

    def conv(w):
        return jax.lax.conv_general_dilated(
            x, w[:, :, None], (1, 1), [(padding, padding)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
            precision=jax.lax.Precision.HIGHEST)

    return jax.vjp(conv, jnp.zeros((k, k, c), jnp.float32))[1](dy)[0]


@needs_kernels
@pytest.mark.parametrize("shape, k, padding", [
    ((2, 9, 11, 32), 3, 1),    # the register-blocked path only
    ((1, 7, 6, 20), 3, 1),     # 16 channels blocked, 4 by the generic loop
    ((3, 8, 5, 6), 3, 0),      # generic loop only, no padding (DCEvo's reflect-padded convs)
    ((1, 6, 7, 16), 3, 3),     # padding >= k: whole rows and columns of taps outside the image
    ((2, 9, 8, 17), 5, 2),     # another kernel size
    ((1, 2, 2, 16), 3, 1),     # an image smaller than the kernel's reach: border columns only
])
def test_depthwise_kernel_grad_matches_xla(shape, k, padding):
    rng = np.random.default_rng(sum(shape) + k + padding)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    b, h, w, c = shape
    dy = jnp.asarray(rng.standard_normal((b, h + 2 * padding - k + 1, w + 2 * padding - k + 1, c)),
                     jnp.float32)
    got = jax.jit(cpu_kernels.depthwise_kernel_grad, static_argnums=(2, 3))(x, dy, k, padding)
    assert got.shape == (k, k, c) and got.dtype == jnp.float32
    want = _grouped_conv_kernel_grad(x, dy, k, padding)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    loop = dcevo._depthwise_kernel_grad_xla(x, dy, k, padding)
    np.testing.assert_allclose(np.asarray(got), np.asarray(loop), rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("shape, k, padding", [
    ((2, 9, 11, 32), 3, 1),
    ((1, 7, 6, 20), 3, 1),
    ((3, 8, 5, 6), 3, 0),
    ((1, 6, 7, 16), 3, 3),
    ((1, 9, 9, 16), 3, -1),   # negative padding crops (the input gradient of padding 3)
    ((2, 9, 8, 17), 5, 2),
    ((1, 2, 2, 16), 3, 1),
])
def test_depthwise_conv_matches_xla(shape, k, padding):
    rng = np.random.default_rng(sum(shape) + k + padding)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1])), jnp.float32)
    got = jax.jit(cpu_kernels.depthwise_conv, static_argnums=2)(x, w, padding)
    pad = max(padding, 0)
    want = jax.lax.conv_general_dilated(
        x, w[:, :, None], (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=shape[-1], precision=jax.lax.Precision.HIGHEST)
    if padding < 0:
        want = want[:, -padding:padding, -padding:padding]
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_depthwise_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"kernel of shape \(3, 3, 4\), expected \(3, 3, 8\)"):
        cpu_kernels.depthwise_conv(jnp.zeros((1, 5, 5, 8)), jnp.zeros((3, 3, 4)), 1)
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        cpu_kernels.depthwise_conv(jnp.zeros((1, 2, 5, 8)), jnp.zeros((3, 3, 8)), 0)


@needs_kernels
@pytest.mark.parametrize("xs, co, khw, pads", [
    ((2, 9, 7, 8), 32, (3, 3), ((1, 1), (1, 1))),     # DCEvo's 3x3 "same" convolutions
    ((1, 6, 10, 16), 64, (3, 3), ((0, 0), (0, 0))),   # valid: a smaller output
    ((1, 5, 6, 8), 32, (3, 2), ((2, 0), (0, 1))),     # asymmetric pads, a non-square kernel
    ((1, 4, 4, 24), 32, (5, 5), ((3, 3), (3, 3))),    # taps wholly outside the image
    ((2, 1, 3, 8), 32, (1, 1), ((0, 0), (0, 0))),     # 1x1
])
def test_conv_kernel_grad_matches_lax(xs, co, khw, pads):
    rng = np.random.default_rng(sum(xs) + co)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    k = jnp.asarray(rng.standard_normal(khw + (xs[-1], co)), jnp.float32)

    def conv(k_):
        return jax.lax.conv_general_dilated(x, k_, (1, 1), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=jax.lax.Precision.HIGHEST)

    y, vjp = jax.vjp(conv, k)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    got = jax.jit(cpu_kernels.conv_kernel_grad, static_argnums=(2, 3))(x, dy, khw, pads)
    assert got.shape == k.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(vjp(dy)[0]), rtol=1e-5, atol=1e-4)


def test_conv_kernel_grad_supported_channel_counts():
    assert cpu_kernels.conv_kernel_grad_supported(8, 32)
    assert cpu_kernels.conv_kernel_grad_supported(64, 96)
    assert not cpu_kernels.conv_kernel_grad_supported(4, 32)
    assert not cpu_kernels.conv_kernel_grad_supported(8, 16)


@needs_kernels
def test_conv_kernel_grad_rejects_bad_shapes():
    x = jnp.zeros((1, 8, 8, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"dy has shape \(1, 8, 7, 32\), expected \(1, 8, 8\)"):
        cpu_kernels.conv_kernel_grad(x, jnp.zeros((1, 8, 7, 32)), (3, 3), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="C_out % 32 == 0"):
        cpu_kernels.conv_kernel_grad(x, jnp.zeros((1, 8, 8, 16)), (3, 3), ((1, 1), (1, 1)))


@needs_kernels
def test_conv2d_uses_the_kernel_on_the_cpu_and_matches_lax():
    from evafusion_jax.models import convolution

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((2, 9, 7, 32)), jnp.float32)

    def ours(x_, k_):
        return convolution.conv2d(x_, k_, "SAME")

    text = jax.jit(lambda a, b: jax.vjp(ours, a, b)[1](dy)).lower(x, k).as_text()
    assert cpu_kernels._DENSE_GRAD_TARGET in text
    got = jax.vjp(ours, x, k)[1](dy)
    ref = jax.vjp(lambda a, b: jax.lax.conv_general_dilated(
        a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST), x, k)[1](dy)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-4)


@needs_kernels
def test_depthwise_kernel_grad_rejects_an_inconsistent_gradient():
    x = jnp.zeros((1, 8, 8, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"dy has shape \(1, 8, 7, 16\), expected \(1, 8, 8, 16\)"):
        cpu_kernels.depthwise_kernel_grad(x, jnp.zeros((1, 8, 7, 16)), 3, 1)


@needs_kernels
def test_kernel_is_on_the_cpu_program_only():
    """platform_dependent: the custom calls are in the CPU program, not in a CUDA one."""
    x = jnp.ones((1, 6, 6, 16), jnp.float32)
    w = jnp.ones((3, 3, 16), jnp.float32)

    def grad_w(x, w):
        return jax.grad(lambda w_: jnp.sum(dcevo.depthwise_conv(x, w_, 1) ** 2))(w)

    targets = (cpu_kernels._DEPTHWISE_GRAD_TARGET, cpu_kernels._DEPTHWISE_CONV_TARGET)
    allow = [jax.export.DisabledSafetyCheck.custom_call(t) for t in targets]
    cpu = jax.export.export(jax.jit(grad_w), platforms=["cpu"], disabled_checks=allow)(x, w)
    cuda = jax.export.export(jax.jit(grad_w), platforms=["cuda"])(x, w)
    cpu, cuda = cpu.mlir_module(), cuda.mlir_module()
    for t in targets:
        assert t in cpu and t not in cuda


def test_build_is_cached_by_content(tmp_path, monkeypatch):
    cxx = cpu_kernels._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
    lib = cpu_kernels._build(cxx)
    assert lib.parent == tmp_path and lib.exists() and lib.name.startswith("cpu_kernels-")
    mtime = lib.stat().st_mtime_ns
    assert cpu_kernels._build(cxx) == lib and lib.stat().st_mtime_ns == mtime  # not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == [lib.name]  # no temporary left


def test_failed_build_falls_back_and_leaves_no_file(tmp_path, monkeypatch, caplog):
    bad = tmp_path / "bad-cxx"
    bad.write_text("#!/bin/sh\necho 'bad-cxx: cannot compile' >&2\nexit 3\n")
    bad.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXX", str(bad))
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(cache))
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels._load.__wrapped__() is False
    assert "cannot compile" in caplog.text and "EVAFUSION_JAX_CPU_KERNELS" in caplog.text
    assert list(cache.iterdir()) == []


def test_no_compiler_or_disabled_means_unavailable(monkeypatch, caplog):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels._load.__wrapped__() is False
    assert "no C++ compiler" in caplog.text
    monkeypatch.setenv(cpu_kernels.ENABLE_ENV, "0")
    monkeypatch.setattr(cpu_kernels, "_build", lambda cxx: pytest.fail("built while disabled"))
    assert cpu_kernels._load.__wrapped__() is False


def test_enabled_only_on_a_cpu_default_backend(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(cpu_kernels, "available", lambda: pytest.fail("built on a GPU host"))
    assert cpu_kernels.enabled() is False
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(cpu_kernels, "available", lambda: True)
    assert cpu_kernels.enabled() is True


@needs_kernels
def test_depthwise_conv_gradient_without_the_kernels_is_the_same(monkeypatch):
    """The XLA fallback and the kernel path give the same DCEvo depthwise values and gradients."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 10, 9, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 24)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 10, 9, 24)), jnp.float32)

    def grads():
        y, vjp = jax.vjp(lambda a, b: dcevo.depthwise_conv(a, b, 1), x, w)
        return (y, *vjp(ct))

    with_kernels = grads()
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    without = grads()
    for a, b in zip(with_kernels, without):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
