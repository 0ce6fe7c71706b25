"""Fine-tune DCEvo against the reward model: ``python -m evafusion_jax.train_grpo``.

    python -m evafusion_jax.train_grpo --config configs/grpo.py \
        --config.data.data_dir=DATA --config.data.cache_dir=REGIONS \
        --config.dcevo_checkpoint=ckpt/dcevo --config.reward_checkpoint=ckpt/reward \
        --config.workdir=runs/grpo [--config.objective=grpo|direct|fusion|dpo|ppo]

Writes under ``workdir``: ``checkpoints/`` (Orbax: policy params, optimizer state,
theta_old, theta_ref, step, data iterator; the run resumes from the latest one when
started again with the same workdir), ``logs/`` (metrics.jsonl + TensorBoard: mean
reward, per-term rewards, KL, clip fraction, advantage statistics, losses, F
before/after images), ``dcevo_final/`` (Orbax model checkpoint, kind "dcevo",
readable by ``fuse``) and, with ``export_pth``, the released ``.pth`` layout.

Multi-GPU: every local device is used (data parallel over the ``data`` mesh axis);
``data.batch_size`` is the GLOBAL batch and must be a multiple of the device count.
Multi-host: start one process per host with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set (or under SLURM / Open MPI); each
host reads its shard of the pairs. The training loop (checkpoints, resume, the NaN/inf policy,
logs, multi-host start-up, workdir lock) is :mod:`evafusion_jax.train.loop`, shared with
``train_reward``: a NaN/inf loss or state stops the run without saving (exit code 3; the last
checkpoint on disk is the last good one); a second run on a workdir in use refuses (exit code 4).
Exit codes: ``evafusion_jax.cli``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from evafusion_jax.config import ConfigError
from evafusion_jax.data import grpo_pairs
from evafusion_jax.models import dcevo
from evafusion_jax.rl import grpo, rewards
from evafusion_jax.storage import checkpoints
from evafusion_jax.train import grpo_training as gt
from evafusion_jax.train import loop as train_loop
from evafusion_jax.train import parallel

log = logging.getLogger(__name__)


def _validate(cfg) -> None:
    if cfg.objective not in gt.OBJECTIVES:
        raise ConfigError(f"config field objective={cfg.objective!r}; use one of {gt.OBJECTIVES}")
    if cfg.objective in gt.REWARD_OBJECTIVES and cfg.reward_kind == "model" and not cfg.reward_checkpoint:
        raise ConfigError(f"objective {cfg.objective!r} with reward_kind='model' needs "
                          "--config.reward_checkpoint=<reward checkpoint folder> (convert the released "
                          "model with python -m evafusion_jax.convert.reward_from_torch, or train one with "
                          "train_reward); or use --config.reward_kind=contrast for a smoke test")
    if cfg.reward_kind not in ("model", "contrast"):
        raise ConfigError(f"config field reward_kind={cfg.reward_kind!r}; use 'model' or 'contrast'")
    if cfg.reward_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config field reward_dtype={cfg.reward_dtype!r}; use float32 or bfloat16")
    if not cfg.data.data_dir:
        raise ConfigError("config field data.data_dir is empty: set it to a folder with ir/ and vi/")
    if not cfg.workdir:
        raise ConfigError("config field workdir is empty")
    if (cfg.objective == "grpo" and cfg.ratio == "l1" and cfg.weight_decay == 0
            and not (cfg.grpo_fusion_weight or cfg.grpo_decomp_weight or cfg.grpo_pseudo_weight)):
        log.warning("objective=grpo with ratio=l1, weight_decay=0 and no auxiliary loss never moves: "
                    "theta_old starts equal to theta, where the l1 ratio has zero gradient, so the "
                    "first update is zero and theta_old stays equal. Set weight_decay > 0, an auxiliary "
                    "grpo_*_weight, or ratio=gaussian.")


def load_policy(cfg) -> tuple[Any, dcevo.DCEvoConfig]:
    """DCEvo params + config: from ``dcevo_checkpoint`` or randomly initialised (``seed``)."""
    if cfg.dcevo_checkpoint:
        params, cdict = checkpoints.load_params(cfg.dcevo_checkpoint, expected_kind="dcevo")
        mcfg = dcevo.DCEvoConfig.from_dict(cdict)
        keep = {k: cfg.dcevo[k] for k in ("dtype", "precision") if k in cfg.dcevo}
        mcfg = dcevo.DCEvoConfig.from_dict({**mcfg.to_dict(), **keep})
        return params, mcfg
    mcfg = dcevo.DCEvoConfig.from_dict(dict(cfg.dcevo))
    return dcevo.init_params(mcfg, jax.random.PRNGKey(int(cfg.seed))), mcfg


def load_reward(cfg):
    """(reward_fn, reward_params) from the config."""
    weights = grpo.RewardWeights.from_dict(dict(cfg.weights))
    if cfg.objective == "fusion":
        return None, {}
    if cfg.reward_kind == "contrast":
        return rewards.ContrastReward(), {}
    from evafusion_jax.models import reward_model
    region_mode = str(cfg.get("region_reward", "masked"))
    if region_mode not in rewards.REGION_MODES:
        raise ConfigError(f"config.region_reward must be one of {rewards.REGION_MODES}, "
                          f"got {region_mode!r}")
    if region_mode == "composite" and cfg.objective == "grpo" and cfg.get("ratio") == "l1":
        raise ConfigError("config.region_reward=composite pastes regions of SAMPLED fusions into "
                          "the deterministic one; with ratio=l1 there are no samples and every "
                          "region would get the same reward: use ratio=gaussian or "
                          "region_reward=masked")
    params, cdict = checkpoints.load_params(cfg.reward_checkpoint, expected_kind="reward")
    rcfg = reward_model.RewardConfig.from_dict(cdict)
    fn = rewards.ModelReward(rcfg, weights, dtype=cfg.reward_dtype,
                                released_preprocessing_bug=bool(cfg.released_preprocessing_bug),
                                region_mode=region_mode)
    if cfg.reward_dtype == "bfloat16":
        import jax.numpy as jnp
        params = jax.tree_util.tree_map(
            lambda x: np.asarray(x).astype(jnp.bfloat16)
            if np.issubdtype(np.asarray(x).dtype, np.floating) else x, params)
    return fn, params


def _hparams(cfg) -> gt.TrainHParams:
    try:
        return gt.TrainHParams.from_config({k: cfg[k] for k in cfg.keys()})
    except ValueError as e:  # the message names the field (e.g. group_size)
        raise ConfigError(f"bad config field: {e}") from None


def _nan_batch(batch):
    out = dict(batch)
    out["ir"] = np.full_like(batch["ir"], np.nan)
    return out


def _grid(ir, vi, before, after):
    """One row per sample: IR | visible | F before | F after (H, 4W)."""
    rows = [np.concatenate([ir[i, ..., 0], vi[i, ..., 0], before[i, ..., 0], after[i, ..., 0]],
                           axis=1) for i in range(ir.shape[0])]
    return np.concatenate(rows, axis=0)


def train(cfg) -> dict:
    """Runs (or resumes) a training run; returns the final metrics."""
    _validate(cfg)
    hp = _hparams(cfg)
    with train_loop.session(cfg, "train_grpo") as workdir:
        return _train(cfg, hp, workdir)


class _GRPOTrainer(train_loop.Trainer):
    """The DCEvo fine-tuning step, its logs (the last step's metrics) and preview images."""

    def __init__(self, cfg, hp: gt.TrainHParams, mcfg, tx, schedule, reward_fn, reward_params,
                 mesh, total_steps: int):
        self.cfg, self.mesh, self.total_steps = cfg, mesh, total_steps
        self.desc = f"train_grpo[{cfg.objective}]"
        self.reward_params = parallel.replicate(reward_params, mesh)
        self.p_step = gt.make_train_step(hp, mcfg, tx, reward_fn, mesh, schedule)
        self.eval_fn = gt.make_eval_fn(mcfg) if cfg.image_every_steps > 0 else None
        self.extra = {"config": cfg.to_dict(), "dcevo_config": mcfg.to_dict()}
        self.preview = None
        self.metrics: dict = {}

    def place(self, state):
        return parallel.replicate(state, self.mesh)

    def step(self, state, batch, step):
        if self.preview is None:
            self.preview = {k: np.asarray(batch[k][:2]) for k in ("ir", "vi")}
        if step == self.cfg.debug_nan_at_step:
            batch = _nan_batch(batch)  # bad input data: the guard keeps the checkpoints
        state, m = self.p_step(state, self.reward_params, parallel.shard_batch(batch, self.mesh))
        return state, m, batch

    def log_values(self, step, window):
        self.metrics, _ = super().log_values(step, window)
        return self.metrics, {"loss": f"{self.metrics['loss']:.4g}",
                              "reward": f"{self.metrics.get('reward', float('nan')):.4g}"}

    def evaluate(self, step, state, writer):
        if self.eval_fn is not None and (step % int(self.cfg.image_every_steps) == 0
                                         or step == self.total_steps):
            preview = self.preview
            before = np.asarray(self.eval_fn(parallel.unreplicate(state["ref_params"]), {},
                                             preview)["fused"])
            after = np.asarray(self.eval_fn(parallel.unreplicate(state["params"]), {},
                                            preview)["fused"])
            writer.images(step, {"ir|vi|before|after": _grid(preview["ir"], preview["vi"],
                                                             before, after)})
        return None

    def should_save(self, step, total_steps):
        return step % max(int(self.cfg.checkpoint_every_steps), 1) == 0

    def checkpoint(self, step, state):
        return {"state": state, "metrics": self.metrics, "extra": self.extra}


def _train(cfg, hp: gt.TrainHParams, workdir: Path) -> dict:
    mesh = parallel.data_mesh()
    per_host = parallel.local_batch_size(int(cfg.data.batch_size), mesh)
    params, mcfg = load_policy(cfg)
    reward_fn, reward_params = load_reward(cfg)

    dcfg = cfg.data.copy_and_resolve_references()
    dcfg.batch_size = per_host
    dcfg.num_epochs = None  # repeat; the run stops after total_steps
    num_pairs = len(grpo_pairs.list_pairs(cfg.data.data_dir))
    if cfg.max_steps and cfg.max_steps > 0:
        total = int(cfg.max_steps)
    else:
        spe = int(cfg.steps_per_epoch) if cfg.steps_per_epoch > 0 else max(
            num_pairs // int(cfg.data.batch_size), 1)
        total = int(cfg.num_epochs) * spe
    tx, schedule = gt.make_optimizer(cfg.learning_rate, total, cfg.end_learning_rate,
                                     cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip_norm)
    state = gt.create_train_state(params, tx, objective=hp.objective)
    loader = grpo_pairs.make_loader_from_config(dcfg)

    trainer = _GRPOTrainer(cfg, hp, mcfg, tx, schedule, reward_fn, reward_params, mesh, total)
    exit_at = int(cfg.debug_exit_at_step)
    result = train_loop.run(
        trainer, workdir=workdir, state=state, data_iter=iter(loader), total_steps=total,
        keep_checkpoints=int(cfg.keep_checkpoints), log_every=int(cfg.log_every_steps),
        progress=bool(cfg.progress), exit_after_steps=exit_at + 1 if exit_at >= 0 else -1,
        unit="step")
    export(cfg, parallel.unreplicate(result.state["params"]), mcfg, workdir)
    return trainer.metrics


def export(cfg, params, mcfg: dcevo.DCEvoConfig, workdir: Path) -> None:
    """Writes ``workdir/dcevo_final`` (Orbax, kind "dcevo") and optionally the released .pth."""
    if jax.process_index() != 0:
        return
    out = checkpoints.save_params(workdir / "dcevo_final", params, mcfg.to_dict(), kind="dcevo",
                                  overwrite=True, extra={"trained_by": "train_grpo",
                                                         "objective": cfg.objective})
    log.info("wrote %s", out)
    if cfg.export_pth:
        from evafusion_jax.convert import (
            dcevo_from_torch,  # torch only on this export path
        )
        dcevo_from_torch.export_file(out, cfg.export_pth, overwrite=True)
        log.info("wrote %s", cfg.export_pth)


OOM_HINT = ("Lower --config.data.batch_size or --config.data.crop_size (or group_size / "
            "num_regions for grpo), use --config.reward_dtype=bfloat16 --config.dcevo.dtype=bfloat16, "
            "or more devices; the run resumes from its last checkpoint")


def _run(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    train(cfg)


def main(argv=None) -> int:
    """The command line; exit codes as documented in :mod:`evafusion_jax.cli`."""
    return train_loop.main(argv, prog="train_grpo", config_name="grpo.py", description=__doc__,
                           oom_hint=OOM_HINT, body=_run)


if __name__ == "__main__":
    sys.exit(main())
