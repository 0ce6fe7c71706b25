"""Config of ``python -m evafusion_jax.precompute_regions`` (region masks, computed offline).

Override fields on the command line, e.g.
``--config configs/regions.py --config.num_regions=16 --config.generator.points_per_side=16``.
The short options of the CLI (``--data``, ``--cache``, ``--sam-checkpoint`` ...) set the
same fields.
"""

import ml_collections

from evafusion_jax.data import regions


def get_config():
    cfg = ml_collections.ConfigDict()
    cfg.data_dir = ""            # folder with ir/ and vi/ (same file names)
    cfg.cache_dir = ""           # region cache folder to write (resumed when it exists)
    cfg.source = "sam"           # sam | random_crops | grid | superpixels
    cfg.image = "fused"          # image the regions are computed on: fused | vi | ir
    cfg.num_regions = 8          # K slots per image
    cfg.seed = 0                 # random_crops only
    cfg.overwrite = False        # replace a cache made with other parameters
    cfg.index_every = 20         # rewrite index.json after this many new images

    cfg.dcevo = ""               # Orbax DCEvo checkpoint (kind "dcevo"), needed for image=fused

    cfg.sam = ml_collections.ConfigDict()
    cfg.sam.model_type = "vit_h"  # vit_h | vit_l | vit_b | tiny (test model; checkpoint = its state dict)
    cfg.sam.checkpoint = ""       # local .pth file of segment_anything weights
    cfg.sam.device = "cpu"        # torch device, e.g. cuda

    # segment_anything.SamAutomaticMaskGenerator keyword arguments (its defaults, kept in
    # evafusion_jax.data.regions.SAM_GENERATOR_DEFAULTS: points_per_side, points_per_batch,
    # pred_iou_thresh, stability_score_thresh, ...).
    # min_mask_region_area > 0 needs opencv-python (segment_anything uses cv2 there).
    cfg.generator = ml_collections.ConfigDict(dict(regions.SAM_GENERATOR_DEFAULTS))

    # Parameters of the fallback sources (their defaults: evafusion_jax.data.regions.SOURCE_PARAMS).
    cfg.random_crops = ml_collections.ConfigDict(dict(regions.SOURCE_PARAMS["random_crops"]))
    cfg.superpixels = ml_collections.ConfigDict(dict(regions.SOURCE_PARAMS["superpixels"]))
    return cfg
