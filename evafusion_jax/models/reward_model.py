"""EVAFusion's fusion-oriented reward model (``RAHF`` in the release), in Flax.

Data flow for one (IR, visible, fused) triple, each an RGB image normalised
to [-1, 1] at the ViT's input size S::

    tokens_x = ViT(x)[:, 1:]                          shared frozen backbone, after its final LayerNorm
    z = Dense(concat(tokens_ir, tokens_vi, tokens_fused))       3D -> D ("projection")
    z = MixEncoder([cls; z] + pos)[:, 1:]              the mixing ViT's blocks, no final LayerNorm
    map = z as (B, S/p, S/p, D)
    heatmaps[t] = HeatmapHead_t(map)   (B, S, S) in [0, 1]
    scores[t]   = ScoreHead_t(map)     (B,)      in [0, 1]   (human score / 5)

The public API separates the frozen encoder from the rest so that callers can
encode IR/visible images once and reuse their tokens::

    tokens = encode(params, pixel_values, config)
    out = head(params, tokens_ir, tokens_vi, tokens_fused, config)
    out = apply(params, pix_ir, pix_vi, pix_fused, config)      # encode + head
    out = score_images(params, ir, vi, fused, config)             # [0, 1] images, any size

``out`` is ``{"scores": {score_type: (B,)}, "heatmaps": {heatmap_type: (B, S, S)}}``.
The parameter tree mirrors the released state dict (``vit``, ``vit_fusion``,
``projection``, ``heatmap_predictor``, ``score_predictor``); see
``convert/reward_from_torch.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evafusion_jax.models import convolution, numerics
from evafusion_jax.models import vit as vit_lib
from evafusion_jax.models.init_utils import init_tree
from evafusion_jax.models.param_tree import check_tree_shapes
from evafusion_jax.models.score_names import HEATMAP_TYPES, SCORE_TYPES
from evafusion_jax.models.vit import ViTConfig


@dataclasses.dataclass(frozen=True)
class RewardConfig(numerics.ComputeSettings):
    """Architecture of the reward model. Defaults are the released ones (ViT-L/16-384)."""

    vit: ViTConfig = dataclasses.field(default_factory=ViTConfig)
    multi_heads: bool = True
    score_types: tuple[str, ...] = SCORE_TYPES
    heatmap_types: tuple[str, ...] = HEATMAP_TYPES
    heatmap_channels: tuple[int, ...] = (768, 384)
    deconv_channels: tuple[int, ...] = (768, 384, 384, 192)
    heatmap_last_channels: int = 192
    score_conv_divisors: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
    score_hidden: tuple[int, ...] = (512, 128)
    dtype: str = "float32"          # compute dtype of every layer: float32 | bfloat16 | float16
    precision: str | None = None    # matmul/conv precision: None | default | high | highest

    def __post_init__(self):
        if isinstance(self.vit, Mapping):
            object.__setattr__(self, "vit", ViTConfig.from_dict(self.vit))
        for f in ("score_types", "heatmap_types", "heatmap_channels", "deconv_channels",
                  "score_conv_divisors", "score_hidden"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        if 2 ** len(self.deconv_channels) != self.vit.patch_size:
            raise ValueError(
                f"RewardConfig: {len(self.deconv_channels)} stride-2 upsamplings "
                f"(deconv_channels={self.deconv_channels}) do not bring the {self.vit.grid_size}x"
                f"{self.vit.grid_size} token map back to the {self.vit.image_size}x{self.vit.image_size} "
                f"input (patch_size {self.vit.patch_size}); use log2(patch_size) entries")
        if self.vit.hidden_size // self.score_conv_divisors[-1] < 1:
            raise ValueError(f"RewardConfig: hidden_size {self.vit.hidden_size} // "
                             f"{self.score_conv_divisors[-1]} leaves no channel for the score heads")
        numerics.check("RewardConfig", self.dtype, self.precision)

    def replace(self, **kw) -> "RewardConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vit"] = self.vit.to_dict()
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RewardConfig":
        kw = numerics.known_fields(cls, d, "RewardConfig: unknown field")
        if "vit" in kw and isinstance(kw["vit"], Mapping):
            kw["vit"] = ViTConfig.from_dict(kw["vit"])
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw) -> "RewardConfig":
        """A small reward model for tests and demos (hidden 32, 32x32 input, patch 8)."""
        base = dict(vit=ViTConfig.tiny(), heatmap_channels=(32, 16), deconv_channels=(16, 16, 8),
                    heatmap_last_channels=8, score_conv_divisors=(1, 2, 4, 4, 4, 4),
                    score_hidden=(32, 16))
        base.update(kw)
        return cls(**base)


class ChannelRMSNorm(nn.Module):
    """T5-style norm over channels (no mean subtraction, no bias), per-channel ``scale``."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-8)
        return (y * scale).astype(self.dtype)


