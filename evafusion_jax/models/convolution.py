"""Dense 2-D convolution (NHWC input, HWIO kernel, stride 1) with a fast kernel gradient.

``conv2d(x, kernel, padding, lhs_dilation)`` equals ``lax.conv_general_dilated`` with
``dimension_numbers=("NHWC", "HWIO", "NHWC")`` and unit strides; its forward pass and
its input gradient are XLA's. Only the kernel gradient is written by hand:

    dK[i, j] = sum over (b, m, n) of x[b, m, n, :]^T  dy[b, pt - i + d m, pl - j + d n, :]

one matrix product (C_in x B*H*W) @ (B*H*W x C_out) per tap, over the undilated input
(``d`` = ``lhs_dilation``, ``pt``/``pl`` the leading paddings; out-of-range rows of
``dy`` are zeros). XLA on the CPU runs the kernel gradient of a convolution as a
convolution whose "kernel" is the whole output gradient, several times slower than its
forward pass (1.10 s vs 0.23 s for a 3x3 conv on 1x96x96x192 -> 192, 2-core CPU); the
per-tap products run at about the forward's speed. For a transposed convolution
(``lhs_dilation`` 2) they also skip the three quarters of zeros of the dilated input.
Without input dilation the k_h row windows of ``dy`` are stacked along the channels once
and multiplied by each of the k_w column windows of ``x``: k_h + k_w - 1 window copies
instead of k_h * k_w, in k_w wider products (DCEvo forward + backward 64x64 batch 2, 2 XLA
devices: 1.28 s -> 1.16 s on a 2-core CPU). On the CPU backend, for float32 and channel
counts it supports, the native kernel :func:`cpu_kernels.conv_kernel_grad` replaces those
products (no window copies at all).

A 1x1 convolution without padding or dilation is computed as a matrix product over the
pixels (forward and, by autodiff, both gradients): XLA on the CPU runs the convolution
about 2x slower forward and several times slower backward (4x64x64x256 -> 64 channels:
7.1 ms vs 3.1 ms forward, 51 ms vs 9 ms for both gradients, 2-core CPU). Values equal the
convolution's up to float rounding.

:class:`Conv` is a drop-in for ``flax.linen.Conv`` (same ``kernel`` / ``bias``
parameters) using it: the reward model's heads and up-convolutions and DCEvo's dense
(ungrouped) convolutions use it (DCEvo forward + backward 64x64 batch 2: 6.5 s -> 4.6 s on
a 2-core CPU; ``benchmarks/dcevo_profile.py``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from evafusion_jax.models import cpu_kernels

_DIMS = ("NHWC", "HWIO", "NHWC")


def _pads(padding, kernel_hw, lhs_dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID") or tuple(lhs_dilation) != (1, 1):
            raise ValueError(f"conv2d: padding {padding!r} needs to be 'SAME' or 'VALID' without "
                             f"lhs_dilation; give explicit ((top, bottom), (left, right)) pads")
        if padding == "VALID":
            return (0, 0), (0, 0)
        return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw)
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    (a, b), (c, d) = padding
    return (int(a), int(b)), (int(c), int(d))


def _lax_conv(x, kernel, pads, lhs_dilation, precision):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, lhs_dilation=lhs_dilation,
                                        dimension_numbers=_DIMS, precision=precision)


def _window(a, start: int, step: int, n: int, axis: int):
    """``a[start + step * m]`` for m in 0..n-1 along ``axis``, zero where out of range."""
    size = a.shape[axis]
    last = start + step * (n - 1)
    lo, hi = max(0, -start), max(0, last - (size - 1))
    if lo or hi:
        cfg = [(0, 0, 0)] * a.ndim
        cfg[axis] = (lo, hi, 0)
        a = jax.lax.pad(a, jnp.zeros((), a.dtype), cfg)
    s = start + lo
    return jax.lax.slice_in_dim(a, s, s + step * (n - 1) + 1, step, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, pads, lhs_dilation, precision):
    return _lax_conv(x, kernel, pads, lhs_dilation, precision)


def _conv_fwd(x, kernel, pads, lhs_dilation, precision):
    return _lax_conv(x, kernel, pads, lhs_dilation, precision), (x, kernel)


def _kernel_grad_per_tap(x, dy, kernel_shape, pads, lhs_dilation, precision, acc):
    """dK as one (C_in x B*H*W) @ (B*H*W x C_out) product per tap, over the undilated input."""
    kh, kw, cin, cout = kernel_shape
    b, h, w, _ = x.shape
    (pt, _), (pl, _) = pads
    dh, dw = lhs_dilation
    x2 = x.reshape(b * h * w, cin)
    taps = []
    for i in range(kh):
        dy_i = _window(dy, pt - i, dh, h, axis=1)
        for j in range(kw):
            z = _window(dy_i, pl - j, dw, w, axis=2).reshape(b * h * w, cout)
            taps.append(jax.lax.dot_general(x2, z, (((0,), (0,)), ((), ())), precision=precision,
                                            preferred_element_type=acc))
    return jnp.stack(taps).reshape(kernel_shape)


def _kernel_grad_row_stacked(x, dy, kernel_shape, pads, precision, acc):
    """dK for an undilated input as k_w products (C_in x B*H*W_out) @ (B*H*W_out x k_h*C_out).

    With ``R[b, m, n, (i, o)] = dy[b, m + pt - i, n, o]`` (the k_h row windows of dy side by
    side, zero out of range) and ``X_j[b, m, n] = x[b, m, n + j - pl]`` (a column window of x),
    ``dK[i, j] = X_j^T R[..., i, :]``: k_h + k_w - 1 window copies instead of k_h * k_w, and
    products k_h times wider.
    """
    kh, kw, cin, cout = kernel_shape
    b, h, _, _ = x.shape
    wo = dy.shape[2]
    (pt, _), (pl, _) = pads
    r = jnp.concatenate([_window(dy, pt - i, 1, h, axis=1) for i in range(kh)], axis=-1)
    r = r.reshape(b * h * wo, kh * cout)
    cols = [jax.lax.dot_general(_window(x, j - pl, 1, wo, axis=2).reshape(b * h * wo, cin), r,
                                (((0,), (0,)), ((), ())), precision=precision,
                                preferred_element_type=acc) for j in range(kw)]
    return jnp.stack(cols).reshape(kw, cin, kh, cout).transpose(2, 0, 1, 3)


def _conv_bwd(pads, lhs_dilation, precision, res, dy):
    x, kernel = res
    _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, kernel, pads, lhs_dilation, precision), x)
    (dx,) = vjp_x(dy)
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    kh, kw, cin, cout = kernel.shape
    native = (tuple(lhs_dilation) == (1, 1) and x.dtype == dy.dtype == acc == jnp.float32
              and cpu_kernels.conv_kernel_grad_supported(cin, cout) and cpu_kernels.enabled())
    if native:  # on the CPU backend the native kernel (no window copies), XLA's products elsewhere
        dk = jax.lax.platform_dependent(
            x, dy, cpu=lambda a, g: cpu_kernels.conv_kernel_grad(a, g, (kh, kw), pads),
            default=lambda a, g: _kernel_grad_row_stacked(a, g, kernel.shape, pads, precision,
                                                          acc))
    elif tuple(lhs_dilation) == (1, 1):
        dk = _kernel_grad_row_stacked(x, dy, kernel.shape, pads, precision, acc)
    else:  # a transposed convolution: the per-tap products skip the dilated input's zeros
        dk = _kernel_grad_per_tap(x, dy, kernel.shape, pads, lhs_dilation, precision, acc)
    return dx, dk.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x, kernel, padding: Any = "SAME", lhs_dilation: Sequence[int] = (1, 1),
           precision: Any = None):
    """Stride-1 convolution of NHWC ``x`` with the HWIO ``kernel`` (module docstring).

    ``padding``: "SAME", "VALID", an int, or ``((top, bottom), (left, right))``;
    ``lhs_dilation``: input dilation (2 for a stride-2 transposed convolution).
    """
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"conv2d: expected NHWC input and HWIO kernel with matching channels, "
                         f"got {x.shape} and {kernel.shape}")
    lhs_dilation = tuple(int(d) for d in lhs_dilation)
    pads = _pads(padding, kernel.shape[:2], lhs_dilation)
    if kernel.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)) and lhs_dilation == (1, 1):
        # A 1x1 convolution is a matrix product over the pixels; XLA on the CPU runs it (and its
        # gradients, by autodiff of the product) much faster than the convolution.
        b, h, w, cin = x.shape
        y = jnp.dot(x.reshape(b * h * w, cin), kernel[0, 0], precision=precision)
        return y.reshape(b, h, w, kernel.shape[3])
    return _conv(x, kernel, pads, lhs_dilation, precision)


class Conv(nn.Module):
    """``nn.Conv(features, (k, k), padding=padding)`` (stride 1, no groups) by :func:`conv2d`.

    Same parameters (``kernel`` (k, k, C_in, features), ``bias``) and the same result up to
    float rounding: the kernel gradient is computed differently, and an unpadded 1x1
    convolution is a matrix product (module docstring).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Any = None
    precision: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features), self.param_dtype)
        dt = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        y = conv2d(x.astype(dt), kernel.astype(dt), self.padding, precision=self.precision)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                               self.param_dtype).astype(dt)
        return y
