"""Training state and jitted, data-parallel update steps for fine-tuning DCEvo.

Five objectives (``TrainHParams.objective``):

* ``"grpo"``: region-level GRPO (EVAFusion). The policy DCEvo (params theta) fuses
  F for a pair; regions M_k come from SAM (or a fallback); rewards carry no
  gradient; the loss is -mean min(r A, clip(r, 1 - eps, 1 + eps) A) over valid
  regions + beta KL(F || F_ref), F_ref from the frozen initial network. Two
  policies (``TrainHParams.ratio``):

  - ``"gaussian"`` (default): the policy is N(F_theta, sigma^2) per pixel
    (sigma = ``exploration_std``; the same Gaussian the KL term assumes). For each
    pair a group of G = ``group_size`` fusions a_g = F_old + sigma noise_g is
    sampled from the old policy (antithetic pairs by default), every region of
    every sample is scored, s_{g,k} = R(a_g * M_k, i, v), advantages are
    standardised within the group (``advantage_group``: region k over the G
    samples by default), and r_{g,k} is the likelihood ratio of a_g on M_k under
    theta vs theta_old (per-pixel log-ratio averaged over the region). This is
    GRPO's group of sampled responses, with regions as the units of credit; it
    has a policy gradient already at theta_old == theta and raises the reward.
  - ``"l1"``: the paper's formula on the deterministic F: s_k = R(F * M_k, i, v),
    A_k standardised over the pair's valid regions, and
    r_k = 1 + alpha |F - F_old|_{1,M_k} / (|F_old|_{1,M_k} + eps). This ratio says
    how much a region changed, not in which direction (its gradient is
    alpha sign(F - F_old) / |F_old|, zero at theta_old == theta); it does not
    raise the reward by itself (README, "Caveats").

  Optional auxiliary fusion losses (weights ``grpo_fusion_weight`` etc.) regularise it.
* ``"direct"``: the released fine-tuning (reward_final.py): maximise the weighted
  reward of the whole fused image by backpropagating through the frozen reward
  model, plus the fusion loss, the decomposition loss and the pseudo-fusion MSE
  with the released weights (0.5, 1, 2, 100).
* ``"fusion"``: only the unsupervised fusion + decomposition losses (no reward
  model): trains DCEvo from scratch or warms it up.
* ``"dpo"``: DPO on the Gaussian policy (the paper's policy-optimisation ablation).
  The same group of G sampled fusions a_g ~ N(F_old, sigma^2) as ``grpo``; in each
  preference unit (``dpo_preference``: every valid region, s_{g,k} = R(a_g * M_k, i, v),
  or the whole image, s_g = R(a_g, i, v)) the highest-reward sample is preferred to the
  lowest-reward one (units whose rewards do not differ are skipped), and the loss is
  -log sigmoid(beta [(log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l))]) with
  log pi(a) = -mean_{unit} (a - F_theta)^2 / (2 sigma^2) and pi_ref the frozen initial
  network; ``beta`` is the config's KL weight (DPO's implicit KL strength; no explicit KL
  term is added). Rewards carry no gradient.
* ``"ppo"``: PPO without GRPO's group-relative advantages: whole-image rewards
  s_g = R(a_g, i, v) of the G sampled fusions, advantages against a running baseline
  A = (s - b) / sqrt(v), b and v exponential moving averages (``ppo_baseline_momentum``)
  of the global batch's reward mean and variance over earlier steps (the first step
  uses its own batch). The baseline lives in the train state (``state["baseline"]``),
  so a resumed run continues with the same baseline. Whole-image likelihood ratios,
  the clipped objective and the KL term as in ``grpo``.

theta_old: after the update of step s, when (s + 1) % old_policy_interval == 0,
theta_old becomes the parameters from *before* that update, so it lags the current
parameters by at least one update (for ``ratio="l1"`` with theta_old == theta the
ratio's gradient is exactly zero, so that ratio's first step moves the parameters
only through the KL/auxiliary terms and the weight decay). With the default
interval 1 the ``gaussian`` samples come from the network before the last update
(one update off-policy: the likelihood ratio corrects for it, the clipping bounds it).

Exploration noise is keyed by (``noise_seed``, step, global pair index), so a pair
gets the same samples whatever the number of devices or hosts, and a resumed run
draws the same samples as an uninterrupted one.

Data parallel: the step runs per device shard under ``jax.shard_map`` over the
``"data"`` mesh axis (:mod:`evafusion_jax.train.parallel`). Each shard's loss is scaled
so that the ``psum`` of the shard gradients is the gradient of the global-batch
loss: the GRPO surrogate is divided by the *global* number of valid (sample,)
region entries, and per-pixel means by the number of shards. So the step on N
devices equals the 1-device step on the same global batch (up to float summation
order). The decomposition loss (a ratio of batch means) is computed per shard, as
``nn.DataParallel`` replicas would; it is therefore not exactly the global one
for the ``direct``/``fusion`` objectives on several devices.

The train state is a plain dict pytree (Orbax-friendly):
``{"params", "opt_state", "old_params", "ref_params", "step"}`` (plus ``"baseline"`` for
``"ppo"``, see :func:`create_train_state`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from evafusion_jax.models import dcevo
from evafusion_jax.rl import fusion_losses, grpo
from evafusion_jax.rl.grpo import PREFERENCE_UNITS
from evafusion_jax.rl.rewards import RewardFn
from evafusion_jax.train import optimizer as optim
from evafusion_jax.train import parallel

OBJECTIVES = ("grpo", "direct", "fusion", "dpo", "ppo")
#: objectives that sample a group of fusions from the Gaussian policy and score them
SAMPLED_OBJECTIVES = ("dpo", "ppo")
#: objectives that need a reward function
REWARD_OBJECTIVES = ("grpo", "direct", "dpo", "ppo")
AXIS = parallel.DATA_AXIS


@dataclasses.dataclass(frozen=True)
class TrainHParams:
    """Hyper-parameters of the update step (static under jit). Defaults as the issue / release."""

    objective: str = "grpo"
    # GRPO
    clip_eps: float = 0.2
    beta: float = 0.1
    kl_sigma: float = 1.0
    ratio: str = "gaussian"         # gaussian (sampled group) | l1 (the paper's formula)
    exploration_std: float = 0.05   # sigma of the "gaussian" policy's sampled actions
    group_size: int = 4             # G sampled fusions per pair ("gaussian")
    antithetic: bool = True         # mirrored noise pairs within the group (G even)
    advantage_group: str = "samples"  # samples | regions | all (grpo.sampled_group_advantages)
    noise_seed: int = 0
    ratio_alpha: float = 1.0
    ratio_eps: float = 1e-6
    adv_eps: float = 1e-6
    old_policy_interval: int = 1
    whole_image_region: bool = False
    # DPO / PPO (policy-optimisation ablations; the Gaussian policy and group as above)
    dpo_preference: str = "region"    # region | image: the unit of a preference pair
    ppo_baseline_momentum: float = 0.9  # EMA of the reward mean / variance (PPO's baseline)
    # auxiliary losses in GRPO (0 = off)
    grpo_fusion_weight: float = 0.0
    grpo_decomp_weight: float = 0.0
    grpo_pseudo_weight: float = 0.0
    # direct / fusion (released weights)
    reward_loss_weight: float = 0.5
    fusion_loss_weight: float = 1.0
    decomp_loss_weight: float = 2.0
    pseudo_fusion_weight: float = 100.0
    pseudo_fusion_mode: str = "max"
    fusion_grad_weight: float = 10.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.ratio not in ("l1", "gaussian"):
            raise ValueError(f"ratio must be 'l1' or 'gaussian', got {self.ratio!r}")
        sampled = self.objective in SAMPLED_OBJECTIVES
        if self.ratio == "gaussian" or sampled:
            if not self.exploration_std > 0:
                raise ValueError(f"exploration_std must be > 0, got {self.exploration_std}")
            if self.group_size < 1:
                raise ValueError(f"group_size must be >= 1, got {self.group_size}")
            if self.antithetic and self.group_size % 2:
                raise ValueError(f"antithetic sampling needs an even group_size, got "
                                 f"{self.group_size}; use an even size or antithetic=False")
            if self.advantage_group not in grpo.ADVANTAGE_GROUPS:
                raise ValueError(f"advantage_group must be one of {grpo.ADVANTAGE_GROUPS}, "
                                 f"got {self.advantage_group!r}")
            if (self.objective == "grpo" and self.advantage_group == "samples"
                    and self.group_size < 2):
                raise ValueError("advantage_group='samples' compares the samples of a pair and "
                                 "needs group_size >= 2")
        if self.objective == "dpo" and self.group_size < 2:
            raise ValueError(f"objective 'dpo' compares the best and the worst of a pair's "
                             f"sampled fusions and needs group_size >= 2, got {self.group_size}")
        if self.dpo_preference not in PREFERENCE_UNITS:
            raise ValueError(f"dpo_preference must be one of {PREFERENCE_UNITS}, "
                             f"got {self.dpo_preference!r}")
        if not 0.0 <= self.ppo_baseline_momentum < 1.0:
            raise ValueError(f"ppo_baseline_momentum must be in [0, 1), "
                             f"got {self.ppo_baseline_momentum}")
        if self.old_policy_interval < 1:
            raise ValueError(f"old_policy_interval must be >= 1, got {self.old_policy_interval}")
        if not self.kl_sigma > 0:
            raise ValueError(f"kl_sigma must be > 0, got {self.kl_sigma}")
        if self.pseudo_fusion_mode not in fusion_losses.PSEUDO_FUSION_MODES:
            raise ValueError(f"pseudo_fusion_mode must be one of "
                             f"{fusion_losses.PSEUDO_FUSION_MODES}, got {self.pseudo_fusion_mode!r}")

    @classmethod
    def from_config(cls, cfg: Mapping) -> "TrainHParams":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: cfg[k] for k in names if k in cfg})


def make_optimizer(learning_rate: float = 1e-4, total_steps: int = 1000,
                   end_learning_rate: float = 1e-6, weight_decay: float = 0.01,
                   warmup_steps: int = 0, grad_clip_norm: float = 0.0):
    """AdamW (:func:`evafusion_jax.train.optimizer.adamw`) with cosine decay from
    ``learning_rate`` to ``end_learning_rate`` over ``total_steps`` (after ``warmup_steps``).

    Returns (optax transformation, schedule).
    """
    total_steps = max(int(total_steps), 1)
    alpha = end_learning_rate / learning_rate if learning_rate > 0 else 0.0
    if warmup_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1),
            end_value=end_learning_rate)
    else:
        schedule = optax.cosine_decay_schedule(learning_rate, total_steps, alpha=alpha)
    return optim.adamw(schedule, weight_decay, grad_clip_norm), schedule


def create_train_state(params: Any, tx: optax.GradientTransformation,
                       ref_params: Any = None, objective: str | None = None) -> dict:
    """The initial train state: theta_old and theta_ref are copies of ``params`` (or ``ref_params``).

    ``objective="ppo"`` adds PPO's running reward baseline (``"baseline"``,
    :func:`grpo.init_running_baseline`); other objectives have no extra state.
    """
    copy = lambda t: jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), t)  # noqa: E731
    params = copy(params)
    state = {"params": params, "opt_state": tx.init(params), "old_params": copy(params),
             "ref_params": copy(params if ref_params is None else ref_params),
             "step": jnp.zeros((), jnp.int32)}
    if objective == "ppo":
        state["baseline"] = grpo.init_running_baseline()
    return state


def with_whole_image(masks: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Appends the whole image as one more (valid) region: (B, K+1, H, W), (B, K+1)."""
    ones = jnp.ones(masks.shape[:1] + (1,) + masks.shape[2:], masks.dtype)
    return (jnp.concatenate([masks, ones], axis=1),
            jnp.concatenate([valid, jnp.ones(valid.shape[:1] + (1,), bool)], axis=1))


