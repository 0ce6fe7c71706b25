"""The demo's driver: runs the stages in order into a staging folder, writes the report and
renames it into place (``python -m evafusion_jax.demo``)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from evafusion_jax.demo.config import STAGES, build_parser, validate
from evafusion_jax.demo.report import write_report
from evafusion_jax.demo.stages import (
    stage_data,
    stage_evaluate,
    stage_fusion,
    stage_grpo,
    stage_reward,
)
from evafusion_jax.storage import fileio
from evafusion_jax.storage.fileio import commit_dir, staging_dir

log = logging.getLogger("evafusion_jax.demo")


def _stage(i: int, msg: str = "") -> None:
    log.info("[stage %d/%d] %s%s", i + 1, len(STAGES), STAGES[i], f": {msg}" if msg else "")



def run(args) -> dict:
    """Runs all stages into ``args.out``; returns the summary dict (also in summary.json)."""
    validate(args)
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
