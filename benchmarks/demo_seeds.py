"""Runs the demo for several seeds and prints the before/after numbers with mean +- std.

    python benchmarks/demo_seeds.py [--seeds 0,1,2,3,4] [--out demo_seeds] [demo options ...]

Every seed is a complete ``python -m evafusion_jax.demo --seed N`` run into ``OUT/seed_N``
(other options are passed through, e.g. ``--region-reward masked`` or ``--pairs DIR``;
``--reuse EARLIER_OUT`` reuses each seed's warm-up and reward model from an earlier run). For
each seed it reads ``summary.json``'s ``before_after``: (i) the deterministic policy's mean
region reward on the fixed training crops and (ii) the held-out pairs' whole-image reward,
before and after GRPO. It prints a table per seed, the mean +- std (population) of every
column over the seeds, and whether every seed's gain exceeds the seed-to-seed spread (std) of
the "before" values; ``OUT/seeds.json`` gets the same numbers. An existing seed folder with a
``summary.json`` is reused (delete it to rerun that seed). ``--cross-judge`` also scores every
seed's held-out fusions with every seed's reward model (``cross_judge``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

KEYS = (("policy_region_reward", "region reward, training crops"),
        ("heldout_reward", "whole-image reward, held-out pairs"))


def run_seed(seed: int, out: Path, extra: list[str], reuse: Path | None = None,
             reuse_reward: bool = True) -> dict:
    from evafusion_jax import demo
    folder = out / f"seed_{seed}"
    if reuse is not None:  # the same seed's warm-up (and reward model) from an earlier run
        work = reuse / f"seed_{seed}" / "work"
        extra = extra + ["--dcevo", str(work / "fusion" / "dcevo_final")]
        extra += (["--reward", str(work / "reward" / "final_model")] if reuse_reward else
                  ["--eval-reward", str(work / "reward" / "final_model")])
    if not (folder / "summary.json").is_file():
        t = time.time()
        rc = demo.main(["--out", str(folder), "--overwrite", "--seed", str(seed)] + extra)
        if rc:
            raise SystemExit(f"demo seed {seed} failed with exit code {rc}")
        print(f"seed {seed}: {time.time() - t:.0f} s", flush=True)
    s = json.loads((folder / "summary.json").read_text())
    row = {"seed": seed, "total_s": s["timings_s"]["total"]}
    for key, _ in KEYS:
        b, a = s["before_after"][key]["before"], s["before_after"][key]["after"]
        row[key] = {"before": b, "after": a, "gain": a - b}
    return row


def summarize(rows: list[dict]) -> dict:
    out = {}
    for key, _ in KEYS:
        cols = {c: np.array([r[key][c] for r in rows], np.float64)
                for c in ("before", "after", "gain")}
        spread = float(cols["before"].std())
        out[key] = {c: {"mean": float(v.mean()), "std": float(v.std())} for c, v in cols.items()}
        out[key]["min_gain"] = float(cols["gain"].min())
        out[key]["every_seed_up"] = bool(np.all(cols["gain"] > 0))
        out[key]["every_gain_above_before_spread"] = bool(np.all(cols["gain"] > spread))
    return out


def cross_judge(out: Path, seeds: list[int]) -> dict:
    """(ii) with every seed's reward model as the judge of every seed's held-out fusions.

    Each seed trains its own reward model, and reward models differ in calibration (one may
    score every image 0.5 lower): the std of the "before" values over seeds then measures
    the judges as much as the networks. Scored by one judge, the spread is the networks'
    alone. Returns, per judge, the before/after means per seed and how many gains exceed
    that judge's "before" std, and the same for the mean over judges."""
    from evafusion_jax.data import grpo_pairs, image_io
    from evafusion_jax.demo import stages

    def folder(s):
        return out / f"seed_{s}"

    def checkpoint(s):
        ck = Path(json.loads((folder(s) / "summary.json").read_text())["reward_model"]
                  ["checkpoint"])
        return ck if ck.is_absolute() else folder(s) / ck
    test = folder(seeds[0]) / "work" / "data" / "pairs_test"
    names = grpo_pairs.list_pairs(test)
    pairs = [(image_io.read_image(test / "ir" / n), image_io.read_image(test / "vi" / n))
             for n in names]
    fused = {(s, tag): [image_io.to_gray(image_io.read_image(
        folder(s) / "work" / f"fused_{tag}" / (Path(n).stem + ".png"))) for n in names]
        for s in seeds for tag in ("before", "after")}
    scores = {}
    for j in seeds:
        score = stages._score_fn(checkpoint(j))
        for key, images in fused.items():
            scores[(j,) + key] = float(np.mean([score(ir, vi, f)[2]
                                                for (ir, vi), f in zip(pairs, images)]))

    def verdict(before, after):
        spread = float(np.std(before))
        gains = np.asarray(after) - np.asarray(before)
        return {"before": [float(x) for x in before], "after": [float(x) for x in after],
                "before_std": spread, "above": int(np.sum(gains > spread)),
                "up": int(np.sum(gains > 0))}
    res = {"seeds": seeds, "judges": {}}
    for j in seeds:
        res["judges"][j] = verdict([scores[(j, s, "before")] for s in seeds],
                                   [scores[(j, s, "after")] for s in seeds])
    res["mean_over_judges"] = verdict(
        [np.mean([scores[(j, s, "before")] for j in seeds]) for s in seeds],
        [np.mean([scores[(j, s, "after")] for j in seeds]) for s in seeds])
    return res


