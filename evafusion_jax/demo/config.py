"""The demo's configuration: its stages, sizes and models, and its command line (options and
their checks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from evafusion_jax.models.score_names import SCORE_TYPES

STAGES = ("data", "reward model", "fusion warm-up", "regions + GRPO", "evaluate", "report")
#: Metrics of ``metrics.py`` reported by the demo (NIQE/BRISQUE need larger images).
DEMO_METRICS = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC")
SCORE_LABELS = SCORE_TYPES  # the reward model's score names (models/score_names.py)


#: GRPO and fusion warm-up steps of the demo. With 120 warm-up steps GRPO gained less than the
#: seed-to-seed spread on seed 2 (its warm-up network started close to where GRPO ended); with
#: 300 the spread stayed the same but GRPO went further on every seed (README "Region rewards
#: in the demo, and what GRPO gains").
GRPO_STEPS = 80
#: Std of GRPO's sampled fusions around F (train_grpo's exploration_std) in the demo: on the
#: procedural scenes, and on real pairs (``--pairs``), whose detail layers have about a third of
#: the procedural scenes' contrast (rms 0.026-0.036 vs 0.081 on feedback crops), so that the
#: noise stays about as strong relative to the image (README "Exploration noise on real pairs").
GRPO_SIGMA = 0.05
GRPO_SIGMA_PAIRS = 0.02
#: GRPO's group (sampled fusions per pair) and the part of its steps over which the learning
#: rate rises linearly from 0. Adam's first update moves every parameter by the full learning
#: rate (its moments are one gradient), which clipped 18-51 % of the second step's regions on
#: every M3FD seed; with a group of 8 and no warm-up 2 of 5 M3FD seeds barely moved, with 16 and
#: an eighth of the steps as warm-up all 5 gained (README "A group of 16 and a learning-rate
#: warm-up").
GRPO_GROUP = 16
GRPO_LR_WARMUP_FRACTION = 0.125
WARMUP_STEPS = 300
#: Held-out synthetic pairs: how many, and the seed they are drawn from. The seed is fixed (not
#: ``--seed``), so that every run is scored on the same test set and the seed-to-seed spread of
#: the held-out numbers is the training's, not the sampling of 4 different test scenes.
TEST_PAIRS = 16
TEST_SEED = 1000
#: Reward-model training steps and peak learning rate of the demo (README "Region rewards in the
#: demo, and what GRPO gains": 450, 1200 and 2000 steps, learning rates 1e-3 and 3e-3).
REWARD_STEPS = 2000
REWARD_LR = 1e-3
#: Synthetic feedback samples of the demo (80 % train). With 3000, the reward model learned
#: its 2400 training images by heart (training loss 30-70x the test loss on Artifacts,
#: Sharpness, Texture) and stayed below PLCC 0.7 on Artifacts and Sharpness; 12000 reached
#: >= 0.7 on all five scores (README "Region rewards in the demo, and what GRPO gains").
FEEDBACK = 12000


class DemoError(ValueError):
    """An invalid demo option (names the option and what to do)."""


def grpo_lr_warmup(args) -> int:
    """GRPO's learning-rate warm-up steps: ``--grpo-lr-warmup``, else an eighth of ``--steps``."""
    if args.grpo_lr_warmup is not None:
        return int(args.grpo_lr_warmup)
    return int(args.steps * GRPO_LR_WARMUP_FRACTION)


def grpo_sigma(args) -> float:
    """GRPO's exploration std: ``--grpo-sigma``, else the default for synthetic or real pairs."""
    if args.grpo_sigma is not None:
        return float(args.grpo_sigma)
    return GRPO_SIGMA_PAIRS if args.pairs else GRPO_SIGMA


# ----------------------------------------------------------------------------- models

def demo_dcevo_config(**kw):
    """The DCEvo trained from scratch by the demo (``DCEvoConfig.tiny``: dim 8, one block of each kind)."""
    from evafusion_jax.models import dcevo
    base = dict(dim=8, num_blocks=1, c2f_n=1, detail_layers=1, heads=2)
    base.update(kw)
    return dcevo.DCEvoConfig(**base)


def demo_reward_config(hidden: int = 32, image_size: int = 32, patch_size: int = 4, **kw):
    """The reward model trained from scratch by the demo: ``RewardConfig.tiny`` (one ViT layer)
    of width ``hidden`` on ``image_size`` x ``image_size`` inputs cut into ``patch_size`` patches,
    with score heads that keep 8 channels (defaults: hidden 32, 32x32, patch 4: 8x8 tokens).

    ``RewardConfig.tiny``'s score heads narrow the 32 channels to 1 (divisor 32) before a
    channel RMS norm, which maps a single channel to +-scale: fine for shape tests, but such
    heads cannot learn, so the demo uses smaller divisors. A random frozen patch embedding
    keeps everything a patch shows only if ``hidden >= 3 * patch_size ** 2`` (hidden 64 with
    patch 4 measured no better than 32, README).
    """
    import math

    from evafusion_jax.models import reward_model as rm
    from evafusion_jax.models.vit import ViTConfig
    ups = int(round(math.log2(patch_size)))
    if patch_size < 2 or 2 ** ups != patch_size:
        raise DemoError(f"--reward-patch {patch_size}: need a power of two >= 2")
    if image_size % patch_size:
        raise DemoError(f"--feedback-size {image_size} is not a multiple of --reward-patch "
                        f"{patch_size}")
    base = dict(vit=ViTConfig.tiny(hidden_size=hidden, intermediate_size=2 * hidden,
                                   image_size=image_size, patch_size=patch_size),
                deconv_channels=(16,) + (8,) * (ups - 1),
                score_conv_divisors=(1, 1, 2, 2, 4, 4))
    base.update(kw)
    return rm.RewardConfig.tiny(**base)


