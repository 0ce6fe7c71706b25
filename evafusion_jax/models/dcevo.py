"""The DCEvo infrared/visible fusion network in Flax (weight compatible with the PyTorch release).

DCEvo fuses a single-channel infrared image and a single-channel visible image
(luminance) into one fused image. Its inference path is::

    vi_b, vi_d = DE_Encoder(vi)             # low-/high-frequency features
    ir_b, ir_d = DE_Encoder(ir)
    fb = LowFreqExtractor(ir_b + vi_b)      # fused base (low-frequency) features
    fd = HighFreqExtractor(ir_d + vi_d)     # fused detail (high-frequency) features
    fused = sigmoid(DE_Decoder(fb, fd) + (ir + vi) / 2)

Everything is NHWC. Images are float32 in ``[0, 1]`` with one channel. The
parameter tree has the top-level keys ``DE_Encoder``, ``DE_Decoder``,
``LowFreqExtractor`` and ``HighFreqExtractor`` (the four groups of the released
``DCEvo_fusion.pth``); below them, submodule names follow the PyTorch module
names with ``name.N`` written as ``name_N`` and conv ``weight`` as ``kernel``
(HWIO), so ``convert/dcevo_from_torch.py`` maps keys mechanically.

Differences from the PyTorch reference, all identical at its default sizes and
batch size 1:

* The residual ``(ir + vi) / 2`` is added per sample (the reference adds the
  first two samples of the batch to every sample when the batch has >= 2).
* The detail branches use ``dim // 2`` channels per half instead of a
  hard-coded 32 (so smaller ``dim`` works), and the fusion HighFreqExtractor
  uses ``config.detail_layers`` like the encoder's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evafusion_jax.models import convolution, cpu_kernels, numerics
from evafusion_jax.models.init_utils import init_tree

__all__ = [
    "DCEvoConfig",
    "DCEvo",
    "DE_Encoder",
    "DE_Decoder",
    "LowFreqExtractor",
    "HighFreqExtractor",
    "init_params",
    "param_shapes",
    "fuse",
    "fuse_with_features",
    "apply_model",
    "validate_inputs",
]


@dataclasses.dataclass(frozen=True)
class DCEvoConfig(numerics.ComputeSettings):
    """Architecture (and numerics) of DCEvo. Frozen and hashable, so it can be a static jit argument.

    Attributes:
      dim: feature channels (64 in the release).
      num_blocks: LowFreqExtractor blocks in the encoder trunk and in the decoder (5).
      c2f_n: bottlenecks in each C2f of a LowFreqExtractor (6).
      detail_layers: INN DetailNode layers of each HighFreqExtractor (3).
      heads: attention heads of the decoder's TransformerBlock (8).
      ffn_expansion_factor: hidden size factor of its gated FFN (2.0).
      dtype: compute dtype, "float32" (default), "bfloat16" or "float16". Parameters
        stay float32; norms, attention softmax and gates are computed in float32.
      precision: matmul/conv precision, "highest" (default; bitwise-stable float32
        on accelerators), "high" or "default" (faster TF32/bf16 passes on GPU/TPU).
    """

    dim: int = 64
    num_blocks: int = 5
    c2f_n: int = 6
    detail_layers: int = 3
    heads: int = 8
    ffn_expansion_factor: float = 2.0
    dtype: str = "float32"
    precision: str = "highest"

    def __post_init__(self):
        if isinstance(self.ffn_expansion_factor, (int, np.integer)) and \
                not isinstance(self.ffn_expansion_factor, bool):
            object.__setattr__(self, "ffn_expansion_factor", float(self.ffn_expansion_factor))
        for f in ("dim", "num_blocks", "c2f_n", "detail_layers", "heads"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"DCEvoConfig.{f} must be a positive integer, got {v!r}")
        if self.dim < 2 or self.dim % 2:
            raise ValueError(f"DCEvoConfig.dim must be even and >= 2 (the detail branch splits it "
                             f"in halves), got {self.dim}")
        if self.dim % self.heads:
            raise ValueError(f"DCEvoConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not (self.ffn_expansion_factor > 0) or int(self.dim * self.ffn_expansion_factor) < 1:
            raise ValueError("DCEvoConfig.ffn_expansion_factor must give at least one hidden "
                             f"channel, got {self.ffn_expansion_factor!r}")
        numerics.check("DCEvoConfig", self.dtype, self.precision)

    @property
    def ffn_hidden(self) -> int:
        return int(self.dim * self.ffn_expansion_factor)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DCEvoConfig":
        d = numerics.known_fields(cls, d, "unknown DCEvoConfig field")
        if "ffn_expansion_factor" in d:
            d["ffn_expansion_factor"] = float(d["ffn_expansion_factor"])
        return cls(**d)

    @classmethod
    def tiny(cls, **overrides) -> "DCEvoConfig":
        """A small configuration for tests."""
        base = dict(dim=8, num_blocks=1, c2f_n=1, detail_layers=1, heads=2)
        base.update(overrides)
        return cls(**base)


# ---- small functional pieces -----------------------------------------------------------------

def _f32(x):
    return x.astype(jnp.float32)


def _reflect_pad(x, p: int = 1):
    """``nn.ReflectionPad2d(p)`` on an NHWC tensor."""
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")


def _prominent(x):
    """DCEvo's ``prominent`` gate: ``silu(x * sigmoid(s^2 / mean_hw(s)))`` with ``s = sigmoid(x)``."""
    dt = x.dtype
    x = _f32(x)
    y = jax.nn.sigmoid(x)
    gate = jax.nn.sigmoid(jnp.square(y) / jnp.mean(y, axis=(1, 2), keepdims=True))
    return jax.nn.silu(x * gate).astype(dt)