class UpConv(nn.Module):
    """``ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)``: doubles H and W.

    ``kernel`` is the HWIO kernel of the equivalent convolution over the input
    dilated by 2 (the PyTorch weight flipped spatially, in/out swapped).
    """

    features: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = convolution.conv2d(x.astype(self.dtype), kernel.astype(self.dtype),
                               ((1, 2), (1, 2)), lhs_dilation=(2, 2), precision=self.precision)
        return y + bias.astype(self.dtype)


class HeatmapPredictor(nn.Module):
    config: RewardConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pr = cfg.compute_dtype, cfg.lax_precision
        conv = lambda c, name: convolution.Conv(c, (3, 3), dtype=dt, precision=pr, name=name)
        norm = lambda name: ChannelRMSNorm(dt, name=name)
        c1, c2 = cfg.heatmap_channels
        x = norm("conv_layers_2")(nn.relu(conv(c1, "conv_layers_0")(x)))
        x = norm("conv_layers_5")(nn.relu(conv(c2, "conv_layers_3")(x)))
        for i, c in enumerate(cfg.deconv_channels):
            x = nn.relu(norm(f"deconv_layers_{i}_1")(UpConv(c, dt, pr, name=f"deconv_layers_{i}_0")(x)))
            identity = x
            y = nn.relu(norm(f"conv_layers2_{i}_1")(conv(c, f"conv_layers2_{i}_0")(x)))
            y = norm(f"conv_layers2_{i}_4")(conv(c, f"conv_layers2_{i}_3")(y))
            x = nn.relu(y + identity)
        x = nn.relu(conv(cfg.heatmap_last_channels, "last_conv1")(x))
        x = conv(1, "last_conv2")(x)
        return jax.nn.sigmoid(x.astype(jnp.float32))[..., 0]


class ScorePredictor(nn.Module):
    config: RewardConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pr = cfg.compute_dtype, cfg.lax_precision
        d = x.shape[-1]
        for j, div in enumerate(cfg.score_conv_divisors):
            x = convolution.Conv(d // div, (3, 3), dtype=dt, precision=pr,
                                 name=f"conv_layers_{3 * j}")(x)
            x = nn.relu(ChannelRMSNorm(dt, name=f"conv_layers_{3 * j + 1}")(x))
        # The release flattens NCHW: channel-major order.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        for j, h in enumerate(cfg.score_hidden):
            x = nn.relu(nn.Dense(h, dtype=dt, precision=pr, name=f"linear_layers_{2 * j}")(x))
        x = nn.Dense(1, dtype=dt, precision=pr, name=f"linear_layers_{2 * len(cfg.score_hidden)}")(x)
        return jax.nn.sigmoid(x.astype(jnp.float32))[:, 0]


class _PerType(nn.Module):
    """One head per type (``multi_heads=True``), named by type as in the release."""

    head: type
    config: RewardConfig
    types: tuple[str, ...]

    @nn.compact
    def __call__(self, x):
        return {t: self.head(self.config, name=t)(x) for t in self.types}


class MixingViT(nn.Module):
    """The second ViT of the release, used from its CLS token, position embeddings
    and encoder blocks only (no patch embedding, no final LayerNorm)."""

    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, tokens):
        x = vit_lib.Embeddings(self.config, False, self.dtype, self.precision, name="embeddings")(tokens)
        return vit_lib.Encoder(self.config, self.dtype, self.precision, name="encoder")(x)


