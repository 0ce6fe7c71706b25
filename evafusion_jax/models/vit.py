"""Vision Transformer with the exact forward pass of Hugging Face ``transformers.ViTModel``.

Patch embedding (a stride-``patch`` convolution), a CLS token, learned position
embeddings, pre-LayerNorm blocks (multi-head self-attention and an exact-GELU
MLP, each with a residual), and a final LayerNorm. ``ViT`` returns every token
(CLS first); callers drop the CLS token when they need patch tokens only.

Input is ``pixel_values``: NHWC, already resized to ``image_size`` and
normalised with the model's mean and std (for ViT-L/16-384: to [-1, 1]).

The parameter tree mirrors the classic Hugging Face key layout, so the
converter (``convert/vit_from_hf.py``) is a renaming plus transposes::

    embeddings/{cls_token, position_embeddings, patch_embeddings_projection/{kernel,bias}}
    encoder/layer_<i>/{layernorm_before, attention/{query,key,value,output}, layernorm_after,
                       intermediate, output}
    layernorm
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evafusion_jax.models import numerics
from evafusion_jax.models.init_utils import init_tree, truncated_normal

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Sizes of a ViT, named as in a Hugging Face ``config.json``."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ViTConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"ViTConfig: unsupported hidden_act {self.hidden_act!r}")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ViTConfig":
        d = numerics.known_fields(cls, d, "ViTConfig: unknown field")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    @classmethod
    def from_hf_config(cls, hf: Mapping, preprocessor: Mapping | None = None) -> "ViTConfig":
        """Builds a config from a Hugging Face ``config.json`` (and optionally
        ``preprocessor_config.json`` for the normalisation constants)."""
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in hf and f.name not in ("image_mean", "image_std"):
                kw[f.name] = hf[f.name]
        for key in ("image_size", "patch_size"):
            if isinstance(kw.get(key), (list, tuple)):
                a, b = kw[key]
                if a != b:
                    raise ValueError(f"non-square {key} {kw[key]} is not supported")
                kw[key] = a
        if preprocessor:
            if "image_mean" in preprocessor:
                kw["image_mean"] = tuple(preprocessor["image_mean"])
            if "image_std" in preprocessor:
                kw["image_std"] = tuple(preprocessor["image_std"])
        return cls(**kw)

    # ---- presets ---------------------------------------------------------------------------
    @classmethod
    def vit_l16_384(cls) -> "ViTConfig":
        """google/vit-large-patch16-384, the backbone of the released reward model."""
        return cls()

    @classmethod
    def vit_b16_224(cls) -> "ViTConfig":
        return cls(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, image_size=224)

    @classmethod
    def tiny(cls, hidden_size: int = 32, num_hidden_layers: int = 1, num_attention_heads: int = 2,
             intermediate_size: int = 64, image_size: int = 32, patch_size: int = 8) -> "ViTConfig":
        """A small ViT for tests and demos."""
        return cls(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                   num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                   image_size=image_size, patch_size=patch_size)


def _activation(name: str):
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    return jax.nn.relu


class Embeddings(nn.Module):
    """CLS token and learned position embeddings; with ``patches`` also the patch projection."""

    config: ViTConfig
    patches: bool = True
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = nn.initializers.truncated_normal(0.02)
        cls_token = self.param("cls_token", init, (1, 1, cfg.hidden_size))
        pos = self.param("position_embeddings", init, (1, cfg.num_patches + 1, cfg.hidden_size))
        if self.patches:
            b, h, w, c = x.shape
            if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
                raise ValueError(f"ViT expects pixel_values of shape (B, {cfg.image_size}, "
                                 f"{cfg.image_size}, {cfg.num_channels}), got {x.shape}; "
                                 "resize/normalise with reward_model.preprocess first")
            proj = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size),
                           strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                           dtype=self.dtype, precision=self.precision,
                           name="patch_embeddings_projection")
            x = proj(x).reshape(b, -1, cfg.hidden_size)
        b = x.shape[0]
        cls = jnp.broadcast_to(cls_token.astype(x.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        return x + pos[:, : x.shape[1]].astype(x.dtype)


class SelfAttention(nn.Module):
    config: ViTConfig
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        heads = cfg.num_attention_heads
        dh = cfg.hidden_size // heads
        dense = lambda name, bias=True: nn.Dense(cfg.hidden_size, use_bias=bias, dtype=self.dtype,
                                                 precision=self.precision, name=name)
        b, n, _ = x.shape
        q = dense("query", cfg.qkv_bias)(x).reshape(b, n, heads, dh)
        k = dense("key", cfg.qkv_bias)(x).reshape(b, n, heads, dh)
        v = dense("value", cfg.qkv_bias)(x).reshape(b, n, heads, dh)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) / math.sqrt(dh)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision).reshape(b, n, -1)
        return dense("output")(out)


class Layer(nn.Module):
    """One pre-LN transformer block, as ``ViTLayer``."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
        x = x + SelfAttention(cfg, self.dtype, self.precision, name="attention")(ln("layernorm_before")(x))
        h = ln("layernorm_after")(x)
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, precision=self.precision,
                     name="intermediate")(h)
        h = _activation(cfg.hidden_act)(h)
        h = nn.Dense(cfg.hidden_size, dtype=self.dtype, precision=self.precision, name="output")(h)
        return x + h


class Encoder(nn.Module):
    """The stack of transformer blocks (no final LayerNorm), as ``ViTEncoder``."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_hidden_layers):
            x = Layer(self.config, self.dtype, self.precision, name=f"layer_{i}")(x)
        return x


class ViT(nn.Module):
    """``ViTModel`` without pooler: returns ``last_hidden_state`` (B, 1 + N, D), CLS first."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        x = Embeddings(cfg, True, self.dtype, self.precision, name="embeddings")(
            pixel_values.astype(self.dtype))
        x = Encoder(cfg, self.dtype, self.precision, name="encoder")(x)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)


def hf_leaf_init(gen, path: str, shape: tuple[int, ...], std: float = 0.02):
    """Hugging Face ViT initialisation: weights and embeddings ~ truncated normal(0.02),
    biases 0, LayerNorm scales 1."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "scale":
        return np.ones(shape)
    if leaf == "bias":
        return np.zeros(shape)
    return truncated_normal(gen, shape, std)


def param_shapes(config: ViTConfig) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (traced, nothing computed)."""
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    return jax.eval_shape(lambda x: ViT(config).init(jax.random.PRNGKey(0), x)["params"], x)


def init_params(config: ViTConfig, rng) -> dict:
    """Random parameters (HF-style initialisation, see :func:`hf_leaf_init`) for ``config``;
    ``rng`` is a JAX key or an int seed. Nothing is compiled."""
    return init_tree(param_shapes(config), rng, hf_leaf_init)


def apply(params, pixel_values, config: ViTConfig, dtype: Dtype = jnp.float32, precision=None):
    """All tokens (B, 1 + N, D) of the ViT for normalised NHWC ``pixel_values``."""
    return ViT(config, dtype, precision).apply({"params": params}, pixel_values)