def _simam(x, e_lambda: float = 1e-4):
    """SimAM attention (parameter free), statistics over H, W."""
    dt = x.dtype
    x = _f32(x)
    n = x.shape[1] * x.shape[2] - 1
    d = jnp.square(x - jnp.mean(x, axis=(1, 2), keepdims=True))
    y = d / (4.0 * (jnp.sum(d, axis=(1, 2), keepdims=True) / n + e_lambda)) + 0.5
    return (x * jax.nn.sigmoid(y)).astype(dt)


def _l2_normalize(x, axis=-1, eps=1e-12):
    """``torch.nn.functional.normalize``: ``x / max(||x||_2, eps)``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _shifted_sum(x, w, k: int):
    """``y[b, h, w, c] = sum_ij x[b, h + i, w + j, c] * w[i, j, c]`` (valid correlation, ``w`` (k, k, C))."""
    h, wd = x.shape[1] - k + 1, x.shape[2] - k + 1
    y = None
    for i in range(k):
        for j in range(k):
            term = x[:, i:i + h, j:j + wd, :] * w[i, j]
            y = term if y is None else y + term
    return y


def _zero_pad_hw(x, p: int):
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x, w, padding: int = 0):
    """Depthwise 2-D correlation of NHWC ``x`` with ``w`` (k, k, C), zero padding ``padding``.

    Equals ``lax.conv_general_dilated(x, w[:, :, None], (1, 1), [(p, p)] * 2,
    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=C)`` up to float
    rounding. On the CPU backend the forward pass and the input gradient (float32
    operands) and the kernel gradient are the native kernels of :mod:`cpu_kernels` when
    they are available (DCEvo forward + backward, 64x64, batch 2, 2 XLA devices on a 2-core
    CPU: 1.36 s -> 1.16 s, ``benchmarks/dcevo_profile.py``). Otherwise, and on GPU / TPU,
    forward and input gradient are k*k shifted multiply-adds (one elementwise fusion each;
    XLA on CPU runs a one-channel-per-group convolution several times slower: 1.23 s vs
    0.19 s forward on 1x480x640x64), and the kernel gradient is a loop over the k*k taps,
    each one reduction of the tap's products over (B, H, W). Written out as k*k fusions,
    that gradient made XLA recompute the incoming gradient (an elementwise SiLU backward in
    DCEvo) inside every tap and read its inputs k*k times; in the loop it is computed once
    (DCEvo forward + backward, 64x64, batch 2, one XLA device: 2.70 s -> 2.26 s).
    """
    return _native_or(lambda a, b: _shifted_sum(_zero_pad_hw(a, padding), b, b.shape[0]),
                      x, w, padding)


def _native_or(xla_fn, x, w, padding: int):
    """``xla_fn(x, w)``, or on the CPU backend the native kernel for float32 operands."""
    if x.dtype != jnp.float32 or w.dtype != jnp.float32 or not cpu_kernels.enabled():
        return xla_fn(x, w)
    return jax.lax.platform_dependent(
        x, w, cpu=lambda a, b: cpu_kernels.depthwise_conv(a, b, padding), default=xla_fn)


def _depthwise_fwd(x, w, padding):
    return depthwise_conv(x, w, padding), (x, w)


def _depthwise_input_grad(dy, w, padding: int, x):
    """dx of :func:`depthwise_conv`: dy, zero padded by k - 1 - p, correlated with the flipped w."""
    k = w.shape[0]
    q = k - 1 - padding

    def xla(g, wf):
        if q >= 0:
            return _shifted_sum(_zero_pad_hw(g, q), wf, k)
        # padding >= k: the gradient of the padded input, cropped
        dxp = _shifted_sum(_zero_pad_hw(g, k - 1), wf, k)
        return dxp[:, padding:padding + x.shape[1], padding:padding + x.shape[2]]

    return _native_or(xla, dy, w[::-1, ::-1], q).astype(x.dtype)


def _depthwise_kernel_grad_xla(x, dy, k: int, padding: int):
    """dw[i, j, c] = sum_bhw xp[b, h + i, w + j, c] * dy[b, h, w, c], one tap per loop iteration.

    The loop is what makes it fast in context: dy is usually an elementwise expression (the
    SiLU backward) that XLA would otherwise recompute inside each tap's fusion, reading its
    inputs from memory k*k times; as a loop operand it is computed once.
    """
    acc = jnp.promote_types(dy.dtype, jnp.float32)
    xp = _zero_pad_hw(x, padding).astype(acc)
    dya = dy.astype(acc)
    b, ho, wo, c = dy.shape

    def tap(t, dw):
        xs = jax.lax.dynamic_slice(xp, (0, t // k, t % k, 0), (b, ho, wo, c))
        return dw.at[t].set(jnp.sum(xs * dya, axis=(0, 1, 2)))

    return jax.lax.fori_loop(0, k * k, tap, jnp.zeros((k * k, c), acc)).reshape(k, k, c)


def _depthwise_bwd(padding, res, dy):
    x, w = res
    k = w.shape[0]
    dx = _depthwise_input_grad(dy, w, padding, x)
    if cpu_kernels.enabled():  # the native kernel on the CPU backend, XLA's loop elsewhere
        dw = jax.lax.platform_dependent(
            x, dy, cpu=lambda a, g: cpu_kernels.depthwise_kernel_grad(a, g, k, padding),
            default=lambda a, g: _depthwise_kernel_grad_xla(a, g, k, padding).astype(
                jnp.float32))
    else:
        dw = _depthwise_kernel_grad_xla(x, dy, k, padding)
    return dx, dw.reshape(w.shape).astype(w.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
    """Depthwise convolution (``groups == in == out channels``) by :func:`depthwise_conv`.

    Same parameters as the equivalent grouped ``nn.Conv`` (``kernel`` of shape
    (k, k, 1, C), optional ``bias``) and the same result up to float rounding.
    """

    features: int
    kernel_size: int
    padding: int = 0
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, c = self.kernel_size, self.features
        if x.shape[-1] != c:
            raise ValueError(f"DepthwiseConv expects {c} channels, got {x.shape[-1]}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
        y = depthwise_conv(x.astype(self.dtype), kernel[:, :, 0].astype(self.dtype), self.padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(self.dtype)
        return y


def _conv(features, kernel, name, config, padding=0, groups=1, use_bias=False):
    # A bare conv named like the torch module (its params sit directly under `name`).
    if groups > 1 and groups == features:
        return DepthwiseConv(features, kernel, padding, use_bias, config.compute_dtype, name=name)
    if groups == 1:  # XLA's forward and input gradient, per-tap matrix products for the kernel's
        return convolution.Conv(features, (kernel, kernel), padding=padding, use_bias=use_bias,
                                dtype=config.compute_dtype, precision=config.lax_precision,
                                name=name)
    return nn.Conv(features, (kernel, kernel), padding=((padding, padding), (padding, padding)),
                   feature_group_count=groups, use_bias=use_bias, dtype=config.compute_dtype,
                   param_dtype=jnp.float32, precision=config.lax_precision, name=name)


# ---- LowFreqExtractor: two C2f blocks ----------------------------------------------------------

class ConvSiLU(nn.Module):
    """Ultralytics-style ``Conv``: conv (zero ``k // 2`` padding, no bias) + SiLU. Torch key ``<name>.conv.weight``."""

    features: int
    kernel: int
    groups: int = 1
    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        x = _conv(self.features, self.kernel, "conv", self.config, padding=self.kernel // 2,
                  groups=self.groups)(x)
        return jax.nn.silu(x)


class Bottleneck(nn.Module):
    """``x + cv2(cv1(x))``: full 3x3 conv then grouped (depthwise at DCEvo sizes) 3x3 conv."""

    channels: int
    groups: int
    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        y = ConvSiLU(self.channels, 3, config=self.config, name="cv1")(x)
        y = ConvSiLU(self.channels, 3, groups=self.groups, config=self.config, name="cv2")(y)
        return x + y


class C2f(nn.Module):
    """CSP block with ``n`` bottlenecks and a ``prominent``-gated residual."""

    dim: int
    n: int
    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        c = int(self.dim * 0.5)
        groups = self.dim // 2
        if c % groups:
            raise ValueError(f"C2f: hidden channels {c} not divisible by groups {groups}")
        y = ConvSiLU(2 * c, 1, config=self.config, name="cv1")(x)
        ys = [y[..., :c], y[..., c:]]
        for i in range(self.n):
            ys.append(Bottleneck(c, groups, config=self.config, name=f"m_{i}")(ys[-1]))
        y = ConvSiLU(self.dim, 1, config=self.config, name="cv2")(jnp.concatenate(ys, axis=-1))
        return x + _prominent(y)


class LowFreqExtractor(nn.Module):
    """Two C2f blocks (``net1``, ``net2``)."""

    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        x = C2f(self.config.dim, self.config.c2f_n, config=self.config, name="net1")(x)
        return C2f(self.config.dim, self.config.c2f_n, config=self.config, name="net2")(x)


# ---- HighFreqExtractor: INN detail nodes ------------------------------------------------------

class DWBlock(nn.Module):
    """1x1 conv, ReLU6, reflect-pad depthwise 3x3, ReLU6, 1x1 conv, ReLU6, reflect-pad depthwise 3x3.

    Torch keys ``bottleneckBlock.{0,3,5,8}.weight`` (the Sequential indices); no residual.
    """

    channels: int
    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        c, cfg = self.channels, self.config
        x = jax.nn.relu6(_conv(c, 1, "bottleneckBlock_0", cfg)(x))
        x = jax.nn.relu6(_conv(c, 3, "bottleneckBlock_3", cfg, groups=c)(_reflect_pad(x)))
        x = jax.nn.relu6(_conv(c, 1, "bottleneckBlock_5", cfg)(x))
        return _conv(c, 3, "bottleneckBlock_8", cfg, groups=c)(_reflect_pad(x))


class DetailNode(nn.Module):
    """One invertible-network-style coupling layer followed by SimAM on both halves."""

    half: int
    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, z1, z2):
        h, cfg = self.half, self.config
        z = _conv(2 * h, 1, "shffleconv", cfg, use_bias=True)(jnp.concatenate([z1, z2], axis=-1))
        z1, z2 = z[..., :h], z[..., h:]
        z2 = z2 + DWBlock(h, cfg, name="theta_phi")(z1)
        rho = DWBlock(h, cfg, name="theta_rho")(z2)
        eta = DWBlock(h, cfg, name="theta_eta")(z2)
        z1 = z1 * jnp.exp(rho) + eta
        return _simam(z1), _simam(z2)


