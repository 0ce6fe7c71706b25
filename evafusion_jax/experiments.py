"""The paper's ablation study: ``python -m evafusion_jax.experiments --config configs/experiments.py``.

    python -m evafusion_jax.experiments --config configs/experiments.py          # CPU preset
    python -m evafusion_jax.experiments --config configs/experiments.py:full \\
        --config.init.dcevo_checkpoint=ckpt/dcevo --config.init.reward_checkpoint=ckpt/reward \\
        --config.regions.sam_checkpoint=sam_vit_h_4b8939.pth --config.data.train_dir=/data/MSRS \\
        --config.data.eval_dirs=TNO=/data/TNO,RoadScene=/data/RoadScene,M3FD=/data/M3FD

Runs a list of variants x seeds from ONE initial DCEvo and ONE reward model, evaluates every
(variant, seed) on held-out pair folders and writes the paper's two ablation tables.

Variants (``--config.variants``, comma-separated; :data:`VARIANTS`):

* ``baseline``: the initial DCEvo, not fine-tuned (evaluated once; it has no seed);
* ``full`` (alias ``grpo``): region GRPO with the full reward (score and heatmap branches) on the
  region cache (SAM, or the preset's fallback);
* ``wo_score`` / ``wo_heatmap``: the reward without the score / the heatmap branch
  (``weights.use_scores`` / ``weights.use_heatmap`` = False);
* ``wo_sam``: random rectangular crops instead of SAM regions (``data.region_source=random_crops``);
* ``dpo`` / ``ppo``: the policy-optimisation ablations (``objective=dpo|ppo``, see
  :mod:`evafusion_jax.train.grpo_training`).

Everything else (steps, learning rate, group, crops) is ``config.train`` (configs/grpo.py fields)
and is the same for all variants. Seeds change the data order and crops of fine-tuning
(``data.seed``) and nothing else: the initial models are shared, and the exploration noise is keyed
by (``train.noise_seed``, step, pair index) as in ``train_grpo`` and is the same stream for every
seed, so that the seeds of a variant run one compiled program (the persistent compilation cache in
``OUT/jax_cache`` then compiles each variant once).

Layout of ``out_dir`` (every stage is a finished unit on disk; rerunning the same command resumes):

* ``study.json``: the config the study was started with (a rerun with other fields is refused);
* ``init/``: the initial models and data (``init.json`` once complete): made by the demo's stages
  (:mod:`evafusion_jax.demo`: reward model on the SYNTHETIC feedback set, fusion warm-up of a small
  DCEvo) unless ``init.reward_checkpoint`` / ``init.dcevo_checkpoint`` are given, plus the region
  cache of the fine-tuning pairs (:func:`precompute_regions.precompute_regions`);
* ``units/<variant>/seed_<s>/``: ``train/`` (a ``train_grpo`` workdir, so an interrupted unit
  resumes from its last checkpoint), ``fused/<set>/`` and ``result.json`` (written last,
  atomically: a unit with it is done and skipped);
* ``ablation.md``, ``ablation.csv``, ``ablation.json``, ``ablation.png``: the tables (mean +- std
  over seeds, sample std) and a bar chart, rewritten from the finished units after every unit
  (``--config.tables_only=True`` only rewrites them from the units finished so far).

Metrics are those of :mod:`evafusion_jax.evaluate` (``eval.metrics``; PSNR is ``PSNR_unit``, the
~60 dB convention of the EVAFusion tables) plus the reward model's five scores (``R_*``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evafusion_jax.storage import fileio

log = logging.getLogger("evafusion_jax.experiments")

#: variant name -> overrides of ``config.train`` (dotted field names); ``None``: not fine-tuned.
VARIANTS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "full": {},
    "wo_score": {"weights.use_scores": False},
    "wo_heatmap": {"weights.use_heatmap": False},
    "wo_sam": {"data.region_source": "random_crops"},
    "dpo": {"objective": "dpo"},
    "ppo": {"objective": "ppo"},
}
#: other names of variants (GRPO in the policy table is the full method of the component table)
ALIASES = {"grpo": "full"}
#: the paper's two tables: (title, [(row label, variant)])
TABLES = (
    ("Ablation of the components", [("w/o score branch", "wo_score"),
                                    ("w/o heatmap branch", "wo_heatmap"),
                                    ("w/o SAM (random crops)", "wo_sam"),
                                    ("Ours (full)", "full")]),
    ("Ablation of the policy optimisation", [("Baseline (DCEvo)", "baseline"), ("DPO", "dpo"),
                                             ("PPO", "ppo"), ("GRPO (ours)", "full")]),
)
#: config fields that may change between runs of one study
FREE_FIELDS = ("variants", "seeds", "progress", "out_dir", "tables_only")


class ExperimentError(ValueError):
    """An invalid study config or a study folder made with another config."""


# ----------------------------------------------------------------------------- config

def resolve_variants(spec: str | Sequence[str]) -> list[str]:
    """Variant names (aliases resolved, duplicates dropped, order kept); unknown names are an error."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in VARIANTS and n not in ALIASES]
    if unknown:
        raise ExperimentError(
            f"unknown variant(s) {unknown} in config field variants; known: "
            f"{', '.join(list(VARIANTS) + [f'{a} (= {b})' for a, b in ALIASES.items()])}")
    if not names:
        raise ExperimentError("config field variants is empty; e.g. --config.variants=baseline,full")
    out: list[str] = []
    for n in names:
        n = ALIASES.get(n, n)
        if n not in out:
            out.append(n)
    return out


