"""Precomputes region masks of a training folder into a region cache.

Command line::

    python -m evafusion_jax.precompute_regions --data DATA --cache CACHE \\
        --sam-model-type vit_h --sam-checkpoint sam_vit_h_4b8939.pth --dcevo DCEVO_CKPT
    python -m evafusion_jax.precompute_regions --data DATA --cache CACHE --source superpixels --image vi
    python -m evafusion_jax.precompute_regions --config configs/regions.py \\
        --config.data_dir=DATA --config.cache_dir=CACHE --config.generator.points_per_side=16 ...

For every pair ``DATA/ir/<name>``, ``DATA/vi/<name>`` the regions are computed on
one image (``--image``): the fused output of the initial DCEvo (``fused``,
default; needs ``--dcevo``), the visible image (``vi``, its colours are kept for
SAM) or the infrared one (``ir``). Sources: ``sam`` (segment_anything's
``SamAutomaticMaskGenerator``; K masks kept by area, ties by stability score, see
``regions.select_sam_masks``), ``random_crops``, ``grid``, ``superpixels``.
The cache layout is described in :mod:`evafusion_jax.data.regions`.

Resuming: an existing cache made with the same parameters is completed (images
already there are skipped; an image whose ir/vi files changed since its masks were
computed, by SHA-256, or that has no recorded hash, is recomputed and named in the
log); one made with other parameters is an error unless ``--overwrite`` (which
deletes the old cache first). Temporary mask files left by a killed run are removed.
Every image is decoded before any work. Exit codes: :mod:`evafusion_jax.cli`. torch and segment_anything
are imported only for the SAM source.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from evafusion_jax.data import grpo_pairs as pipeline
from evafusion_jax.data import regions as regions_lib
from evafusion_jax.data.regions import RegionError
from evafusion_jax.storage import fileio

log = logging.getLogger(__name__)

IMAGE_CHOICES = ("fused", "vi", "ir")
SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")
DEFAULT_GENERATOR = regions_lib.SAM_GENERATOR_DEFAULTS


# --------------------------------------------------------------------------
# fingerprints


def file_fingerprint(path: str | os.PathLike) -> dict:
    """``{"path", "size", "sha256"}`` of a file (the hash streams the whole file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file {path} does not exist")
    return {"path": str(path.absolute()), "size": path.stat().st_size,
            "sha256": regions_lib.file_sha256(path)}


# --------------------------------------------------------------------------
# SAM


def build_tiny_sam(seed: int = 0):
    """A tiny randomly initialised SAM (no weights needed), for tests.

    Image encoder: depth 1, width 32, 128-pixel input, 16-pixel patches;
    prompt encoder and a 1-layer two-way-transformer mask decoder of width 32.
    Its ``state_dict()`` saved with ``torch.save`` is a valid
    ``--sam-checkpoint`` with ``--sam-model-type tiny``.
    """
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    with torch.random.fork_rng(devices=[]):  # leaves the global torch RNG untouched
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(img_size=128, patch_size=16, embed_dim=32, depth=1,
                                          num_heads=2, out_chans=32, window_size=4,
                                          global_attn_indexes=(0,), use_rel_pos=True),
            prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(8, 8),
                                         input_image_size=(128, 128), mask_in_chans=4),
            mask_decoder=MaskDecoder(transformer_dim=32,
                                     transformer=TwoWayTransformer(depth=1, embedding_dim=32,
                                                                   mlp_dim=64, num_heads=2),
                                     num_multimask_outputs=3, iou_head_depth=2,
                                     iou_head_hidden_dim=32),
        )
    return sam.eval()


