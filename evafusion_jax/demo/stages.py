"""The demo's stages: each builds the library's configs and calls its code (data writers,
``train_reward``, ``train_grpo``, ``precompute_regions``, ``fuse``, ``evaluate``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from evafusion_jax.demo.config import (
    DEMO_METRICS,
    SCORE_LABELS,
    DemoError,
    demo_dcevo_config,
    demo_reward_config,
    grpo_base_config,
    grpo_lr_warmup,
    grpo_sigma,
    reward_base_config,
)


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


def _read_log(path: Path) -> list[dict]:
    from evafusion_jax.train import metric_writer
    return metric_writer.read_jsonl(path) if path.is_file() else []


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


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
                                                       args.size, args.size, seed=args.test_seed)
            bar.update(1)
            out["pairs_kind"] = "SYNTHETIC procedural scenes (evafusion_jax.data.synthetic)"
        if not args.reward:
            # with --pairs: degraded fusions of crops of the TRAINING pairs (never the held-out)
            out["feedback"] = synthetic.write_feedback_folder(
                data / "feedback_SYNTHETIC", args.feedback, seed=args.seed,
                size=args.feedback_size, fused_per_pair=2,
                pairs=out["train"] if args.pairs else None,
                masked_fraction=args.reward_masked_examples, min_detail=args.pairs_min_detail)
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
        from evafusion_jax.convert.vit_from_hf import init_from_pretrained_vit
        params, config = init_from_pretrained_vit(args.vit, rng)
    else:
        config = demo_reward_config(args.reward_hidden, args.feedback_size, args.reward_patch)
        params = rm.init_params(config, rng)
    init_ckpt = checkpoints.save_params(rdir / "init", jax.tree_util.tree_map(np.asarray, params),
                                        config.to_dict(), "reward")
    cfg = reward_base_config()
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
    epochs = max(-(-args.reward_steps // steps_per_epoch), 1)
    # about three dev evaluations, the last one after the final epoch
    cfg.eval_every_epochs = max(epochs // 3, 1)
    cfg.num_epochs = -(-epochs // cfg.eval_every_epochs) * cfg.eval_every_epochs
    cfg.max_steps = -1
    cfg.init_lr = args.reward_lr
    cfg.min_lr = args.reward_lr / 10
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
    cfg = grpo_base_config()
    cfg.workdir = str(fdir)
    cfg.seed = args.seed
    cfg.objective = "fusion"
    cfg.dcevo_checkpoint = ""
    for k, v in demo_dcevo_config().to_dict().items():
        if k in cfg.dcevo:
            cfg.dcevo[k] = v
    _grpo_data(cfg, args, data["train"], "grid")
    cfg.max_steps = args.warmup_steps
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
    cfg = grpo_base_config()
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
    cfg.warmup_steps = grpo_lr_warmup(args)
    cfg.weight_decay = 0.01
    cfg.beta = 0.1
    cfg.group_size = args.grpo_group
    cfg.exploration_std = grpo_sigma(args)
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
            "lr_warmup_steps": int(cfg.warmup_steps),
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