class HighFreqExtractor(nn.Module):
    """``detail_layers`` DetailNodes over the two channel halves of the input."""

    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        h = x.shape[-1] // 2
        z1, z2 = x[..., :h], x[..., h:]
        for i in range(self.config.detail_layers):
            z1, z2 = DetailNode(h, self.config, name=f"net_{i}")(z1, z2)
        return jnp.concatenate([z1, z2], axis=-1)


# ---- decoder TransformerBlock (Restormer-style) -----------------------------------------------

class WithBiasLayerNorm(nn.Module):
    """Channel LayerNorm without scale: ``(x - mu) / sqrt(var + 1e-5) + bias`` (torch ``norm.body``)."""

    dim: int

    @nn.compact
    def __call__(self, x):
        bias = self.param("bias", nn.initializers.zeros, (self.dim,), jnp.float32)
        xf = _f32(x)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        return ((xf - mu) / jnp.sqrt(var + 1e-5) + bias).astype(x.dtype)


class LayerNorm(nn.Module):
    """Wrapper so that the parameter path is ``norm1/body/bias`` like the torch key ``norm1.body.bias``."""

    dim: int

    @nn.compact
    def __call__(self, x):
        return WithBiasLayerNorm(self.dim, name="body")(x)


class Attention(nn.Module):
    """Transposed (channel) attention with L2-normalised q/k and a learned per-head temperature."""

    dim: int
    heads: int
    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        cfg, dim, heads = self.config, self.dim, self.heads
        temperature = self.param("temperature", nn.initializers.ones, (heads, 1, 1), jnp.float32)
        b, hh, ww, _ = x.shape
        qkv = _conv(3 * dim, 1, "qkv", cfg)(x)
        qkv = _conv(3 * dim, 3, "qkv_dwconv", cfg, padding=1, groups=3 * dim)(qkv)

        def split_heads(t):  # (B, H, W, C) -> (B, heads, C/heads, HW), channel order (head c)
            return t.reshape(b, hh * ww, heads, dim // heads).transpose(0, 2, 3, 1)

        q, k, v = (split_heads(_f32(qkv[..., i * dim:(i + 1) * dim])) for i in range(3))
        q, k = _l2_normalize(q), _l2_normalize(k)
        attn = jnp.einsum("bhcn,bhdn->bhcd", q, k, precision=cfg.lax_precision) * temperature
        attn = jax.nn.softmax(attn, axis=-1)
        dt = cfg.compute_dtype
        out = jnp.einsum("bhcd,bhdn->bhcn", attn.astype(dt), v.astype(dt),
                         precision=cfg.lax_precision)
        out = out.transpose(0, 3, 1, 2).reshape(b, hh, ww, dim)
        return _conv(dim, 1, "project_out", cfg)(out)


class FeedForward(nn.Module):
    """Gated-GELU FFN with a depthwise 3x3 conv (exact erf GELU)."""

    dim: int
    hidden: int
    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        cfg, hid = self.config, self.hidden
        x = _conv(2 * hid, 1, "project_in", cfg)(x)
        x = _conv(2 * hid, 3, "dwconv", cfg, padding=1, groups=2 * hid)(x)
        x = jax.nn.gelu(x[..., :hid], approximate=False) * x[..., hid:]
        return _conv(self.dim, 1, "project_out", cfg)(x)


class TransformerBlock(nn.Module):
    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = x + _prominent(Attention(cfg.dim, cfg.heads, cfg, name="attn")(
            LayerNorm(cfg.dim, name="norm1")(x)))
        x = x + _prominent(FeedForward(cfg.dim, cfg.ffn_hidden, cfg, name="ffn")(
            LayerNorm(cfg.dim, name="norm2")(x)))
        return x


# ---- encoder / decoder -----------------------------------------------------------------------

class _PatchEmbed(nn.Module):
    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, x):
        return _conv(self.config.dim, 3, "proj", self.config, padding=1)(x)