def format_cross_judge(res: dict) -> str:
    lines = ["held-out whole-image reward, every seed's reward model as judge (gain per seed "
             f"{res['seeds']}; above = gain > that judge's std of the before values):",
             "| judge | before std | gains | up | above |", "|---|---|---|---|---|"]
    items = [(str(j), v) for j, v in res["judges"].items()]
    items.append(("mean over judges", res["mean_over_judges"]))
    n = len(res["seeds"])
    for name, v in items:
        gains = " ".join(f"{a - b:+.3f}" for b, a in zip(v["before"], v["after"]))
        lines.append(f"| {name} | {v['before_std']:.3f} | {gains} | {v['up']}/{n} | "
                     f"{v['above']}/{n} |")
    return "\n".join(lines)


def format_table(rows: list[dict], summ: dict) -> str:
    lines = []
    for key, title in KEYS:
        lines.append(f"{title}:")
        lines.append("| seed | before | after | gain |")
        lines.append("|---|---|---|---|")
        for r in rows:
            v = r[key]
            lines.append(f"| {r['seed']} | {v['before']:.4f} | {v['after']:.4f} | "
                         f"{v['gain']:+.4f} |")
        m = summ[key]
        lines.append("| mean +- std | " + " | ".join(
            f"{m[c]['mean']:.4f} +- {m[c]['std']:.4f}" for c in ("before", "after", "gain")) + " |")
        lines.append(f"every seed up: {m['every_seed_up']}; every gain > std of the before "
                     f"values ({m['before']['std']:.4f}): {m['every_gain_above_before_spread']}\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--out", default="demo_seeds", help="folder of the per-seed demo outputs")
    p.add_argument("--reuse", help="an earlier --out: each seed reuses its fusion warm-up and "
                                   "reward model (only GRPO and the evaluation run), to compare "
                                   "GRPO variants on the same models")
    p.add_argument("--cross-judge", action="store_true",
                   help="also score every seed's held-out fusions with every seed's reward "
                        "model (the spread of one judge is the networks' alone)")
    p.add_argument("--reuse-warmup-only", action="store_true",
                   help="with --reuse: train a new reward model (e.g. --reward-masked-examples) "
                        "but score the held-out pairs with the reused one")
    args, extra = p.parse_known_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reuse = Path(args.reuse) if args.reuse else None
    rows = [run_seed(s, out, extra, reuse, not args.reuse_warmup_only) for s in seeds]
    summ = summarize(rows)
    record = {"options": extra, "seeds": rows, "summary": summ}
    if args.cross_judge:
        record["cross_judge"] = cross_judge(out, seeds)
    (out / "seeds.json").write_text(json.dumps(record, indent=2))
    print(f"demo {' '.join(extra)}; seeds {seeds}; "
          f"mean demo time {np.mean([r['total_s'] for r in rows]):.0f} s\n")
    print(format_table(rows, summ))
    if args.cross_judge:
        print(format_cross_judge(record["cross_judge"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
