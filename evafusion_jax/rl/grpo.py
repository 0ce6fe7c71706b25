"""The pure mathematics of region-level GRPO for the fusion policy.

EVAFusion fine-tunes DCEvo with a GRPO-style objective whose "group" is the set
of SAM regions of one image pair. Two policies are supported (see
:mod:`evafusion_jax.train.grpo_training`): the paper's deterministic F with the L1
region ratio, and (the default) the Gaussian policy N(F, sigma^2) with a group of
G sampled fusions per pair and per-region likelihood ratios. Everything here is a pure ``jax.numpy``
function of arrays (no models, no state), so it can be tested against
hand-computed values and used inside ``jit``/``grad``/``shard_map``.

Shapes: ``B`` pairs per batch, ``K`` region slots per pair, images (B, H, W, 1),
masks (B, K, H, W) float {0, 1}, ``valid`` (B, K) bool (False marks an empty /
padding slot; such slots never contribute to any statistic).

* :func:`aggregate_reward` turns reward-model outputs into one scalar per
  region with the released weights (texture 2, thermal 1, sharpness 2,
  artifacts 0.5 x (1 + artifact-heatmap area above 0.5)).
* :func:`group_advantages` standardises rewards within each pair's group of
  valid regions: A_k = (s_k - mean) / (std + eps); groups without spread (or
  with fewer than two valid regions) get zero advantages, never NaN.
* :func:`region_ratios` r_k = 1 + alpha |F[M_k] - F_old[M_k]|_1 / (|F_old[M_k]|_1 + eps).
* :func:`sample_actions`, :func:`gaussian_region_ratios`,
  :func:`sampled_group_advantages`: the sampled group (G fusions x K regions).
* :func:`clipped_surrogate` the PPO/GRPO clipped objective over valid regions.
* :func:`gaussian_kl` KL of two fixed-variance Gaussians centred on the fused
  images: mean((F - F_ref)^2) / (2 sigma^2).
* :func:`gaussian_region_logp`, :func:`preference_pairs`, :func:`dpo_loss_terms`: DPO on
  the Gaussian policy (best vs worst sampled fusion of each pair or region).
* :func:`running_baseline_advantages`, :func:`update_running_baseline`: PPO's
  advantages against a running mean of the reward (no group).

The surrogate is returned as a (sum, count) pair where it matters, so that a
data-parallel step can divide by the *global* number of valid regions and match
the single-device result exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

# Names of the reward-model score outputs used by the reward (their home: models/score_names).
from evafusion_jax.models import numerics
from evafusion_jax.models.score_names import (
    ARTIFACTS,
    HEATMAP,
    SHARPNESS,
    TEXTURE,
    THERMAL,
)


@dataclasses.dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward aggregation (defaults: the released fine-tuning, reward_final.py).

    reward = texture * Texture + thermal * Thermal + sharpness * Sharpness
             + artifacts * (1 + area) * Artifacts                  (use_scores, use_heatmap)
    where ``area`` is the fraction of the artifact heatmap >= ``heatmap_threshold``.

    Ablations (the paper's "w/o score" / "w/o heatmap"):
      use_heatmap=False: the artifacts term is ``artifacts * Artifacts`` (no area factor).
      use_scores=False: no score terms; the reward is ``-heatmap_only * area`` (less
        predicted artifact area is better). This is OUR definition of the heatmap-only
        reward (the release has no such code). With ``soft_area`` the area is the mean
        heatmap value instead of the thresholded fraction, which is differentiable (the
        thresholded area has zero gradient, as in the release).
    """

    texture: float = 2.0
    thermal: float = 1.0
    sharpness: float = 2.0
    artifacts: float = 0.5
    heatmap_threshold: float = 0.5
    use_scores: bool = True
    use_heatmap: bool = True
    heatmap_only: float = 1.0
    soft_area: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RewardWeights":
        return cls(**numerics.known_fields(cls, d, "unknown reward weight"))