class DE_Encoder(nn.Module):  # noqa: N801 - named like the checkpoint group
    """Image (B,H,W,1) -> (low-frequency features, high-frequency features, trunk features)."""

    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, img):
        cfg = self.config
        x = _PatchEmbed(cfg, name="patch_embed")(img)
        for i in range(cfg.num_blocks):
            x = LowFreqExtractor(cfg, name=f"encoder_level1_{i}")(x)
        base = LowFreqExtractor(cfg, name="baseFeature")(x)
        detail = HighFreqExtractor(cfg, name="detailFeature")(x)
        return base, detail, x


class DE_Decoder(nn.Module):  # noqa: N801
    """(fused base, fused detail) -> pre-sigmoid single-channel output (residual added by the caller)."""

    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, base, detail):
        cfg = self.config
        x = _conv(cfg.dim, 1, "reduce_channel", cfg)(jnp.concatenate([base, detail], axis=-1))
        for i in range(cfg.num_blocks):
            x = LowFreqExtractor(cfg, name=f"encoder_level2_{i}")(x)
        # The torch `output` Sequential: TransformerBlock (0), pad, conv (2), LeakyReLU, pad, conv (5).
        x = TransformerBlock(cfg, name="output_0")(x)
        x = _conv(cfg.dim // 2, 3, "output_2", cfg)(_reflect_pad(x))
        x = jax.nn.leaky_relu(x, negative_slope=0.01)
        return _conv(1, 3, "output_5", cfg)(_reflect_pad(x))


class DCEvo(nn.Module):
    """The full fusion network; returns a dict of the fused image and intermediate features."""

    config: DCEvoConfig = DCEvoConfig()

    @nn.compact
    def __call__(self, ir, vi):
        cfg = self.config
        dt = cfg.compute_dtype
        b = ir.shape[0]
        encoder = DE_Encoder(cfg, name="DE_Encoder")
        # One encoder pass over [ir; vi] stacked on the batch axis (every op is per sample).
        base, detail, _ = encoder(jnp.concatenate([ir, vi], axis=0).astype(dt))
        ir_b, vi_b = base[:b], base[b:]
        ir_d, vi_d = detail[:b], detail[b:]
        fb = LowFreqExtractor(cfg, name="LowFreqExtractor")(ir_b + vi_b)
        fd = HighFreqExtractor(cfg, name="HighFreqExtractor")(ir_d + vi_d)
        out = DE_Decoder(cfg, name="DE_Decoder")(fb, fd)
        residual = _f32(vi) * 0.5 + _f32(ir) * 0.5
        fused = jax.nn.sigmoid(_f32(out) + residual)
        return {"fused": fused, "ir_base": ir_b, "ir_detail": ir_d, "vi_base": vi_b,
                "vi_detail": vi_d, "fused_base": fb, "fused_detail": fd}


# ---- public functional API -------------------------------------------------------------------

def validate_inputs(ir, vi) -> None:
    """Raises ``ValueError`` unless ``ir`` and ``vi`` are same-shape (B, H, W, 1) with H, W >= 2."""
    for name, x in (("ir", ir), ("vi", vi)):
        shape = tuple(np.shape(x))
        if len(shape) != 4 or shape[-1] != 1:
            raise ValueError(f"DCEvo input {name!r} must have shape (B, H, W, 1) (NHWC, one "
                             f"channel, float in [0, 1]); got shape {shape}. Convert RGB to "
                             "luminance and add the batch/channel axes first.")
        if shape[0] < 1:
            raise ValueError(f"DCEvo input {name!r} has an empty batch (shape {shape})")
        if shape[1] < 2 or shape[2] < 2:
            raise ValueError(f"DCEvo input {name!r} is {shape[1]}x{shape[2]} pixels; height and "
                             "width must be >= 2 (reflection padding)")
    if tuple(np.shape(ir)) != tuple(np.shape(vi)):
        raise ValueError(f"DCEvo inputs must have the same shape; ir is {tuple(np.shape(ir))}, "
                         f"vi is {tuple(np.shape(vi))}")
    for name, x in (("ir", ir), ("vi", vi)):
        dt = getattr(x, "dtype", None)
        if dt is not None and not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"DCEvo input {name!r} has dtype {dt}; pass floats in [0, 1] "
                             "(divide uint8 images by 255)")