def parse_seeds(spec) -> list[int]:
    try:
        seeds = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise ExperimentError(f"config field seeds={spec!r}: give comma-separated integers, e.g. 0,1,2") \
            from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"config field seeds={spec!r}: give distinct integers, e.g. 0,1,2")
    return seeds


def parse_eval_dirs(spec: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ExperimentError(f"config field data.eval_dirs: expected NAME=DIR, got {item!r}")
        if name in out:
            raise ExperimentError(f"config field data.eval_dirs: the name {name!r} is given twice")
        out[name] = Path(folder)
    return out


def _set_field(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value


def _check_study(cfg, out: Path) -> None:
    """Writes ``study.json`` or checks that the study in ``out`` used the same config."""
    mine = {k: v for k, v in cfg.to_dict().items() if k not in FREE_FIELDS}
    mine = json.loads(json.dumps(mine, default=str))
    path = out / "study.json"
    if path.exists():
        theirs = json.loads(path.read_text())
        diffs = []

        def walk(a, b, prefix=""):
            for k in sorted(set(a) | set(b)):
                x, y = a.get(k), b.get(k)
                if isinstance(x, dict) and isinstance(y, dict):
                    walk(x, y, f"{prefix}{k}.")
                elif x != y:
                    diffs.append(f"{prefix}{k}: {y!r} in the study, {x!r} now")
        walk(mine, theirs)
        if diffs:
            raise ExperimentError(
                f"{out} holds a study made with another config ({len(diffs)} field(s) differ: "
                + "; ".join(diffs[:8]) + "); use another --config.out_dir, or the same fields "
                "(only variants, seeds and progress may change)")
        return
    out.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(mine, indent=2))


# ----------------------------------------------------------------------------- initial models

def _demo_args(cfg):
    """The demo's options for the shared initial stages (data, reward model, fusion warm-up)."""
    from evafusion_jax import demo
    i, d, t = cfg.init, cfg.data, cfg.train
    # the demo's proportions: reward model 10x, fusion warm-up 3x the GRPO steps
    argv = ["--seed", str(i.seed), "--steps", str(max(int(i.steps), 1)),
            "--reward-steps", str(10 * max(int(i.steps), 1)),
            "--warmup-steps", str(3 * max(int(i.steps), 1)),
            "--pairs", str(d.train_dir), "--test-pairs", str(max(int(d.heldout), 1)),
            "--train-pairs", str(int(d.max_train_pairs) if d.max_train_pairs > 0 else 10 ** 9),
            "--crop", str(t.data.crop_size), "--batch", str(t.data.batch_size),
            "--regions", str(t.data.num_regions), "--feedback", str(i.feedback),
            "--feedback-size", str(i.feedback_size),
            "--pairs-min-detail", str(i.pairs_min_detail)]
    for opt, v in (("--vit", i.vit_checkpoint), ("--reward", i.reward_checkpoint),
                   ("--dcevo", i.dcevo_checkpoint)):
        if v:
            argv += [opt, str(v)]
    return demo.build_parser().parse_args(argv)


def prepare_init(cfg, out: Path) -> dict:
    """The initial DCEvo, reward model, fine-tuning pairs, region cache and held-out sets.

    Done once per study (``out/init/init.json``); an incomplete ``out/init`` is rebuilt.
    """
    from evafusion_jax import demo, precompute_regions
    from evafusion_jax.data import grpo_pairs
    from evafusion_jax.models import dcevo
    from evafusion_jax.storage import checkpoints
    root = out / "init"
    marker = root / "init.json"
    if marker.exists():
        return json.loads(marker.read_text())
    if root.exists():
        log.info("rebuilding the incomplete %s", root)
        shutil.rmtree(root)
    d = cfg.data
    if not d.train_dir:
        raise ExperimentError("config field data.train_dir is empty: set it to a folder of "
                              "fine-tuning pairs (ir/, vi/)")
    grpo_pairs.list_pairs(d.train_dir)  # PairDataError naming the problem
    extra = parse_eval_dirs(d.eval_dirs)
    for name, folder in extra.items():
        grpo_pairs.list_pairs(folder)
    if int(d.heldout) <= 0 and not extra:
        raise ExperimentError("nothing to evaluate: set data.heldout > 0 or data.eval_dirs")
    args = _demo_args(cfg)
    work = root / "work"
    data = demo.stage_data(args, work)
    if int(d.heldout) <= 0:  # every pair of train_dir fine-tunes; evaluation on eval_dirs only
        names = grpo_pairs.list_pairs(d.train_dir)
        if d.max_train_pairs > 0:
            names = names[:int(d.max_train_pairs)]
        shutil.rmtree(data["train"])
        data["train"] = demo._link_pairs(Path(d.train_dir), names, data["train"])
    reward = demo.stage_reward(args, work, data)
    fusion = demo.stage_fusion(args, work, data)

    params, cdict = checkpoints.load_params(fusion["checkpoint"], "dcevo")
    r = cfg.regions
    k = int(cfg.train.data.num_regions)
    if r.source == "sam":
        if not r.sam_checkpoint:
            raise ExperimentError("regions.source=sam needs regions.sam_checkpoint (a segment_anything "
                                  "checkpoint) or another source: superpixels, grid, random_crops")
        kw = dict(sam_model_type=r.sam_model_type, sam_checkpoint=r.sam_checkpoint,
                  generator_params={"points_per_side": int(r.points_per_side)})
    elif r.source == "superpixels":
        kw = dict(region_params={"n_segments": int(r.superpixels_per_region) * k,
                                 "compactness": 0.1})
    else:
        kw = {}
    precompute_regions.precompute_regions(
        data["train"], work / "regions", source=r.source, image=r.image, num_regions=k,
        dcevo_params=params, dcevo_config=dcevo.DCEvoConfig.from_dict(cdict), seed=int(cfg.init.seed),
        progress=bool(cfg.progress), **kw)

    sets = {}
    if int(d.heldout) > 0:
        sets[d.train_name] = str(data["test"])
    for name, folder in extra.items():
        names = grpo_pairs.list_pairs(folder)
        if d.eval_max_pairs > 0 and len(names) > d.eval_max_pairs:
            folder = demo._link_pairs(folder, names[:int(d.eval_max_pairs)], work / "eval" / name)
        sets[name] = str(Path(folder).absolute())
    info = {"dcevo": str(fusion["checkpoint"]), "reward": str(reward["checkpoint"]),
            "train": str(data["train"]), "regions": str(work / "regions"), "eval_sets": sets,
            "reward_trained": bool(reward["trained"]), "dcevo_trained": bool(fusion["trained"]),
            "pairs_kind": data.get("pairs_kind", ""),
            "num_train": len(grpo_pairs.list_pairs(data["train"]))}
    with fileio.atomic_path(marker) as tmp:
        Path(tmp).write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------- one unit

def unit_dir(out: Path, variant: str, seed: int | None) -> Path:
    return out / "units" / variant / ("init_model" if seed is None else f"seed_{seed}")


def train_config(cfg, init: dict, variant: str, seed: int, workdir: Path):
    """``config.train`` for one (variant, seed), with the shared initial models and data."""
    t = cfg.train.copy_and_resolve_references()
    for k, v in VARIANTS[variant].items():
        _set_field(t, k, v)
    t.workdir = str(workdir)
    t.seed = int(seed)
    t.data.seed = int(seed)
    t.dcevo_checkpoint = init["dcevo"]
    t.reward_kind = "model"
    t.reward_checkpoint = init["reward"]
    t.data.data_dir = init["train"]
    if t.data.region_source in ("sam", "cache"):
        t.data.cache_dir = init["regions"]
    t.progress = bool(cfg.progress)
    return t


def evaluate_params(cfg, init: dict, params, mcfg, name: str, udir: Path) -> dict:
    """Fuses every held-out set with ``params`` and computes the metrics and reward scores."""
    from evafusion_jax import evaluate, fuse
    names = [m.strip() for m in cfg.eval.metrics.split(",") if m.strip()]
    out = {}
    for set_name, folder in init["eval_sets"].items():
        folder = Path(folder)
        fused = udir / "fused" / set_name
        fuse.fuse_folder(params, mcfg, folder / "ir", folder / "vi", fused,
                         bucket=int(cfg.eval.bucket), overwrite=True, progress=bool(cfg.progress))
        tasks = evaluate.plan_evaluation(folder / "ir", folder / "vi", {name: fused})
        rows = evaluate.evaluate(tasks, names, workers=int(cfg.eval.workers) or None,
                                 progress=bool(cfg.progress))
        columns = list(names)
        if cfg.eval.reward_scores:
            for row, scores in zip(rows, evaluate.reward_scores(init["reward"], tasks,
                                                                progress=bool(cfg.progress))):
                row.update(scores)
            columns += sorted(k for k in rows[0] if k.startswith("R_"))
        out[set_name] = {"summary": evaluate.summarize(rows, columns)[name], "rows": rows}
    return out


def run_unit(cfg, init: dict, variant: str, seed: int | None, out: Path) -> dict:
    """Trains (unless ``baseline``) and evaluates one (variant, seed); returns its result."""
    from evafusion_jax import train_grpo
    from evafusion_jax.models import dcevo
    from evafusion_jax.storage import checkpoints
    udir = unit_dir(out, variant, seed)
    done = udir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    udir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_metrics: dict = {}
    if VARIANTS[variant] is None:
        ckpt = Path(init["dcevo"])
    else:
        tcfg = train_config(cfg, init, variant, seed, udir / "train")
        train_metrics = train_grpo.train(tcfg)
        ckpt = udir / "train" / "dcevo_final"
    params, cdict = checkpoints.load_params(ckpt, "dcevo")
    sets = evaluate_params(cfg, init, params, dcevo.DCEvoConfig.from_dict(cdict), variant, udir)
    result = {"variant": variant, "seed": seed, "checkpoint": str(ckpt),
              "sets": {k: v["summary"] for k, v in sets.items()},
              "per_image": {k: v["rows"] for k, v in sets.items()},
              "train_final_metrics": train_metrics, "seconds": time.perf_counter() - start}
    with fileio.atomic_path(done) as tmp:
        Path(tmp).write_text(json.dumps(fileio.json_safe(result), indent=2))
    return result


# ----------------------------------------------------------------------------- tables

def aggregate(results: Sequence[dict]) -> dict:
    """``{variant: {set: {column: {"mean", "std", "n_seeds", "values"}}}}`` over seeds.

    Each seed contributes its mean over the set's images; ``std`` is the sample std over
    seeds (0 with one seed).
    """
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    out: dict = {}
    for variant, rs in by_variant.items():
        out[variant] = {}
        for set_name in rs[0]["sets"]:
            cols = rs[0]["sets"][set_name]
            out[variant][set_name] = {}
            for c in cols:
                vals = [r["sets"][set_name][c]["mean"] for r in rs]
                v = np.array([np.nan if x is None else x for x in vals], np.float64)
                v = v[np.isfinite(v)]
                out[variant][set_name][c] = {
                    "mean": float(v.mean()) if v.size else float("nan"),
                    "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                    "n_seeds": int(v.size), "values": [float(x) for x in v],
                    "seeded": rs[0]["seed"] is not None}
    return out


def _cell(stat: dict | None, digits: int, n_seeds: int | None = None) -> str:
    """``mean ± std``; ``(n=k)`` when fewer seeds than the study's finished (an unfinished study)."""
    if not stat or not math.isfinite(stat["mean"]):
        return "-"
    few = f" (n={stat['n_seeds']})" if n_seeds and 1 < n_seeds and stat["n_seeds"] < n_seeds and \
        stat.get("seeded", True) else ""
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}{few}"


