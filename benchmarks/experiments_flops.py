"""FLOPs of one fine-tuning step per objective at the paper's scale, and the time per ablation variant.

    python benchmarks/experiments_flops.py [--crop 128] [--batch 2] [--group-size 4] [--regions 8]
        [--steps 36000] [--tflops 60]

Traces (does not compile or run) the jitted train step of ``grpo`` (which the components ablation
variants share: same shapes), ``dpo`` and ``ppo`` with the released geometry (ViT-L/16-384 reward
model with its mixing ViT, full DCEvo dim 64) on abstract parameters, and reads XLA's HLO cost
analysis (``Lowered.cost_analysis()["flops"]``). Time per variant = steps x FLOPs per step /
sustained FLOP/s (``--tflops``, an assumption: e.g. ~60 TFLOP/s is 40% of an A100's or an A40's
bf16 peak with ``reward_dtype=bfloat16``). ``--steps`` defaults to the paper's 20 epochs of the
region-GRPO fine-tuning set (set it to your run's ``max_steps``).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from evafusion_jax.models import dcevo, reward_model
from evafusion_jax.rl import rewards
from evafusion_jax.train import grpo_training as gt


def step_flops(objective: str, rcfg, dcfg, batch: int, crop: int, group: int, regions: int) -> float:
    hp = gt.TrainHParams(objective=objective, group_size=group)
    tx, _ = gt.make_optimizer(1e-4, 100)
    rf = rewards.ModelReward(rcfg)
    dparams = dcevo.param_shapes(dcfg)
    rparams = reward_model.param_shapes(rcfg)
    state = jax.eval_shape(lambda p: gt.create_train_state(p, tx, objective=objective), dparams)
    f32 = jnp.float32
    b = {"ir": jax.ShapeDtypeStruct((batch, crop, crop, 1), f32),
         "vi": jax.ShapeDtypeStruct((batch, crop, crop, 1), f32),
         "masks": jax.ShapeDtypeStruct((batch, regions, crop, crop), f32),
         "valid": jax.ShapeDtypeStruct((batch, regions), jnp.bool_)}
    fn = jax.jit(lambda s, r, x: gt.train_step(s, r, x, hp=hp, model_config=dcfg, tx=tx,
                                               reward_fn=rf))
    ca = fn.lower(state, rparams, b).cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--regions", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20 * (1083 // 2),
                    help="steps per variant (default: 20 epochs of 1083 pairs, e.g. MSRS train, batch 2)")
    ap.add_argument("--tflops", type=float, default=60.0, help="assumed sustained TFLOP/s")
    ap.add_argument("--objectives", default="grpo,dpo,ppo")
    args = ap.parse_args(argv)
    rcfg, dcfg = reward_model.RewardConfig(), dcevo.DCEvoConfig()
    for objective in args.objectives.split(","):
        f = step_flops(objective, rcfg, dcfg, args.batch, args.crop, args.group_size, args.regions)
        hours = args.steps * f / (args.tflops * 1e12) / 3600
        print(json.dumps({"objective": objective, "tflop_per_step": round(f / 1e12, 2),
                          "steps": args.steps, "assumed_tflops": args.tflops,
                          "hours_per_variant": round(hours, 2)}))


if __name__ == "__main__":
    main()