def heatmap_area(heatmap: jax.Array, threshold: float = 0.5, soft: bool = False) -> jax.Array:
    """Fraction of heatmap pixels >= ``threshold`` (or the mean value when ``soft``).

    ``heatmap`` has shape (..., S, S); returns shape (...,).
    """
    hm = heatmap.astype(jnp.float32)
    if soft:
        return jnp.mean(hm, axis=(-2, -1))
    return jnp.mean((hm >= threshold).astype(jnp.float32), axis=(-2, -1))


def aggregate_reward(scores: Mapping[str, jax.Array], heatmaps: Mapping[str, jax.Array],
                     weights: RewardWeights = RewardWeights()) -> tuple[jax.Array, dict]:
    """Weighted reward from reward-model outputs.

    Args:
      scores: {score name: (...,)} sigmoid scores in [0, 1] (reward_model.SCORE_TYPES names).
      heatmaps: {"artifact_heatmap": (..., S, S)} in [0, 1].
      weights: a :class:`RewardWeights`.

    Returns:
      (total (...,), terms) where ``terms`` maps "texture", "thermal", "sharpness",
      "artifacts", "heatmap" and "artifact_area" to (...,) arrays; ``total`` is the
      sum of the weighted terms (every term already carries its weight;
      "artifact_area" is a diagnostic, not added).
    """
    w = weights
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    ref = f32(scores[ARTIFACTS]) if ARTIFACTS in scores else f32(next(iter(scores.values())))
    zero = jnp.zeros_like(ref)
    area = (heatmap_area(heatmaps[HEATMAP], w.heatmap_threshold, w.soft_area)
            if HEATMAP in heatmaps else zero)
    terms = {"texture": zero, "thermal": zero, "sharpness": zero, "artifacts": zero,
             "heatmap": zero}
    if w.use_scores:
        terms["texture"] = w.texture * f32(scores[TEXTURE])
        terms["thermal"] = w.thermal * f32(scores[THERMAL])
        terms["sharpness"] = w.sharpness * f32(scores[SHARPNESS])
        art = f32(scores[ARTIFACTS])
        terms["artifacts"] = w.artifacts * art
        if w.use_heatmap:
            # The released (1 + area) factor, split so that each part is visible in the logs.
            terms["heatmap"] = w.artifacts * area * art
    elif w.use_heatmap:
        terms["heatmap"] = -w.heatmap_only * area
    total = sum(terms.values())
    terms["artifact_area"] = area
    return total, terms


def masked_mean_std(values: jax.Array, valid: jax.Array, axis: int = -1):
    """Mean, population std and count of ``values`` over the ``valid`` entries along ``axis``."""
    v = valid.astype(jnp.float32)
    n = jnp.sum(v, axis=axis, keepdims=True)
    safe_n = jnp.maximum(n, 1.0)
    x = jnp.where(valid, values, 0.0)
    mean = jnp.sum(x, axis=axis, keepdims=True) / safe_n
    dev = jnp.where(valid, values - mean, 0.0)
    var = jnp.sum(dev * dev, axis=axis, keepdims=True) / safe_n
    return mean, jnp.sqrt(var), n