def _digits(metric: str) -> int:
    return 2 if metric.startswith("PSNR") or metric in ("NIQE", "BRISQUE") else 3


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def format_tables(agg: dict, sets: Sequence[str], table_metrics: Sequence[str],
                  all_metrics: Sequence[str], n_seeds: int | None = None) -> tuple[str, list[list]]:
    """The two tables in the paper's layout (cells ``CC / PSNR``), the full metric tables,
    and the long-format CSV rows. ``n_seeds``: cells over fewer seeds are marked ``(n=k)``."""
    from evafusion_jax.eval import metrics as metrics_lib
    md = []
    csv_rows = []
    for title, rows in TABLES:
        present = [(label, v) for label, v in rows if v in agg]
        if not present:
            continue
        md.append(f"### {title} ({' / '.join(table_metrics)}, mean ± std over seeds)\n\n")
        body = []
        for label, v in present:
            cells = [" / ".join(_cell(agg[v].get(s, {}).get(m), _digits(m), n_seeds)
                                for m in table_metrics) for s in sets]
            body.append([label] + cells)
            for s in sets:
                for m in all_metrics:
                    st = agg[v].get(s, {}).get(m)
                    if st:
                        csv_rows.append([title, label, v, s, m, st["mean"], st["std"], st["n_seeds"]])
        md.append(_md_table(["Method"] + list(sets), body) + "\n")
    md.append("### All metrics (mean ± std over seeds)\n\n")
    for s in sets:
        md.append(f"**{s}**\n\n")
        head = ["Variant"] + [m + (" ↑" if metrics_lib.HIGHER_IS_BETTER.get(m, True) else " ↓")
                              for m in all_metrics]
        body = [[v] + [_cell(agg[v].get(s, {}).get(m), _digits(m), n_seeds) for m in all_metrics]
                for v in VARIANTS if v in agg]
        md.append(_md_table(head, body) + "\n")
    return "".join(md), csv_rows