class RewardModel(nn.Module):
    config: RewardConfig

    def setup(self):
        cfg = self.config
        dt, pr = cfg.compute_dtype, cfg.lax_precision
        self.vit = vit_lib.ViT(cfg.vit, dt, pr)
        self.projection = nn.Dense(cfg.vit.hidden_size, dtype=dt, precision=pr)
        self.vit_fusion = MixingViT(cfg.vit, dt, pr)
        if cfg.multi_heads:
            self.heatmap_predictor = _PerType(HeatmapPredictor, cfg, cfg.heatmap_types)
            self.score_predictor = _PerType(ScorePredictor, cfg, cfg.score_types)
        else:
            self.heatmap_predictor = HeatmapPredictor(cfg)
            self.score_predictor = ScorePredictor(cfg)

    def encode(self, pixel_values):
        return self.vit(pixel_values)[:, 1:]

    def head(self, tokens_ir, tokens_vi, tokens_fused):
        cfg = self.config
        for name, t in (("tokens_ir", tokens_ir), ("tokens_vi", tokens_vi), ("tokens_fused", tokens_fused)):
            if t.ndim != 3 or t.shape[1:] != (cfg.vit.num_patches, cfg.vit.hidden_size):
                raise ValueError(f"head: {name} must have shape (B, {cfg.vit.num_patches}, "
                                 f"{cfg.vit.hidden_size}), got {t.shape}")
        z = self.projection(jnp.concatenate([tokens_ir, tokens_vi, tokens_fused], axis=-1))
        z = self.vit_fusion(z)[:, 1:]
        g = cfg.vit.grid_size
        fmap = z.reshape(z.shape[0], g, g, cfg.vit.hidden_size)
        if cfg.multi_heads:
            heatmaps = self.heatmap_predictor(fmap)
            scores = self.score_predictor(fmap)
        else:
            hm, sc = self.heatmap_predictor(fmap), self.score_predictor(fmap)
            heatmaps = {t: hm for t in cfg.heatmap_types}
            scores = {t: sc for t in cfg.score_types}
        return {"scores": scores, "heatmaps": heatmaps}

    def __call__(self, pix_ir, pix_vi, pix_fused):
        return self.head(self.encode(pix_ir), self.encode(pix_vi), self.encode(pix_fused))


# ---- pure functions ------------------------------------------------------------------------

def encode(params, pixel_values, config: RewardConfig):
    """Patch tokens (B, N, D) of the frozen backbone for normalised NHWC ``pixel_values``."""
    return RewardModel(config).apply({"params": params}, pixel_values, method=RewardModel.encode)


def head(params, tokens_ir, tokens_vi, tokens_fused, config: RewardConfig):
    """Projection, mixing ViT and prediction heads on precomputed backbone tokens."""
    return RewardModel(config).apply({"params": params}, tokens_ir, tokens_vi, tokens_fused,
                                     method=RewardModel.head)


def apply(params, pix_ir, pix_vi, pix_fused, config: RewardConfig):
    """Full forward pass on normalised NHWC inputs at the ViT input size."""
    return RewardModel(config).apply({"params": params}, pix_ir, pix_vi, pix_fused)


