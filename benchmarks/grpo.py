"""GRPO benchmark: region scoring throughput and step time, shared vs re-encoded IR/visible tokens.

    python benchmarks/grpo.py [--geometry small|vit_l16_384] [--dtype float32|bfloat16]
                              [--regions 8] [--batch 2] [--crop 128] [--repeats 3]

Random weights (timings do not depend on them). For K regions of B pairs the
reward model encodes IR and visible once per pair (shared, what the trainer does)
or once per region (naive). Measures (after one compile):

* regions scored per second by ``ModelReward.regions`` (jitted);
* the full jitted GRPO train step (DCEvo forward/backward + theta_old/theta_ref
  forwards + region rewards) in seconds; with the default ``--ratio gaussian`` the
  step scores G x K regions per pair (``--group-size``), with ``l1`` K.

Geometries: ``small`` = a 4-layer, 128-wide ViT at 128x128 (patch 16) with a
small head, DCEvo dim 16; ``vit_l16_384`` = the released reward model
(ViT-L/16-384 backbone and mixing ViT) with the released DCEvo (dim 64).
Prints one JSON object per configuration.

``--per-region`` times instead, interleaved (A B A B ..., median of ``--repeats``), at
batch 1 and the reward model's input size, a region scored by
``ModelReward(share_tokens=False)`` (three backbone passes and the head) and a region
scored with the pair's IR/visible tokens given (one backbone pass and the head: what
``share_tokens=True`` pays per region); the pair's two encodes (paid once per pair when
shared) are the difference of the two. It prints the per-region ratio for
``--regions`` K regions per pair and for K -> infinity, with the FLOP bounds.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_medians, median_seconds

from evafusion_jax.models import dcevo, reward_model, vit
from evafusion_jax.rl import rewards
from evafusion_jax.train import grpo_training as gt
from evafusion_jax.train import parallel


def _geometry(name: str):
    if name == "small":
        rcfg = reward_model.RewardConfig(
            vit=vit.ViTConfig.tiny(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=512, image_size=128, patch_size=16),
            heatmap_channels=(64, 32), deconv_channels=(32, 32, 16, 16), heatmap_last_channels=16,
            score_conv_divisors=(1, 2, 4, 8, 16, 32), score_hidden=(64, 32))
        dcfg = dcevo.DCEvoConfig(dim=16, num_blocks=1, c2f_n=1, detail_layers=1, heads=2)
    elif name == "vit_l16_384":
        rcfg = reward_model.RewardConfig()
        dcfg = dcevo.DCEvoConfig()
    else:
        raise SystemExit(f"unknown geometry {name!r}; use small or vit_l16_384")
    return rcfg, dcfg



def per_region(args, rcfg, rparams):
    """Per-region cost of region scoring, IR/visible tokens shared or not (module doc)."""
    from reward_training import analytic_gflop

    rng = np.random.default_rng(0)
    s = rcfg.vit.image_size
    img = lambda: jnp.asarray(rng.random((1, s, s, 1)), jnp.float32)  # noqa: E731
    fused, ir, vi = img(), img(), img()
    masks = jnp.ones((1, 1, s, s), jnp.float32)
    naive = rewards.ModelReward(rcfg, share_tokens=False, dtype=args.dtype)
    shared = rewards.ModelReward(rcfg, share_tokens=True, dtype=args.dtype)
    cfg = shared.model_config

    def region(p, f, tok_ir, tok_vi):  # per region when shared (ModelReward's one_region)
        p = shared._params(p)
        tok_f = reward_model.encode(p, shared.pixel_values(f), cfg)
        return shared._aggregate(reward_model.head(p, tok_ir, tok_vi, tok_f, cfg))[0]

    t0 = time.perf_counter()
    naive_c = jax.jit(naive.regions).lower(rparams, fused, ir, vi, masks).compile()
    v = rcfg.vit
    toks = [jnp.asarray(rng.standard_normal((1, v.num_patches, v.hidden_size)), jnp.float32)
            for _ in range(2)]  # the pair's tokens (values do not change the time)
    region_c = jax.jit(region).lower(rparams, fused, *toks).compile()
    compile_s = time.perf_counter() - t0
    res = interleaved_medians({
        "naive_region": lambda: naive_c(rparams, fused, ir, vi, masks)[0],
        "shared_region": lambda: region_c(rparams, fused, *toks)}, args.repeats,
        warmup=not args.no_warmup)
    t = {k: r["median_s"] for k, r in res.items()}
    k = args.regions
    parts = analytic_gflop(rcfg)
    e = parts["backbone_fwd"]
    h = (parts["projection_fwd"] + parts["mixing_vit_fwd"] + parts["heatmap_heads_fwd"]
         + parts["score_heads_fwd"])
    return {"mode": "per_region", "geometry": args.geometry, "dtype": args.dtype, "batch": 1,
            "device": str(jax.devices()[0].platform), "compile_s": round(compile_s, 1),
            "repeats": args.repeats, "times_s": {n: r["times_s"] for n, r in res.items()},
            "median_s": {n: round(x, 4) for n, x in t.items()},
            "regions": k,
            # the pair's two encodes = the naive region's extra work over the shared one
            "pair_encode_s_est": round(t["naive_region"] - t["shared_region"], 4),
            "ratio_per_region_k": round(k * t["naive_region"] / (
                t["naive_region"] - t["shared_region"] + k * t["shared_region"]), 3),
            "ratio_per_region_k_inf": round(t["naive_region"] / t["shared_region"], 3),
            "bound_k": round(k * (3 * e + h) / (2 * e + k * (e + h)), 3),
            "bound_k_inf": round((3 * e + h) / (e + h), 3),
            "gflop": {"backbone_fwd": e, "head_fwd": round(h, 2)}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--regions", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", default="gaussian", choices=("gaussian", "l1"),
                    help="GRPO policy of the timed step (gaussian scores G x K regions per pair)")
    ap.add_argument("--group-size", type=int, default=4, help="G sampled fusions per pair")
    ap.add_argument("--no-step", action="store_true", help="only time the region scoring")
    ap.add_argument("--per-region", action="store_true",
                    help="time the per-region costs, shared vs re-encoded tokens (module doc)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="--per-region: no untimed first call (the functions are compiled ahead)")
    args = ap.parse_args(argv)

    rcfg, dcfg = _geometry(args.geometry)
    rparams = reward_model.init_params(rcfg, jax.random.PRNGKey(0))
    if args.dtype == "bfloat16":
        rparams = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), rparams)
    if args.per_region:
        print(json.dumps(per_region(args, rcfg, rparams)), flush=True)
        return
    dparams = dcevo.init_params(dcfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    b, k, c = args.batch, args.regions, args.crop
    batch = {"ir": rng.random((b, c, c, 1)).astype(np.float32),
             "vi": rng.random((b, c, c, 1)).astype(np.float32),
             "masks": (rng.random((b, k, c, c)) > 0.5).astype(np.float32),
             "valid": np.ones((b, k), bool)}
    fused = jnp.asarray(rng.random((b, c, c, 1)), jnp.float32)
    mesh = parallel.data_mesh()
    for share in (True, False):
        rf = rewards.ModelReward(rcfg, share_tokens=share, dtype=args.dtype)
        score = jax.jit(rf.regions)
        t0 = time.perf_counter()
        jax.block_until_ready(score(rparams, fused, batch["ir"], batch["vi"], batch["masks"]))
        compile_s = time.perf_counter() - t0
        t_score = median_seconds(lambda: score(rparams, fused, batch["ir"], batch["vi"], batch["masks"]),
                        args.repeats)
        rec = {"geometry": args.geometry, "dtype": args.dtype, "share_tokens": share,
               "batch": b, "regions": k, "crop": c, "device": str(jax.devices()[0].platform),
               "n_devices": jax.device_count(), "score_compile_s": round(compile_s, 2),
               "score_s": round(t_score, 4), "regions_per_s": round(b * k / t_score, 2)}
        if not args.no_step:
            hp = gt.TrainHParams(objective="grpo", ratio=args.ratio, group_size=args.group_size)
            tx, _ = gt.make_optimizer(1e-4, 100)
            step = gt.make_train_step(hp, dcfg, tx, rf, mesh)
            state = parallel.replicate(gt.create_train_state(dparams, tx), mesh)
            rp = parallel.replicate(rparams, mesh)
            sb = parallel.shard_batch(batch, mesh)
            holder = {"s": state}

            def one():
                holder["s"], m = step(holder["s"], rp, sb)
                return m["loss"]
            rec["step_s"] = round(median_seconds(one, args.repeats), 4)
            per_step = b * k * (args.group_size if args.ratio == "gaussian" else 1)
            rec.update(ratio=args.ratio, group_size=args.group_size,
                       step_regions=per_step, step_regions_per_s=round(per_step / rec["step_s"], 2))
        if jax.devices()[0].platform == "gpu":
            stats = jax.devices()[0].memory_stats() or {}
            rec["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