def _num_shards(axis_name):
    return jax.lax.psum(1, axis_name) if axis_name else 1


def _psum(x, axis_name):
    return jax.lax.psum(x, axis_name) if axis_name else x


def _aux_losses(feats, ir, vi, hp: TrainHParams, w_fusion, w_decomp, w_pseudo) -> dict:
    fused = feats["fused"]
    out = {}
    if w_fusion:
        total, l_in, l_grad = fusion_losses.fusion_loss(vi, ir, fused, hp.fusion_grad_weight)
        out["fusion_loss"] = (w_fusion, total)
        out["fusion_intensity"] = (0.0, l_in)
        out["fusion_gradient"] = (0.0, l_grad)
    if w_decomp:
        out["decomp_loss"] = (w_decomp, fusion_losses.decomposition_loss(
            feats["vi_base"], feats["ir_base"], feats["vi_detail"], feats["ir_detail"]))
    if w_pseudo:
        out["pseudo_fusion_loss"] = (w_pseudo, fusion_losses.pseudo_fusion_loss(
            fused, ir, vi, hp.pseudo_fusion_mode))
    return out


def _sample_noise(step, seed, shape, axis_name):
    """N(0, 1) noise (B, H, W, C) for this shard; sample i of the global batch always gets the
    same noise (keyed by seed, step and global index), whatever the number of shards."""
    b = shape[0]
    first = (jax.lax.axis_index(axis_name) * b) if axis_name else 0
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(b))
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)