def load_sam(model_type: str, checkpoint: str | os.PathLike, device: str = "cpu"):
    """A SAM model from a local checkpoint (``vit_h``, ``vit_l``, ``vit_b``; ``tiny`` =
    :func:`build_tiny_sam` loaded with a saved state dict)."""
    import torch

    if model_type not in SAM_MODEL_TYPES:
        raise RegionError(f"SAM model type must be one of {SAM_MODEL_TYPES}, got {model_type!r}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise RegionError(f"SAM checkpoint {checkpoint} does not exist; download it from the "
                          "segment-anything release and pass its local path")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RegionError(f"cannot read SAM checkpoint {checkpoint} as a torch state dict: "
                          f"{str(e)[:500]}") from e
    try:
        if model_type == "tiny":
            sam = build_tiny_sam()
        else:
            from segment_anything import sam_model_registry

            sam = sam_model_registry[model_type](checkpoint=None)
        sam.load_state_dict(state)
    except RuntimeError as e:
        raise RegionError(f"SAM checkpoint {checkpoint} does not fit model type {model_type!r}: "
                          f"{str(e)[:500]}") from e
    return sam.to(device).eval()


def make_sam_generator(sam_model, generator_params: Mapping[str, Any] | None = None):
    """``SamAutomaticMaskGenerator(sam_model, **params)`` with binary-mask output."""
    from segment_anything import SamAutomaticMaskGenerator

    params = dict(DEFAULT_GENERATOR, **dict(generator_params or {}))
    unknown = set(params) - set(DEFAULT_GENERATOR)
    if unknown:
        raise RegionError(f"unknown SamAutomaticMaskGenerator parameters: {sorted(unknown)}; "
                          f"known: {sorted(DEFAULT_GENERATOR)}")
    return SamAutomaticMaskGenerator(sam_model, output_mode="binary_mask", **params)


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# the driver


def _load_dcevo(dcevo_checkpoint, dcevo_params, dcevo_config):
    from evafusion_jax.models import dcevo

    if dcevo_params is None:
        if not dcevo_checkpoint:
            raise RegionError("image='fused' needs the initial DCEvo: pass --dcevo CKPT (an Orbax "
                              "checkpoint of kind 'dcevo') or choose --image vi / --image ir")
        from evafusion_jax.storage import checkpoints

        dcevo_params, cfg_dict = checkpoints.load_params(dcevo_checkpoint, "dcevo")
        dcevo_config = dcevo.DCEvoConfig.from_dict(cfg_dict)
    elif dcevo_config is None:
        raise RegionError("dcevo_params were given without dcevo_config")
    return dcevo_params, dcevo_config


def _comparable(desc: dict) -> dict:
    """The source description without file locations (a moved checkpoint with the same
    hash, or a moved DCEvo checkpoint with the same parameters, still matches)."""
    desc = json.loads(json.dumps(desc))
    if isinstance(desc.get("sam", {}).get("checkpoint"), dict):
        desc["sam"]["checkpoint"].pop("path", None)
    if isinstance(desc.get("dcevo"), dict):
        desc["dcevo"].pop("checkpoint", None)
    return desc


def _prepare_cache_dir(cache_dir: Path, source_desc: dict, num_regions: int,
                       overwrite: bool) -> dict:
    """Returns the existing index (resume) or a fresh one; clears on overwrite."""
    index_path = cache_dir / regions_lib.INDEX_FILE
    fresh = {"format_version": regions_lib.CACHE_FORMAT_VERSION, "num_regions": num_regions,
             "source": source_desc, "images": {}, "complete": False}
    if not cache_dir.exists():
        return fresh
    if not cache_dir.is_dir():
        raise RegionError(f"cache path {cache_dir} exists and is not a folder")
    if not index_path.exists():
        if any(cache_dir.iterdir()):
            raise RegionError(f"{cache_dir} is a non-empty folder without {regions_lib.INDEX_FILE}; "
                              "refusing to write a region cache into it (choose another --cache)")
        return fresh
    old = regions_lib.read_index(cache_dir)
    same = (old["num_regions"] == num_regions
            and _comparable(old["source"]) == _comparable(source_desc))
    if same:
        old["source"] = source_desc  # records the current file locations
        return old
    if not overwrite:
        diffs = []
        if old["num_regions"] != num_regions:
            diffs.append(f"num_regions: cache {old['num_regions']}, now {num_regions}")
        old_c, new_c = _comparable(old["source"]), _comparable(source_desc)
        for key in sorted(set(old_c) | set(new_c)):
            a, b = old_c.get(key), new_c.get(key)
            if a != b:
                diffs.append(f"{key}: cache {a!r}, now {b!r}")
        raise RegionError(f"region cache {cache_dir} was made with other parameters ("
                          + "; ".join(diffs) + "); pass --overwrite to recompute it, or "
                          "choose another --cache folder")
    log.info("--overwrite: deleting the region cache %s made with other parameters", cache_dir)
    shutil.rmtree(cache_dir / regions_lib.MASKS_DIR, ignore_errors=True)
    index_path.unlink()
    return fresh


