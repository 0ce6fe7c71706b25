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
host reads its shard of the pairs. A NaN/inf loss or state stops the run without saving
(exit code 3; the last checkpoint on disk is the last good one, see
``evafusion_jax.train.nonfinite.guard_step``). The workdir is locked while the run lasts (a second run
on it refuses, exit code 4). Exit codes: ``evafusion_jax.cli``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from evafusion_jax import cli
from evafusion_jax import config as config_lib
from evafusion_jax.data import grpo_pairs
from evafusion_jax.models import dcevo
from evafusion_jax.rl import grpo, rewards
from evafusion_jax.storage import checkpoints, locks
from evafusion_jax.train import checkpointer, metric_writer, nonfinite, parallel
from evafusion_jax.train import grpo_training as gt

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad field in the training config."""


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
    parallel.maybe_initialize_distributed()
    with locks.WorkdirLock(cfg.workdir, "train_grpo", primary=jax.process_index() == 0):
        return _train(cfg, hp)


def _train(cfg, hp: gt.TrainHParams) -> dict:
    mesh = parallel.data_mesh()
    workdir = Path(cfg.workdir)
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
    data_it = iter(loader)

    ckpt = checkpointer.TrainCheckpointer(workdir / "checkpoints", max_to_keep=int(cfg.keep_checkpoints))
    step = 0
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(target=state)
        state, step = restored.state, restored.step
        if restored.iterator_state is not None:
            data_it.set_state(restored.iterator_state)
        log.info("resumed from %s at step %d", workdir / "checkpoints", step)
    state = parallel.replicate(state, mesh)
    reward_params = parallel.replicate(reward_params, mesh)
    p_step = gt.make_train_step(hp, mcfg, tx, reward_fn, mesh, schedule)
    eval_fn = gt.make_eval_fn(mcfg) if cfg.image_every_steps > 0 else None

    writer = metric_writer.MetricWriter(workdir / "logs", resume_step=step)
    extra = {"config": cfg.to_dict(), "dcevo_config": mcfg.to_dict()}
    preview = None
    metrics: dict = {}
    bar = None
    if cfg.progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc=f"train_grpo[{cfg.objective}]", unit="step")
    try:
        while step < total:
            batch = next(data_it)
            if preview is None:
                preview = {k: np.asarray(batch[k][:2]) for k in ("ir", "vi")}
            if step == cfg.debug_nan_at_step:
                batch = _nan_batch(batch)
            state, m = p_step(state, reward_params, parallel.shard_batch(batch, mesh))
            nonfinite.guard_step(ckpt, m["loss"], state, step, batch)
            step += 1
            if bar is not None:
                bar.update(1)
            if step % max(int(cfg.log_every_steps), 1) == 0 or step == total:
                metrics = {k: float(np.asarray(v)) for k, v in parallel.unreplicate(m).items()}
                writer.scalars(step, metrics)
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}",
                                    reward=f"{metrics.get('reward', float('nan')):.4g}")
            if eval_fn is not None and (step % int(cfg.image_every_steps) == 0 or step == total):
                before = np.asarray(eval_fn(parallel.unreplicate(state["ref_params"]), {},
                                            preview)["fused"])
                after = np.asarray(eval_fn(parallel.unreplicate(state["params"]), {},
                                           preview)["fused"])
                writer.images(step, {"ir|vi|before|after": _grid(preview["ir"], preview["vi"],
                                                                 before, after)})
            if step % max(int(cfg.checkpoint_every_steps), 1) == 0 or step == total:
                ckpt.save(step, state, data_it.get_state(), metrics=metrics, extra=extra)
            if cfg.debug_exit_at_step >= 0 and step - 1 == cfg.debug_exit_at_step:
                ckpt.close()
                writer.close()
                os._exit(75)
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    export(cfg, parallel.unreplicate(state["params"]), mcfg, workdir)
    return metrics


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


def main(argv=None) -> int:
    """The command line; exit codes as documented in :mod:`evafusion_jax.cli`."""
    argv = list(sys.argv if argv is None else argv)

    def body():
        cfg = config_lib.parse_cli_config(argv, config_lib.default_config_path("grpo.py"), description=__doc__)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            force=True)
        train(cfg)
    return cli.run(body, prog="train_grpo", oom_hint=OOM_HINT)


if __name__ == "__main__":
    sys.exit(main())
