"""DCEvo fine-tuning config: GRPO over regions (EVAFusion), the released direct mode, or fusion losses.

    python -m evafusion_jax.train_grpo --config configs/grpo.py \
        --config.data.data_dir=/data/MSRS_train --config.data.cache_dir=/data/MSRS_regions \
        --config.dcevo_checkpoint=ckpt/dcevo --config.reward_checkpoint=ckpt/reward \
        --config.workdir=runs/grpo

    # the release's direct fine-tuning (backprop through the reward model):
    ... --config.objective=direct
    # unsupervised fusion losses only (train DCEvo from scratch / warm up):
    ... --config.objective=fusion --config.dcevo_checkpoint= --config.data.region_source=grid
"""

import ml_collections

from evafusion_jax.data import grpo_pairs
from evafusion_jax.rl import grpo


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = "runs/grpo"         # checkpoints/, logs/, dcevo_final/ (Orbax), dcevo_final.pth
    c.seed = 0                      # DCEvo init when dcevo_checkpoint is empty
    c.objective = "grpo"            # grpo | direct | fusion | dpo | ppo (policy-optimisation ablations)

    # Policy: DCEvo checkpoint (kind "dcevo", e.g. converted DCEvo_fusion.pth); "" = random init
    # with the architecture below (dcevo fields are ignored when a checkpoint is given).
    c.dcevo_checkpoint = ""
    c.dcevo = ml_collections.ConfigDict(dict(
        dim=64, num_blocks=5, c2f_n=6, detail_layers=3, heads=8, ffn_expansion_factor=2.0,
        dtype="float32", precision="highest"))

    # Reward: model (reward checkpoint, kind "reward") | contrast (analytic, for tests/demos).
    c.reward_kind = "model"
    c.reward_checkpoint = ""
    c.reward_dtype = "float32"      # float32 | bfloat16 (mixed precision for the reward model)
    c.released_preprocessing_bug = False  # True: feed [0, 1] pixels like reward_final.py
    # Region rewards: masked = R(F * M_k) (the paper's) | composite = R(F_old with region k of
    # the sample pasted in), whole natural images for the reward model (README, "Region rewards").
    c.region_reward = "masked"
    # Reward aggregation weights: texture, thermal, sharpness, artifacts, heatmap_threshold,
    # use_scores, use_heatmap, heatmap_only, soft_area (defaults: the released ones, kept in
    # evafusion_jax.rl.grpo.RewardWeights).
    c.weights = ml_collections.ConfigDict(grpo.RewardWeights().to_dict())

    # GRPO.
    c.clip_eps = 0.2
    c.beta = 0.1
    c.kl_sigma = 1.0
    # ratio: gaussian = the policy is N(F_theta, exploration_std^2); a group of group_size sampled
    # fusions per pair is scored region by region, with per-region likelihood ratios (learns);
    # l1 = the paper's r_k = 1 + alpha |F - F_old|_1 / |F_old|_1 on the deterministic F (one sample;
    # no policy gradient at theta_old == theta; see README "Caveats").
    c.ratio = "gaussian"
    c.exploration_std = 0.05        # sigma of the sampled fusions (pixel units, [0, 1] images)
    c.group_size = 4                # G sampled fusions per pair (the reward model scores G x K regions)
    c.antithetic = True             # samples in mirrored pairs F_old +- sigma * noise (G even)
    c.advantage_group = "samples"   # samples (region k over the G samples) | regions | all
    c.noise_seed = 0
    c.ratio_alpha = 1.0
    c.ratio_eps = 1e-6
    c.adv_eps = 1e-6
    c.old_policy_interval = 1       # refresh theta_old every N steps (it lags by >= 1 update)
    c.whole_image_region = False    # add the whole image as one more region
    # DPO / PPO (objective=dpo|ppo): the same Gaussian policy and sampled group as GRPO.
    c.dpo_preference = "region"     # region: best vs worst sample per region | image: per whole image
    c.ppo_baseline_momentum = 0.9   # PPO baseline: EMA of the batch reward mean/variance (in the state)
    c.grpo_fusion_weight = 0.0      # optional auxiliary losses in GRPO
    c.grpo_decomp_weight = 0.0
    c.grpo_pseudo_weight = 0.0

    # Direct / fusion objectives (released weights).
    c.reward_loss_weight = 0.5
    c.fusion_loss_weight = 1.0
    c.decomp_loss_weight = 2.0
    c.pseudo_fusion_weight = 100.0
    c.pseudo_fusion_mode = "max"    # max | saliency (our target; the release's is unpublished)
    c.fusion_grad_weight = 10.0

    # Optimisation.
    c.learning_rate = 1e-4
    c.end_learning_rate = 1e-6      # cosine decay target
    c.weight_decay = 0.01           # AdamW (decoupled)
    c.warmup_steps = 0              # linear learning-rate warm-up (the demo: an eighth of its steps;
                                    # README "A group of 16 and a learning-rate warm-up")
    c.grad_clip_norm = 0.0
    c.num_epochs = 20
    c.steps_per_epoch = -1          # -1: number of pairs // global batch size
    c.max_steps = -1                # > 0: train exactly this many steps (overrides epochs)

    # Data: GRPO pairs + regions (grpo_pairs); data.batch_size is the GLOBAL batch.
    c.data = grpo_pairs.default_config()
    c.data.batch_size = 2

    # Logs, checkpoints, export.
    c.log_every_steps = 10
    c.image_every_steps = 100       # F before/after images to TensorBoard; 0 = off
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 3
    c.export_pth = ""               # also write the released .pth layout here (needs torch)
    c.progress = True
    c.debug_nan_at_step = -1        # testing: NaN input batch at this 0-based step (data blamed)
    c.debug_exit_at_step = -1       # testing: os._exit(75) right after this step (a kill)
    return c