def _trees_equal(a, b) -> jax.Array:
    leaves = [jnp.all(x == y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                              jax.tree_util.tree_leaves(b))]
    return jnp.all(jnp.stack(leaves))


def _frozen_forward(params, fused, other, ir, vi, model_config):
    """F of the frozen parameters ``other`` (no gradient).

    When ``other`` equals ``params`` exactly, returns ``fused`` itself: a second
    forward pass would differ from it by float round-off (different fusion inside
    XLA), which would give the L1 ratio a spurious sign gradient.
    """
    f = dcevo.apply_model(jax.lax.stop_gradient(other), ir, vi, model_config)["fused"]
    return jax.lax.stop_gradient(jnp.where(_trees_equal(params, other), fused, f))


def loss_fn(params: Any, state: Mapping, reward_params: Any, batch: Mapping, *,
            hp: TrainHParams, model_config: dcevo.DCEvoConfig, reward_fn: RewardFn | None = None,
            axis_name: str | None = None):
    """This shard's loss (scaled so that psum over shards = global loss) and metrics.

    Metrics come back as (value, reduction) pairs with reduction "sum" (already
    divided by the global count, so summing over shards gives the global value),
    "mean" (average over shards), "min" or "max".
    """
    ir, vi = batch["ir"], batch["vi"]
    n_shards = _num_shards(axis_name)
    feats = dcevo.apply_model(params, ir, vi, model_config)
    fused = feats["fused"]
    metrics: dict[str, tuple[jax.Array, str]] = {}
    loss = 0.0

    if hp.objective == "grpo":
        masks, valid = batch["masks"].astype(jnp.float32), batch["valid"].astype(bool)
        if hp.whole_image_region:
            masks, valid = with_whole_image(masks, valid)
        fused_old = _frozen_forward(params, fused, state["old_params"], ir, vi, model_config)
        fused_ref = _frozen_forward(params, fused, state["ref_params"], ir, vi, model_config)
        if hp.ratio == "gaussian":
            # A group of G sampled fusions a_g ~ N(F_old, sigma^2) per pair; every region of
            # every sample is scored; per-region likelihood ratios (grpo.gaussian_region_ratios).
            b = fused.shape[0]
            noise = _sample_noise(state["step"], hp.noise_seed,
                                  (b, hp.group_size) + fused.shape[1:], axis_name)
            actions = grpo.sample_actions(fused_old, noise, hp.exploration_std, hp.antithetic)
            # base: the deterministic F_old, into which "composite" region rewards paste region k
            rewards, terms = reward_fn.sample_regions(reward_params, actions, ir, vi, masks,
                                                      base=fused_old)
            ratios = grpo.gaussian_region_ratios(fused, fused_old, actions, masks,
                                                 hp.exploration_std)  # (B, G, K)
            adv = grpo.sampled_group_advantages(rewards, valid, hp.advantage_group, hp.adv_eps)
            entries = jnp.broadcast_to(valid[:, None, :], rewards.shape)  # (B, G, K)
        else:
            rewards, terms = reward_fn.regions(reward_params, fused, ir, vi, masks)
            ratios = grpo.region_ratios(fused, fused_old, masks, hp.ratio_alpha, hp.ratio_eps)
            adv = grpo.group_advantages(rewards, valid, hp.adv_eps)
            entries = valid  # (B, K)
        obj, clipped = grpo.clipped_surrogate_terms(ratios, adv, entries, hp.clip_eps)
        n_global = jnp.maximum(_psum(jnp.sum(entries.astype(jnp.float32)), axis_name), 1.0)
        surrogate = jnp.sum(obj) / n_global
        kl = grpo.gaussian_kl(fused, fused_ref, hp.kl_sigma)
        loss = -surrogate + hp.beta * kl / n_shards
        gsum = lambda x: jnp.sum(jnp.where(entries, x, 0.0)) / n_global  # noqa: E731
        metrics["reward"] = (gsum(rewards), "sum")
        for name, t in terms.items():
            metrics[f"reward/{name}"] = (gsum(t), "sum")
        metrics["surrogate"] = (surrogate, "sum")
        metrics["kl"] = (kl, "mean")
        metrics["clip_fraction"] = (jnp.sum(clipped) / n_global, "sum")
        metrics["ratio_mean"] = (gsum(ratios), "sum")
        metrics["ratio_max"] = (jnp.max(jnp.where(entries, ratios, 1.0)), "max")
        metrics["adv_mean"] = (gsum(adv), "sum")
        metrics["adv_sq"] = (gsum(adv * adv), "sum")
        big = jnp.float32(3.0e38)
        metrics["adv_min"] = (jnp.min(jnp.where(entries, adv, big)), "min")
        metrics["adv_max"] = (jnp.max(jnp.where(entries, adv, -big)), "max")
        metrics["regions_per_image"] = (jnp.mean(jnp.sum(valid.astype(jnp.float32), axis=-1)),
                                        "mean")
        aux = _aux_losses(feats, ir, vi, hp, hp.grpo_fusion_weight, hp.grpo_decomp_weight,
                          hp.grpo_pseudo_weight)
    elif hp.objective in SAMPLED_OBJECTIVES:
        loss, aux = _sampled_objective_loss(params, fused, feats, state, reward_params, batch,
                                            hp, model_config, reward_fn, axis_name, metrics)
    elif hp.objective == "direct":
        reward, terms = reward_fn.image(reward_params, fused, ir, vi)
        reward_mean = jnp.mean(reward)
        loss = -hp.reward_loss_weight * reward_mean / n_shards
        metrics["reward"] = (reward_mean, "mean")
        for name, t in terms.items():
            metrics[f"reward/{name}"] = (jnp.mean(t), "mean")
        aux = _aux_losses(feats, ir, vi, hp, hp.fusion_loss_weight, hp.decomp_loss_weight,
                          hp.pseudo_fusion_weight)
    else:  # fusion
        aux = _aux_losses(feats, ir, vi, hp, hp.fusion_loss_weight, hp.decomp_loss_weight, 0.0)

    for name, (w, value) in aux.items():
        loss = loss + w * value / n_shards
        metrics[name] = (value, "mean")
    metrics["fused_mean"] = (jnp.mean(fused), "mean")
    return loss, metrics


