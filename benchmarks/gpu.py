"""One part of the GPU benchmark (benchmarks/gpu.sh runs every part, each in a fresh process).

    python benchmarks/gpu.py --part reward|grpo|fuse --dtype float32|bfloat16 [--smoke]
                             [--peak-tflops X] [--repeats 5] [--json-out FILE]

Random weights at the released geometry (ViT-L/16-384 reward model, DCEvo dim 64); nothing is
downloaded. ``--smoke``: tiny geometry (small ViT and DCEvo, small images) so the script can be
checked on a CPU in a minute; its numbers mean nothing.

Parts:
  reward  reward-model forward (3 backbone passes + mixing ViT + heads) per sample at batch
          ``--batch`` (8), its FLOPs (XLA cost analysis of the compiled step) and MFU against the
          card's peak; and the head alone on cached tokens (what GRPO and cached reward
          training run per region).
  grpo    one full jitted GRPO step (batch 2, K 8 regions, group 4, gaussian ratio: DCEvo
          forward/backward + theta_old/theta_ref forwards + G x K region rewards), its time,
          FLOPs, floor = FLOPs / peak, and the device's peak memory.
  fuse    DCEvo fusion throughput at 480x640 (images/s at batch 1 and 4).

MFU = FLOPs / time / peak. Peaks (dense TFLOP/s) come from a table of cards by
``device_kind`` (bfloat16 tensor cores; float32 runs at XLA's default matmul precision, which
on Ampere and later is TF32, so its MFU is against the TF32 peak); ``--peak-tflops`` overrides.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from timing import median_seconds

from evafusion_jax.models import dcevo, reward_model, vit
from evafusion_jax.rl import rewards
from evafusion_jax.train import grpo_training as gt
from evafusion_jax.train import parallel

# device_kind substring -> (bfloat16, tf32) dense tensor-core TFLOP/s (vendor data sheets).
PEAKS = {
    "H200": (989.0, 494.0), "H100 PCIe": (756.0, 378.0), "H100": (989.0, 494.0),
    "GH200": (989.0, 494.0), "B200": (2250.0, 1100.0), "A100": (312.0, 156.0),
    "L40S": (362.0, 181.0), "L4": (121.0, 60.0), "A10G": (70.0, 35.0), "A10": (125.0, 62.5),
    "RTX 4090": (165.0, 82.6), "RTX 3090": (71.0, 35.6), "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}


def peak_tflops(dtype: str, override: float | None):
    if override:
        return override, "--peak-tflops"
    kind = jax.devices()[0].device_kind
    for name, (bf16, tf32) in PEAKS.items():
        if name.lower() in kind.lower():
            return (bf16 if dtype == "bfloat16" else tf32), kind
    return None, kind


def _flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    f = (ca or {}).get("flops")
    return float(f) if f else None



def _compile(fn, *args):
    t = time.perf_counter()
    c = jax.jit(fn).lower(*args).compile()
    return c, time.perf_counter() - t


def _mfu(flops, seconds, peak):
    if not flops or not peak:
        return None
    return round(flops / seconds / (peak * 1e12), 4)


def _geometry(smoke: bool, dtype: str):
    if smoke:
        rcfg = reward_model.RewardConfig(
            vit=vit.ViTConfig.tiny(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=128, image_size=64, patch_size=16),
            heatmap_channels=(32, 16), deconv_channels=(16, 16, 8, 8), heatmap_last_channels=8,
            score_conv_divisors=(1, 2, 4, 8, 16, 32), score_hidden=(32, 16), dtype=dtype)
        dcfg = dcevo.DCEvoConfig(dim=8, num_blocks=1, c2f_n=1, detail_layers=1, heads=2,
                                 dtype=dtype, precision="default")
    else:
        rcfg = reward_model.RewardConfig(dtype=dtype)
        dcfg = dcevo.DCEvoConfig(dtype=dtype, precision="default")
    return rcfg, dcfg


def _peak_memory():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def part_reward(args, rec, peak):
    rcfg, _ = _geometry(args.smoke, args.dtype)
    p = reward_model.init_params(rcfg, 0)
    s, b = rcfg.vit.image_size, args.batch
    x = jax.random.uniform(jax.random.PRNGKey(0), (b, s, s, 3), minval=-1, maxval=1)
    c, cs = _compile(lambda p, x: reward_model.apply(p, x, x, x, rcfg), p, x)
    t = median_seconds(lambda: c(p, x), args.repeats)
    f = _flops(c)
    rec["reward_forward"] = dict(batch=b, image=s, compile_s=round(cs, 1), step_s=round(t, 4),
                                 per_sample_ms=round(t / b * 1e3, 2),
                                 gflop_per_sample=f and round(f / b / 1e9, 3), mfu=_mfu(f, t, peak))
    tok = jax.random.normal(jax.random.PRNGKey(1), (b, rcfg.vit.num_patches, rcfg.vit.hidden_size))
    c, cs = _compile(lambda p, t: reward_model.head(p, t, t, t, rcfg), p, tok)
    t = median_seconds(lambda: c(p, tok), args.repeats)
    f = _flops(c)
    rec["head_on_cached_tokens"] = dict(batch=b, compile_s=round(cs, 1), step_s=round(t, 4),
                                        per_sample_ms=round(t / b * 1e3, 2),
                                        gflop_per_sample=f and round(f / b / 1e9, 3),
                                        mfu=_mfu(f, t, peak))


def part_grpo(args, rec, peak):
    rcfg, dcfg = _geometry(args.smoke, args.dtype)
    rparams = reward_model.init_params(rcfg, 0)
    dparams = dcevo.init_params(dcfg, 1)
    rng = np.random.default_rng(0)
    b, k, c = 2, 8, (32 if args.smoke else args.crop)
    batch = {"ir": rng.random((b, c, c, 1)).astype(np.float32),
             "vi": rng.random((b, c, c, 1)).astype(np.float32),
             "masks": (rng.random((b, k, c, c)) > 0.5).astype(np.float32),
             "valid": np.ones((b, k), bool)}
    mesh = parallel.data_mesh()
    rf = rewards.ModelReward(rcfg, share_tokens=True, dtype=args.dtype)
    hp = gt.TrainHParams(objective="grpo", ratio="gaussian", group_size=4)
    tx, _ = gt.make_optimizer(1e-4, 100)
    step = gt.make_train_step(hp, dcfg, tx, rf, mesh)
    state = parallel.replicate(gt.create_train_state(dparams, tx), mesh)
    rp = parallel.replicate(rparams, mesh)
    sb = parallel.shard_batch(batch, mesh)
    flops = None
    try:
        flops = _flops(step.lower(state, rp, sb).compile())
    except Exception:  # noqa: BLE001 - a step that is not a plain jit: no FLOP count
        pass
    holder = {"s": state}

    def one():
        holder["s"], m = step(holder["s"], rp, sb)
        return m["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(one())
    first = time.perf_counter() - t0
    t = median_seconds(one, args.repeats)
    floor = flops / (peak * 1e12) if flops and peak else None
    rec["grpo_step"] = dict(batch=b, regions=k, group_size=4, crop=c, n_devices=jax.device_count(),
                            first_call_s=round(first, 1), step_s=round(t, 4),
                            gflop_per_step=flops and round(flops / 1e9, 3),
                            flop_floor_s=floor and round(floor, 4),
                            times_floor=floor and round(t / floor, 2),
                            peak_bytes_in_use=_peak_memory())


def part_fuse(args, rec, peak):
    _, dcfg = _geometry(args.smoke, args.dtype)
    p = dcevo.init_params(dcfg, 0)
    h, w = (48, 64) if args.smoke else (480, 640)
    out = {}
    for b in (1, 4):
        ir = jax.random.uniform(jax.random.PRNGKey(0), (b, h, w, 1))
        vi = jax.random.uniform(jax.random.PRNGKey(1), (b, h, w, 1))
        c, cs = _compile(lambda p, a, v: dcevo.apply_model(p, a, v, dcfg)["fused"], p, ir, vi)
        t = median_seconds(lambda: c(p, ir, vi), args.repeats)
        f = _flops(c)
        out[f"batch_{b}"] = dict(compile_s=round(cs, 1), step_s=round(t, 4),
                                 images_per_s=round(b / t, 2), mfu=_mfu(f, t, peak))
    rec["dcevo_fuse"] = dict(height=h, width=w, **out, peak_bytes_in_use=_peak_memory())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=("reward", "grpo", "fuse"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--smoke", action="store_true", help="tiny geometry (check the script on CPU)")
    ap.add_argument("--batch", type=int, default=8, help="reward-model batch")
    ap.add_argument("--crop", type=int, default=128, help="GRPO crop size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, help="the card's peak for --dtype (dense)")
    ap.add_argument("--json-out", help="append the JSON line to this file too")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    peak, peak_src = peak_tflops(args.dtype, args.peak_tflops)
    rec = dict(part=args.part, dtype=args.dtype, smoke=args.smoke, platform=dev.platform,
               device_kind=dev.device_kind, n_devices=jax.device_count(),
               peak_tflops=peak, peak_source=peak_src)
    {"reward": part_reward, "grpo": part_grpo, "fuse": part_fuse}[args.part](args, rec, peak)
    line = json.dumps(rec)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")
    return rec


if __name__ == "__main__":
    main()
