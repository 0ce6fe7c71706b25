"""Unsupervised fusion losses released with DCEvo / CDDFuse and EVAFusion's fine-tuning.

All images are NHWC float32 in [0, 1]; features are NHWC.

* :func:`sobel_gradient` |Sobel_x| + |Sobel_y| with zero padding (the released ``Sobelxy``).
* :func:`fusion_loss` the released ``Fusionloss``: L1(max(Y_vi, ir), F) + 10 L1(max(grad Y_vi,
  grad ir), grad F), returning (total, intensity term, gradient term). Y_vi is the first
  channel of the visible image.
* :func:`correlation` the released ``cc``: per-sample, per-channel correlation coefficient
  clamped to [-1, 1], averaged.
* :func:`decomposition_loss` cc(vi_detail, ir_detail)^2 / (1.01 + cc(vi_base, ir_base)).
* :func:`pseudo_fusion_target` / :func:`pseudo_fusion_loss`: the release's ``pseudo_fuse_cuda``
  (reward_final.py) is NOT part of the public code, so we define our own documented target:
  ``"max"`` (default) the per-pixel maximum of IR and visible luminance (the same target as
  the intensity term of the fusion loss), or ``"saliency"`` a blend weighted by each
  image's local detail energy (smoothed Sobel magnitude), w_ir = g_ir / (g_ir + g_vi + eps).
  The loss is the MSE between the fused image and the target (the release scales it by 100).

The released fine-tuning (reward_final.py) combines them as
``fusion_loss + 2 * decomposition_loss + 100 * pseudo_fusion_mse + 0.5 * reward_loss``;
the SSIM/MSE terms it computes are not added to its loss, so they are not here either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS32 = float(jnp.finfo(jnp.float32).eps)


def _luma(x: jax.Array) -> jax.Array:
    return x[..., :1].astype(jnp.float32)


def sobel_gradient(x: jax.Array) -> jax.Array:
    """|Sobel_x * x| + |Sobel_y * x| per channel, zero padding 1 (as torch conv2d padding=1).

    Kernels (cross-correlation, as torch): x: [[-1,0,1],[-2,0,2],[-1,0,1]],
    y: [[1,2,1],[0,0,0],[-1,-2,-1]]. Input (B, H, W, C); output same shape.
    """
    x = x.astype(jnp.float32)
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1], x.shape[2]

    def s(dy, dx):  # neighbour at offset (dy, dx) in {-1, 0, 1}
        return p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w, :]

    gx = (-s(-1, -1) + s(-1, 1) - 2 * s(0, -1) + 2 * s(0, 1) - s(1, -1) + s(1, 1))
    gy = (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1) - s(1, -1) - 2 * s(1, 0) - s(1, 1))
    return jnp.abs(gx) + jnp.abs(gy)


def fusion_loss(vi: jax.Array, ir: jax.Array, fused: jax.Array,
                grad_weight: float = 10.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The released max-intensity + max-gradient fusion loss.

    Args:
      vi: visible image (B, H, W, C); only its first (luminance) channel is used.
      ir: infrared (B, H, W, 1).
      fused: fused image (B, H, W, 1).
      grad_weight: weight of the gradient term (10 in the release).

    Returns:
      (total, loss_in, loss_grad) scalars with total = loss_in + grad_weight * loss_grad.
    """
    y = _luma(vi)
    ir = ir.astype(jnp.float32)
    fused = fused.astype(jnp.float32)
    loss_in = jnp.mean(jnp.abs(jnp.maximum(y, ir) - fused))
    joint = jnp.maximum(sobel_gradient(y), sobel_gradient(ir))
    loss_grad = jnp.mean(jnp.abs(joint - sobel_gradient(fused)))
    return loss_in + grad_weight * loss_grad, loss_in, loss_grad


def correlation(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean over samples and channels of the correlation coefficient of ``a`` and ``b`` (NHWC).

    As the released ``cc``: eps (float32 machine epsilon) added to the product of
    norms, clamped to [-1, 1].
    """
    n, c = a.shape[0], a.shape[-1]
    a = a.astype(jnp.float32).reshape(n, -1, c)
    b = b.astype(jnp.float32).reshape(n, -1, c)
    a = a - jnp.mean(a, axis=1, keepdims=True)
    b = b - jnp.mean(b, axis=1, keepdims=True)
    num = jnp.sum(a * b, axis=1)
    den = _EPS32 + jnp.sqrt(jnp.sum(a * a, axis=1)) * jnp.sqrt(jnp.sum(b * b, axis=1))
    return jnp.mean(jnp.clip(num / den, -1.0, 1.0))


def decomposition_loss(vi_base: jax.Array, ir_base: jax.Array, vi_detail: jax.Array,
                       ir_detail: jax.Array) -> jax.Array:
    """cc(vi_detail, ir_detail)^2 / (1.01 + cc(vi_base, ir_base)) (released DCEvo/CDDFuse)."""
    cc_b = correlation(vi_base, ir_base)
    cc_d = correlation(vi_detail, ir_detail)
    return cc_d ** 2 / (1.01 + cc_b)


def _box_blur(x: jax.Array, radius: int) -> jax.Array:
    if radius <= 0:
        return x
    k = 2 * radius + 1
    p = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    c = jnp.cumsum(jnp.cumsum(p, axis=1), axis=2)
    c = jnp.pad(c, ((0, 0), (1, 0), (1, 0), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    s = c[:, k:k + h, k:k + w] - c[:, :h, k:k + w] - c[:, k:k + h, :w] + c[:, :h, :w]
    return s / (k * k)


PSEUDO_FUSION_MODES = ("max", "saliency")


def _sobel_edge(x: jax.Array) -> jax.Array:
    """Sobel magnitude with edge (replicate) padding: no artificial gradient at the border."""
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return sobel_gradient(p)[:, 1:-1, 1:-1]


def pseudo_fusion_target(ir: jax.Array, vi: jax.Array, mode: str = "max",
                         radius: int = 3) -> jax.Array:
    """Our pseudo-fused target (B, H, W, 1) in [0, 1] (the release's pseudo_fuse_cuda is
    unpublished).

    ``"max"``: max(ir, Y_vi) per pixel. ``"saliency"``: w * ir + (1 - w) * Y_vi with
    w = (g_ir + 1e-3) / (g_ir + g_vi + 2e-3), g = box-blurred (radius) Sobel magnitude
    (edge padding); where both are flat (g_ir = g_vi = 0) it is the average. No
    gradient flows into the target.
    """
    ir = ir.astype(jnp.float32)
    y = _luma(vi)
    if mode == "max":
        t = jnp.maximum(ir, y)
    elif mode == "saliency":
        g_ir = _box_blur(_sobel_edge(ir), radius)
        g_vi = _box_blur(_sobel_edge(y), radius)
        w = (g_ir + 1e-3) / (g_ir + g_vi + 2e-3)
        t = w * ir + (1.0 - w) * y
    else:
        raise ValueError(f"pseudo-fusion mode must be one of {PSEUDO_FUSION_MODES}, got {mode!r}")
    return jax.lax.stop_gradient(t)


def pseudo_fusion_loss(fused: jax.Array, ir: jax.Array, vi: jax.Array,
                       mode: str = "max") -> jax.Array:
    """MSE between ``fused`` and :func:`pseudo_fusion_target` (unweighted)."""
    t = pseudo_fusion_target(ir, vi, mode)
    return jnp.mean((fused.astype(jnp.float32) - t) ** 2)
