"""Reward-model training / evaluation config (defaults = the released RichHF/train.py).

    python -m evafusion_jax.train_reward --config configs/reward.py \
        --config.data.path=/data/EVAFusion_feedback --config.workdir=runs/reward \
        --config.init=vit --config.init_checkpoint=ckpt/vit-large-patch16-384

    python -m evafusion_jax.train_reward --config configs/reward.py --config.mode=eval \
        --config.data.path=/data/EVAFusion_feedback --config.eval.checkpoint=runs/reward/best_model
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = "train"              # train | eval
    c.workdir = "runs/reward"     # checkpoints/, best_model/, final_model/, logs/
    c.seed = 0

    # Model. preset: released (ViT-L/16-384) | vit_b16_224 | tiny | small | from_checkpoint
    # (from_checkpoint takes the architecture of init_checkpoint, kind "reward").
    c.model = ml_collections.ConfigDict()
    c.model.preset = "released"
    c.model.multi_heads = True
    c.model.dtype = "float32"     # compute dtype: float32 | bfloat16 | float16
    c.model.precision = ""        # "" (backend default) | default | high | highest

    # Initial parameters: random | vit (a converted ViT checkpoint for the backbone) |
    # reward (a converted or trained reward checkpoint).
    c.init = "random"
    c.init_checkpoint = ""
    c.mixer_init = "random"       # random (as released) | copy_backbone
    c.train_mixer = False         # the release keeps the mixing ViT frozen
    c.train_backbone = False      # the release keeps the backbone frozen; True trains it too
                                  # (for a random backbone, e.g. the demo's; disables the cache)

    # Data (feedback layouts: datasets save_to_disk folder, parquet, plain folder).
    c.data = ml_collections.ConfigDict()
    c.data.path = ""
    c.data.train_split = "train"
    c.data.eval_split = "dev"
    c.data.validate = "header"    # none | header | full
    c.data.split_seed = 0         # folder layout without splits: hash split
    c.data.read_threads = 4
    c.data.worker_count = 0

    # Feature cache of the frozen backbone's tokens.
    c.cache = ml_collections.ConfigDict()
    c.cache.enabled = True
    c.cache.dir = ""              # default: <workdir>/feature_cache
    c.cache.dtype = "float16"     # float32 | float16 | bfloat16
    c.cache.fingerprint = "stat"  # stat (file sizes + mtimes) | content (file bytes)
    c.cache.batch_size = 8

    # Optimisation (released values).
    c.num_epochs = 30
    c.batch_size = 4              # global batch, split over all devices of all hosts
    c.eval_batch_size = 8         # per host
    c.init_lr = 2e-5
    c.min_lr = 1e-5
    c.schedule = "released"       # released (per-epoch cosine as torch stepped it) | cosine | constant
    c.weight_decay = 2e-3
    c.grad_clip_norm = 0.0        # 0 = off (the release does not clip)
    c.score_weight = 1.0
    c.heatmap_weight = 1.0

    # Checkpoints and logs.
    c.checkpoint_every_steps = 0  # 0 = at the end of every epoch only
    c.keep_checkpoints = 3
    c.best_metric = "avg_metric"  # validation metric that selects best_model (higher is better)
    c.eval_every_epochs = 1
    c.log_every_steps = 10
    c.max_steps = -1              # stop after this many steps (testing); -1 = all epochs
    c.debug_nan_at_step = -1      # inject a NaN loss at this 0-based step (testing)
    c.debug_exit_at_step = -1     # os._exit(75) right after this step, simulating a kill (testing)
    c.progress = True             # tqdm bars

    # Evaluation mode.
    c.eval = ml_collections.ConfigDict()
    c.eval.checkpoint = ""        # reward checkpoint (default: <workdir>/best_model)
    c.eval.split = "test"
    c.eval.output = ""            # metrics JSON (default: <checkpoint>/eval_<split>.json)

    # Multi-process (see parallel.maybe_initialize_distributed; env vars work too).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c