def _is_done(cache_dir: Path, index: dict, name: str, size: tuple[int, int], k: int,
             hashes: dict | None = None, data_dir: Path | None = None) -> bool:
    rel = regions_lib.mask_file_name(name)
    path = cache_dir / rel
    if not path.is_file():
        index["images"].pop(name, None)
        return False
    old = index["images"].get(name, {})
    if hashes is not None:
        changed = [r for r in ("ir", "vi") if old.get(f"{r}_sha256") != hashes[f"{r}_sha256"]]
        if changed:
            why = ("no content hash recorded (older cache)" if not old.get("ir_sha256") else
                   "file changed since its masks were computed: " + ", ".join(
                       str(Path(data_dir or ".") / r / name) for r in changed))
            log.warning("recomputing %s: %s", name, why)
            index["images"].pop(name, None)
            return False
    try:
        data = regions_lib.read_region_file(path)
    except RegionError as e:
        log.warning("recomputing %s: %s", name, e)
        index["images"].pop(name, None)
        return False
    kk, h, w = (int(v) for v in data["shape"])
    if (kk, h, w) != (k, *size):
        log.warning("recomputing %s: cached masks are %s, expected %s", name, (kk, h, w), (k, *size))
        index["images"].pop(name, None)
        return False
    index["images"][name] = {"file": rel, "height": h, "width": w,
                             "num_valid": int(np.asarray(data["valid"]).sum()),
                             **(hashes or {})}
    return True