def _sampled_objective_loss(params, fused, feats, state, reward_params, batch, hp, model_config,
                            reward_fn: RewardFn, axis_name, metrics):
    """The ``dpo`` / ``ppo`` loss of this shard (see the module docstring); fills ``metrics``."""
    ir, vi = batch["ir"], batch["vi"]
    n_shards = _num_shards(axis_name)
    sigma = hp.exploration_std
    fused_old = _frozen_forward(params, fused, state["old_params"], ir, vi, model_config)
    fused_ref = _frozen_forward(params, fused, state["ref_params"], ir, vi, model_config)
    b = fused.shape[0]
    noise = _sample_noise(state["step"], hp.noise_seed, (b, hp.group_size) + fused.shape[1:],
                          axis_name)
    actions = grpo.sample_actions(fused_old, noise, sigma, hp.antithetic)  # (B, G, H, W, C)
    if hp.objective == "dpo" and hp.dpo_preference == "region":
        masks, valid = batch["masks"].astype(jnp.float32), batch["valid"].astype(bool)
        if hp.whole_image_region:
            masks, valid = with_whole_image(masks, valid)
    else:  # whole-image units: one all-ones "region"
        masks = jnp.ones((b, 1) + fused.shape[1:3], jnp.float32)
        valid = jnp.ones((b, 1), bool)
    rewards, terms = reward_fn.sample_regions(reward_params, actions, ir, vi, masks)  # (B, G, K)
    entries = jnp.broadcast_to(valid[:, None, :], rewards.shape)
    n_entries = jnp.maximum(_psum(jnp.sum(entries.astype(jnp.float32)), axis_name), 1.0)
    gsum = lambda x: jnp.sum(jnp.where(entries, x, 0.0)) / n_entries  # noqa: E731
    kl = grpo.gaussian_kl(fused, fused_ref, hp.kl_sigma)
    metrics["reward"] = (gsum(rewards), "sum")
    for name, t in terms.items():
        metrics[f"reward/{name}"] = (gsum(t), "sum")
    metrics["kl"] = (kl, "mean")
    if hp.objective == "dpo":
        logp = grpo.gaussian_region_logp(fused, actions, masks, sigma)
        logp_ref = grpo.gaussian_region_logp(fused_ref, actions, masks, sigma)
        win, lose, has_pair = grpo.preference_pairs(rewards, valid)
        per_pair, margin, acc = grpo.dpo_loss_terms(logp, logp_ref, win, lose, has_pair, hp.beta)
        n_pairs = jnp.maximum(_psum(jnp.sum(has_pair.astype(jnp.float32)), axis_name), 1.0)
        loss = jnp.sum(per_pair) / n_pairs
        n_units = jnp.maximum(_psum(jnp.sum(valid.astype(jnp.float32)), axis_name), 1.0)
        r = jax.lax.stop_gradient(rewards)
        gap = jnp.where(has_pair, jnp.max(r, axis=1) - jnp.min(r, axis=1), 0.0)
        metrics["dpo_loss"] = (loss, "sum")
        metrics["dpo_margin"] = (jnp.sum(margin) / n_pairs, "sum")
        metrics["dpo_accuracy"] = (jnp.sum(acc) / n_pairs, "sum")
        metrics["preference_gap"] = (jnp.sum(gap) / n_pairs, "sum")
        metrics["pairs_fraction"] = (jnp.sum(has_pair.astype(jnp.float32)) / n_units, "sum")
    else:  # ppo
        if "baseline" not in state:
            raise ValueError("objective 'ppo' keeps a running reward baseline in the train state: "
                             "create it with create_train_state(..., objective='ppo')")
        s = rewards[..., 0]  # (B, G) whole-image rewards
        batch_mean = _psum(jnp.sum(s), axis_name) / n_entries
        # two passes (not E[s^2] - E[s]^2, which cancels catastrophically in float32)
        batch_var = _psum(jnp.sum((s - batch_mean) ** 2), axis_name) / n_entries
        adv = grpo.running_baseline_advantages(s, state["baseline"], batch_mean, batch_var,
                                               hp.adv_eps)
        ratios = grpo.gaussian_region_ratios(fused, fused_old, actions, masks, sigma)[..., 0]
        ones = jnp.ones(s.shape, bool)
        obj, clipped = grpo.clipped_surrogate_terms(ratios, adv, ones, hp.clip_eps)
        surrogate = jnp.sum(obj) / n_entries
        loss = -surrogate + hp.beta * kl / n_shards
        metrics["surrogate"] = (surrogate, "sum")
        metrics["clip_fraction"] = (jnp.sum(clipped) / n_entries, "sum")
        metrics["ratio_mean"] = (jnp.sum(ratios) / n_entries, "sum")
        metrics["ratio_max"] = (jnp.max(ratios), "max")
        metrics["adv_mean"] = (jnp.sum(adv) / n_entries, "sum")
        metrics["adv_sq"] = (jnp.sum(adv * adv) / n_entries, "sum")
        metrics["baseline"] = (jnp.where(state["baseline"]["count"] == 0, batch_mean,
                                         state["baseline"]["mean"]), "max")
        # the global batch statistics (identical on every shard) update the running baseline
        metrics["reward_batch_mean"] = (batch_mean, "max")
        metrics["reward_batch_var"] = (batch_var, "max")
    aux = _aux_losses(feats, ir, vi, hp, hp.grpo_fusion_weight, hp.grpo_decomp_weight,
                      hp.grpo_pseudo_weight)
    return loss, aux


