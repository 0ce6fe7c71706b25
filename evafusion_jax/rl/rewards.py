"""Reward functions for GRPO / direct fine-tuning, with one common interface (:class:`RewardFn`).

A reward function is an object with

* ``regions(params, fused, ir, vi, masks, base=None) -> (total (B, K), terms {name: (B, K)})``:
  the reward of every region k of every pair. No gradient flows out of it (inputs and
  outputs are wrapped in ``stop_gradient``).
* ``sample_regions(params, samples, ir, vi, masks, base=None) -> (total (B, G, K), terms)``:
  the same for G sampled fused images per pair (``samples`` (B, G, H, W, C)); the
  reward model encodes each pair's IR and visible images once for all G x K.

What "the reward of region k" is depends on ``region_mode`` (:data:`REGION_MODES`):

* ``"masked"`` (the paper's): s_k = R(F * M_k, i, v), the fused image black outside the
  region (unlike anything a reward model sees in training).
* ``"composite"``: s_k = R(base * (1 - M_k) + F * M_k, i, v): region k of F pasted into a
  base image (GRPO passes the deterministic fusion F_old of theta_old; ``base=None`` means
  F itself, so every region of a deterministic F gets the whole-image reward R(F)). The
  reward model sees whole, natural fused images that differ only inside region k.
* ``image(params, fused, ir, vi) -> (total (B,), terms {name: (B,)})``: the reward of
  whole fused images, differentiable with respect to ``fused`` (used by the
  ``direct`` objective; the reward parameters are still constants).
* ``term_names``: the keys of ``terms`` (for logging).

``params`` is passed explicitly (not closed over) so that jit does not bake a large
reward model into the compiled program as constants. Images are NHWC float32 in
[0, 1]: ``fused``, ``ir``, ``vi`` (B, H, W, 1) (``vi`` may have 3 channels), masks
(B, K, H, W) float {0, 1}.

Two implementations:

* :class:`ModelReward`: the EVAFusion reward model (``reward_model.py``) with the
  released aggregation (:func:`grpo.aggregate_reward`). Images are resized to the
  model's input size and normalised exactly as in its training (ViT mean/std, i.e. to
  [-1, 1]) by ``reward_model.preprocess``. IR and visible tokens are encoded ONCE per
  pair and reused for the K masked fused images (``vmap`` over regions); with
  ``share_tokens=False`` they are re-encoded for every region (only for the
  benchmark). ``dtype="bfloat16"`` runs the reward model in bf16 (parameters and
  inputs cast; outputs back to float32). ``released_preprocessing_bug=True``
  reproduces the release's direct fine-tuning, which fed [0, 1] images (resized, not
  normalised) to a model trained on [-1, 1] inputs.
* :class:`ContrastReward`: a tiny analytic reward for tests: the mean Sobel gradient
  magnitude (local contrast) of F inside the region (params unused, pass ``{}``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from evafusion_jax.rl import fusion_losses, grpo

REWARD_TERMS = ("texture", "thermal", "sharpness", "artifacts", "heatmap", "artifact_area")
REGION_MODES = ("masked", "composite")

#: ``(total, terms)``: the reward and its named terms, every array of the same shape.
Rewards = tuple[jax.Array, Mapping[str, jax.Array]]


@runtime_checkable
class RewardFn(Protocol):
    """The interface every reward function satisfies (:class:`ModelReward`, :class:`ContrastReward`).

    Images are NHWC float32 in [0, 1]: ``fused``, ``ir``, ``vi`` (B, H, W, C) (``C`` 1, ``vi``
    may have 3); ``samples`` (B, G, H, W, C); ``masks`` (B, K, H, W) float in {0, 1}; ``base``
    (B, H, W, C) or None. ``params`` are the reward function's own parameters (``{}`` when it
    has none), passed explicitly so jit does not bake them in as constants.
    """

    #: The keys of the ``terms`` dict every method returns (for logging).
    term_names: tuple[str, ...]

    def regions(self, params: Any, fused: jax.Array, ir: jax.Array, vi: jax.Array,
                masks: jax.Array, base: jax.Array | None = None) -> Rewards:
        """Reward of every region of every pair: total (B, K), terms {name: (B, K)}; no gradient."""
        ...

    def sample_regions(self, params: Any, samples: jax.Array, ir: jax.Array, vi: jax.Array,
                       masks: jax.Array, base: jax.Array | None = None) -> Rewards:
        """Reward of every region of G samples per pair: total (B, G, K), terms (B, G, K); no gradient."""
        ...

    def image(self, params: Any, fused: jax.Array, ir: jax.Array, vi: jax.Array) -> Rewards:
        """Reward of whole fused images: total (B,), terms (B,); differentiable in ``fused``."""
        ...


def region_images(images, masks, base=None, mode: str = "masked"):
    """The images whose rewards are the region rewards (module docstring, ``region_mode``).

    ``images`` (B, H, W, C) or (B, G, H, W, C); ``masks`` (B, K, H, W); ``base`` (B, H, W, C)
    or None (= ``images``). Returns (B, K, H, W, C) or (B, G, K, H, W, C).
    """
    if mode not in REGION_MODES:
        raise ValueError(f"region mode must be one of {REGION_MODES}, got {mode!r}")
    grouped = images.ndim == 5
    m = masks[..., None].astype(images.dtype)          # (B, K, H, W, 1)
    if grouped:
        m = m[:, None]                                  # (B, 1, K, H, W, 1)
    x = images[:, :, None] if grouped else images[:, None]
    if mode == "masked":
        return x * m
    b = x if base is None else (base[:, None, None] if grouped else base[:, None])
    return b * (1.0 - m) + x * m


def _cast_floats(tree: Any, dtype) -> Any:
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x,
        tree)


@dataclasses.dataclass(frozen=True)
class ModelReward:
    """The reward model as a reward function (see the module docstring).

    Attributes:
      config: a ``reward_model.RewardConfig``.
      weights: a :class:`grpo.RewardWeights`.
      share_tokens: encode IR/visible once per pair (True) or once per region (False).
      dtype: "float32" or "bfloat16" (mixed precision for the reward model).
      released_preprocessing_bug: feed [0, 1] pixels like the release's fine-tuning.
      region_mode: "masked" (the paper's F * M_k) or "composite" (module docstring).
    """

    config: Any
    weights: grpo.RewardWeights = grpo.RewardWeights()
    share_tokens: bool = True
    dtype: str = "float32"
    released_preprocessing_bug: bool = False
    region_mode: str = "masked"

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ModelReward.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.region_mode not in REGION_MODES:
            raise ValueError(f"ModelReward.region_mode must be one of {REGION_MODES}, got "
                             f"{self.region_mode!r}")

    term_names = REWARD_TERMS

    @property
    def _jdtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

    def pixel_values(self, images: jax.Array) -> jax.Array:
        """[0, 1] NHWC images -> the reward model's input (resized RGB, normalised)."""
        from evafusion_jax.models import reward_model
        pix = reward_model.preprocess(images, self.config)
        if self.released_preprocessing_bug:
            mean = jnp.asarray(self.config.vit.image_mean, jnp.float32)
            std = jnp.asarray(self.config.vit.image_std, jnp.float32)
            pix = pix * std + mean  # undo the normalisation: resized [0, 1] pixels
        return pix.astype(self._jdtype)

    @property
    def model_config(self):
        """The reward model config with the compute dtype of this reward function."""
        if self.dtype == self.config.dtype:
            return self.config
        return dataclasses.replace(self.config, dtype=self.dtype)

    def _params(self, params):
        params = jax.lax.stop_gradient(params)
        return _cast_floats(params, self._jdtype) if self.dtype != "float32" else params

    def _aggregate(self, out):
        return grpo.aggregate_reward(out["scores"], out["heatmaps"], self.weights)

    def image(self, params, fused, ir, vi):
        from evafusion_jax.models import reward_model
        p, cfg = self._params(params), self.model_config
        tok_ir = reward_model.encode(p, self.pixel_values(ir), cfg)
        tok_vi = reward_model.encode(p, self.pixel_values(vi), cfg)
        tok_f = reward_model.encode(p, self.pixel_values(fused), cfg)
        out = reward_model.head(p, tok_ir, tok_vi, tok_f, cfg)
        return self._aggregate(out)

    def _score_masked(self, params, masked, ir, vi):
        """Rewards of masked fused images (B, N, H, W, C) of each pair -> (B, N), terms."""
        from evafusion_jax.models import reward_model
        p, cfg = self._params(params), self.model_config
        b, n = masked.shape[:2]
        if self.share_tokens:
            tok_ir = reward_model.encode(p, self.pixel_values(ir), cfg)
            tok_vi = reward_model.encode(p, self.pixel_values(vi), cfg)

            def one_region(f_k):  # (B, H, W, C) -> (B,)
                tok_f = reward_model.encode(p, self.pixel_values(f_k), cfg)
                return self._aggregate(reward_model.head(p, tok_ir, tok_vi, tok_f, cfg))

            total, terms = jax.vmap(one_region, in_axes=1, out_axes=1)(masked)
        else:
            # Naive: every region re-encodes its pair (B*N encodes of IR and of visible).
            rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
            flat = masked.reshape((b * n,) + masked.shape[2:])
            out = reward_model.apply(p, self.pixel_values(rep(ir)), self.pixel_values(rep(vi)),
                                     self.pixel_values(flat), cfg)
            total, terms = self._aggregate(out)
            total = total.reshape(b, n)
            terms = {name: t.reshape(b, n) for name, t in terms.items()}
        return jax.lax.stop_gradient((total, terms))

    def regions(self, params, fused, ir, vi, masks, base=None):
        fused = jax.lax.stop_gradient(fused)
        base = None if base is None else jax.lax.stop_gradient(base)
        masked = region_images(fused, masks, base, self.region_mode)  # (B, K, H, W, C)
        return self._score_masked(params, masked, ir, vi)

    def sample_regions(self, params, samples, ir, vi, masks, base=None):
        samples = jax.lax.stop_gradient(samples)
        base = None if base is None else jax.lax.stop_gradient(base)
        b, g = samples.shape[:2]
        k = masks.shape[1]
        # (B, G, K, H, W, C): every region of every sample, IR/visible encoded once per pair.
        masked = region_images(samples, masks, base, self.region_mode)
        total, terms = self._score_masked(
            params, masked.reshape((b, g * k) + masked.shape[3:]), ir, vi)
        return total.reshape(b, g, k), {n: t.reshape(b, g, k) for n, t in terms.items()}


@dataclasses.dataclass(frozen=True)
class ContrastReward:
    """Analytic reward: mean |Sobel| magnitude of F inside the region (times ``scale``).

    A known, cheap function of the image for tests and demos: sharper / higher
    contrast fused images score higher. Ignores ``params``, ``ir`` and ``vi``.
    """

    scale: float = 1.0
    eps: float = 1e-6

    term_names = ("contrast",)

    def _region_contrast(self, fused, masks):
        g = jnp.sum(fusion_losses.sobel_gradient(fused), axis=-1)  # (B, H, W)
        m = masks.astype(jnp.float32)
        num = jnp.einsum("bhw,bkhw->bk", g, m)
        return self.scale * num / (jnp.sum(m, axis=(-2, -1)) + self.eps)

    def regions(self, params, fused, ir, vi, masks, base=None):
        del params, ir, vi, base
        c = self._region_contrast(jax.lax.stop_gradient(fused), masks)
        c = jax.lax.stop_gradient(c)
        return c, {"contrast": c}

    def sample_regions(self, params, samples, ir, vi, masks, base=None):
        del params, ir, vi, base
        b, g = samples.shape[:2]
        flat = jax.lax.stop_gradient(samples).reshape((b * g,) + samples.shape[2:])
        c = self._region_contrast(flat, jnp.repeat(masks, g, axis=0)).reshape(b, g, -1)
        c = jax.lax.stop_gradient(c)
        return c, {"contrast": c}

    def image(self, params, fused, ir, vi):
        del params, ir, vi
        ones = jnp.ones(fused.shape[:1] + (1,) + fused.shape[1:3], jnp.float32)
        c = self._region_contrast(fused, ones)[:, 0]
        return c, {"contrast": c}


def make_reward_fn(kind: str, reward_config: Any = None, weights: grpo.RewardWeights | None = None,
                   **kwargs) -> RewardFn:
    """``"model"`` -> :class:`ModelReward` (needs ``reward_config``), ``"contrast"`` -> :class:`ContrastReward`."""
    if kind == "model":
        if reward_config is None:
            raise ValueError("reward kind 'model' needs the reward model's config (a RewardConfig); "
                             "set --config.reward_checkpoint to a converted/trained reward checkpoint")
        return ModelReward(reward_config, weights or grpo.RewardWeights(), **kwargs)
    if kind == "contrast":
        return ContrastReward(**kwargs)
    raise ValueError(f"unknown reward kind {kind!r}; use 'model' or 'contrast'")