def _check_config(config) -> DCEvoConfig:
    if not isinstance(config, DCEvoConfig):
        raise TypeError(f"config must be a DCEvoConfig, got {type(config).__name__}")
    return config


def _leaf_init(rng: np.random.Generator, path: str, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch's default initialisation for the leaf at ``path``.

    Conv kernels (HWIO) and conv biases: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    with ``fan_in = kh * kw * in_per_group`` (what ``nn.Conv2d.reset_parameters``
    gives); LayerNorm bias zeros; attention temperature ones.
    """
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "temperature":
        return np.ones(shape, np.float32)
    if path.endswith("body/bias"):
        return np.zeros(shape, np.float32)
    if leaf == "kernel":
        fan_in = shape[0] * shape[1] * shape[2]
    elif leaf == "bias":
        # The only conv biases (DetailNode.shffleconv) belong to 1x1 convs with in == out.
        fan_in = shape[0]
    else:  # pragma: no cover - every leaf of the model is handled above
        raise ValueError(f"no initialiser for parameter {path}")
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _param_shapes_cached(config: DCEvoConfig) -> dict:
    dummy = jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32)
    variables = jax.eval_shape(DCEvo(config).init, jax.random.key(0), dummy, dummy)
    return flax.core.unfreeze(nn.unbox(variables)["params"])


def param_shapes(config: DCEvoConfig) -> dict:
    """The parameter tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
    config = _check_config(config)
    return jax.tree_util.tree_map(lambda x: x, _param_shapes_cached(config))


def init_params(config: DCEvoConfig, rng) -> dict:
    """Randomly initialised parameters (plain nested dicts of float32 arrays), PyTorch-style init.

    ``rng`` is a JAX PRNG key (or an int seed). Each leaf draws from a NumPy
    generator seeded with (key data, crc32(path)) (``init_utils.init_tree``), so a
    leaf's value does not depend on which other leaves exist; nothing is compiled
    and the network is only traced for shapes.
    """
    return init_tree(param_shapes(config), rng, _leaf_init)


def apply_model(params: Any, ir, vi, config: DCEvoConfig) -> dict:
    """Un-jitted forward pass (for use inside your own jit/grad); see :func:`fuse_with_features`."""
    config = _check_config(config)
    validate_inputs(ir, vi)
    return DCEvo(config).apply({"params": params}, jnp.asarray(ir, jnp.float32),
                               jnp.asarray(vi, jnp.float32))


def _fuse_with_features(params, ir, vi, config):
    return apply_model(params, ir, vi, config)


def _fuse(params, ir, vi, config):
    return apply_model(params, ir, vi, config)["fused"]


_fuse_with_features_jit = jax.jit(_fuse_with_features, static_argnames=("config",))
_fuse_jit = jax.jit(_fuse, static_argnames=("config",))


def fuse_with_features(params: Any, ir, vi, config: DCEvoConfig) -> dict:
    """Fuses ``ir`` and ``vi`` ((B, H, W, 1) float32 in [0, 1], any H, W >= 2).

    Returns a dict with ``fused`` (B, H, W, 1) float32 and the features
    ``ir_base``, ``ir_detail``, ``vi_base``, ``vi_detail``, ``fused_base``,
    ``fused_detail`` (B, H, W, dim) in the compute dtype. Jit-compiled per
    (config, shape); usable inside ``jax.jit``/``jax.grad`` (config is static).
    """
    validate_inputs(ir, vi)
    return _fuse_with_features_jit(params, ir, vi, config=_check_config(config))


def fuse(params: Any, ir, vi, config: DCEvoConfig):
    """The fused image (B, H, W, 1) float32 in [0, 1]; see :func:`fuse_with_features`."""
    validate_inputs(ir, vi)
    return _fuse_jit(params, ir, vi, config=_check_config(config))
