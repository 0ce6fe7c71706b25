"""Released EVAFusion reward checkpoint (``torch.save`` of ``RAHF.state_dict()``) -> Orbax.

Usage::

    python -m evafusion_jax.convert.reward_from_torch model_best.pt out/reward [--vit-config config.json] [--overwrite]

The state dict holds ``vit.*`` (backbone), ``vit_fusion.*`` (mixing ViT),
``projection.*``, ``heatmap_predictor.*`` and ``score_predictor.*``. The
architecture (sizes, ``multi_heads``, head widths, score types) is read from
the tensor shapes; the number of attention heads cannot be, so it comes from
``--vit-config`` (a Hugging Face ``config.json`` or our ViT config JSON) or,
for the standard widths, from ViT-L/B/S/Ti conventions (1024 -> 16 heads,
768 -> 12, 384 -> 6, 192 -> 3).

Keys that the forward pass never uses (``vit.pooler.*``,
``vit_fusion.pooler.*``, ``vit_fusion.layernorm.*``,
``vit_fusion.embeddings.patch_embeddings.*``) are skipped and listed; any
other unknown or missing key, or a shape mismatch, is an error naming the key.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from evafusion_jax.convert.common import (
    ConversionError,
    KeyReader,
    conv,
    conv_transpose,
    linear,
    load_state_dict,
    run_cli,
)
from evafusion_jax.convert.vit_from_hf import vit_params_from_reader
from evafusion_jax.models import reward_model as rm
from evafusion_jax.models.vit import ViTConfig
from evafusion_jax.storage import checkpoints

log = logging.getLogger(__name__)

_HEADS_BY_WIDTH = {1024: 16, 768: 12, 384: 6, 192: 3}
SKIPPABLE_PREFIXES = ("vit.pooler.", "vit_fusion.pooler.", "vit_fusion.layernorm.",
                      "vit_fusion.embeddings.patch_embeddings.", "vit.embeddings.mask_token",
                      "vit_fusion.embeddings.mask_token")


def _need(sd, key, source):
    if key not in sd:
        raise ConversionError(f"{source}: missing key {key!r}")
    return np.asarray(sd[key])


def infer_config(sd: Mapping[str, np.ndarray], source: str = "checkpoint",
                 vit_config: Mapping | None = None) -> rm.RewardConfig:
    """Reads the reward-model architecture off the tensor shapes of a state dict."""
    if not any(k.startswith("vit.") for k in sd) or "projection.weight" not in sd:
        raise ConversionError(f"{source}: no 'vit.*' or 'projection.weight' keys; this is not an "
                              "EVAFusion reward checkpoint (RAHF state dict)")
    proj = _need(sd, "projection.weight", source)
    d = proj.shape[0]
    patch_w = _need(sd, "vit.embeddings.patch_embeddings.projection.weight", source)
    _, c, p, _ = patch_w.shape
    n_tok = _need(sd, "vit.embeddings.position_embeddings", source).shape[1]
    grid = int(round(np.sqrt(n_tok - 1)))
    if grid * grid != n_tok - 1:
        raise ConversionError(f"{source}: vit.embeddings.position_embeddings has {n_tok} tokens, "
                              "not 1 + a square number")
    layers = 1 + max(int(m.group(1)) for k in sd
                     if (m := re.match(r"vit\.encoder\.layer\.(\d+)\.", k)))
    inter = _need(sd, "vit.encoder.layer.0.intermediate.dense.weight", source).shape[0]
    vit_kw = dict(hidden_size=d, num_hidden_layers=layers, intermediate_size=inter,
                  image_size=grid * p, patch_size=p, num_channels=c,
                  qkv_bias="vit.encoder.layer.0.attention.attention.query.bias" in sd)
    if vit_config is not None:
        given = ViTConfig.from_hf_config(vit_config) if "model_type" in vit_config else \
            ViTConfig.from_dict(vit_config)
        for k, v in vit_kw.items():
            if getattr(given, k) != v:
                raise ConversionError(f"{source}: the checkpoint has {k}={v}, but the given ViT "
                                      f"config says {k}={getattr(given, k)}")
        vit = given
    else:
        if d not in _HEADS_BY_WIDTH:
            raise ConversionError(f"{source}: hidden size {d} is not a standard ViT width; give "
                                  "--vit-config with num_attention_heads")
        vit = ViTConfig(num_attention_heads=_HEADS_BY_WIDTH[d], **vit_kw)

    multi = any(k.startswith("score_predictor.") and not k.startswith("score_predictor.conv_layers")
                and not k.startswith("score_predictor.linear_layers") for k in sd)
    if multi:
        found_scores = {k.split(".")[1] for k in sd if k.startswith("score_predictor.")}
        found_maps = {k.split(".")[1] for k in sd if k.startswith("heatmap_predictor.")}
        known = [t for t in rm.SCORE_TYPES if t in found_scores]
        score_types = tuple(known + sorted(found_scores - set(known)))
        heatmap_types = tuple(sorted(found_maps))
        hp, sp = f"heatmap_predictor.{heatmap_types[0]}.", f"score_predictor.{score_types[0]}."
    else:
        score_types, heatmap_types = rm.SCORE_TYPES, rm.HEATMAP_TYPES
        hp, sp = "heatmap_predictor.", "score_predictor."
    heatmap_channels = (_need(sd, hp + "conv_layers.0.weight", source).shape[0],
                        _need(sd, hp + "conv_layers.3.weight", source).shape[0])
    deconv = []
    while hp + f"deconv_layers.{len(deconv)}.0.weight" in sd:
        deconv.append(np.shape(sd[hp + f"deconv_layers.{len(deconv)}.0.weight"])[1])
    last = _need(sd, hp + "last_conv1.weight", source).shape[0]
    divisors = []
    while sp + f"conv_layers.{3 * len(divisors)}.weight" in sd:
        divisors.append(d // np.shape(sd[sp + f"conv_layers.{3 * len(divisors)}.weight"])[0])
    hidden = []
    while sp + f"linear_layers.{2 * (len(hidden) + 1)}.weight" in sd:
        hidden.append(np.shape(sd[sp + f"linear_layers.{2 * len(hidden)}.weight"])[0])
    try:
        return rm.RewardConfig(vit=vit, multi_heads=multi, score_types=score_types,
                               heatmap_types=heatmap_types, heatmap_channels=heatmap_channels,
                               deconv_channels=tuple(deconv), heatmap_last_channels=last,
                               score_conv_divisors=tuple(divisors), score_hidden=tuple(hidden))
    except ValueError as e:
        raise ConversionError(f"{source}: inconsistent architecture: {e}") from e


def _torch_key(path: tuple[str, ...]) -> str:
    """Our head parameter path -> the released key (``conv_layers2_1_3`` -> ``conv_layers2.1.3``)."""
    *mods, leaf = path
    mods = [re.sub(r"_(\d+)", r".\1", m) for m in mods]
    return ".".join(mods + [{"kernel": "weight"}.get(leaf, leaf)])


def _heads_from_reader(reader: KeyReader, abstract: Mapping, prefix: str) -> dict:
    def build(tree, path):
        if isinstance(tree, Mapping):
            return {k: build(v, path + (k,)) for k, v in tree.items()}
        key = prefix + _torch_key(path)
        shape = tuple(tree.shape)
        leaf = path[-1]
        if leaf == "scale":
            return reader.take(key, (shape[0], 1, 1)).reshape(shape)
        if leaf == "kernel" and len(shape) == 4:
            kh, kw, i, o = shape
            if any(m.startswith("deconv_layers") for m in path):
                return conv_transpose(reader.take(key, (i, o, kh, kw)))
            return conv(reader.take(key, (o, i, kh, kw)))
        if leaf == "kernel":
            return linear(reader.take(key, (shape[1], shape[0])))
        return reader.take(key, shape)

    return build(abstract, ())


def convert_state_dict(sd: Mapping[str, np.ndarray], config: rm.RewardConfig | None = None,
                       source: str = "checkpoint", vit_config: Mapping | None = None):
    """Returns ``(params, config, skipped_keys)`` for a released reward-model state dict."""
    if config is None:
        config = infer_config(sd, source, vit_config)
    reader = KeyReader(sd, source)
    abstract = rm.param_shapes(config)
    params = {
        "vit": vit_params_from_reader(reader, config.vit, "vit."),
        "vit_fusion": vit_params_from_reader(reader, config.vit, "vit_fusion.", patches=False,
                                             final_norm=False),
        "projection": {"kernel": linear(reader.take("projection.weight",
                                                    (config.vit.hidden_size, 3 * config.vit.hidden_size))),
                       "bias": reader.take("projection.bias", (config.vit.hidden_size,))},
        "heatmap_predictor": _heads_from_reader(reader, abstract["heatmap_predictor"], "heatmap_predictor."),
        "score_predictor": _heads_from_reader(reader, abstract["score_predictor"], "score_predictor."),
    }
    skipped = reader.finish(lambda k: k.startswith(SKIPPABLE_PREFIXES))
    return params, config, skipped


def convert(checkpoint: str | Path, out: str | Path, vit_config_file: str | Path | None = None,
            overwrite: bool = False) -> Path:
    vit_config = None
    if vit_config_file is not None:
        try:
            vit_config = json.loads(Path(vit_config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConversionError(f"--vit-config {vit_config_file}: cannot read JSON: {e}") from e
    sd = load_state_dict(checkpoint)
    params, config, skipped = convert_state_dict(sd, None, str(checkpoint), vit_config)
    if skipped:
        log.info("skipped %d keys the forward pass never uses: %s", len(skipped), ", ".join(skipped))
    return checkpoints.save_params(out, params, config.to_dict(), "reward", overwrite=overwrite,
                                   extra={"source": str(checkpoint), "skipped_keys": skipped})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evafusion_jax.convert.reward_from_torch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the released reward checkpoint (torch.save of the state dict)")
    ap.add_argument("out", help="output checkpoint folder")
    ap.add_argument("--vit-config", help="HF config.json (or our ViT config JSON) of the backbone")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = ap.parse_args(argv)
    return run_cli(lambda: convert(args.checkpoint, args.out, args.vit_config, args.overwrite))

if __name__ == "__main__":
    sys.exit(main())