def plot_chart(agg: dict, sets: Sequence[str], chart_metrics: Sequence[str], path: Path) -> None:
    """Bars per variant (mean, error bar = std over seeds), one panel per (metric, set)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = [v for v in VARIANTS if v in agg]
    metrics_ = [m for m in chart_metrics if any(m in agg[v].get(s, {}) for v in variants for s in sets)]
    if not metrics_ or not sets:
        return
    fig, axes = plt.subplots(len(metrics_), len(sets), squeeze=False,
                             figsize=(3.2 * len(sets) + 1, 2.6 * len(metrics_) + 0.6))
    for i, m in enumerate(metrics_):
        for j, s in enumerate(sets):
            ax = axes[i][j]
            stats = [agg[v].get(s, {}).get(m) or {"mean": np.nan, "std": 0.0} for v in variants]
            means = np.array([st["mean"] for st in stats], float)
            ax.bar(range(len(variants)), means, yerr=[st["std"] for st in stats], capsize=3,
                   color=[f"C{k}" for k in range(len(variants))])
            finite = means[np.isfinite(means)]
            if finite.size:
                lo, hi = finite.min(), finite.max()
                pad = max(hi - lo, 1e-3 * max(abs(hi), 1.0))
                ax.set_ylim(lo - pad, hi + pad)
            ax.set_xticks(range(len(variants)))
            ax.set_xticklabels(variants, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{m}, {s}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def write_tables(cfg, out: Path, results: Sequence[dict], init: dict) -> dict:
    """``ablation.md``, ``.csv``, ``.json``, ``.png`` in ``out`` (each written atomically)."""
    from evafusion_jax import evaluate
    agg = aggregate(results)
    sets = list(init["eval_sets"])
    table_metrics = [m.strip() for m in cfg.eval.table_metrics.split(",") if m.strip()]
    all_metrics: list[str] = []
    for v in agg.values():
        for s in v.values():
            all_metrics += [c for c in s if c not in all_metrics]
    seeds = sorted({r["seed"] for r in results if r["seed"] is not None})
    md_tables, csv_rows = format_tables(agg, sets, table_metrics, all_metrics, len(seeds))
    header = (f"# Ablation study ({cfg.preset} preset)\n\n"
              f"Seeds {seeds}; held-out sets: "
              + ", ".join(f"{s} ({len(next(iter(results))['per_image'][s])} pairs)" for s in sets)
              + f"; fine-tuning pairs: {init['num_train']} ({init.get('pairs_kind', '')}); "
              f"{cfg.train.max_steps} steps per variant; reward model "
              f"{'trained on a SYNTHETIC feedback set' if init['reward_trained'] else init['reward']}; "
              f"initial DCEvo {'warmed up here (small)' if init['dcevo_trained'] else init['dcevo']}. "
              "The baseline is evaluated once (no seed). GRPO (ours) = the full method.\n\n")
    md = header + md_tables + "Metrics: " + evaluate.CONVENTIONS + "\n"
    with fileio.atomic_path(out / "ablation.md") as tmp:
        Path(tmp).write_text(md, encoding="utf-8")
    with fileio.atomic_path(out / "ablation.csv") as tmp:
        Path(tmp).write_text(evaluate._csv_text(
            ["table", "row", "variant", "set", "metric", "mean", "std", "n_seeds"], csv_rows))
    doc = {"preset": cfg.preset, "seeds": seeds, "sets": sets, "variants": agg,
           "tables": {title: [v for _, v in rows] for title, rows in TABLES},
           "init": init, "conventions": evaluate.CONVENTIONS}
    with fileio.atomic_path(out / "ablation.json") as tmp:
        Path(tmp).write_text(json.dumps(fileio.json_safe(doc), indent=2))
    with fileio.atomic_path(out / "ablation.png") as tmp:
        plot_chart(agg, sets, [m.strip() for m in cfg.eval.chart_metrics.split(",") if m.strip()],
                   Path(tmp))
    return doc



# ----------------------------------------------------------------------------- driver

def run(cfg) -> dict:
    """Runs (or resumes) the study described by ``cfg``; returns the tables' JSON document."""
    from tqdm import tqdm
    variants = resolve_variants(cfg.variants)
    seeds = parse_seeds(cfg.seeds)
    for v in variants:
        for k in (VARIANTS[v] or {}):
            try:
                _set_field(cfg.train.copy_and_resolve_references(), k, VARIANTS[v][k])
            except (KeyError, AttributeError):
                raise ExperimentError(f"variant {v!r} sets train.{k}, which configs/grpo.py "
                                      "does not have") from None
    out = Path(cfg.out_dir).absolute()
    if cfg.get("tables_only", False) and not (out / "init" / "init.json").exists():
        raise ExperimentError(f"{out} has no finished initial stage: nothing to tabulate")
    _check_study(cfg, out)
    _use_compilation_cache(out / "jax_cache")
    log.info("study %s: variants %s, seeds %s", out, variants, seeds)
    units = [(v, None) for v in variants if VARIANTS[v] is None]
    units += [(v, s) for s in seeds for v in variants if VARIANTS[v] is not None]
    if cfg.get("tables_only", False):  # the tables of the units finished so far; no work
        init = json.loads((out / "init" / "init.json").read_text())
        done = [unit_dir(out, v, s) / "result.json" for v, s in units]
        results = [json.loads(p.read_text()) for p in done if p.exists()]
        if not results:
            raise ExperimentError(f"{out} has no finished (variant, seed) unit yet")
        log.info("tables of %d of %d units", len(results), len(units))
        return write_tables(cfg, out, results, init)
    init = prepare_init(cfg, out)
    results = []
    with tqdm(total=len(units), desc="study", unit="unit", disable=not cfg.progress) as bar:
        for v, s in units:
            bar.set_postfix(variant=v, seed="-" if s is None else s)
            results.append(run_unit(cfg, init, v, s, out))
            doc = write_tables(cfg, out, results, init)  # partial tables after every unit
            bar.update(1)
    log.info("tables: %s", out / "ablation.md")
    return doc


def _use_compilation_cache(path: Path) -> None:
    """A persistent compilation cache for the study (unless one is configured already)."""
    import jax
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: Sequence[str] | None = None) -> int:
    from evafusion_jax import config as config_lib
    from evafusion_jax import demo, train_grpo
    from evafusion_jax.data import feedback, grpo_pairs, regions
    from evafusion_jax.storage import checkpoints
    argv = list(sys.argv if argv is None else argv)
    cfg = config_lib.parse_cli_config(argv, config_lib.default_config_path("experiments.py"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "evafusion_jax.train.checkpointer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run(cfg)
    except (ExperimentError, demo.DemoError, train_grpo.ConfigError, grpo_pairs.PairDataError,
            feedback.FeedbackDataError, checkpoints.CheckpointError, regions.RegionError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
