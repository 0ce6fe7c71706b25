"""Reward-model training speed with and without the feature cache.

    python benchmarks/reward_training.py --geometry released --batch_size 1 --steps 2
    python benchmarks/reward_training.py --geometry small --batch_size 8 --steps 20

Random weights. Measures, after one warm-up (compile) step each:

* ``uncached``: the training step on pixel batches (the frozen backbone
  encodes IR, visible and fused images every step, then the head trains);
* ``cached``: the same step on precomputed tokens (what training from the
  feature cache runs);
* ``encode``: backbone throughput (images/s), i.e. the one-off cost of building
  the cache.

Note that the cached step still runs the frozen mixing ViT forward and
backward (the gradient reaches the projection through it), so the speed-up is
bounded by the share of the backbone encodes in the uncached step.
Prints a JSON line per geometry; numbers depend on the machine (state it when
you report them).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from evafusion_jax.models import reward_model as rm
from evafusion_jax.models.vit import ViTConfig
from evafusion_jax.train import parallel as par
from evafusion_jax.train import reward_training as rt


def geometry(name: str) -> rm.RewardConfig:
    if name == "released":
        return rm.RewardConfig(vit=ViTConfig.vit_l16_384())
    if name == "base":
        return rm.RewardConfig(vit=ViTConfig.vit_b16_224())
    if name == "small":
        return rm.RewardConfig.tiny(vit=ViTConfig.tiny(hidden_size=64, num_hidden_layers=2,
                                                      image_size=64, patch_size=8),
                                    score_conv_divisors=(1, 2, 4, 8, 8, 8))
    raise SystemExit(f"unknown geometry {name!r}")


def _time(fn, steps):
    out = fn()  # warm-up / compile
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps


def run(name: str, batch_size: int, steps: int, cache_dtype: str) -> dict:
    cfg = geometry(name)
    v = cfg.vit
    t0 = time.perf_counter()
    params = rm.init_params(cfg, jax.random.PRNGKey(0))
    init_s = time.perf_counter() - t0
    trained, frozen = rt.split_params(params)
    del params  # keep one copy of the (large) frozen weights
    mesh = par.data_mesh()
    opt = rt.make_optimizer(steps_per_epoch=100)
    step = rt.make_train_step(cfg, opt, mesh)
    rng = np.random.default_rng(0)
    b, s = batch_size, v.image_size
    pix = {k: rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32) for k in ("ir", "vi", "fused")}
    targets = {"heatmap": rng.random((b, s, s)).astype(np.float32),
               "scores": rng.uniform(0.2, 1, (b, 5)).astype(np.float32)}
    fr_all = par.replicate(frozen, mesh)
    del frozen
    fr_heads = {k: x for k, x in fr_all.items() if k != "vit"}
    state = par.replicate(rt.init_train_state(trained, opt), mesh)
    pix_batch = par.shard_batch({**pix, **targets}, mesh)

    enc = jax.jit(lambda p, x: rm.encode({"vit": p}, x, cfg))
    x3 = par.shard_batch(np.concatenate([pix["ir"], pix["vi"], pix["fused"]]), mesh)
    enc_s = _time(lambda: enc(fr_all["vit"], x3), steps)
    toks = np.asarray(enc(fr_all["vit"], x3))
    np_dt = {"float32": np.float32, "float16": np.float16}[cache_dtype]
    tok_batch = par.shard_batch({"tok_ir": toks[:b].astype(np_dt), "tok_vi": toks[b:2 * b].astype(np_dt),
                                 "tok_fused": toks[2 * b:].astype(np_dt), **targets}, mesh)

    uncached_s = _time(lambda: step(state, fr_all, pix_batch)[1]["loss"], steps)
    cached_s = _time(lambda: step(state, fr_heads, tok_batch)[1]["loss"], steps)
    return {
        "geometry": name, "vit": {"hidden": v.hidden_size, "layers": v.num_hidden_layers,
                                  "image": v.image_size, "patch": v.patch_size},
        "batch_size": b, "timed_steps": steps, "devices": [str(d) for d in jax.devices()],
        "machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} device(s)",
        "init_s": round(init_s, 2),
        "uncached_step_s": round(uncached_s, 4), "uncached_steps_per_s": round(1 / uncached_s, 4),
        "cached_step_s": round(cached_s, 4), "cached_steps_per_s": round(1 / cached_s, 4),
        "speedup": round(uncached_s / cached_s, 2),
        "encode_images_per_s": round(3 * b / enc_s, 3),
        "cache_dtype": cache_dtype,
        "cache_bytes_per_image": int(v.num_patches * v.hidden_size * np.dtype(np_dt).itemsize),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="small", choices=["released", "base", "small"], nargs="+")
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cache_dtype", default="float16", choices=["float32", "float16"])
    args = ap.parse_args()
    for g in ([args.geometry] if isinstance(args.geometry, str) else args.geometry):
        print(json.dumps(run(g, args.batch_size, args.steps, args.cache_dtype)), flush=True)


if __name__ == "__main__":
    main()