def precompute_regions(data_dir: str | os.PathLike, cache_dir: str | os.PathLike, *,
                       source: str = "sam", image: str = "fused", num_regions: int = 8,
                       sam_model=None, sam_model_type: str | None = None,
                       sam_checkpoint: str | os.PathLike | None = None,
                       generator_params: Mapping[str, Any] | None = None,
                       device: str = "cpu",
                       dcevo_checkpoint: str | os.PathLike | None = None,
                       dcevo_params: Any = None, dcevo_config: Any = None,
                       region_params: Mapping[str, Any] | None = None, seed: int = 0,
                       overwrite: bool = False, progress: bool = True,
                       index_every: int = 20, names: Sequence[str] | None = None) -> dict:
    """Computes the K region masks of every pair of ``data_dir`` into ``cache_dir``.

    Args:
      data_dir: folder with ``ir/`` and ``vi/``.
      cache_dir: region cache folder (created; resumed when it holds a cache
        made with the same parameters).
      source: ``"sam"``, ``"random_crops"``, ``"grid"`` or ``"superpixels"``.
      image: ``"fused"`` (initial DCEvo output), ``"vi"`` or ``"ir"``.
      num_regions: K.
      sam_model: an already-built ``segment_anything`` ``Sam`` (e.g.
        :func:`build_tiny_sam`); otherwise ``sam_model_type`` + ``sam_checkpoint``.
      generator_params: ``SamAutomaticMaskGenerator`` keyword arguments
        (defaults: :data:`DEFAULT_GENERATOR`).
      device: torch device for SAM.
      dcevo_checkpoint / dcevo_params + dcevo_config: the initial DCEvo for ``image="fused"``.
      region_params: keyword arguments of the fallback source
        (``regions.random_crop_regions`` / ``regions.superpixel_regions``).
      seed: seed of ``random_crops`` (each image's rng is ``(seed, crc32(name))``).
      overwrite: recompute a cache made with other parameters.
      progress: show a tqdm bar.
      index_every: rewrite ``index.json`` after this many new images.
      names: restrict to these pair names (default: all pairs).

    Returns:
      The final index (also written to ``cache_dir/index.json``).
    """
    if source not in regions_lib.SOURCES:
        raise RegionError(f"source must be one of {regions_lib.SOURCES}, got {source!r}")
    if image not in IMAGE_CHOICES:
        raise RegionError(f"image must be one of {IMAGE_CHOICES}, got {image!r}")
    if num_regions < 1:
        raise RegionError(f"num_regions must be >= 1, got {num_regions}")
    cache_dir = Path(cache_dir)
    data = pipeline.PairDataSource(data_dir, names)
    from evafusion_jax.data import image_io
    try:  # decode every image now: a truncated file is found before any work
        image_io.check_images([Path(data_dir) / r / n for n in data.names for r in ("ir", "vi")])
    except image_io.ImageReadError as e:
        raise pipeline.PairDataError(str(e)) from None
    image_io.check_writable(cache_dir, RegionError)

    # Describe everything that determines the masks (compared when resuming).
    desc: dict[str, Any] = {"kind": source, "image": image}
    if source == "sam":
        gen = dict(DEFAULT_GENERATOR, **dict(generator_params or {}))
        if sam_model is None:
            if not sam_model_type or not sam_checkpoint:
                raise RegionError("source 'sam' needs --sam-model-type (vit_h, vit_l, vit_b) and "
                                  "--sam-checkpoint (a local file); without a checkpoint use "
                                  "--source superpixels, grid or random_crops")
            sam_desc = {"model_type": sam_model_type,
                        "checkpoint": file_fingerprint(sam_checkpoint)}
        else:
            from evafusion_jax.storage.fingerprint import (
                tree_fingerprint,  # the one pytree digest
            )
            sam_desc = {"model_type": sam_model_type or type(sam_model).__name__,
                        "checkpoint": None,
                        "state_dict_sha256": tree_fingerprint(
                            {k: v.detach().cpu().float().numpy()
                             for k, v in sam_model.state_dict().items()})}
        desc["sam"] = sam_desc
        desc["generator"] = gen
        desc["ranking"] = "area desc, stability_score desc, predicted_iou desc"
    else:
        defaults = regions_lib.SOURCE_PARAMS[source]
        params = dict(defaults, **dict(region_params or {}))
        unknown = set(params) - set(defaults)
        if unknown:
            raise RegionError(f"unknown parameters for source {source!r}: {sorted(unknown)}; "
                              f"known: {sorted(defaults)}")
        desc["params"] = params
        if source == "random_crops":
            desc["seed"] = int(seed)
    if source in ("random_crops", "grid"):
        desc["image"] = "any"  # these sources do not look at the pixels
    elif image == "fused":
        from evafusion_jax.storage.fingerprint import (
            tree_fingerprint,  # the one pytree digest
        )
        dcevo_params, dcevo_config = _load_dcevo(dcevo_checkpoint, dcevo_params, dcevo_config)
        desc["dcevo"] = {"config": dcevo_config.to_dict(),
                         "params_sha256": tree_fingerprint(dcevo_params),
                         "checkpoint": str(Path(dcevo_checkpoint).absolute())
                         if dcevo_checkpoint else None}

    try:  # as stored in index.json (tuples -> lists), so resumed runs compare equal
        desc = json.loads(json.dumps(desc))
    except TypeError as e:
        raise RegionError(f"region source parameters are not JSON-serialisable: {e}") from e
    index = _prepare_cache_dir(cache_dir, desc, num_regions, overwrite)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fileio.remove_stale_temporaries(cache_dir)
    fileio.remove_stale_temporaries(cache_dir / regions_lib.MASKS_DIR)
    index["data_dir"] = str(Path(data_dir).absolute())
    hashes = regions_lib.pair_hashes(data_dir, data.names)
    todo = [i for i, n in enumerate(data.names)
            if not _is_done(cache_dir, index, n, data.sizes[n], num_regions, hashes[n],
                            Path(data_dir))]
    fileio.write_json_atomic(cache_dir / regions_lib.INDEX_FILE, index)
    log.info("%d of %d images already in %s; computing %d", len(data) - len(todo), len(data),
             cache_dir, len(todo))

    compute = _make_compute(source, image, num_regions, data, desc, sam_model, sam_model_type,
                            sam_checkpoint, device, dcevo_params, dcevo_config, seed)
    from tqdm import tqdm

    new = 0
    for i in tqdm(todo, desc=f"regions ({source})", unit="image", disable=not progress):
        name = data.names[i]
        masks, valid, area, score = compute(i)
        index["images"][name] = {**regions_lib.write_region_file(cache_dir, name, masks, valid,
                                                                 area, score), **hashes[name]}
        new += 1
        if new % max(1, index_every) == 0:
            fileio.write_json_atomic(cache_dir / regions_lib.INDEX_FILE, index)
    all_names = set(pipeline.list_pairs(data_dir))
    index["complete"] = all_names.issubset(index["images"])
    fileio.write_json_atomic(cache_dir / regions_lib.INDEX_FILE, index)
    return index


