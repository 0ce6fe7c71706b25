"""Throughput and achieved FLOP/s of the jitted models (random weights).

    python benchmarks/models.py [--only dcevo,reward_b16,reward_l16] [--batch N] [--iters N] [--json OUT]

Cases:
  dcevo        DCEvo (released widths) at 128x128: forward, and forward+backward of a
               mean-output loss w.r.t. the parameters.
  reward_b16   reward model with a ViT-B/16-224 geometry: forward (3 backbone passes + head).
  reward_l16   reward model with the released ViT-L/16-384 geometry: forward, and the head
               alone on precomputed tokens (what GRPO / cached reward training run per step).

FLOPs come from XLA's cost analysis of the compiled executable (``flops`` of
``compiled.cost_analysis()``); achieved FLOP/s = FLOPs / median step time.
Compile time is reported separately and excluded from the step time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from evafusion_jax.models import dcevo
from evafusion_jax.models import reward_model as rm
from evafusion_jax.models.vit import ViTConfig


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def bench(name, fn, args, iters, items):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    flops = _flops(compiled)
    row = dict(case=name, compile_s=round(compile_s, 2), step_s=round(step, 4),
               items_per_s=round(items / step, 3), gflop_per_step=round(flops / 1e9, 2),
               achieved_gflops=round(flops / step / 1e9, 2))
    print(f"{name:<34} compile {compile_s:7.1f}s  step {step * 1e3:9.1f} ms  "
          f"{items / step:9.2f} items/s  {flops / 1e9:9.1f} GFLOP  {flops / step / 1e9:8.1f} GFLOP/s",
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="dcevo,reward_b16,reward_l16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    which = set(args.only.split(","))
    print(f"devices: {jax.devices()}  platform: {platform.processor() or platform.machine()}  "
          f"batch {args.batch}  dtype {args.dtype}", flush=True)
    rows = []
    b = args.batch
    key = jax.random.PRNGKey(0)

    if "dcevo" in which:
        cfg = dcevo.DCEvoConfig(dtype=args.dtype, precision="default")
        p = dcevo.init_params(cfg, 0)
        ir = jax.random.uniform(key, (b, 128, 128, 1))
        vi = jax.random.uniform(jax.random.PRNGKey(1), (b, 128, 128, 1))
        fwd = lambda p, a, c: dcevo.apply_model(p, a, c, cfg)["fused"]
        rows.append(bench("dcevo 128x128 forward", fwd, (p, ir, vi), args.iters, b))
        grad = jax.grad(lambda p, a, c: jnp.mean(dcevo.apply_model(p, a, c, cfg)["fused"]))
        rows.append(bench("dcevo 128x128 forward+backward", grad, (p, ir, vi), args.iters, b))

    for case, vcfg in (("reward_b16", ViTConfig.vit_b16_224()), ("reward_l16", ViTConfig.vit_l16_384())):
        if case not in which:
            continue
        cfg = rm.RewardConfig(vit=vcfg, dtype=args.dtype)
        p = rm.init_params(cfg, 0)
        s = vcfg.image_size
        x = jax.random.uniform(key, (b, s, s, 3), minval=-1, maxval=1)
        rows.append(bench(f"{case} {s}x{s} forward", lambda p, x: rm.apply(p, x, x, x, cfg),
                          (p, x), args.iters, b))
        if case == "reward_l16":
            tok = jax.random.normal(key, (b, vcfg.num_patches, vcfg.hidden_size))
            rows.append(bench(f"{case} head on cached tokens", lambda p, t: rm.head(p, t, t, t, cfg),
                              (p, tok), args.iters, b))
        del p
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