def grpo_base_config():
    from evafusion_jax import config as config_lib
    return config_lib.parse_cli_config(["demo", "--config", config_lib.default_config_path("grpo.py")],
                                       config_lib.default_config_path("grpo.py"))



def reward_base_config():
    from evafusion_jax import config as config_lib
    return config_lib.parse_cli_config(["demo", "--config", config_lib.default_config_path("reward.py")],
                                       config_lib.default_config_path("reward.py"))



def build_parser() -> argparse.ArgumentParser:
    from evafusion_jax.data.synthetic import REAL_MIN_DETAIL
    p = argparse.ArgumentParser(
        prog="python -m evafusion_jax.demo",
        description="End-to-end EVAFusion demo at small scale (synthetic data unless --pairs): "
                    "reward model, DCEvo fusion warm-up, regions, GRPO, evaluation, report.")
    p.add_argument("--out", default="demo_out", help="report folder (default: demo_out)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--steps", type=int, default=GRPO_STEPS,
                   help=f"GRPO steps (default {GRPO_STEPS}; README \"Region rewards in the "
                        f"demo\" compares 40, 80 and 120)")
    p.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                   help=f"fusion warm-up steps (default {WARMUP_STEPS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", help="folder of real pairs (DIR/ir, DIR/vi) instead of synthetic ones")
    p.add_argument("--vit", help="ViT backbone for the reward model: converted checkpoint or "
                                 "Hugging Face folder")
    p.add_argument("--reward", help="trained/converted reward checkpoint (skips reward training)")
    p.add_argument("--dcevo", help="converted DCEvo checkpoint (skips the fusion warm-up)")
    p.add_argument("--eval-reward", help="reward checkpoint that scores the held-out pairs "
                                         "(default: the one GRPO trains against)")
    p.add_argument("--sam", help="segment_anything checkpoint: SAM regions instead of superpixels")
    p.add_argument("--sam-model-type", default="vit_b", choices=("vit_h", "vit_l", "vit_b", "tiny"),
                   help="architecture of the --sam checkpoint (default vit_b)")
    g = p.add_argument_group("sizes (defaults: about 6 min on 2 CPU cores)")
    g.add_argument("--train-pairs", type=int, default=16)
    g.add_argument("--test-pairs", type=int, default=TEST_PAIRS,
                   help=f"held-out pairs (default {TEST_PAIRS}; with --pairs at most a fifth of "
                        f"the folder, its last pairs)")
    g.add_argument("--test-seed", type=int, default=TEST_SEED,
                   help=f"seed of the synthetic held-out pairs (default {TEST_SEED}, the same for "
                        f"every --seed: one test set for all runs)")
    g.add_argument("--size", type=int, default=64, help="side of the synthetic pairs")
    g.add_argument("--crop", type=int, default=48, help="training crop side")
    g.add_argument("--batch", type=int, default=4, help="training batch (fusion and GRPO)")
    g.add_argument("--regions", type=int, default=6, help="K region slots per crop")
    g.add_argument("--feedback", type=int, default=FEEDBACK,
                   help=f"synthetic feedback samples (default {FEEDBACK}; fewer overfit, README)")
    g.add_argument("--feedback-size", type=int, default=32, help="side of feedback images")
    g.add_argument("--reward-batch", type=int, default=32, help="reward-model training batch")
    g.add_argument("--reward-steps", type=int, default=REWARD_STEPS,
                   help=f"reward-model training steps (rounded up to whole epochs; default "
                        f"{REWARD_STEPS}: test PLCC rose from 450 to 2000 steps, README)")
    g.add_argument("--reward-lr", type=float, default=REWARD_LR,
                   help=f"reward-model peak learning rate (cosine to a tenth; default {REWARD_LR})")
    g.add_argument("--reward-hidden", type=int, default=32,
                   help="width of the demo reward model's ViT (input: --feedback-size)")
    g.add_argument("--reward-patch", type=int, default=4,
                   help="patch side of the demo reward model's ViT (a power of two)")
    g.add_argument("--reward-masked-examples", type=float, default=0.0,
                   help="fraction of feedback images also given as masked regions (same scores)")
    g.add_argument("--pairs-side", type=int, default=128,
                   help="with --pairs: resize pairs so that the shorter side is this (0 = keep)")
    g.add_argument("--pairs-min-detail", type=float, default=REAL_MIN_DETAIL,
                   help=f"with --pairs: feedback crops must show a visible-detail rms of at "
                        f"least this (default {REAL_MIN_DETAIL}; 0 = any crop; flat crops made "
                        f"Texture and Sharpness unlearnable on M3FD, README)")
    g.add_argument("--grpo-lr", type=float, default=3e-4, help="GRPO learning rate")
    g.add_argument("--grpo-lr-warmup", type=int, default=None,
                   help="GRPO steps over which the learning rate rises linearly from 0 (default: "
                        "an eighth of --steps; 0 = none)")
    g.add_argument("--grpo-group", type=int, default=GRPO_GROUP,
                   help=f"GRPO group: sampled fusions per pair (even; each is scored region by "
                        f"region; default {GRPO_GROUP})")
    g.add_argument("--grpo-sigma", type=float, default=None,
                   help=f"GRPO exploration noise: std of the sampled fusions around F (default "
                        f"{GRPO_SIGMA}; with --pairs {GRPO_SIGMA_PAIRS}: real images have less "
                        f"contrast, README)")
    g.add_argument("--grpo-fusion-weight", type=float, default=0.0,
                   help="weight of the auxiliary fusion loss during GRPO (0 = pure GRPO + KL)")
    g.add_argument("--region-reward", default="composite", choices=("masked", "composite"),
                   help="region rewards: composite (region k of a sample pasted into the "
                        "deterministic fusion, scored whole; default: it raised the held-out "
                        "reward most over seeds 0-4, README) or masked (the paper's R(F * M_k))")
    g.add_argument("--train-reward-backbone", action="store_true",
                   help="also train the reward model's ViT backbone (train_reward's "
                        "train_backbone; no feature cache); default: frozen, as released")
    return p


