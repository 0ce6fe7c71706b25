"""The paper's ablation study: ``python -m evafusion_jax.experiments --config configs/experiments.py``.

Two presets (``--config configs/experiments.py:cpu`` is the default, ``:full`` the paper's scale):

* ``cpu``: the demo's small models (a small reward model trained on the SYNTHETIC feedback set,
  a small DCEvo warmed up with the fusion losses), fine-tuned on real pairs from
  ``../shared/data/TNO`` (the last 5 held out) and evaluated on those and on 2 M3FD pairs;
  superpixel regions of the visible images (no SAM weights here); 3 seeds; about 30 minutes on 2 CPU cores.
* ``full``: converted released checkpoints (``init.dcevo_checkpoint``, ``init.reward_checkpoint``,
  ViT-L/16-384 reward model, full DCEvo), SAM regions (``regions.sam_checkpoint``), the paper's
  GRPO settings (configs/grpo.py defaults) on a GPU; set the data paths on the command line.

Every field can be overridden: ``--config.variants=full,dpo --config.seeds=0 --config.train.max_steps=4``.
"""

import importlib.util
from pathlib import Path

import ml_collections


def _grpo_config():
    spec = importlib.util.spec_from_file_location("_grpo_config", Path(__file__).with_name("grpo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config(preset: str = "cpu"):
    if preset not in ("cpu", "full"):
        raise ValueError(f"unknown preset {preset!r} of configs/experiments.py; use 'cpu' or 'full' "
                         "(--config configs/experiments.py:full)")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.out_dir = f"runs/experiments_{preset}"
    # baseline | full (= grpo) | wo_score | wo_heatmap | wo_sam | dpo | ppo | grpo
    c.variants = "baseline,full,wo_score,wo_heatmap,wo_sam,dpo,ppo"
    c.seeds = "0,1,2"
    c.progress = True
    c.tables_only = False          # True: only rewrite the tables from the units finished so far

    # The initial DCEvo and reward model, shared by every variant and seed. Empty checkpoints
    # are made as the demo makes them (evafusion_jax.demo stages): a reward model trained on a
    # SYNTHETIC feedback set, a small DCEvo warmed up with the fusion losses.
    c.init = ml_collections.ConfigDict(dict(
        dcevo_checkpoint="", reward_checkpoint="", vit_checkpoint="", seed=0,
        steps=12,                  # demo --steps: 10x reward-model steps, 3x fusion warm-up steps
        feedback=240, feedback_size=32,
        pairs_min_detail=0.03))    # demo --pairs-min-detail (0: feedback crops drawn anywhere)

    # Fine-tuning pairs (train_dir; its last `heldout` pairs are held out and evaluated as
    # `train_name`) and further held-out folders (NAME=DIR,NAME=DIR; at most eval_max_pairs each).
    c.data = ml_collections.ConfigDict(dict(
        train_dir="../shared/data/TNO", train_name="TNO", heldout=5, max_train_pairs=20,
        eval_dirs="M3FD=../shared/data/M3FD", eval_max_pairs=2))

    # Region cache of the fine-tuning pairs on the initial DCEvo's fused images (precompute_regions).
    c.regions = ml_collections.ConfigDict(dict(
        source="superpixels", sam_checkpoint="", sam_model_type="vit_h", points_per_side=32,
        superpixels_per_region=3,
        image="vi"))               # vi | ir | fused (the initial DCEvo's output; the full preset)

    # Evaluation of each (variant, seed) on the held-out folders (evaluate.py / metrics.py names).
    c.eval = ml_collections.ConfigDict(dict(
        metrics="CC,PSNR_unit,Qabf,SSIM,NIQE,BRISQUE", reward_scores=True, bucket=64, workers=1,
        table_metrics="CC,PSNR_unit", chart_metrics="CC,PSNR_unit,R_Overall_Score"))

    # The fine-tuning config of every variant (configs/grpo.py); variants override a few fields.
    t = _grpo_config()
    t.progress = False
    t.image_every_steps = 0
    t.log_every_steps = 1
    t.keep_checkpoints = 1
    t.data.num_regions = 6
    t.data.min_valid_regions = 2
    t.data.pad_small = True
    if preset == "cpu":
        t.max_steps = 16
        t.checkpoint_every_steps = 8
        t.learning_rate = 3e-4
        t.end_learning_rate = 3e-5
        t.group_size = 4
        t.data.crop_size = 48
        t.data.batch_size = 2
        t.data.read_threads = 1
    else:
        t.max_steps = -1           # 20 epochs (configs/grpo.py)
        t.checkpoint_every_steps = 500
        t.data.num_regions = 8
        t.data.crop_size = 128
    c.train = t
    if preset == "full":
        c.init.steps = 0
        c.data.train_dir = ""      # e.g. a folder of MSRS training pairs (ir/, vi/)
        c.data.train_name = "train"
        c.data.heldout = 0
        c.data.max_train_pairs = 0  # 0 = all
        c.data.eval_dirs = ""      # e.g. TNO=/data/TNO,RoadScene=/data/RoadScene,M3FD=/data/M3FD
        c.data.eval_max_pairs = 0
        c.regions.source = "sam"
        c.regions.image = "fused"
        c.eval.bucket = 32
        c.eval.workers = 0         # all cores
    return c
