"""Train (or evaluate) the EVAFusion reward model on a human-feedback dataset.

    python -m evafusion_jax.train_reward --config configs/reward.py \
        --config.data.path=DATA --config.workdir=runs/reward [--config.<field>=...]
    python -m evafusion_jax.train_reward --config configs/reward.py --config.mode=eval \
        --config.data.path=DATA --config.eval.checkpoint=runs/reward/best_model --config.eval.split=test

Outputs under ``workdir``: ``checkpoints/`` (resumable Orbax checkpoints: trained
params, optimizer state, step, data iterator state), ``best_model/`` and
``final_model/`` (complete reward checkpoints, ``checkpoints.load_params(...,
"reward")``), ``logs/metrics.jsonl`` + TensorBoard events, ``feature_cache/``.
Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jax
import numpy as np

from evafusion_jax.config import ConfigError
from evafusion_jax.models import reward_model as rm
from evafusion_jax.models.vit import ViTConfig
from evafusion_jax.storage import checkpoints, fingerprint
from evafusion_jax.train import feature_cache, metric_writer
from evafusion_jax.train import loop as train_loop
from evafusion_jax.train import parallel as par
from evafusion_jax.train import reward_training as rt

logger = logging.getLogger(__name__)

PRESETS = ("released", "vit_b16_224", "tiny", "small", "from_checkpoint")


def small_config(**kw) -> rm.RewardConfig:
    """The "small" preset (tests, demos, the synthetic learning test): a 1-layer ViT of width 64
    on 32x32 inputs with 4x4 patches (64 tokens) and 8 channels before each score MLP."""
    return rm.RewardConfig.tiny(vit=ViTConfig.tiny(hidden_size=64, image_size=32, patch_size=4),
                                deconv_channels=(16, 8), score_conv_divisors=(1, 2, 4, 8, 8, 8),
                                **kw)


# ----------------------------------------------------------------------------- model setup

def _preset_config(cfg) -> rm.RewardConfig:
    m = cfg.model
    kw = dict(multi_heads=bool(m.multi_heads), dtype=str(m.dtype),
              precision=(str(m.precision) or None))
    if m.preset == "released":
        return rm.RewardConfig(vit=ViTConfig.vit_l16_384(), **kw)
    if m.preset == "vit_b16_224":
        return rm.RewardConfig(vit=ViTConfig.vit_b16_224(), **kw)
    if m.preset == "tiny":
        return rm.RewardConfig.tiny(**kw)
    if m.preset == "small":
        return small_config(**kw)
    raise ConfigError(f"config.model.preset must be one of {PRESETS}, got {m.preset!r}")


def _vit_mismatch(want: ViTConfig, have: ViTConfig) -> list[str]:
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "image_size", "patch_size", "num_channels")
    return [f"{f}: config {getattr(want, f)} vs checkpoint {getattr(have, f)}"
            for f in fields if getattr(want, f) != getattr(have, f)]


def load_initial_params(cfg) -> tuple[dict, rm.RewardConfig]:
    """Initial reward-model params and config from ``cfg.init`` / ``cfg.init_checkpoint``."""
    init = str(cfg.init)
    rng = jax.random.PRNGKey(int(cfg.seed))
    if init not in ("random", "vit", "reward"):
        raise ConfigError(f"config.init must be random, vit or reward, got {init!r}")
    if init != "random" and not cfg.init_checkpoint:
        raise ConfigError(f"config.init={init!r} needs config.init_checkpoint (a converted "
                          f"{init} checkpoint folder)")
    if cfg.model.preset == "from_checkpoint" and init != "reward":
        raise ConfigError("config.model.preset=from_checkpoint needs config.init=reward")

    if init == "reward":
        params, ck_cfg = checkpoints.load_params(cfg.init_checkpoint, "reward")
        have = rm.RewardConfig.from_dict(ck_cfg)
        if cfg.model.preset == "from_checkpoint":
            return params, have.replace(dtype=str(cfg.model.dtype),
                                        precision=str(cfg.model.precision) or None)
        want = _preset_config(cfg)
        diff = _vit_mismatch(want.vit, have.vit)
        if diff or want.multi_heads != have.multi_heads:
            diff += ([] if want.multi_heads == have.multi_heads else
                     [f"multi_heads: config {want.multi_heads} vs checkpoint {have.multi_heads}"])
            raise ConfigError(
                f"config.model.preset={cfg.model.preset!r} does not match the reward checkpoint "
                f"{cfg.init_checkpoint}: {'; '.join(diff)}. Use the matching preset or "
                "--config.model.preset=from_checkpoint")
        return params, have.replace(dtype=want.dtype, precision=want.precision)

    model_cfg = _preset_config(cfg)
    backbone = None
    if init == "vit":
        backbone, vit_dict = checkpoints.load_params(cfg.init_checkpoint, "vit")
        have = ViTConfig.from_dict(vit_dict)
        diff = _vit_mismatch(model_cfg.vit, have)
        if diff:
            raise ConfigError(
                f"config.model.preset={cfg.model.preset!r} names a ViT that differs from the ViT "
                f"checkpoint {cfg.init_checkpoint}: {'; '.join(diff)}")
        # Use the checkpoint's normalisation constants (they define the preprocessing).
        model_cfg = model_cfg.replace(vit=have)
    params = rm.init_params(model_cfg, rng, mixer_init=str(cfg.mixer_init), backbone=backbone)
    params = jax.tree_util.tree_map(np.asarray, params)
    return params, model_cfg


# ----------------------------------------------------------------------------- data

def _open(cfg, split: str):
    from evafusion_jax.data import feedback as fd
    if not cfg.data.path:
        raise ConfigError("config.data.path is empty: give the feedback dataset folder "
                          "(--config.data.path=...)")
    return fd.open_split(cfg.data.path, split, validate=str(cfg.data.validate),
                         split_seed=int(cfg.data.split_seed))


def _identity(x):
    return x


def _loader(cfg, source, batch_size, model_cfg, *, train: bool, cached: bool):
    from evafusion_jax.data import feedback as fd
    v = model_cfg.vit
    kw = dict(image_size=v.image_size, mean=v.image_mean, std=v.image_std,
              worker_count=int(cfg.data.worker_count), read_threads=int(cfg.data.read_threads),
              map_fn=_identity if cached else None)
    if train:
        return fd.make_loader(source, batch_size, seed=int(cfg.seed), shuffle=True,
                              num_epochs=int(cfg.num_epochs), drop_remainder=True, **kw)
    # Evaluation: every host reads the whole split, in order, keeping the last partial batch.
    return fd.make_loader(source, batch_size, shuffle=False, num_epochs=1, shard_index=0,
                          shard_count=1, drop_remainder=False, **kw)


def _strip(batch: dict) -> dict:
    return {k: np.asarray(v) for k, v in batch.items() if k not in ("name", "index", "heatmap_empty")}


def _progress(cfg, total=None, desc=""):
    from tqdm import tqdm
    disable = not cfg.progress or jax.process_index() != 0
    return lambda it: tqdm(it, total=total, desc=desc, leave=False, disable=disable)


def _cached_sources(cfg, model_cfg, params, splits, backbone_fp):
    """Builds (process 0) or opens the feature caches of ``splits``; returns {split: source}."""
    cache_root = Path(cfg.cache.dir or (Path(cfg.workdir) / "feature_cache"))
    out = {}
    for split, src in splits.items():
        if jax.process_index() == 0:
            out[split] = feature_cache.build_feature_cache(
                src, params[rt.BACKBONE_KEY], model_cfg, cache_root, dtype=str(cfg.cache.dtype),
                batch_size=int(cfg.cache.batch_size), fingerprint=str(cfg.cache.fingerprint),
                name=split, progress=_progress(cfg, len(src), f"caching {split}"),
                backbone_fingerprint=backbone_fp)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("feature_cache_built")
        for split, src in splits.items():
            if split not in out:
                out[split] = feature_cache.build_feature_cache(
                    src, params[rt.BACKBONE_KEY], model_cfg, cache_root,
                    dtype=str(cfg.cache.dtype), fingerprint=str(cfg.cache.fingerprint),
                    name=split, backbone_fingerprint=backbone_fp)
    return out


# ----------------------------------------------------------------------------- evaluation

def evaluate_params(cfg, model_cfg, params, source, *, cached: bool, desc="eval") -> dict:
    """Validation metrics of ``params`` on ``source`` (every host evaluates the whole split)."""
    mesh = par.data_mesh(jax.local_devices())
    predict = rt.make_predict_fn(model_cfg, mesh)
    p = {k: v for k, v in params.items() if not (cached and k == rt.BACKBONE_KEY)}
    p = par.replicate(p, mesh)
    loader = _loader(cfg, source, int(cfg.eval_batch_size), model_cfg, train=False, cached=cached)
    n_batches = -(-len(source) // int(cfg.eval_batch_size))
    return rt.evaluate_batches(predict, p, loader, mesh, model_cfg,
                               score_weight=float(cfg.score_weight),
                               heatmap_weight=float(cfg.heatmap_weight), seed=int(cfg.seed),
                               progress=_progress(cfg, n_batches, desc))


def run_eval(cfg) -> dict:
    """``mode=eval``: metrics of a reward checkpoint on ``cfg.eval.split``; writes a JSON file."""
    train_loop.start_processes(cfg)
    ckpt = cfg.eval.checkpoint or str(Path(cfg.workdir) / "best_model")
    params, ck_cfg = checkpoints.load_params(ckpt, "reward")
    model_cfg = rm.RewardConfig.from_dict(ck_cfg).replace(
        dtype=str(cfg.model.dtype), precision=str(cfg.model.precision) or None)
    if cfg.model.preset != "from_checkpoint":
        want = _preset_config(cfg)
        diff = _vit_mismatch(want.vit, model_cfg.vit)
        if diff:
            raise ConfigError(
                f"config.model.preset={cfg.model.preset!r} does not match the reward checkpoint "
                f"{ckpt}: {'; '.join(diff)}. Use the matching preset or "
                "--config.model.preset=from_checkpoint")
    source = _open(cfg, str(cfg.eval.split))
    metrics = evaluate_params(cfg, model_cfg, params, source, cached=False,
                              desc=f"eval {cfg.eval.split}")
    metrics["num_samples"] = len(source)
    out = Path(cfg.eval.output or (Path(ckpt) / f"eval_{cfg.eval.split}.json"))
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"checkpoint": str(ckpt), "split": str(cfg.eval.split),
                                   "data": str(cfg.data.path), "metrics": metrics}, indent=2))
        tmp.replace(out)
        logger.info("wrote %s", out)
    return metrics


# ----------------------------------------------------------------------------- training

def _export(path: Path, params, model_cfg, extra: dict) -> None:
    if jax.process_index() == 0:
        checkpoints.save_params(path, par.unreplicate(params), model_cfg.to_dict(), "reward",
                                overwrite=True, extra=metric_writer.json_scalars(extra))


def train(cfg) -> dict:
    """Trains as configured; resumes from ``workdir/checkpoints`` if present.

    Returns a summary dict: ``step``, ``best_value``, ``last_eval`` metrics,
    ``final_model`` path, ``resumed_from``. The loop (checkpoints, resume, NaN/inf policy,
    logs, multi-host start-up, the workdir lock) is :mod:`evafusion_jax.train.loop`.
    """
    with train_loop.session(cfg, "train_reward") as workdir:
        return _train(cfg, workdir)


class _RewardTrainer(train_loop.Trainer):
    """The reward-model step, its logs (means over the logging window), the per-epoch
    validation that picks ``best_model`` and the checkpoint record."""

    def __init__(self, cfg, model_cfg, frozen, mesh, *, cached: bool, train_backbone: bool,
                 steps_per_epoch: int, eval_data, frozen_fp: str, workdir: Path, optimizer):
        self.cfg, self.model_cfg, self.frozen, self.mesh = cfg, model_cfg, frozen, mesh
        self.cached, self.steps_per_epoch, self.eval_data = cached, steps_per_epoch, eval_data
        self.frozen_fp, self.workdir = frozen_fp, workdir
        frozen_step = {k: v for k, v in frozen.items() if not (cached and k == rt.BACKBONE_KEY)}
        self.frozen_rep = par.replicate(frozen_step, mesh)
        self.train_step = rt.make_train_step(model_cfg, optimizer, mesh,
                                             score_weight=float(cfg.score_weight),
                                             heatmap_weight=float(cfg.heatmap_weight),
                                             debug_nan_at_step=int(cfg.debug_nan_at_step),
                                             train_backbone=train_backbone)
        self.schedule = rt.make_schedule(float(cfg.init_lr), float(cfg.min_lr),
                                         int(cfg.num_epochs), steps_per_epoch, str(cfg.schedule))
        self.best_value = None
        self.last_eval: dict = {}

    def on_resume(self, restored):
        extra = restored.meta.get("extra", {})
        workdir = self.workdir
        if extra.get("frozen_fingerprint") not in (None, self.frozen_fp):
            raise ConfigError(
                f"{workdir}/checkpoints was trained with other frozen weights (backbone/mixer) "
                "than this config gives (config.init, config.init_checkpoint, config.seed, "
                "config.mixer_init must match the interrupted run); use a new config.workdir")
        if extra.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise ConfigError(
                f"{workdir}/checkpoints was written with {extra.get('steps_per_epoch')} steps per "
                f"epoch, this config gives {self.steps_per_epoch} (batch size or data changed); "
                "use a new config.workdir")
        self.best_value = extra.get("best_value")

    def place(self, state):
        return par.replicate(state, self.mesh)

    def on_start(self, writer, step):
        writer.text(step, "config", "```\n" + str(self.cfg) + "\n```")

    def step(self, state, batch, step):
        batch = _strip(batch)
        state, metrics = self.train_step(state, self.frozen_rep, par.shard_batch(batch, self.mesh))
        return state, metrics, batch

    def log_values(self, step, window):
        avg = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
        avg["lr"] = float(self.schedule(step - 1))
        avg["epoch"] = (step - 1) // self.steps_per_epoch
        return {f"train/{k}": v for k, v in avg.items()}, {"loss": f"{avg['loss']:.4f}"}

    def _full_params(self, state):
        return rt.merge_params(par.unreplicate(state["params"]), self.frozen)

    def evaluate(self, step, state, writer):
        cfg = self.cfg
        epoch = step // self.steps_per_epoch
        if (step % self.steps_per_epoch or self.eval_data is None
                or epoch % max(int(cfg.eval_every_epochs), 1)):
            return None
        self.last_eval = evaluate_params(cfg, self.model_cfg, self._full_params(state),
                                         self.eval_data, cached=self.cached,
                                         desc=f"eval epoch {epoch}")
        self.last_eval["epoch"] = epoch
        writer.scalars(step, self.last_eval, prefix="val/")
        value = self.last_eval.get(str(cfg.best_metric))
        if value is None or not np.isfinite(value):
            logger.warning("validation %s is %s at epoch %d; best_model not updated",
                           cfg.best_metric, value, epoch)
        return value

    def on_best(self, step, state, value):
        epoch = step // self.steps_per_epoch
        self.best_value = float(value)
        _export(self.workdir / "best_model", self._full_params(state), self.model_cfg,
                {"step": step, "epoch": epoch, "metrics": self.last_eval,
                 "best_metric": str(self.cfg.best_metric)})
        logger.info("new best %s=%.4f at epoch %d", self.cfg.best_metric, value, epoch)

    def should_save(self, step, total_steps):
        every = int(self.cfg.checkpoint_every_steps)
        return step % self.steps_per_epoch == 0 or (every > 0 and step % every == 0)

    def checkpoint(self, step, state):
        extra = {"frozen_fingerprint": self.frozen_fp, "steps_per_epoch": self.steps_per_epoch,
                 "best_value": self.best_value, "model_config": self.model_cfg.to_dict()}
        host_state = par.unreplicate(state) if jax.process_count() > 1 else state
        return {"state": host_state, "best_state": {"params": host_state["params"]},
                "metrics": {"epoch": step // self.steps_per_epoch,
                            **{f"val/{k}": v for k, v in self.last_eval.items()}},
                "extra": extra}


def _train(cfg, workdir: Path) -> dict:
    if cfg.batch_size < 1 or cfg.num_epochs < 1:
        raise ConfigError(f"config.batch_size ({cfg.batch_size}) and config.num_epochs "
                          f"({cfg.num_epochs}) must be >= 1")
    # Validate data before anything is written.
    train_src = _open(cfg, str(cfg.data.train_split))
    eval_src = _open(cfg, str(cfg.data.eval_split)) if cfg.data.eval_split else None

    params, model_cfg = load_initial_params(cfg)
    train_backbone = bool(cfg.get("train_backbone", False))
    trained, frozen = rt.split_params(params, bool(cfg.train_mixer), train_backbone)
    backbone_fp = fingerprint.tree_fingerprint(params[rt.BACKBONE_KEY])
    frozen_fp = fingerprint.tree_fingerprint(
        {k: v for k, v in frozen.items() if k != rt.BACKBONE_KEY}, {"backbone": backbone_fp})

    mesh = par.data_mesh()
    local_bs = par.local_batch_size(int(cfg.batch_size), mesh)
    n_proc = jax.process_count()
    steps_per_epoch = (len(train_src) // n_proc) // local_bs
    if steps_per_epoch < 1:
        raise ConfigError(f"the train split has {len(train_src)} records: fewer than one batch of "
                          f"{cfg.batch_size} (over {n_proc} processes); lower config.batch_size")
    total_steps = steps_per_epoch * int(cfg.num_epochs)
    if cfg.max_steps >= 0:
        total_steps = min(total_steps, int(cfg.max_steps))

    cached = bool(cfg.cache.enabled) and not train_backbone
    if cfg.cache.enabled and train_backbone:
        logger.info("config.train_backbone=True: the backbone changes, so no feature cache")
    if cached:
        splits = {str(cfg.data.train_split): train_src}
        if eval_src is not None:
            splits[str(cfg.data.eval_split)] = eval_src
        caches = _cached_sources(cfg, model_cfg, params, splits, backbone_fp)
        train_data = caches[str(cfg.data.train_split)]
        eval_data = caches.get(str(cfg.data.eval_split)) if eval_src is not None else None
    else:
        train_data, eval_data = train_src, eval_src

    optimizer = rt.make_optimizer(float(cfg.init_lr), float(cfg.min_lr), int(cfg.num_epochs),
                                  steps_per_epoch, float(cfg.weight_decay), str(cfg.schedule),
                                  float(cfg.grad_clip_norm))
    state = rt.init_train_state(trained, optimizer)
    state = jax.tree_util.tree_map(np.asarray, state)
    loader = _loader(cfg, train_data, local_bs, model_cfg, train=True, cached=cached)

    trainer = _RewardTrainer(cfg, model_cfg, frozen, mesh, cached=cached,
                             train_backbone=train_backbone, steps_per_epoch=steps_per_epoch,
                             eval_data=eval_data, frozen_fp=frozen_fp, workdir=workdir,
                             optimizer=optimizer)
    result = train_loop.run(
        trainer, workdir=workdir, state=state, data_iter=iter(loader), total_steps=total_steps,
        keep_checkpoints=int(cfg.keep_checkpoints), log_every=int(cfg.log_every_steps),
        progress=bool(cfg.progress), exit_after_steps=int(cfg.debug_exit_at_step))
    step, best_value = result.step, result.best_value
    _export(workdir / "final_model", trainer._full_params(result.state), model_cfg,
            {"step": step, "metrics": trainer.last_eval, "best_value": best_value})
    summary = {"step": step, "best_value": best_value, "last_eval": trainer.last_eval,
               "final_model": str(workdir / "final_model"), "resumed_from": result.resumed_from,
               "steps_per_epoch": steps_per_epoch}
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(metric_writer.json_scalars(summary),
                                                         indent=2))
    return summary


# ----------------------------------------------------------------------------- CLI

OOM_HINT = ("Lower --config.batch_size / --config.eval_batch_size / --config.cache.batch_size, "
            "use --config.model.dtype=bfloat16, or more devices; the run resumes from its last "
            "checkpoint")


def _run(cfg) -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.mode == "train":
        summary = train(cfg)
        logger.info("done: %s", json.dumps(metric_writer.json_scalars(summary))[:2000])
    elif cfg.mode == "eval":
        metrics = run_eval(cfg)
        logger.info("metrics: %s", json.dumps(metric_writer.json_scalars(metrics)))
    else:
        raise ConfigError(f"config.mode must be train or eval, got {cfg.mode!r}")


def main(argv=None) -> int:
    """The command line; exit codes as documented in :mod:`evafusion_jax.cli`."""
    return train_loop.main(argv, prog="train_reward", config_name="reward.py",
                           description=__doc__, oom_hint=OOM_HINT, body=_run)


if __name__ == "__main__":
    sys.exit(main())