def validate(args) -> None:
    for name in ("pairs", "vit", "reward", "dcevo", "sam", "eval_reward"):
        v = getattr(args, name)
        if v and not Path(v).exists():
            raise DemoError(f"--{name} {v} does not exist")
    if args.pairs:
        from evafusion_jax.data import grpo_pairs
        grpo_pairs.list_pairs(args.pairs)  # raises PairDataError naming the problem
    if args.reward and args.vit:
        raise DemoError("--vit initialises a reward model to train; with --reward nothing is "
                        "trained: give one of them")
    for name in ("steps", "train_pairs", "test_pairs", "size", "crop", "batch", "regions",
                 "feedback", "feedback_size", "reward_hidden", "reward_steps", "warmup_steps"):
        if getattr(args, name) < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.grpo_sigma is not None and not args.grpo_sigma > 0:
        raise DemoError(f"--grpo-sigma must be > 0, got {args.grpo_sigma}")
    if args.grpo_lr_warmup is not None and not 0 <= args.grpo_lr_warmup < max(args.steps, 1):
        raise DemoError(f"--grpo-lr-warmup must be >= 0 and below --steps ({args.steps}), "
                        f"got {args.grpo_lr_warmup}")
    if not args.reward_lr > 0:
        raise DemoError(f"--reward-lr must be > 0, got {args.reward_lr}")
    if not 0.0 <= args.reward_masked_examples <= 1.0:
        raise DemoError(f"--reward-masked-examples must be in [0, 1], got "
                        f"{args.reward_masked_examples}")
    if not args.reward and not args.vit:
        demo_reward_config(args.reward_hidden, args.feedback_size, args.reward_patch)  # checks
    if not args.pairs_min_detail >= 0:
        raise DemoError(f"--pairs-min-detail must be >= 0, got {args.pairs_min_detail}")
    if args.pairs_side < 0:
        raise DemoError(f"--pairs-side must be >= 0, got {args.pairs_side}")
    if args.regions < 2:
        raise DemoError("--regions must be >= 2 (GRPO compares regions within a group)")
    if args.grpo_group < 2 or args.grpo_group % 2:
        raise DemoError(f"--grpo-group must be an even number >= 2 (sampled fusions come in "
                        f"mirrored pairs), got {args.grpo_group}")
    if not args.pairs and args.size < 48:
        raise DemoError(f"--size {args.size}: the metrics (VIF) need pairs of at least 48x48")
    if not args.pairs and args.seed == args.test_seed:
        raise DemoError(f"--seed {args.seed} equals --test-seed: the training pairs would be the "
                        "held-out pairs; choose another --seed or --test-seed")
    if not args.pairs and args.crop > args.size:
        raise DemoError(f"--crop {args.crop} is larger than the synthetic pairs (--size "
                        f"{args.size})")
    if not args.reward and args.feedback < 20:
        raise DemoError(f"--feedback {args.feedback}: need at least 20 samples for train/dev/test")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise DemoError(f"--out {out} exists and is not empty; pass --overwrite to replace it "
                        "or choose another --out")