def _reduce_metrics(metrics, axis_name):
    out = {}
    for k, (v, how) in metrics.items():
        v = jnp.asarray(v, jnp.float32)
        if axis_name:
            v = {"sum": jax.lax.psum, "mean": jax.lax.pmean, "min": jax.lax.pmin,
                 "max": jax.lax.pmax}[how](v, axis_name)
        out[k] = v
    if "adv_sq" in out:
        out["adv_std"] = jnp.sqrt(jnp.maximum(out.pop("adv_sq") - out["adv_mean"] ** 2, 0.0))
    return out


def train_step(state: dict, reward_params: Any, batch: Mapping, *, hp: TrainHParams,
               model_config: dcevo.DCEvoConfig, tx: optax.GradientTransformation,
               reward_fn: RewardFn | None = None, schedule: Callable | None = None,
               axis_name: str | None = None):
    """One update (per shard when ``axis_name`` is set); returns (new state, metrics)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state["params"], state, reward_params, batch, hp=hp,
                                     model_config=model_config, reward_fn=reward_fn,
                                     axis_name=axis_name)
    if axis_name:
        grads = jax.lax.psum(grads, axis_name)
        loss = jax.lax.psum(loss, axis_name)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    step = state["step"]
    refresh = (step + 1) % hp.old_policy_interval == 0
    old = jax.tree_util.tree_map(lambda o, p: jnp.where(refresh, p, o),
                                 state["old_params"], state["params"])
    metrics = _reduce_metrics(metrics, axis_name)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(step), jnp.float32)
    new_state = {"params": new_params, "opt_state": opt_state, "old_params": old,
                 "ref_params": state["ref_params"], "step": step + 1}
    if "baseline" in state:  # ppo: the running reward baseline, from the global batch statistics
        new_state["baseline"] = grpo.update_running_baseline(
            state["baseline"], metrics.pop("reward_batch_mean"), metrics.pop("reward_batch_var"),
            hp.ppo_baseline_momentum)
    return new_state, metrics


def make_train_step(hp: TrainHParams, model_config: dcevo.DCEvoConfig,
                    tx: optax.GradientTransformation, reward_fn: RewardFn | None = None,
                    mesh=None, schedule: Callable | None = None):
    """The jitted data-parallel step ``step(state, reward_params, batch) -> (state, metrics)``.

    ``state`` and ``reward_params`` should be replicated on ``mesh``
    (:func:`parallel.replicate`) and ``batch`` sharded (:func:`parallel.shard_batch`);
    the global batch size must be a multiple of the number of devices. ``reward_fn`` is
    needed by "grpo" and "direct" (see :mod:`evafusion_jax.rl.rewards`).
    """
    if hp.objective in REWARD_OBJECTIVES and reward_fn is None:
        raise ValueError(f"objective {hp.objective!r} needs a reward function")
    mesh = parallel.data_mesh() if mesh is None else mesh

    def per_shard(state, reward_params, batch):
        return train_step(state, reward_params, batch, hp=hp, model_config=model_config, tx=tx,
                          reward_fn=reward_fn, schedule=schedule, axis_name=AXIS)

    return parallel.data_parallel(per_shard, mesh, batch_argnums=(2,), check_vma=False)


def make_eval_fn(model_config: dcevo.DCEvoConfig, reward_fn: RewardFn | None = None, mesh=None):
    """Jitted ``fn(params, reward_params, batch) -> {"fused", "reward" (B,K)}`` (not sharded)."""
    def fn(params, reward_params, batch):
        fused = dcevo.apply_model(params, batch["ir"], batch["vi"], model_config)["fused"]
        out = {"fused": fused}
        if reward_fn is not None and "masks" in batch:
            out["reward"] = reward_fn.regions(reward_params, fused, batch["ir"], batch["vi"],
                                              batch["masks"].astype(jnp.float32))[0]
        return out
    return jax.jit(fn)