def _make_compute(source, image, k, data, desc, sam_model, sam_model_type, sam_checkpoint,
                  device, dcevo_params, dcevo_config, seed) -> Callable[[int], tuple]:
    from evafusion_jax.data import image_io

    def read_gray(role, name):  # (H, W) float32 in [0, 1], colour -> BT.601 luma
        return image_io.to_gray(image_io.read_image(data.data_dir / role / name))[..., 0]

    def load_gray(i):
        name = data.names[i]
        if image == "fused":
            from evafusion_jax.models import dcevo

            fused = dcevo.fuse(dcevo_params, read_gray("ir", name)[None, ..., None],
                               read_gray("vi", name)[None, ..., None], dcevo_config)
            return np.asarray(fused)[0, ..., 0]
        return read_gray(image, name)

    if source == "sam":
        if sam_model is None:
            sam_model = load_sam(sam_model_type, sam_checkpoint, device)
        generator = make_sam_generator(sam_model, desc["generator"])

        def compute(i):
            name = data.names[i]
            if image == "fused":
                rgb = _to_uint8_rgb(load_gray(i))
            else:  # keep the visible image's colours for SAM
                rgb = _to_uint8_rgb(image_io.read_image(data.data_dir / image / name))
            h, w = rgb.shape[:2]
            import torch

            with torch.inference_mode():
                records = generator.generate(rgb)
            return regions_lib.select_sam_masks(records, k, h, w)
        return compute

    def compute(i):
        name = data.names[i]
        h, w = data.sizes[name]
        if source == "random_crops":
            rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
            masks, valid = regions_lib.random_crop_regions(h, w, k, rng, **desc["params"])
        elif source == "grid":
            masks, valid = regions_lib.grid_regions(h, w, k)
        else:
            masks, valid = regions_lib.superpixel_regions(load_gray(i), k, **desc["params"])
        return masks, valid, masks.reshape(k, -1).sum(-1), np.zeros((k,), np.float32)
    return compute


# --------------------------------------------------------------------------
# CLI


def _split_config_args(argv: Sequence[str], default_cfg: str) -> tuple[list[str], list[str]]:
    """Splits ``--config FILE`` / ``--config.FIELD=V`` (config file first) from the rest."""
    cfg_file, overrides, rest = f"--config={default_cfg}", [], []
    it = iter(argv)
    for a in it:
        if a == "--config" or a.startswith("--config=") or a.startswith("--config."):
            if "=" not in a:
                nxt = next(it, None)
                if nxt is None:
                    from evafusion_jax.cli import UsageError
                    raise UsageError(f"{a} needs a value")
                a = f"{a}={nxt}"
            if a.startswith("--config="):
                cfg_file = a
            else:
                overrides.append(a)
        else:
            rest.append(a)
    return [cfg_file] + overrides, rest


