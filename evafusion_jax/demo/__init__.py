"""End-to-end EVAFusion demo at small scale, on what the project makes itself (CPU, minutes).

    python -m evafusion_jax.demo [--out demo_out] [--steps 60] [--seed 0] [--overwrite]
    python -m evafusion_jax.demo --pairs /data/TNO            # real IR/visible pairs (DIR/ir, DIR/vi)
    python -m evafusion_jax.demo --vit ckpt/vit --reward ckpt/reward --dcevo ckpt/dcevo \\
        --sam sam_vit_b.pth --sam-model-type vit_b            # real checkpoints (each optional)

Stages (each with a progress bar; every stage calls the project's library / CLI code):

1. **data**: SYNTHETIC procedural IR/visible scenes (``synthetic.write_pairs_folder``; train
   and held-out folders) and a SYNTHETIC human-feedback set whose five "human" scores and
   artifact heatmaps follow a fixed rule of controlled degradations
   (``synthetic.write_feedback_folder``). Nothing in it is real data or real human judgement.
   ``--pairs DIR`` uses real pairs instead (resized to ``--pairs-side`` in the work folder, or
   linked with ``--pairs-side 0``; the last few held out); the feedback set is then made by the
   same rule from crops of the training pairs.
2. **reward model**: a small reward model (random frozen ViT backbone, or ``--vit``) trained
   on the feedback set with ``train_reward.train`` (mixing ViT and heads trained); reports
   PLCC/SRCC of the five scores on the dev and test splits. ``--reward CKPT`` skips training.
3. **fusion warm-up**: a small DCEvo trained from scratch with the released unsupervised fusion
   and decomposition losses (``train_grpo.train`` with ``objective=fusion``), so that GRPO
   starts from a network that fuses. ``--dcevo CKPT`` skips it.
4. **regions + GRPO**: K regions per training pair on the warm-up network's fused image
   (superpixels, or SAM with ``--sam``; ``precompute_regions``), then region-level GRPO against
   the trained reward model (``train_grpo.train`` with ``objective=grpo``), with the paper's
   masked region rewards ``R(F * M_k)`` by default (``--region-reward composite``: region k of
   each sampled fusion pasted into the deterministic fusion and scored whole).
5. **evaluate**: fuses the held-out pairs before and after GRPO (``fuse.fuse_folder``), computes
   IVIF metrics (``evaluate.evaluate``) and reward-model scores, artifact heatmaps and the
   aggregated GRPO reward of both.
6. **report**: ``OUT/report.md`` (tables), ``OUT/summary.json`` (all numbers; ``before_after``:
   the policy's region reward on the training crops and the held-out whole-image reward),
   ``OUT/grid.png`` (IR | visible | fused before | fused after | artifact heatmap),
   ``OUT/curves.png`` (training curves); the work folders of every stage stay in ``OUT/work``.

``--steps N`` scales every training stage: N GRPO steps, 3N fusion warm-up steps and 10N
reward-model steps (default N = 40). The output folder is
built in a temporary sibling and renamed into place at the end; an existing non-empty
``--out`` is refused unless ``--overwrite``.

The package: ``config`` (stages, sizes, models, command line), ``stages`` (each stage, calling
only library code), ``report`` (report.md, summary.json, figures), ``driver`` (``run``, ``main``).
"""

from evafusion_jax.demo.config import (
                                       DEMO_METRICS,
                                       SCORE_LABELS,
                                       STAGES,
                                       DemoError,
                                       build_parser,
                                       demo_dcevo_config,
                                       demo_reward_config,
)
from evafusion_jax.demo.driver import main, run
from evafusion_jax.demo.report import write_report
from evafusion_jax.demo.stages import (
                                       _link_pairs,
                                       stage_data,
                                       stage_evaluate,
                                       stage_fusion,
                                       stage_grpo,
                                       stage_reward,
)

__all__ = [
                                       "DEMO_METRICS",
                                       "SCORE_LABELS",
                                       "STAGES",
                                       "DemoError",
                                       "_link_pairs",
                                       "build_parser",
                                       "demo_dcevo_config",
                                       "demo_reward_config",
                                       "main",
                                       "run",
                                       "stage_data",
                                       "stage_evaluate",
                                       "stage_fusion",
                                       "stage_grpo",
                                       "stage_reward",
                                       "write_report",
]
