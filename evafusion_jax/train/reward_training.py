"""Reward-model training as pure functions: parameter split, optimizer, loss, steps.

Facts taken from the released ``RichHF/train.py``:

* The backbone ViT and the mixing ViT (``vit_fusion``, randomly initialised in
  the release) are frozen; only ``projection``, ``heatmap_predictor`` and
  ``score_predictor`` learn. ``train_mixer=True`` also trains ``vit_fusion``;
  ``train_backbone=True`` (not in the release: for a randomly initialised
  backbone, e.g. the demo's) also trains the backbone ``vit`` (no feature cache then).
* AdamW (betas 0.9/0.999, eps 1e-8, weight decay 2e-3 on every trained
  parameter), learning rate from 2e-5 to 1e-5 by ``CosineAnnealingLR(T_max=
  num_epochs, eta_min=min_lr)`` stepped once per epoch with ``step(epoch)``
  *after* that epoch, so epoch ``e`` trains with ``cos_lr(max(e - 1, 0))``
  (``schedule="released"``); ``schedule="cosine"`` is a smooth per-step cosine
  over the whole run instead.
* loss = score_weight * sum over the five scores of MSE(pred, score/5)
  + heatmap_weight * MSE(pred heatmap, heatmap), means over the batch (and
  pixels); both weights 1.

Trained parameters are split from frozen ones (:func:`split_params`): the
optimizer only ever sees the trained subtree, so frozen parameters have no
optimizer state at all, and the step receives the frozen subtree as a constant.

The feature cache of the frozen backbone's tokens is in ``train/feature_cache.py``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from evafusion_jax.models import reward_model as rm
from evafusion_jax.train import optimizer as optim
from evafusion_jax.train import parallel as par

logger = logging.getLogger(__name__)

TRAINED_KEYS = ("projection", "heatmap_predictor", "score_predictor")
MIXER_KEY = "vit_fusion"
BACKBONE_KEY = "vit"


# ----------------------------------------------------------------------------- params / optimizer

def trained_keys(train_mixer: bool = False, train_backbone: bool = False) -> tuple[str, ...]:
    return (TRAINED_KEYS + ((MIXER_KEY,) if train_mixer else ())
            + ((BACKBONE_KEY,) if train_backbone else ()))


def split_params(params: Mapping[str, Any], train_mixer: bool = False,
                 train_backbone: bool = False) -> tuple[dict, dict]:
    """``(trained, frozen)`` top-level subtrees of a reward-model parameter tree."""
    keys = trained_keys(train_mixer, train_backbone)
    missing = [k for k in (BACKBONE_KEY, MIXER_KEY) + TRAINED_KEYS if k not in params]
    if missing:
        raise ValueError(f"reward-model params lack the top-level key(s) {missing}; "
                         f"got {sorted(params)}")
    trained = {k: params[k] for k in keys}
    frozen = {k: v for k, v in params.items() if k not in keys}
    return trained, frozen


def merge_params(trained: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    return {**frozen, **trained}


def released_epoch_lr(epoch: int | jax.Array, init_lr: float, min_lr: float, num_epochs: int):
    """The learning rate of (0-based) ``epoch`` in the released script (see module doc)."""
    e = jnp.maximum(jnp.asarray(epoch, jnp.float32) - 1.0, 0.0)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * e / max(num_epochs, 1)))


def make_schedule(init_lr: float, min_lr: float, num_epochs: int, steps_per_epoch: int,
                  schedule: str = "released") -> optax.Schedule:
    """Learning-rate schedule as a function of the optimizer step."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if schedule == "released":
        def fn(count):
            return released_epoch_lr(count // steps_per_epoch, init_lr, min_lr, num_epochs)
        return fn
    if schedule == "cosine":
        total = max(num_epochs * steps_per_epoch, 1)
        return optax.cosine_decay_schedule(init_lr, total, alpha=min_lr / init_lr if init_lr else 0.0)
    if schedule == "constant":
        return optax.constant_schedule(init_lr)
    raise ValueError(f"schedule must be 'released', 'cosine' or 'constant', got {schedule!r}")


def make_optimizer(init_lr: float = 2e-5, min_lr: float = 1e-5, num_epochs: int = 30,
                   steps_per_epoch: int = 1, weight_decay: float = 2e-3,
                   schedule: str = "released", grad_clip_norm: float = 0.0
                   ) -> optax.GradientTransformation:
    """AdamW as released (:func:`evafusion_jax.train.optimizer.adamw`) on :func:`make_schedule`."""
    return optim.adamw(make_schedule(init_lr, min_lr, num_epochs, steps_per_epoch, schedule),
                           weight_decay, grad_clip_norm)


def init_train_state(trained: Any, optimizer: optax.GradientTransformation) -> dict:
    """``{"params": trained, "opt_state": ..., "step": int32 0}``."""
    return {"params": trained, "opt_state": optimizer.init(trained),
            "step": jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------- loss / steps

def batch_tokens(params: Mapping[str, Any], batch: Mapping[str, Any], config: rm.RewardConfig,
                 train_backbone: bool = False):
    """(tokens_ir, tokens_vi, tokens_fused) of a batch: cached tokens, or encoded pixels.

    The backbone gets no gradient unless ``train_backbone``."""
    if "tok_fused" in batch:
        return tuple(jnp.asarray(batch[k], jnp.float32) for k in ("tok_ir", "tok_vi", "tok_fused"))
    sg = (lambda x: x) if train_backbone else jax.lax.stop_gradient
    vit = sg(params[BACKBONE_KEY])
    b = batch["fused"].shape[0]
    pix = jnp.concatenate([batch["ir"], batch["vi"], batch["fused"]], axis=0)
    tok = sg(rm.encode({BACKBONE_KEY: vit}, pix, config))
    return tok[:b], tok[b:2 * b], tok[2 * b:]


def forward(params: Mapping[str, Any], batch: Mapping[str, Any], config: rm.RewardConfig,
            train_backbone: bool = False) -> dict:
    """Reward-model outputs for a batch (cached tokens or pixel values)."""
    t_ir, t_vi, t_fu = batch_tokens(params, batch, config, train_backbone)
    return rm.head(params, t_ir, t_vi, t_fu, config)


def loss_terms(outputs: Mapping[str, Any], batch: Mapping[str, Any], config: rm.RewardConfig,
               score_weight: float = 1.0, heatmap_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """The released loss and its parts (batch means; see module doc)."""
    target = jnp.asarray(batch["scores"], jnp.float32)
    terms = {}
    total = jnp.zeros((), jnp.float32)
    for i, name in enumerate(config.score_types):
        pred = jnp.reshape(outputs["scores"][name], (-1,)).astype(jnp.float32)
        terms[f"loss/{name}"] = jnp.mean((pred - target[:, i]) ** 2)
        total = total + score_weight * terms[f"loss/{name}"]
    gt = jnp.asarray(batch["heatmap"], jnp.float32)
    for name in config.heatmap_types:
        pred = outputs["heatmaps"][name].astype(jnp.float32)
        terms[f"loss/{name}"] = jnp.mean((pred - gt) ** 2)
        total = total + heatmap_weight * terms[f"loss/{name}"]
    terms["loss"] = total
    return total, terms


def make_train_step(config: rm.RewardConfig, optimizer: optax.GradientTransformation,
                    mesh, *, score_weight: float = 1.0, heatmap_weight: float = 1.0,
                    debug_nan_at_step: int = -1, donate: bool = False,
                    train_backbone: bool = False) -> Callable:
    """Jitted data-parallel step ``(state, frozen, batch) -> (state, metrics)``.

    ``state`` from :func:`init_train_state` (replicated), ``frozen`` the frozen
    parameters (replicated), ``batch`` sharded over the mesh's ``"data"`` axis
    (:func:`parallel.shard_batch`). Gradients, loss and metrics are averaged
    over the shards, so the result equals the single-device step on the same
    global batch. ``debug_nan_at_step`` (>= 0) makes the loss NaN at that step
    (0-based), for testing the NaN guard.
    """

    def step(state, frozen, batch):
        def loss_fn(trained):
            out = forward(merge_params(trained, frozen), batch, config, train_backbone)
            return loss_terms(out, batch, config, score_weight, heatmap_weight)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        if debug_nan_at_step >= 0:
            bad = state["step"] == debug_nan_at_step
            loss = jnp.where(bad, jnp.nan, loss)
            terms["loss"] = loss
            grads = jax.tree_util.tree_map(lambda g: jnp.where(bad, jnp.nan, g), grads)
        grads = jax.lax.pmean(grads, par.DATA_AXIS)
        terms = jax.lax.pmean(terms, par.DATA_AXIS)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        terms["grad_norm"] = optax.tree.norm(grads)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, terms

    return par.data_parallel(step, mesh, batch_argnums=(2,), donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=8)
def make_predict_fn(config: rm.RewardConfig, mesh) -> Callable:
    """Jitted data-parallel ``(params, batch) -> {"scores": (B, 5), "heatmaps": (B, S, S)}``.

    Cached per (config, mesh), so that evaluating after every epoch compiles once.

    Per-example outputs stay sharded over ``"data"``; ``heatmaps`` is the first
    heatmap type (the release has one). The batch size must be a multiple of
    the mesh size (:func:`pad_batch`).
    """

    def predict(params, batch):
        out = forward(params, batch, config)
        return {"scores": rm.stack_scores(out["scores"], config).astype(jnp.float32),
                "heatmaps": out["heatmaps"][config.heatmap_types[0]].astype(jnp.float32)}

    return par.data_parallel(predict, mesh, batch_argnums=(1,), out_specs=P(par.DATA_AXIS))


def pad_batch(batch: Mapping[str, np.ndarray], multiple: int) -> tuple[dict, int]:
    """Pads every leaf's first axis (repeating the last row) to a multiple; returns (batch, n)."""
    n = len(next(iter(batch.values())))
    pad = (-n) % multiple
    if not pad:
        return dict(batch), n
    return {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)], axis=0)
            for k, v in batch.items()}, n


