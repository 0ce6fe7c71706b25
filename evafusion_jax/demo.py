"""End-to-end EVAFusion demo at small scale, on what the project makes itself (CPU, minutes).

    python -m evafusion_jax.demo [--out demo_out] [--steps 60] [--seed 0] [--overwrite]
    python -m evafusion_jax.demo --pairs /data/TNO            # real IR/visible pairs (DIR/ir, DIR/vi)
    python -m evafusion_jax.demo --vit ckpt/vit --reward ckpt/reward --dcevo ckpt/dcevo \\
        --sam sam_vit_b.pth --sam-model-type vit_b            # real checkpoints (each optional)

Stages (each with a progress bar; every stage calls the project's library / CLI code):

1. **data**: SYNTHETIC procedural IR/visible scenes (``synthetic.write_pairs_folder``; train
   and held-out folders) and a SYNTHETIC human-feedback set whose five "human" scores and
   artifact heatmaps follow a fixed rule of controlled degradations
   (``synthetic.write_feedback_folder``). Nothing in it is real data or real human judgement.
   ``--pairs DIR`` uses real pairs instead (resized to ``--pairs-side`` in the work folder, or
   linked with ``--pairs-side 0``; the last few held out); the feedback set is then made by the
   same rule from crops of the training pairs.
2. **reward model**: a small reward model (random frozen ViT backbone, or ``--vit``) trained
   on the feedback set with ``train_reward.train`` (mixing ViT and heads trained); reports
   PLCC/SRCC of the five scores on the dev and test splits. ``--reward CKPT`` skips training.
3. **fusion warm-up**: a small DCEvo trained from scratch with the released unsupervised fusion
   and decomposition losses (``train_grpo.train`` with ``objective=fusion``), so that GRPO
   starts from a network that fuses. ``--dcevo CKPT`` skips it.
4. **regions + GRPO**: K regions per training pair on the warm-up network's fused image
   (superpixels, or SAM with ``--sam``; ``precompute_regions``), then region-level GRPO against
   the trained reward model (``train_grpo.train`` with ``objective=grpo``), with the paper's
   masked region rewards ``R(F * M_k)`` by default (``--region-reward composite``: region k of
   each sampled fusion pasted into the deterministic fusion and scored whole).
5. **evaluate**: fuses the held-out pairs before and after GRPO (``fuse.fuse_folder``), computes
   IVIF metrics (``evaluate.evaluate``) and reward-model scores, artifact heatmaps and the
   aggregated GRPO reward of both.
6. **report**: ``OUT/report.md`` (tables), ``OUT/summary.json`` (all numbers; ``before_after``:
   the policy's region reward on the training crops and the held-out whole-image reward),
   ``OUT/grid.png`` (IR | visible | fused before | fused after | artifact heatmap),
   ``OUT/curves.png`` (training curves); the work folders of every stage stay in ``OUT/work``.

``--steps N`` scales every training stage: N GRPO steps, 3N fusion warm-up steps and 10N
reward-model steps (default N = 40). The output folder is
built in a temporary sibling and renamed into place at the end; an existing non-empty
``--out`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evafusion_jax.storage import fileio
from evafusion_jax.storage.fileio import commit_dir, staging_dir

log = logging.getLogger("evafusion_jax.demo")

STAGES = ("data", "reward model", "fusion warm-up", "regions + GRPO", "evaluate", "report")
#: Metrics of ``metrics.py`` reported by the demo (NIQE/BRISQUE need larger images).
DEMO_METRICS = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC")
SCORE_LABELS = ("Thermal_Retention", "Texture_Preservation", "Artifacts", "Sharpness",
                "Overall_Score")


class DemoError(ValueError):
    """An invalid demo option (names the option and what to do)."""


# ----------------------------------------------------------------------------- models

def demo_dcevo_config(**kw):
    """The DCEvo trained from scratch by the demo (``DCEvoConfig.tiny``: dim 8, one block of each kind)."""
    from evafusion_jax.models import dcevo
    base = dict(dim=8, num_blocks=1, c2f_n=1, detail_layers=1, heads=2)
    base.update(kw)
    return dcevo.DCEvoConfig(**base)


def demo_reward_config(**kw):
    """The reward model trained from scratch by the demo: ``RewardConfig.tiny`` (hidden 32,
    32x32 input) with patch 4 (8x8 tokens) and score heads that keep 8 channels.

    ``RewardConfig.tiny``'s score heads narrow the 32 channels to 1 (divisor 32) before a
    channel RMS norm, which maps a single channel to +-scale: fine for shape tests, but such
    heads cannot learn, so the demo uses smaller divisors.
    """
    from evafusion_jax.models import reward_model as rm
    from evafusion_jax.models.vit import ViTConfig
    base = dict(vit=ViTConfig.tiny(patch_size=4), deconv_channels=(16, 8),
                score_conv_divisors=(1, 1, 2, 2, 4, 4))
    base.update(kw)
    return rm.RewardConfig.tiny(**base)


# ----------------------------------------------------------------------------- helpers

def _stage(i: int, msg: str = "") -> None:
    log.info("[stage %d/%d] %s%s", i + 1, len(STAGES), STAGES[i], f": {msg}" if msg else "")


def _link_pairs(src: Path, names: Sequence[str], dst: Path, side: int = 0) -> Path:
    """``dst/ir``, ``dst/vi`` holding symlinks to ``src/ir/<name>``, ``src/vi/<name>``, or with
    ``side`` > 0 copies resized so that the shorter side is ``side`` pixels (``image_io.resize``;
    the output folder's work files, never the project)."""
    from evafusion_jax.data import image_io
    for sub in ("ir", "vi"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for n in names:
            target = (src / sub / n).resolve()
            if side > 0:
                img = image_io.read_image(target)
                h, w = img.shape[:2]
                if min(h, w) > side:
                    img = image_io.resize(img, round(h * side / min(h, w)),
                                          round(w * side / min(h, w)))
                image_io.save_image(dst / sub / (Path(n).stem + ".png"), img)
                continue
            try:
                os.symlink(target, dst / sub / n)
            except OSError:  # file systems without symlinks
                shutil.copyfile(target, dst / sub / n)
    return dst


def _grpo_base_config():
    from evafusion_jax import config as config_lib
    return config_lib.parse_cli_config(["demo", "--config", config_lib.default_config_path("grpo.py")],
                                       config_lib.default_config_path("grpo.py"))


def _reward_base_config():
    from evafusion_jax import config as config_lib
    return config_lib.parse_cli_config(["demo", "--config", config_lib.default_config_path("reward.py")],
                                       config_lib.default_config_path("reward.py"))


def _read_log(path: Path) -> list[dict]:
    from evafusion_jax.train import metric_writer
    return metric_writer.read_jsonl(path) if path.is_file() else []


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------- stages

def stage_data(args, work: Path) -> dict:
    """Training / held-out pair folders and the feedback set."""
    from tqdm import tqdm

    from evafusion_jax.data import grpo_pairs, synthetic
    data = work / "data"
    data.mkdir(parents=True)
    out = {}
    with tqdm(total=3, desc="data", unit="set") as bar:
        if args.pairs:
            names = grpo_pairs.list_pairs(args.pairs)
            n_test = min(args.test_pairs, max(len(names) // 5, 1))
            if len(names) - n_test < 1:
                raise DemoError(f"--pairs {args.pairs} holds {len(names)} pair(s): need at least 2 "
                                "(training pairs and at least one held-out pair)")
            train_names = names[:-n_test][:args.train_pairs]
            out["train"] = _link_pairs(Path(args.pairs), train_names, data / "pairs_train",
                                       args.pairs_side)
            out["test"] = _link_pairs(Path(args.pairs), names[-n_test:], data / "pairs_test",
                                      args.pairs_side)
            out["pairs_kind"] = (f"real pairs from {Path(args.pairs).absolute()}"
                                 + (f", shorter side resized to {args.pairs_side} px"
                                    if args.pairs_side else ""))
            bar.update(2)
        else:
            out["train"] = synthetic.write_pairs_folder(data / "pairs_train", args.train_pairs,
                                                        args.size, args.size, seed=args.seed)
            bar.update(1)
            out["test"] = synthetic.write_pairs_folder(data / "pairs_test", args.test_pairs,
                                                       args.size, args.size, seed=args.seed + 1000)
            bar.update(1)
            out["pairs_kind"] = "SYNTHETIC procedural scenes (evafusion_jax.data.synthetic)"
        if not args.reward:
            # with --pairs: degraded fusions of crops of the TRAINING pairs (never the held-out)
            out["feedback"] = synthetic.write_feedback_folder(
                data / "feedback_SYNTHETIC", args.feedback, seed=args.seed,
                size=args.feedback_size, fused_per_pair=2,
                pairs=out["train"] if args.pairs else None,
                masked_fraction=args.reward_masked_examples)
        bar.update(1)
    out["num_train"] = len(grpo_pairs.list_pairs(out["train"]))
    out["num_test"] = len(grpo_pairs.list_pairs(out["test"]))
    return out


def stage_reward(args, work: Path, data: dict) -> dict:
    """Trains the reward model (or takes ``--reward``); returns its checkpoint and metrics."""
    import jax

    from evafusion_jax import train_reward
    from evafusion_jax.models import reward_model as rm
    from evafusion_jax.storage import checkpoints
    if args.reward:
        _, cdict = checkpoints.load_params(args.reward, "reward")
        return {"checkpoint": Path(args.reward), "trained": False,
                "config": rm.RewardConfig.from_dict(cdict).to_dict()}
    rdir = work / "reward"
    rng = jax.random.PRNGKey(args.seed)
    if args.vit:
        params, config = rm.init_from_pretrained_vit(args.vit, rng)
    else:
        config = demo_reward_config()
        params = rm.init_params(config, rng)
    init_ckpt = checkpoints.save_params(rdir / "init", jax.tree_util.tree_map(np.asarray, params),
                                        config.to_dict(), "reward")
    cfg = _reward_base_config()
    cfg.workdir = str(rdir)
    cfg.seed = args.seed
    cfg.model.preset = "from_checkpoint"
    cfg.init = "reward"
    cfg.init_checkpoint = str(init_ckpt)
    cfg.train_mixer = not args.vit  # a random backbone: let the mixing ViT learn the features
    cfg.train_backbone = bool(args.train_reward_backbone)
    cfg.data.path = str(data["feedback"])
    cfg.cache.dtype = "float32"
    cfg.batch_size = args.reward_batch
    cfg.eval_batch_size = 64
    from evafusion_jax.data import feedback as fd
    n_train = len(fd.open_split(cfg.data.path, "train"))
    steps_per_epoch = max(n_train // cfg.batch_size, 1)
    epochs = max(-(-10 * args.steps // steps_per_epoch), 1)
    # about three dev evaluations, the last one after the final epoch
    cfg.eval_every_epochs = max(epochs // 3, 1)
    cfg.num_epochs = -(-epochs // cfg.eval_every_epochs) * cfg.eval_every_epochs
    cfg.max_steps = -1
    cfg.init_lr = 1e-3
    cfg.min_lr = 1e-4
    cfg.schedule = "cosine"
    cfg.weight_decay = 1e-4
    cfg.log_every_steps = max(steps_per_epoch * cfg.num_epochs // 50, 1)
    cfg.keep_checkpoints = 1
    summary = train_reward.train(cfg)
    ckpt = Path(summary["final_model"])
    # dev metrics of the final model (its last evaluation), test metrics by train_reward's eval mode
    cfg.eval.checkpoint = str(ckpt)
    cfg.eval.split = "test"
    cfg.eval.output = str(rdir / "eval_test.json")
    results = {"dev": summary["last_eval"], "test": train_reward.run_eval(cfg)}
    return {"checkpoint": ckpt, "trained": True, "steps": summary["step"],
            "epochs": int(cfg.num_epochs), "num_train": n_train, "eval": results,
            "config": config.to_dict(), "log": rdir / "logs" / "metrics.jsonl"}


def _grpo_data(cfg, args, data_dir: Path, region_source: str, cache_dir: Path | None = None):
    cfg.data.data_dir = str(data_dir)
    cfg.data.crop_size = args.crop
    cfg.data.num_regions = args.regions
    cfg.data.region_source = region_source
    cfg.data.cache_dir = str(cache_dir) if cache_dir else ""
    cfg.data.batch_size = args.batch
    cfg.data.seed = args.seed
    cfg.data.pad_small = True
    cfg.data.min_valid_regions = 2
    cfg.data.read_threads = 1


def stage_fusion(args, work: Path, data: dict) -> dict:
    """Warm-up of a small DCEvo with the unsupervised fusion losses (or takes ``--dcevo``)."""
    from evafusion_jax import train_grpo
    from evafusion_jax.storage import checkpoints
    if args.dcevo:
        checkpoints.load_params(args.dcevo, "dcevo")  # validates it
        return {"checkpoint": Path(args.dcevo), "trained": False}
    fdir = work / "fusion"
    cfg = _grpo_base_config()
    cfg.workdir = str(fdir)
    cfg.seed = args.seed
    cfg.objective = "fusion"
    cfg.dcevo_checkpoint = ""
    for k, v in demo_dcevo_config().to_dict().items():
        if k in cfg.dcevo:
            cfg.dcevo[k] = v
    _grpo_data(cfg, args, data["train"], "grid")
    cfg.max_steps = 3 * args.steps
    cfg.learning_rate = 2e-3
    cfg.end_learning_rate = 2e-4
    cfg.weight_decay = 0.0
    cfg.log_every_steps = 1
    cfg.image_every_steps = 0
    cfg.checkpoint_every_steps = 10 ** 9
    cfg.keep_checkpoints = 1
    metrics = train_grpo.train(cfg)
    return {"checkpoint": fdir / "dcevo_final", "trained": True, "steps": int(cfg.max_steps),
            "final": metrics, "log": fdir / "logs" / "metrics.jsonl"}


def stage_grpo(args, work: Path, data: dict, reward: dict, fusion: dict) -> dict:
    """Regions on the warm-up network's fused images, then GRPO against the reward model."""
    from evafusion_jax import precompute_regions, train_grpo
    from evafusion_jax.models import dcevo
    from evafusion_jax.storage import checkpoints
    params, cdict = checkpoints.load_params(fusion["checkpoint"], "dcevo")
    mcfg = dcevo.DCEvoConfig.from_dict(cdict)
    cache = work / "regions"
    if args.sam:
        source = "sam"
        kw = dict(sam_model_type=args.sam_model_type, sam_checkpoint=args.sam,
                  generator_params={"points_per_side": 16})
    else:
        source = "superpixels"
        kw = dict(region_params={"n_segments": 3 * args.regions, "compactness": 0.1})
    index = precompute_regions.precompute_regions(
        data["train"], cache, source=source, image="fused", num_regions=args.regions,
        dcevo_params=params, dcevo_config=mcfg, seed=args.seed, **kw)
    valid = [v.get("num_valid", 0) for v in index["images"].values()]

    gdir = work / "grpo"
    cfg = _grpo_base_config()
    cfg.workdir = str(gdir)
    cfg.seed = args.seed
    cfg.objective = "grpo"
    cfg.dcevo_checkpoint = str(fusion["checkpoint"])
    cfg.reward_kind = "model"
    cfg.reward_checkpoint = str(reward["checkpoint"])
    _grpo_data(cfg, args, data["train"], "cache", cache)
    cfg.max_steps = args.steps
    cfg.learning_rate = args.grpo_lr
    cfg.end_learning_rate = args.grpo_lr / 10
    cfg.weight_decay = 0.01
    cfg.beta = 0.1
    cfg.group_size = args.grpo_group
    cfg.noise_seed = args.seed
    cfg.grpo_fusion_weight = args.grpo_fusion_weight
    cfg.region_reward = args.region_reward
    cfg.log_every_steps = 1
    cfg.image_every_steps = 0
    cfg.checkpoint_every_steps = 10 ** 9
    cfg.keep_checkpoints = 1
    metrics = train_grpo.train(cfg)
    rows = _read_log(gdir / "logs" / "metrics.jsonl")
    rewards = [r.get("reward") for r in rows]
    k = max(len(rewards) // 5, 1)
    after, _ = checkpoints.load_params(gdir / "dcevo_final", "dcevo")
    policy = _policy_region_reward(cfg, mcfg, {"before": params, "after": after})
    return {"checkpoint": gdir / "dcevo_final", "steps": int(cfg.max_steps),
            "region_source": source, "regions_per_image": _mean(valid),
            "group_size": int(cfg.group_size), "exploration_std": float(cfg.exploration_std),
            "reward_start": _mean(rewards[:k]), "reward_end": _mean(rewards[-k:]),
            "policy_reward_before": policy["before"], "policy_reward_after": policy["after"],
            "policy_crops": policy["crops"], "region_reward": str(cfg.region_reward),
            "window": k, "final": metrics, "log": gdir / "logs" / "metrics.jsonl"}


def _policy_region_reward(cfg, mcfg, params_by_tag: dict, max_batches: int = 8) -> dict:
    """Mean region reward of the deterministic fused image F (no exploration noise) of each
    parameter set, over the same training crops and regions (the first ``max_batches``
    batches of an unshuffled pass, seed fixed)."""
    import itertools

    import jax.numpy as jnp

    from evafusion_jax import train_grpo
    from evafusion_jax.data import grpo_pairs
    from evafusion_jax.train import grpo_training
    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.shuffle = False
    data_cfg.num_epochs = 1
    data_cfg.drop_remainder = False
    batches = [{k: np.asarray(v) for k, v in b.items() if k in ("ir", "vi", "masks", "valid")}
               for b in itertools.islice(iter(
                   grpo_pairs.make_loader_from_config(data_cfg)), max_batches)]
    reward_fn, reward_params = train_grpo.load_reward(cfg)
    evaluate = grpo_training.make_eval_fn(mcfg, reward_fn)
    out = {"crops": int(sum(len(b["ir"]) for b in batches))}
    for tag, params in params_by_tag.items():
        total, count = 0.0, 0
        for b in batches:
            r = np.asarray(evaluate(params, reward_params, {k: jnp.asarray(v) for k, v in b.items()})
                           ["reward"])
            total += float(r[b["valid"]].sum())
            count += int(b["valid"].sum())
        out[tag] = total / max(count, 1)
    return out


def _score_fn(reward_ckpt):
    """``fn(ir, vi, fused) -> (scores dict, heatmap (S, S), aggregated reward)`` for one image."""
    import jax
    import jax.numpy as jnp

    from evafusion_jax.models import reward_model as rm
    from evafusion_jax.rl import grpo
    from evafusion_jax.storage import checkpoints
    params, cdict = checkpoints.load_params(reward_ckpt, "reward")
    config = rm.RewardConfig.from_dict(cdict)
    apply = jax.jit(lambda p, a, b, c: rm.apply(p, a, b, c, config))

    def fn(ir, vi, fused):
        pix = [rm.preprocess(jnp.asarray(x, jnp.float32)[None], config) for x in (ir, vi, fused)]
        out = apply(params, *pix)
        total, _ = grpo.aggregate_reward(out["scores"], out["heatmaps"])
        scores = {k: float(v[0]) for k, v in out["scores"].items()}
        heat = np.asarray(out["heatmaps"][config.heatmap_types[0]][0])
        return scores, heat, float(total[0])
    return fn


def stage_evaluate(args, work: Path, data: dict, reward: dict, fusion: dict, grpo_res: dict) -> dict:
    """Fuses the held-out pairs before/after GRPO; metrics, reward scores, heatmaps."""
    from tqdm import tqdm

    from evafusion_jax import evaluate, fuse
    from evafusion_jax.data import image_io
    from evafusion_jax.models import dcevo
    from evafusion_jax.storage import checkpoints
    folders = {}
    for tag, ck in (("before", fusion["checkpoint"]), ("after", grpo_res["checkpoint"])):
        params, cdict = checkpoints.load_params(ck, "dcevo")
        folders[tag] = work / f"fused_{tag}"
        fuse.fuse_folder(params, dcevo.DCEvoConfig.from_dict(cdict), data["test"] / "ir",
                         data["test"] / "vi", folders[tag], bucket=16)
    methods = {"before": folders["before"], "after": folders["after"]}
    tasks = evaluate.plan_evaluation(data["test"] / "ir", data["test"] / "vi", methods)
    rows = evaluate.evaluate(tasks, DEMO_METRICS, workers=1)
    score = _score_fn(args.eval_reward or reward["checkpoint"])
    images: dict[str, dict] = {}
    for row, (method, stem, fp, ip, vp) in tqdm(list(zip(rows, tasks)), desc="reward scores",
                                                unit="img"):
        ir = image_io.read_image(ip)
        vi = image_io.read_image(vp)
        fused = image_io.to_gray(image_io.read_image(fp))
        scores, heat, total = score(ir, vi, fused)
        row.update({f"R_{k}": v for k, v in scores.items()})
        row["reward"] = total
        img = images.setdefault(stem, {"ir": ir, "vi": vi})
        img[method] = fused
        img[f"heat_{method}"] = heat
    columns = list(DEMO_METRICS) + [f"R_{k}" for k in SCORE_LABELS] + ["reward"]
    summary = evaluate.summarize(rows, columns)
    return {"rows": rows, "summary": summary, "columns": columns, "images": images,
            "folders": {k: str(v) for k, v in folders.items()}}


# ----------------------------------------------------------------------------- report

def _plot_grid(images: dict, path: Path, max_rows: int = 4) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evafusion_jax.score import overlay
    stems = sorted(images)[:max_rows]
    cols = ("IR", "visible", "fused before GRPO", "fused after GRPO", "artifact heatmap (after)")
    fig, axes = plt.subplots(len(stems), 5, figsize=(12, 2.6 * len(stems) + 0.4), squeeze=False)
    for r, stem in enumerate(stems):
        im = images[stem]
        panels = (im["ir"], im["vi"], im["before"], im["after"],
                  overlay(im["after"], im["heat_after"]) / 255.0)
        for c, (ax, p) in enumerate(zip(axes[r], panels)):
            p = np.asarray(p)
            if p.ndim == 3 and p.shape[-1] == 1:
                p = p[..., 0]
            ax.imshow(np.clip(p, 0, 1), cmap="gray" if p.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r][0].set_ylabel(stem, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_curves(reward: dict, fusion: dict, grpo_res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    ax = axes[0]
    rows = _read_log(Path(reward["log"])) if reward.get("log") else []
    tr = [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    val = [(r["step"], r["val/loss/val"]) for r in rows if r.get("val/loss/val") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="dev loss")
    ax2 = ax.twinx()
    plcc = [(r["step"], r["val/score/plcc/Overall_Score"]) for r in rows
            if r.get("val/score/plcc/Overall_Score") is not None]
    if plcc:
        ax2.plot(*zip(*plcc), "s--", color="C2", label="dev PLCC (overall)")
        ax2.set_ylim(-0.1, 1.0)
        ax2.legend(loc="center right", fontsize=8)
    ax.set_title("1. reward model" + ("" if rows else " (given checkpoint)"))
    ax.set_xlabel("step")
    if rows:
        ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    rows = _read_log(Path(fusion["log"])) if fusion.get("log") else []
    for key in ("fusion_loss", "decomp_loss"):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_title("2. DCEvo fusion warm-up" + ("" if rows else " (given checkpoint)"))
    ax.set_xlabel("step")
    if rows:
        ax.legend(fontsize=8)
    ax = axes[2]
    rows = _read_log(Path(grpo_res["log"]))
    pts = [(r["step"], r["reward"]) for r in rows if r.get("reward") is not None]
    if pts:
        steps, vals = zip(*pts)
        ax.plot(steps, vals, alpha=0.4, label="mean region reward (batch)")
        w = max(len(vals) // 10, 1)
        sm = np.convolve(vals, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], sm, label=f"moving average ({w})")
    ax3 = ax.twinx()
    kl = [(r["step"], r["kl"]) for r in rows if r.get("kl") is not None]
    if kl:
        ax3.plot(*zip(*kl), color="C3", alpha=0.6, label="KL to initial")
        ax3.legend(loc="lower right", fontsize=8)
    ax.set_title("3. GRPO fine-tuning")
    ax.set_xlabel("step")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(out: Path, args, data: dict, reward: dict, fusion: dict, grpo_res: dict,
                 ev: dict, timings: dict) -> dict:
    from evafusion_jax.eval import metrics as metrics_lib
    _plot_grid(ev["images"], out / "grid.png")
    _plot_curves(reward, fusion, grpo_res, out / "curves.png")
    synthetic_pairs = not args.pairs
    md = ["# EVAFusion demo report\n"]
    md.append("> **SYNTHETIC DATA.** " if synthetic_pairs or not args.reward else "")
    if not args.reward:
        md.append("The human-feedback set is synthetic: procedural scenes whose five \"human\" "
                  "scores and artifact heatmaps follow a fixed rule of controlled degradations "
                  "(`evafusion_jax.data.synthetic`); no real person rated anything. ")
    md.append(f"Training / held-out pairs: {data['pairs_kind']}. The numbers show that the "
              "pipeline works end to end; they say nothing about the method's quality on real "
              "images.\n\n")
    md.append(f"Command: `python -m evafusion_jax.demo {' '.join(args.argv)}`  \n")
    md.append(f"Seed {args.seed}, --steps {args.steps}; {data['num_train']} training pairs, "
              f"{data['num_test']} held-out pairs; total time {timings['total']:.0f} s.\n\n")
    md.append("## Stages\n\n")
    md.append(_md_table(["stage", "seconds"], [[s, f"{timings[s]:.1f}"] for s in STAGES]))

    md.append("\n## 1. Reward model\n\n")
    if reward["trained"]:
        vit = reward["config"]["vit"]
        md.append(f"Trained {reward['steps']} steps ({reward['epochs']} epochs of "
                  f"{reward['num_train']} synthetic feedback samples); ViT hidden "
                  f"{vit['hidden_size']}, {vit['num_hidden_layers']} layer(s), input "
                  f"{vit['image_size']}x{vit['image_size']}, patch {vit['patch_size']}; backbone "
                  f"{'from --vit (frozen)' if args.vit else 'random (frozen)'}. Checkpoint: "
                  f"`{Path(reward['checkpoint']).relative_to(out)}`.\n\n")
        rows = []
        for s in SCORE_LABELS:
            rows.append([s] + [_fmt(reward["eval"][sp].get(f"score/{m}/{s}"))
                               for sp in ("dev", "test") for m in ("plcc", "srcc")])
        md.append(_md_table(["score", "dev PLCC", "dev SRCC", "test PLCC", "test SRCC"], rows))
        d = reward["eval"]["dev"]
        md.append(f"\nHeatmap on the dev split: MSE on empty ground truth "
                  f"{_fmt(d.get('loss/artifact_heatmap'))}, CC {_fmt(d.get('heatmap/cc'))}, "
                  f"NSS {_fmt(d.get('heatmap/nss'))}; avg_metric {_fmt(d.get('avg_metric'))}.\n")
    else:
        md.append(f"Given checkpoint `{args.reward}` (not trained here).\n")

    md.append("\n## 2. DCEvo fusion warm-up\n\n")
    if fusion["trained"]:
        f = fusion["final"]
        md.append(f"A small DCEvo ({json.dumps(demo_dcevo_config().to_dict())}) trained "
                  f"{fusion['steps']} steps from scratch with the released fusion + decomposition "
                  f"losses on {args.crop}x{args.crop} crops; final fusion loss "
                  f"{_fmt(f.get('fusion_loss'))}, decomposition loss {_fmt(f.get('decomp_loss'))}.\n")
    else:
        md.append(f"Given checkpoint `{args.dcevo}` (not trained here).\n")

    md.append("\n## 3. Regions + GRPO\n\n")
    g = grpo_res
    md.append(f"Regions: {g['region_source']} on the warm-up network's fused images, K = "
              f"{args.regions} slots, {g['regions_per_image']:.1f} valid per image on average. "
              f"GRPO: {g['steps']} steps, batch {args.batch}, crops {args.crop}x{args.crop}, "
              f"a group of {g['group_size']} sampled fusions per pair (Gaussian policy around "
              f"DCEvo's output, sigma {g['exploration_std']:g}, mirrored pairs), learning rate "
              f"{args.grpo_lr:g}, KL weight 0.1, auxiliary fusion-loss weight "
              f"{args.grpo_fusion_weight:g}.\n\n")
    up = g["policy_reward_after"] - g["policy_reward_before"]
    md.append(_md_table(["", "mean region reward"], [
        ["DCEvo before GRPO", _fmt(g["policy_reward_before"])],
        ["DCEvo after GRPO", _fmt(g["policy_reward_after"])],
        ["change", f"{up:+.4f} ({'up' if up > 0 else 'not up'})"],
        [f"training batches, first {g['window']} steps", _fmt(g["reward_start"])],
        [f"training batches, last {g['window']} steps", _fmt(g["reward_end"])]]))
    md.append(f"\nBefore / after: the reward 2 texture + thermal + 2 sharpness + 0.5 (1 + artifact "
              f"area) artifacts of each valid region of the fused image F (no exploration noise), "
              f"averaged over {g['policy_crops']} fixed training crops. Training batches: the mean "
              f"over the {g['group_size']} sampled fusions per pair that GRPO scored (exploration "
              f"noise included), over the first / last steps.\n")
    if up <= 0:
        md.append("\nThe mean region reward did not go up in this run. GRPO estimates the "
                  "direction that raises the reward from a few sampled fusions per pair, so short "
                  "runs are noisy: try more `--steps`, a larger `--grpo-group`, or another "
                  "`--seed`.\n")
    if g.get("region_reward") == "masked":
        md.append("\nRegion rewards: masked regions `R(F * M_k)` (the paper's), images the "
                  "demo's reward model never saw in its training on whole images; the "
                  "whole-image reward of the held-out pairs (below) need not move the same way.\n")
    else:
        md.append("\nRegion rewards: composites, region k of each sampled fusion pasted into "
                  "the deterministic fusion of the old policy and scored as a whole image "
                  "(`--region-reward composite`); the region reward of the deterministic F "
                  "above is therefore its whole-image reward on the training crops.\n")

    md.append("\n## 4. Held-out pairs before / after GRPO\n\n")
    summ, cols = ev["summary"], ev["columns"]
    head = ["metric", "before GRPO", "after GRPO", "better"]
    rows = []
    for c in cols:
        hib = metrics_lib.HIGHER_IS_BETTER.get(c, True)
        b, a = summ["before"][c]["mean"], summ["after"][c]["mean"]
        better = "-" if not (math.isfinite(a) and math.isfinite(b)) or _fmt(a) == _fmt(b) else (
            "after" if (a > b) == hib else "before")
        rows.append([c + (" ↑" if hib else " ↓"), _fmt(b), _fmt(a), better])
    md.append(_md_table(head, rows))
    md.append("\nIVIF metrics as in `evafusion_jax.evaluate` (grey, 0-255, A = IR, B = visible); "
              "R_*: reward-model scores in [0, 1]; reward: the aggregated GRPO reward of the "
              "whole image. Means over the held-out pairs.\n")
    md.append("\n## Images\n\n![IR | visible | fused before | fused after | artifact heatmap]"
              "(grid.png)\n\n## Training curves\n\n![curves](curves.png)\n")
    md.append("\n## Files\n\n- `summary.json`: every number above\n- `work/data`: pairs and "
              "feedback set\n- `work/reward`, `work/fusion`, `work/grpo`: training runs "
              "(checkpoints, `logs/metrics.jsonl`, TensorBoard events)\n- `work/regions`: region "
              "cache\n- `work/fused_before`, `work/fused_after`: fused held-out pairs\n")
    (out / "report.md").write_text("".join(md), encoding="utf-8")

    def rel(p):
        return str(Path(p).relative_to(out)) if str(p).startswith(str(out)) else str(p)
    summary = {
        "synthetic_feedback": not args.reward, "synthetic_pairs": synthetic_pairs,
        "seed": args.seed, "steps": args.steps, "timings_s": timings,
        "reward_model": {"trained": reward["trained"], "checkpoint": rel(reward["checkpoint"]),
                         **({"dev": reward["eval"]["dev"], "test": reward["eval"]["test"]}
                            if reward["trained"] else {})},
        "fusion": {"trained": fusion["trained"], "checkpoint": rel(fusion["checkpoint"]),
                   **({"final": fusion["final"]} if fusion["trained"] else {})},
        "grpo": {k: (rel(v) if k in ("checkpoint", "log") else v) for k, v in g.items()},
        "heldout": summ,
        # the two numbers a script compares (benchmarks/demo_seeds.py)
        "before_after": {
            "policy_region_reward": {"before": g["policy_reward_before"],
                                     "after": g["policy_reward_after"]},
            "heldout_reward": {"before": summ["before"]["reward"]["mean"],
                               "after": summ["after"]["reward"]["mean"]}},
    }
    (out / "summary.json").write_text(json.dumps(fileio.json_safe(summary), indent=2))
    return summary



# ----------------------------------------------------------------------------- driver

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evafusion_jax.demo",
        description="End-to-end EVAFusion demo at small scale (synthetic data unless --pairs): "
                    "reward model, DCEvo fusion warm-up, regions, GRPO, evaluation, report.")
    p.add_argument("--out", default="demo_out", help="report folder (default: demo_out)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--steps", type=int, default=40,
                   help="GRPO steps; the fusion warm-up runs 3x and the reward model 10x as many")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", help="folder of real pairs (DIR/ir, DIR/vi) instead of synthetic ones")
    p.add_argument("--vit", help="ViT backbone for the reward model: converted checkpoint or "
                                 "Hugging Face folder")
    p.add_argument("--reward", help="trained/converted reward checkpoint (skips reward training)")
    p.add_argument("--dcevo", help="converted DCEvo checkpoint (skips the fusion warm-up)")
    p.add_argument("--eval-reward", help="reward checkpoint that scores the held-out pairs "
                                         "(default: the one GRPO trains against)")
    p.add_argument("--sam", help="segment_anything checkpoint: SAM regions instead of superpixels")
    p.add_argument("--sam-model-type", default="vit_b", choices=("vit_h", "vit_l", "vit_b", "tiny"),
                   help="architecture of the --sam checkpoint (default vit_b)")
    g = p.add_argument_group("sizes (defaults fit ~5 min on 2 CPU cores)")
    g.add_argument("--train-pairs", type=int, default=16)
    g.add_argument("--test-pairs", type=int, default=4)
    g.add_argument("--size", type=int, default=64, help="side of the synthetic pairs")
    g.add_argument("--crop", type=int, default=48, help="training crop side")
    g.add_argument("--batch", type=int, default=4, help="training batch (fusion and GRPO)")
    g.add_argument("--regions", type=int, default=6, help="K region slots per crop")
    g.add_argument("--feedback", type=int, default=3000, help="synthetic feedback samples")
    g.add_argument("--feedback-size", type=int, default=32, help="side of feedback images")
    g.add_argument("--reward-batch", type=int, default=32, help="reward-model training batch")
    g.add_argument("--reward-masked-examples", type=float, default=0.0,
                   help="fraction of feedback images also given as masked regions (same scores)")
    g.add_argument("--pairs-side", type=int, default=128,
                   help="with --pairs: resize pairs so that the shorter side is this (0 = keep)")
    g.add_argument("--grpo-lr", type=float, default=3e-4, help="GRPO learning rate")
    g.add_argument("--grpo-group", type=int, default=8,
                   help="GRPO group: sampled fusions per pair (even; each is scored region by region)")
    g.add_argument("--grpo-fusion-weight", type=float, default=0.0,
                   help="weight of the auxiliary fusion loss during GRPO (0 = pure GRPO + KL)")
    g.add_argument("--region-reward", default="masked", choices=("masked", "composite"),
                   help="region rewards: masked (the paper's R(F * M_k); default: it raised the "
                        "held-out reward most, README) or composite (region k of a sample pasted "
                        "into the deterministic fusion, scored whole)")
    g.add_argument("--train-reward-backbone", action="store_true",
                   help="also train the reward model's ViT backbone (train_reward's "
                        "train_backbone; no feature cache); default: frozen, as released")
    return p


def _validate(args) -> None:
    for name in ("pairs", "vit", "reward", "dcevo", "sam", "eval_reward"):
        v = getattr(args, name)
        if v and not Path(v).exists():
            raise DemoError(f"--{name} {v} does not exist")
    if args.pairs:
        from evafusion_jax.data import grpo_pairs
        grpo_pairs.list_pairs(args.pairs)  # raises PairDataError naming the problem
    if args.reward and args.vit:
        raise DemoError("--vit initialises a reward model to train; with --reward nothing is "
                        "trained: give one of them")
    for name in ("steps", "train_pairs", "test_pairs", "size", "crop", "batch", "regions",
                 "feedback", "feedback_size"):
        if getattr(args, name) < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.reward_masked_examples <= 1.0:
        raise DemoError(f"--reward-masked-examples must be in [0, 1], got "
                        f"{args.reward_masked_examples}")
    if args.pairs_side < 0:
        raise DemoError(f"--pairs-side must be >= 0, got {args.pairs_side}")
    if args.regions < 2:
        raise DemoError("--regions must be >= 2 (GRPO compares regions within a group)")
    if args.grpo_group < 2 or args.grpo_group % 2:
        raise DemoError(f"--grpo-group must be an even number >= 2 (sampled fusions come in "
                        f"mirrored pairs), got {args.grpo_group}")
    if not args.pairs and args.size < 48:
        raise DemoError(f"--size {args.size}: the metrics (VIF) need pairs of at least 48x48")
    if not args.pairs and args.crop > args.size:
        raise DemoError(f"--crop {args.crop} is larger than the synthetic pairs (--size "
                        f"{args.size})")
    if not args.reward and args.feedback < 20:
        raise DemoError(f"--feedback {args.feedback}: need at least 20 samples for train/dev/test")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise DemoError(f"--out {out} exists and is not empty; pass --overwrite to replace it "
                        "or choose another --out")


def run(args) -> dict:
    """Runs all stages into ``args.out``; returns the summary dict (also in summary.json)."""
    _validate(args)
    out = Path(args.out).absolute()
    tmp = staging_dir(out)
    work = tmp / "work"
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    try:
        def timed(i, fn, *a):
            _stage(i)
            t = time.perf_counter()
            res = fn(*a)
            timings[STAGES[i]] = time.perf_counter() - t
            return res
        data = timed(0, stage_data, args, work)
        reward = timed(1, stage_reward, args, work, data)
        fusion = timed(2, stage_fusion, args, work, data)
        grpo_res = timed(3, stage_grpo, args, work, data, reward, fusion)
        log.info("GRPO mean region reward of F on %d training crops: before %.4f, after %.4f",
                 grpo_res["policy_crops"], grpo_res["policy_reward_before"],
                 grpo_res["policy_reward_after"])
        ev = timed(4, stage_evaluate, args, work, data, reward, fusion, grpo_res)
        _stage(5)
        timings["report"] = 0.0
        timings["total"] = time.perf_counter() - t_all
        t = time.perf_counter()
        # paths inside tmp become paths inside out after the rename
        summary = write_report(tmp, args, data, reward, fusion, grpo_res, ev, timings)
        timings["report"] = time.perf_counter() - t
        summary["timings_s"] = timings
        (tmp / "summary.json").write_text(json.dumps(fileio.json_safe(summary), indent=2))
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("report: %s (%.0f s)", out / "report.md", time.perf_counter() - t_all)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("evafusion_jax").setLevel(logging.INFO)
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "evafusion_jax.train.checkpointer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from evafusion_jax import cli

    def body():
        run(args)
    return cli.run(body, prog="demo",
                   oom_hint="lower --steps or use smaller models (the defaults are small)")


if __name__ == "__main__":
    sys.exit(main())
