"""The demo's report: ``report.md``, ``summary.json``, ``grid.png`` and ``curves.png`` from the
stages' results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evafusion_jax.demo.config import SCORE_LABELS, STAGES, demo_dcevo_config
from evafusion_jax.demo.stages import _read_log
from evafusion_jax.storage import fileio


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"



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
    md.append(f"Seed {args.seed}, --steps {args.steps} (GRPO), --warmup-steps {args.warmup_steps}, "
              f"--reward-steps {args.reward_steps}; {data['num_train']} training pairs, "
              f"{data['num_test']} held-out pairs"
              + ("" if args.pairs else f" (synthetic, --test-seed {args.test_seed}: the same "
                                       "for every --seed)")
              + f"; total time {timings['total']:.0f} s.\n\n")
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
                  f"{_fmt(d.get('loss/artifact_heatmap'))}, "
                  f"CC {_fmt(d.get('heatmap/cc/artifact_heatmap'))}, "
                  f"NSS {_fmt(d.get('heatmap/nss/artifact_heatmap'))}; "
                  f"avg_metric {_fmt(d.get('avg_metric'))}.\n")
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
              f"{args.grpo_lr:g} (linear warm-up over {g['lr_warmup_steps']} steps), KL weight "
              f"0.1, auxiliary fusion-loss weight "
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
        "seed": args.seed, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "reward_steps": args.reward_steps, "timings_s": timings,
        "test_pairs": data["num_test"], "test_seed": None if args.pairs else args.test_seed,
        "pairs_min_detail": (args.pairs_min_detail if args.pairs and not args.reward else None),
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