def group_advantages(rewards: jax.Array, valid: jax.Array, eps: float = 1e-6,
                     min_std: float = 1e-6) -> jax.Array:
    """A_k = (s_k - mean) / (std + eps) within each row's valid regions.

    Args:
      rewards: (B, K) region rewards.
      valid: (B, K) bool.
      eps: added to the std.
      min_std: a group whose std is <= this (no spread; also groups with fewer
        than two valid regions) gets zero advantages.

    Returns:
      (B, K) float32 advantages, exactly 0 at invalid slots; never NaN for
      finite rewards. Treated as constants (stop_gradient).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    valid = jnp.asarray(valid, bool)
    mean, std, n = masked_mean_std(rewards, valid)
    adv = (rewards - mean) / (std + eps)
    ok = valid & (std > min_std) & (n >= 2)
    return jax.lax.stop_gradient(jnp.where(ok, adv, 0.0))


def abs0(x: jax.Array) -> jax.Array:
    """|x| whose derivative is sign(x), i.e. exactly 0 at x = 0 (jnp.abs uses 1 there)."""
    return x * jax.lax.stop_gradient(jnp.sign(x))


def region_l1(x: jax.Array, masks: jax.Array) -> jax.Array:
    """sum over each region of |x|: x (B, H, W, C), masks (B, K, H, W) -> (B, K).

    Uses :func:`abs0`, so the gradient at x = 0 is 0 (the L1 subgradient at 0).
    """
    ax = jnp.sum(abs0(x.astype(jnp.float32)), axis=-1)  # (B, H, W)
    return jnp.einsum("bhw,bkhw->bk", ax, masks.astype(jnp.float32))


def region_ratios(fused: jax.Array, fused_old: jax.Array, masks: jax.Array,
                  alpha: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """r_k = 1 + alpha * |F[M_k] - F_old[M_k]|_1 / (|F_old[M_k]|_1 + eps), shape (B, K).

    ``fused_old`` is treated as a constant. With fused == fused_old the ratio is
    exactly 1 and its gradient is exactly 0 (the L1 norm's subgradient at 0):
    the old policy must lag the current one for the surrogate to move anything.
    """
    fused_old = jax.lax.stop_gradient(fused_old)
    num = region_l1(fused - fused_old, masks)
    den = region_l1(fused_old, masks)
    return 1.0 + alpha * num / (den + eps)


def gaussian_region_ratios(fused: jax.Array, fused_old: jax.Array, actions: jax.Array,
                           masks: jax.Array, sigma: float) -> jax.Array:
    """Likelihood ratio of each region of each sampled action under N(F, sigma^2) vs N(F_old, sigma^2).

    r_{g,k} = exp(mean over M_k of [(a_g - F_old)^2 - (a_g - F)^2] / (2 sigma^2)): the
    per-pixel log-ratio is averaged over the region (pixels play the role of GRPO's
    tokens; the average keeps large regions from saturating the clipping).

    Args:
      fused, fused_old: (B, H, W, C) means of the current and the old policy
        (``fused_old`` is a constant).
      actions: (B, G, H, W, C) sampled fused images (constants), or (B, H, W, C) for
        one sample per pair.
      masks: (B, K, H, W).
      sigma: the policy's fixed standard deviation.

    Returns:
      (B, G, K) ratios, or (B, K) when ``actions`` has no group axis. r = 1 at
      F = F_old, with the non-zero gradient (a - F) / (sigma^2 n_k).
    """
    single = actions.ndim == fused.ndim
    if single:
        actions = actions[:, None]
    fused_old = jax.lax.stop_gradient(fused_old).astype(jnp.float32)[:, None]
    actions = jax.lax.stop_gradient(actions).astype(jnp.float32)
    fused = fused.astype(jnp.float32)[:, None]
    d = jnp.sum((actions - fused_old) ** 2 - (actions - fused) ** 2, axis=-1)  # (B, G, H, W)
    m = masks.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m, axis=(-2, -1)), 1.0)[:, None, :]  # (B, 1, K)
    log_r = jnp.einsum("bghw,bkhw->bgk", d, m) / n / (2.0 * sigma * sigma)
    r = jnp.exp(log_r)
    return r[:, 0] if single else r


ADVANTAGE_GROUPS = ("samples", "regions", "all")


def sampled_group_advantages(rewards: jax.Array, valid: jax.Array, group: str = "samples",
                             eps: float = 1e-6, min_std: float = 1e-6) -> jax.Array:
    """Standardised advantages of G sampled fusions x K regions of each pair.

    Args:
      rewards: (B, G, K) reward of region k of sample g of pair b.
      valid: (B, K) bool (a region slot is valid or not for all samples of its pair).
      group: how the pair's G x K rewards are standardised:
        "samples" (default): each region's baseline is its mean over the G samples
          (GRPO's group of responses to one prompt, with regions as prompts: the
          region's content cancels and only the effect of the sampled change
          remains), and the centred values are divided by their std over the whole
          pair (every valid sample and region), so regions keep their relative
          weight. Every region's advantages sum to 0 over the samples.
        "regions": the valid regions of one sample (EVAFusion's group of K regions),
          separately for each sample.
        "all": every valid (sample, region) of the pair, one mean and one std.
      eps, min_std: as in :func:`group_advantages` (a group without spread gets 0).

    Why not divide each region by its own std: that weights every region equally
    however little reward is at stake in it, and on the demo's reward model the
    resulting update pointed against the gradient of the mean region reward
    (cosine -0.94 over 8 draws); with the pair-level scale it pointed along it.

    Returns:
      (B, G, K) float32 advantages, 0 at invalid slots (constants).
    """
    if group not in ADVANTAGE_GROUPS:
        raise ValueError(f"advantage group must be one of {ADVANTAGE_GROUPS}, got {group!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    b, g, k = rewards.shape
    v = jnp.broadcast_to(jnp.asarray(valid, bool)[:, None, :], (b, g, k))
    if group == "regions":
        return group_advantages(rewards.reshape(b * g, k), v.reshape(b * g, k), eps,
                                min_std).reshape(b, g, k)
    if group == "all":
        return group_advantages(rewards.reshape(b, g * k), v.reshape(b, g * k), eps,
                                min_std).reshape(b, g, k)
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)  # per region over samples
    vf = v.reshape(b, g * k).astype(jnp.float32)
    c = jnp.where(v, centred, 0.0).reshape(b, g * k)
    n = jnp.sum(vf, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True) / jnp.maximum(n, 1.0))
    ok = (std > min_std) & (n >= 2) & (g >= 2)
    adv = jnp.where(ok, c / (std + eps), 0.0).reshape(b, g, k)
    return jax.lax.stop_gradient(jnp.where(v, adv, 0.0))


def sample_actions(fused_old: jax.Array, noise: jax.Array, sigma: float,
                   antithetic: bool = True) -> jax.Array:
    """Sampled fused images a_g = F_old + sigma * noise_g, shape (B, G, H, W, C).

    ``noise`` is N(0, 1) of shape (B, G, H, W, C). With ``antithetic`` (G even) the
    second half of the group mirrors the first (noise_{g + G/2} = -noise_g), which
    cancels the reward's even part around F_old and halves the estimator's variance.
    Actions are not clipped to [0, 1] (the Gaussian policy's support is unbounded;
    the reward model sees them as they are).
    """
    fused_old = jax.lax.stop_gradient(fused_old)
    if antithetic:
        g = noise.shape[1]
        if g % 2:
            raise ValueError(f"antithetic sampling needs an even group size, got {g}")
        noise = jnp.concatenate([noise[:, : g // 2], -noise[:, : g // 2]], axis=1)
    return fused_old[:, None] + sigma * noise


def clipped_surrogate_terms(ratios: jax.Array, advantages: jax.Array, valid: jax.Array,
                            clip_eps: float = 0.2):
    """Per-region min(r A, clip(r, 1 - eps, 1 + eps) A) and a per-region "clipped" flag.

    Returns (objective (B, K) with zeros at invalid slots, clipped (B, K) float {0, 1}).
    A region counts as clipped when the clipped branch is the active one and
    differs from the unclipped value (its gradient through r is zero).
    """
    valid = jnp.asarray(valid, bool)
    unclipped = ratios * advantages
    clipped_r = jnp.clip(ratios, 1.0 - clip_eps, 1.0 + clip_eps)
    clipped = clipped_r * advantages
    obj = jnp.minimum(unclipped, clipped)
    is_clipped = (clipped < unclipped) & (clipped_r != ratios)
    return (jnp.where(valid, obj, 0.0),
            jnp.where(valid, is_clipped, False).astype(jnp.float32))


def clipped_surrogate(ratios: jax.Array, advantages: jax.Array, valid: jax.Array,
                      clip_eps: float = 0.2) -> tuple[jax.Array, jax.Array]:
    """Mean over valid regions of the clipped surrogate, and the fraction of clipped regions."""
    obj, clipped = clipped_surrogate_terms(ratios, advantages, valid, clip_eps)
    n = jnp.maximum(jnp.sum(jnp.asarray(valid, jnp.float32)), 1.0)
    return jnp.sum(obj) / n, jnp.sum(clipped) / n


def gaussian_kl(fused: jax.Array, fused_ref: jax.Array, sigma: float = 1.0) -> jax.Array:
    """KL(N(F, sigma^2) || N(F_ref, sigma^2)) per pixel, averaged: mean((F - F_ref)^2) / (2 sigma^2)."""
    d = fused.astype(jnp.float32) - jax.lax.stop_gradient(fused_ref).astype(jnp.float32)
    return jnp.mean(d * d) / (2.0 * sigma * sigma)


def advantage_stats(advantages: jax.Array, valid: jax.Array) -> dict:
    """Mean, std, min, max of the advantages over valid slots and the mean group size."""
    valid = jnp.asarray(valid, bool)
    v = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v), 1.0)
    mean = jnp.sum(jnp.where(valid, advantages, 0.0)) / n
    var = jnp.sum(jnp.where(valid, (advantages - mean) ** 2, 0.0)) / n
    big = jnp.finfo(jnp.float32).max
    return {"adv_mean": mean, "adv_std": jnp.sqrt(var),
            "adv_min": jnp.min(jnp.where(valid, advantages, big)),
            "adv_max": jnp.max(jnp.where(valid, advantages, -big)),
            "regions_per_image": jnp.mean(jnp.sum(v, axis=-1))}


# ----------------------------------------------------------------------------- DPO

PREFERENCE_UNITS = ("region", "image")


def gaussian_region_logp(fused: jax.Array, actions: jax.Array, masks: jax.Array,
                         sigma: float) -> jax.Array:
    """Log-likelihood of sampled actions under N(F, sigma^2), per-pixel averaged over each region.

    log pi(a_g | M_k) = -mean over M_k of (a_g - F)^2 / (2 sigma^2) (the normalising constant,
    the same for every policy of this family, is left out: it cancels in every ratio). The
    average over the region's pixels matches :func:`gaussian_region_ratios`
    (``log r = logp(theta) - logp(theta_old)``).

    Args:
      fused: (B, H, W, C) mean of the policy (differentiable).
      actions: (B, G, H, W, C) sampled fused images (constants).
      masks: (B, K, H, W).
      sigma: the policy's standard deviation.

    Returns:
      (B, G, K).
    """
    actions = jax.lax.stop_gradient(actions).astype(jnp.float32)
    d = jnp.sum((actions - fused.astype(jnp.float32)[:, None]) ** 2, axis=-1)  # (B, G, H, W)
    m = masks.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m, axis=(-2, -1)), 1.0)[:, None, :]
    return -jnp.einsum("bghw,bkhw->bgk", d, m) / n / (2.0 * sigma * sigma)


def preference_pairs(rewards: jax.Array, valid: jax.Array, min_gap: float = 1e-6):
    """The preferred (highest-reward) and rejected (lowest-reward) sample of each group.

    Args:
      rewards: (B, G, K) reward of sample g in unit k (a region, or K = 1 for the image).
      valid: (B, K) bool.
      min_gap: a unit whose best and worst rewards differ by <= this has no preference.

    Returns:
      (winner (B, K) int32, loser (B, K) int32, has_pair (B, K) bool). Ties go to the
      lowest sample index (``argmax``/``argmin``); ``has_pair`` is False at invalid units,
      for G < 2 and for units without a reward gap. Constants (no gradient).
    """
    rewards = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
    win = jnp.argmax(rewards, axis=1).astype(jnp.int32)
    lose = jnp.argmin(rewards, axis=1).astype(jnp.int32)
    gap = jnp.max(rewards, axis=1) - jnp.min(rewards, axis=1)
    ok = jnp.asarray(valid, bool) & (gap > min_gap) & (rewards.shape[1] >= 2)
    return win, lose, ok


def dpo_loss_terms(logp: jax.Array, logp_ref: jax.Array, winner: jax.Array, loser: jax.Array,
                   has_pair: jax.Array, beta: float):
    """DPO: -log sigmoid(beta [(lp(w) - lp_ref(w)) - (lp(l) - lp_ref(l))]) per preference pair.

    Args:
      logp: (B, G, K) log-likelihoods of the samples under the policy being trained.
      logp_ref: (B, G, K) the same under the frozen reference (constants).
      winner, loser, has_pair: from :func:`preference_pairs`.
      beta: DPO's temperature (the strength of the implicit KL to the reference).

    Returns:
      (loss (B, K), margin (B, K), accuracy (B, K)), zero where ``has_pair`` is False.
      ``margin`` is the beta-scaled implicit reward margin h, ``accuracy`` 1 where h > 0.
    """
    take = lambda x, i: jnp.take_along_axis(x, i[:, None, :], axis=1)[:, 0]  # noqa: E731
    log_ratio = logp - jax.lax.stop_gradient(logp_ref)
    h = beta * (take(log_ratio, winner) - take(log_ratio, loser))
    loss = jax.nn.softplus(-h)  # = -log sigmoid(h)
    return (jnp.where(has_pair, loss, 0.0), jnp.where(has_pair, h, 0.0),
            jnp.where(has_pair, (h > 0).astype(jnp.float32), 0.0))


# ----------------------------------------------------------------------------- PPO

def init_running_baseline() -> dict:
    """PPO's reward baseline (kept in the train state): running mean and variance, and a count."""
    return {"mean": jnp.zeros((), jnp.float32), "var": jnp.ones((), jnp.float32),
            "count": jnp.zeros((), jnp.int32)}


def running_baseline_advantages(rewards: jax.Array, baseline: Mapping, batch_mean: jax.Array,
                                batch_var: jax.Array, eps: float = 1e-6) -> jax.Array:
    """A = (s - b) / (sqrt(v) + eps) with the running mean b and variance v of earlier batches.

    At the first step (``count == 0``) there is no history: b and v are this batch's mean and
    variance (``batch_mean``, ``batch_var``: over the GLOBAL batch). The baseline is never the
    pair's own group of samples. Constants (stop_gradient).
    """
    first = baseline["count"] == 0
    b = jnp.where(first, batch_mean, baseline["mean"])
    v = jnp.where(first, batch_var, baseline["var"])
    adv = (jnp.asarray(rewards, jnp.float32) - b) / (jnp.sqrt(jnp.maximum(v, 0.0)) + eps)
    return jax.lax.stop_gradient(adv)


def update_running_baseline(baseline: Mapping, batch_mean: jax.Array, batch_var: jax.Array,
                            momentum: float) -> dict:
    """Exponential moving averages of the batch reward mean and variance.

    The first update takes the batch's values; later ones
    ``m <- momentum m + (1 - momentum) batch_mean`` (the same for the variance).
    """
    first = baseline["count"] == 0
    mix = lambda old, new: jnp.where(first, new, momentum * old + (1.0 - momentum) * new)  # noqa
    return {"mean": mix(baseline["mean"], batch_mean).astype(jnp.float32),
            "var": mix(baseline["var"], batch_var).astype(jnp.float32),
            "count": baseline["count"] + 1}
