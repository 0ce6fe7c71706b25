"""Benchmark: all IVIF metrics over the TNO pairs of ../shared/data/TNO with pixel-mean fusion.

    python benchmarks/metrics.py [--data ../shared/data/TNO] [--workers 2]

Prints the wall-clock seconds of ``evaluate.evaluate`` (all 15 metrics, a pool of
``--workers`` processes, including pool start-up) and a single-process
per-metric breakdown on the first pair. The fused images (mean of the grey
sources) are written to a temporary folder that is deleted afterwards.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from evafusion_jax import evaluate
from evafusion_jax.data import image_io
from evafusion_jax.eval import metrics


def main():
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(repo.parent / "shared" / "data" / "TNO"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    data = Path(args.data)
    if not (data / "ir").is_dir():
        raise SystemExit(f"no benchmark data at {data} (expects ir/ and vi/)")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = image_io.pair_files({"ir": data / "ir", "vi": data / "vi"})
        for stem, p_ in pairs:
            a = image_io.to_gray(image_io.read_image(p_["ir"]))
            b = image_io.to_gray(image_io.read_image(p_["vi"]))
            image_io.save_image(Path(tmp) / f"{stem}.png", (a + b) / 2)
        tasks = evaluate.plan_evaluation(data / "ir", data / "vi", {"mean": tmp})
        t0 = time.perf_counter()
        rows = evaluate.evaluate(tasks, metrics.METRIC_NAMES, workers=args.workers, progress=False)
        total = time.perf_counter() - t0
        summary = evaluate.summarize(rows, list(metrics.METRIC_NAMES))
        print(evaluate.format_markdown(summary, list(metrics.METRIC_NAMES)))
        print(f"{len(tasks)} pairs, all {len(metrics.METRIC_NAMES)} metrics, {args.workers} worker processes: "
              f"{total:.1f} s ({total / len(tasks):.2f} s/pair); os.cpu_count()={os.cpu_count()}")
        f, a, b = (evaluate._load_gray(p_, True) for p_ in tasks[0][2:])
        parts = []
        for n in metrics.METRIC_NAMES:
            t0 = time.perf_counter()
            metrics.compute_metrics(f, a, b, [n])
            parts.append(f"{n} {time.perf_counter() - t0:.3f}")
        print(f"single process, pair {tasks[0][1]} ({f.shape[1]}x{f.shape[0]}), seconds per metric: " + ", ".join(parts))


if __name__ == "__main__":
    main()
