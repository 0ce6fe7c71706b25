"""Reward-model training speed with and without the feature cache, side by side.

    python benchmarks/reward_training.py --geometry released --batch_size 1 --repeats 3 --no-warmup
    python benchmarks/reward_training.py --small            # quick check (= --geometry small)

Random weights. Compiles ahead of time, then times, interleaved (A B C A B C ...,
median of ``--repeats`` each, so that a drifting load hits every variant alike):

* ``uncached``: the training step on pixel batches (the frozen backbone encodes IR,
  visible and fused images every step, then the head trains): the released cost;
* ``cached``: the same step on precomputed tokens (training from the feature cache);
* ``encode3``: the three backbone passes alone (what the cache removes); the uncached
  step is exactly the cached one plus these passes (``--no-uncached`` skips it, e.g. when
  memory or time is short, and reports ``(cached + encode3) / cached``);
* with ``--xla-conv-grad``, also ``cached_xla_conv_grad``: the cached step with XLA's
  own convolution kernel gradients instead of ``models/convolution.py``'s (the code
  before that module).

The cached step still runs the frozen mixing ViT forward and backward (the gradient
reaches the projection through it; its weights get no gradient) and the heads forward
and backward, so the speed-up is bounded. The bound is printed twice: from analytic
FLOPs of the parts (:func:`analytic_gflop`) and from XLA's cost analysis of the two
compiled steps. Prints one JSON line per geometry; numbers depend on the machine and
its load (state both when you report them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import jax
import numpy as np
from timing import interleaved_medians

from evafusion_jax.models import convolution
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


def analytic_gflop(cfg: rm.RewardConfig) -> dict:
    """Forward GFLOPs (2 per multiply-add, per sample) of the reward model's parts."""
    v = cfg.vit
    g, d, f = v.grid_size, v.hidden_size, v.intermediate_size
    n = g * g

    def vit_blocks(tokens):
        lin = v.num_hidden_layers * (2 * tokens * d * 4 * d + 2 * 2 * tokens * d * f)
        att = v.num_hidden_layers * 2 * 2 * tokens * tokens * d
        return lin, att

    def conv(h, cin, cout, k=3):
        return 2 * h * h * k * k * cin * cout

    lin, att = vit_blocks(n + 1)
    backbone = lin + att + 2 * n * v.num_channels * v.patch_size ** 2 * d
    c1, c2 = cfg.heatmap_channels
    heat = conv(g, d, c1) + conv(g, c1, c2)
    h, cin = g, c2
    for c in cfg.deconv_channels:   # a stride-2 transposed conv: 9/4 taps per output pixel
        h *= 2
        heat += conv(h, cin, c) / 4 + 2 * conv(h, c, c)
        cin = c
    heat += conv(h, cin, cfg.heatmap_last_channels) + conv(h, cfg.heatmap_last_channels, 1)
    score, cin = 0, d
    for div in cfg.score_conv_divisors:
        score += conv(g, cin, d // div)
        cin = d // div
    width = n * cin
    for hdim in cfg.score_hidden:
        score += 2 * width * hdim
        width = hdim
    score += 2 * width
    n_heat = len(cfg.heatmap_types) if cfg.multi_heads else 1
    n_score = len(cfg.score_types) if cfg.multi_heads else 1
    return {k: round(x / 1e9, 4) for k, x in {
        "backbone_fwd": backbone, "mixing_vit_fwd": lin + att, "mixing_vit_attention": att,
        "projection_fwd": 2 * n * 3 * d * d, "heatmap_heads_fwd": n_heat * heat,
        "score_heads_fwd": n_score * score}.items()}


def cache_bound(parts: dict) -> dict:
    """The cached and uncached steps' GFLOPs per sample and their ratio (the bound).

    Both run the projection forward and its weight gradient (2x), the frozen mixing
    ViT forward and its input gradient only (1x for the linear layers, 2x for the
    attention products), the trained heads forward, input and weight gradients (3x);
    the uncached step adds the three backbone passes."""
    cached = (2 * parts["projection_fwd"] + 2 * parts["mixing_vit_fwd"]
              + parts["mixing_vit_attention"]
              + 3 * (parts["heatmap_heads_fwd"] + parts["score_heads_fwd"]))
    uncached = cached + 3 * parts["backbone_fwd"]
    return {"cached_gflop": round(cached, 1), "uncached_gflop": round(uncached, 1),
            "bound": round(uncached / cached, 3)}


@contextlib.contextmanager
def xla_conv_gradients():
    """Inside: ``convolution.conv2d`` differentiates with XLA's own gradients (before #16)."""
    orig = convolution._conv
    convolution._conv = convolution._lax_conv
    try:
        yield
    finally:
        convolution._conv = orig


def _flops(compiled) -> float:
    a = compiled.cost_analysis()
    a = a[0] if isinstance(a, (list, tuple)) else a
    return float(a.get("flops", 0.0))


def run(name: str, batch_size: int, repeats: int, cache_dtype: str, warmup: bool = True,
        xla_conv_grad: bool = False, uncached: bool = True) -> dict:
    cfg = geometry(name)
    v = cfg.vit
    t0 = time.perf_counter()
    params = rm.init_params(cfg, jax.random.PRNGKey(0))
    init_s = time.perf_counter() - t0
    trained, frozen = rt.split_params(params)
    del params  # keep one copy of the (large) frozen weights
    mesh = par.data_mesh()
    opt = rt.make_optimizer(steps_per_epoch=100)
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
    toks = np.asarray(enc(fr_all["vit"], x3))
    np_dt = {"float32": np.float32, "float16": np.float16}[cache_dtype]
    tok_batch = par.shard_batch({"tok_ir": toks[:b].astype(np_dt), "tok_vi": toks[b:2 * b].astype(np_dt),
                                 "tok_fused": toks[2 * b:].astype(np_dt), **targets}, mesh)

    # Ahead-of-time compiles; one step function per variant (no shared trace cache).
    t0 = time.perf_counter()
    enc_c = enc.lower(fr_all["vit"], x3).compile()
    cac_c = rt.make_train_step(cfg, opt, mesh).lower(state, fr_heads, tok_batch).compile()
    fns = {"cached": lambda: cac_c(state, fr_heads, tok_batch)[1]["loss"],
           "encode3": lambda: enc_c(fr_all["vit"], x3)}
    if uncached:
        unc_c = rt.make_train_step(cfg, opt, mesh).lower(state, fr_all, pix_batch).compile()
        fns = {"uncached": lambda: unc_c(state, fr_all, pix_batch)[1]["loss"], **fns}
    if xla_conv_grad:
        with xla_conv_gradients():
            old_c = rt.make_train_step(cfg, opt, mesh).lower(state, fr_heads, tok_batch).compile()
        fns["cached_xla_conv_grad"] = lambda: old_c(state, fr_heads, tok_batch)[1]["loss"]
    compile_s = time.perf_counter() - t0
    xla = {"cached_gflop": round(_flops(cac_c) / 1e9, 1), "encode3_gflop": round(_flops(enc_c) / 1e9, 1)}
    if uncached:
        xla["uncached_gflop"] = round(_flops(unc_c) / 1e9, 1)
    xla["bound"] = round(xla.get("uncached_gflop", xla["cached_gflop"] + xla["encode3_gflop"])
                         / xla["cached_gflop"], 3) if xla["cached_gflop"] else None
    parts = analytic_gflop(cfg)
    bound = cache_bound(parts)
    bound = {k: (round(x * b, 1) if k.endswith("gflop") else x) for k, x in bound.items()}

    res = interleaved_medians(fns, repeats, warmup=warmup)
    med = {k: r["median_s"] for k, r in res.items()}
    out = {
        "geometry": name, "vit": {"hidden": v.hidden_size, "layers": v.num_hidden_layers,
                                  "image": v.image_size, "patch": v.patch_size},
        "batch_size": b, "repeats": repeats, "interleaved": list(fns), "warmup": warmup,
        "devices": [str(d) for d in jax.devices()],
        "machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} device(s)",
        "init_s": round(init_s, 2), "compile_s": round(compile_s, 1),
        "times_s": {k: r["times_s"] for k, r in res.items()},
        "cached_step_s": round(med["cached"], 4), "encode3_s": round(med["encode3"], 4),
        # the uncached step is the cached one plus the three (stop_gradient) backbone passes
        "speedup_cached_plus_encode3": round((med["cached"] + med["encode3"]) / med["cached"], 3),
        "bound_analytic": bound, "parts_gflop_per_sample": parts, "bound_xla_cost_analysis": xla,
        "cached_gflop_per_s": round(bound["cached_gflop"] / med["cached"], 1),
        "encode3_gflop_per_s": round(3 * b * parts["backbone_fwd"] / med["encode3"], 1),
        "encode_images_per_s": round(3 * b / med["encode3"], 3),
        "cache_dtype": cache_dtype,
        "cache_bytes_per_image": int(v.num_patches * v.hidden_size * np.dtype(np_dt).itemsize),
    }
    if uncached:
        out.update(uncached_step_s=round(med["uncached"], 4),
                   speedup=round(med["uncached"] / med["cached"], 3),
                   uncached_gflop_per_s=round(bound["uncached_gflop"] / med["uncached"], 1))
    if xla_conv_grad:
        out["cached_xla_conv_grad_step_s"] = round(med["cached_xla_conv_grad"], 4)
        out["speedup_with_xla_conv_grad"] = round(
            (med["uncached"] if uncached else med["cached"] + med["encode3"])
            / med["cached_xla_conv_grad"], 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default=["small"], choices=["released", "base", "small"], nargs="+")
    ap.add_argument("--small", action="store_true", help="shorthand for --geometry small")
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--repeats", "--steps", type=int, default=3, dest="repeats",
                    help="timed calls of each variant (median reported)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed first call of each variant (they are compiled ahead of time)")
    ap.add_argument("--xla-conv-grad", action="store_true",
                    help="also time the cached step with XLA's own convolution kernel gradients")
    ap.add_argument("--no-uncached", action="store_true",
                    help="do not compile/time the uncached step (memory, time); the speed-up is then "
                         "(cached + encode3) / cached")
    ap.add_argument("--cache_dtype", default="float16", choices=["float32", "float16"])
    args = ap.parse_args()
    for g in (["small"] if args.small else args.geometry):
        print(json.dumps(run(g, args.batch_size, args.repeats, args.cache_dtype,
                             warmup=not args.no_warmup, xla_conv_grad=args.xla_conv_grad,
                             uncached=not args.no_uncached)), flush=True)


if __name__ == "__main__":
    main()
