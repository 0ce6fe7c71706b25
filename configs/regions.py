"""Config of ``python -m evafusion_jax.precompute_regions`` (region masks, computed offline).

Override fields on the command line, e.g.
``--config configs/regions.py --config.num_regions=16 --config.generator.points_per_side=16``.
The short options of the CLI (``--data``, ``--cache``, ``--sam-checkpoint`` ...) set the
same fields.
"""

import ml_collections


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

    # segment_anything.SamAutomaticMaskGenerator keyword arguments (its defaults).
    # min_mask_region_area > 0 needs opencv-python (segment_anything uses cv2 there).
    cfg.generator = ml_collections.ConfigDict()
    cfg.generator.points_per_side = 32
    cfg.generator.points_per_batch = 64
    cfg.generator.pred_iou_thresh = 0.88
    cfg.generator.stability_score_thresh = 0.95
    cfg.generator.stability_score_offset = 1.0
    cfg.generator.box_nms_thresh = 0.7
    cfg.generator.crop_n_layers = 0
    cfg.generator.crop_nms_thresh = 0.7
    cfg.generator.crop_overlap_ratio = 512 / 1500
    cfg.generator.crop_n_points_downscale_factor = 1
    cfg.generator.min_mask_region_area = 0

    # Parameters of the fallback sources (see evafusion_jax.data.regions).
    cfg.random_crops = ml_collections.ConfigDict({"min_frac": 0.1, "max_frac": 0.5})
    cfg.superpixels = ml_collections.ConfigDict({
        "method": "slic", "n_segments": 32, "compactness": 0.1, "felzenszwalb_scale": 100.0})
    return cfg