def parse_args(argv: Sequence[str]):
    """Returns the resolved ``ml_collections`` config of a command line."""
    from evafusion_jax import config as config_lib

    default_cfg = config_lib.default_config_path("regions.py")
    cfg_args, rest = _split_config_args(argv, str(default_cfg))
    # unknown keys (command line or config file) are a UsageError naming the closest key
    cfg = config_lib.parse_cli_config(["precompute_regions"] + cfg_args, str(default_cfg))

    p = argparse.ArgumentParser(
        prog="python -m evafusion_jax.precompute_regions",
        description="Precompute K region masks per training pair into a region cache. "
                    "Also accepts --config FILE and --config.FIELD=VALUE overrides.")
    p.add_argument("--data", "--data-dir", dest="data_dir", help="folder with ir/ and vi/")
    p.add_argument("--cache", "--cache-dir", dest="cache_dir", help="region cache folder")
    p.add_argument("--source", choices=regions_lib.SOURCES)
    p.add_argument("--image", choices=IMAGE_CHOICES)
    p.add_argument("--num-regions", type=int)
    p.add_argument("--sam-model-type", choices=SAM_MODEL_TYPES)
    p.add_argument("--sam-checkpoint")
    p.add_argument("--device")
    p.add_argument("--dcevo", help="Orbax DCEvo checkpoint (for --image fused)")
    p.add_argument("--seed", type=int)
    p.add_argument("--overwrite", action="store_true", default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(rest)
    for key, field in (("data_dir", "data_dir"), ("cache_dir", "cache_dir"), ("source", "source"),
                       ("image", "image"), ("num_regions", "num_regions"), ("dcevo", "dcevo"),
                       ("seed", "seed"), ("overwrite", "overwrite")):
        if getattr(a, key) is not None:
            setattr(cfg, field, getattr(a, key))
    if a.sam_model_type is not None:
        cfg.sam.model_type = a.sam_model_type
    if a.sam_checkpoint is not None:
        cfg.sam.checkpoint = a.sam_checkpoint
    if a.device is not None:
        cfg.sam.device = a.device
    return cfg, not a.no_progress


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit codes as documented in :mod:`evafusion_jax.cli`."""
    from evafusion_jax import cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body():
        cfg, progress = parse_args(sys.argv[1:] if argv is None else argv)
        if not cfg.data_dir or not cfg.cache_dir:
            raise cli.UsageError("--data (folder with ir/ and vi/) and --cache (output folder) "
                                 "are required")
        region_params = {"random_crops": dict(cfg.random_crops),
                         "superpixels": dict(cfg.superpixels)}.get(cfg.source)
        index = precompute_regions(
            cfg.data_dir, cfg.cache_dir, source=cfg.source, image=cfg.image,
            num_regions=cfg.num_regions, sam_model_type=cfg.sam.model_type,
            sam_checkpoint=cfg.sam.checkpoint or None,
            generator_params=dict(cfg.generator), device=cfg.sam.device,
            dcevo_checkpoint=cfg.dcevo or None, region_params=region_params, seed=cfg.seed,
            overwrite=cfg.overwrite, progress=progress, index_every=cfg.index_every)
        log.info("region cache %s: %d images, K=%d, source %s (complete: %s)", cfg.cache_dir,
                 len(index["images"]), index["num_regions"], index["source"]["kind"],
                 index["complete"])
    return cli.run(body, prog="precompute_regions",
                   oom_hint="use --device cpu, a smaller SAM (--sam-model-type vit_b), fewer "
                            "--config.generator.points_per_batch, or --image vi (no DCEvo pass); "
                            "the run resumes where it stopped")


if __name__ == "__main__":
    sys.exit(main())