def preprocess(images, config: RewardConfig):
    """[0, 1] NHWC images (1 or 3 channels, any size) -> normalised ViT ``pixel_values``.

    The one preprocessing of every scoring path (``score_images``, the GRPO / direct reward
    functions, ``score``, ``evaluate --reward``, the demo): grayscale is repeated to RGB,
    images are resized with PIL's bilinear filter to the ViT input size, then normalised with
    the ViT's mean and std (0.5 for the released model: [-1, 1]), as the released training did.
    Jittable and differentiable. Training reads 8-bit files and resizes them with PIL itself
    (``feedback.preprocess_example``, bit-exact to the release); the two differ only by
    PIL's 8-bit rounding (README, "Preprocessing").
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"preprocess: expected NHWC images with 1 or 3 channels, got shape {images.shape}")
    images = images.astype(jnp.float32)
    s = config.vit.image_size
    if images.shape[1:3] != (s, s):
        # PIL's BILINEAR: a triangle filter widened by the scale when downscaling (antialias),
        # half-pixel centres; equal to PIL's float resize to ~1e-7.
        images = jax.image.resize(images, images.shape[:1] + (s, s) + images.shape[3:],
                                  "linear", antialias=True)
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    mean = jnp.asarray(config.vit.image_mean, jnp.float32)
    std = jnp.asarray(config.vit.image_std, jnp.float32)
    return (images - mean) / std


def score_images(params, ir, vi, fused, config: RewardConfig):
    """Reward-model outputs for [0, 1] NHWC IR, visible and fused images of any size."""
    return apply(params, preprocess(ir, config), preprocess(vi, config), preprocess(fused, config), config)


def param_shapes(config: RewardConfig) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (traced, nothing computed)."""
    s = config.vit.image_size
    x = jax.ShapeDtypeStruct((1, s, s, config.vit.num_channels), jnp.float32)
    return jax.eval_shape(lambda a: RewardModel(config).init(jax.random.PRNGKey(0), a, a, a)["params"], x)


def _leaf_init(gen, path: str, shape):
    """ViT parts as Hugging Face initialises them; projection and head weights as PyTorch's
    default layers (uniform(+-1/sqrt(fan_in))), biases 0, RMS-norm scales 1."""
    if path.startswith(("vit/", "vit_fusion/")):
        return vit_lib.hf_leaf_init(gen, path, shape)
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "scale":
        return np.ones(shape)
    if leaf == "bias":
        return np.zeros(shape)
    fan_in = int(np.prod(shape[:-1]))
    if "deconv_layers" in path:  # ConvTranspose2d: PyTorch's fan_in is out-channels * k * k
        fan_in = shape[0] * shape[1] * shape[3]
    bound = 1.0 / np.sqrt(fan_in)
    return gen.uniform(-bound, bound, shape)


def init_params(config: RewardConfig, rng, mixer_init: str = "random",
                backbone: Any = None) -> dict:
    """Parameters for a new reward model.

    Args:
      config: the architecture.
      rng: PRNG key for everything randomly initialised.
      mixer_init: ``"random"`` (as released: the mixing ViT is a fresh ViT) or
        ``"copy_backbone"`` (CLS token, position embeddings and blocks copied from the backbone).
      backbone: optional ViT parameters (``vit.init_params`` tree, e.g. restored from a
        converted Hugging Face checkpoint) used for ``vit``; random otherwise.
    """
    if mixer_init not in ("random", "copy_backbone"):
        raise ValueError(f"mixer_init must be 'random' or 'copy_backbone', got {mixer_init!r}")
    params = init_tree(param_shapes(config), rng, _leaf_init)
    if backbone is not None:
        backbone = _to_dict(backbone)
        check_tree_shapes(params["vit"], backbone, "backbone ViT parameters vs reward config")
        params["vit"] = backbone
    if mixer_init == "copy_backbone":
        src = params["vit"]
        params["vit_fusion"] = {
            "embeddings": {"cls_token": src["embeddings"]["cls_token"],
                           "position_embeddings": src["embeddings"]["position_embeddings"]},
            "encoder": jax.tree_util.tree_map(lambda a: a, src["encoder"]),
        }
    return params


def _to_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def frozen_mask(params, train_mixer: bool = False) -> dict:
    """Pytree of bools, True where a parameter is frozen during reward training
    (the backbone always; the mixing ViT unless ``train_mixer``)."""
    frozen_top = {"vit"} | (set() if train_mixer else {"vit_fusion"})
    return {k: jax.tree_util.tree_map(lambda _: k in frozen_top, v) for k, v in params.items()}


def stack_scores(scores: Mapping[str, jax.Array], config: RewardConfig) -> jax.Array:
    """Scores dict -> (B, len(score_types)) array in ``config.score_types`` order."""
    return jnp.stack([scores[t] for t in config.score_types], axis=-1)