def evaluate_batches(predict_fn: Callable, params: Any, batches: Iterable[Mapping[str, Any]],
                     mesh, config: rm.RewardConfig, *, score_weight: float = 1.0,
                     heatmap_weight: float = 1.0, seed: int = 0,
                     progress: Callable | None = None) -> dict[str, float]:
    """The released validation metrics of ``params`` over ``batches``, streamed.

    Uses ``reward_metrics.MetricAccumulator`` (PLCC/SRCC per score; heatmap MSE
    on empty ground truths, NSS/CC/similarity/KLD/AUC-Judd on the others;
    ``avg_metric``) and adds ``loss/val`` = the training loss over the set.
    Batches may have any size (padded to the mesh size here).
    """
    from evafusion_jax.eval import reward_metrics

    acc = reward_metrics.MetricAccumulator(seed=seed)
    n_dev = mesh.devices.size
    it = progress(batches) if progress else batches
    for batch in it:
        batch = {k: np.asarray(v) for k, v in batch.items() if k not in ("name", "heatmap_empty",
                                                                        "index")}
        padded, n = pad_batch(batch, n_dev)
        out = jax.device_get(predict_fn(params, par.shard_batch(padded, mesh)))
        acc.add(np.asarray(out["scores"])[:n], batch["scores"][:n],
                np.asarray(out["heatmaps"])[:n], batch["heatmap"][:n])
    metrics = acc.result()
    total = sum(score_weight * metrics[f"loss/{t}"] for t in config.score_types)
    total += heatmap_weight * metrics[f"loss/{config.heatmap_types[0]}"]
    metrics["loss/val"] = float(total)
    return {k: float(v) for k, v in metrics.items()}
