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
``summary.json`` is reused (delete it to rerun that seed).
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
    (out / "seeds.json").write_text(json.dumps({"options": extra, "seeds": rows,
                                                "summary": summ}, indent=2))
    print(f"demo {' '.join(extra)}; seeds {seeds}; "
          f"mean demo time {np.mean([r['total_s'] for r in rows]):.0f} s\n")
    print(format_table(rows, summ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
