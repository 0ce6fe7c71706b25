"""Hugging Face ViT folder -> evafusion_jax ViT checkpoint (Orbax + JSON config).

Usage::

    python -m evafusion_jax.convert.vit_from_hf path/to/vit-large-patch16-384 out/vit_l16_384 [--overwrite]

The folder is what ``save_pretrained`` writes or a hub snapshot you downloaded
yourself: ``config.json`` plus ``model.safetensors`` (read without torch) or
``pytorch_model.bin`` (needs torch), and optionally ``preprocessor_config.json``
(for the normalisation mean/std). Keys are read in the classic file layout
(``encoder.layer.N.attention.attention.query.weight``), with or without the
``vit.`` prefix of ``ViTForImageClassification``; that is the layout hub files
and ``save_pretrained`` of transformers 4 and 5 write. The pooler and a
classification head are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from evafusion_jax.convert.common import (
    ConversionError,
    KeyReader,
    conv,
    linear,
    load_state_dict,
    run_cli,
)
from evafusion_jax.models.vit import ViTConfig
from evafusion_jax.storage import checkpoints

log = logging.getLogger(__name__)


def vit_params_from_reader(reader: KeyReader, config: ViTConfig, prefix: str,
                           patches: bool = True, final_norm: bool = True) -> dict:
    """Maps the classic HF ViT keys under ``prefix`` onto our ViT parameter tree.

    ``patches=False`` / ``final_norm=False`` build the reduced tree of the
    reward model's mixing ViT (no patch projection, no final LayerNorm).
    """
    d, c, p = config.hidden_size, config.num_channels, config.patch_size
    n = config.num_patches + 1
    t = lambda k, shape=None: reader.take(prefix + k, shape)
    emb = {"cls_token": t("embeddings.cls_token", (1, 1, d)),
           "position_embeddings": t("embeddings.position_embeddings", (1, n, d))}
    if patches:
        emb["patch_embeddings_projection"] = {
            "kernel": conv(t("embeddings.patch_embeddings.projection.weight", (d, c, p, p))),
            "bias": t("embeddings.patch_embeddings.projection.bias", (d,))}

    def dense(k, din, dout, bias=True):
        out = {"kernel": linear(t(k + ".weight", (dout, din)))}
        if bias:
            out["bias"] = t(k + ".bias", (dout,))
        return out

    def ln(k):
        return {"scale": t(k + ".weight", (d,)), "bias": t(k + ".bias", (d,))}

    encoder = {}
    for i in range(config.num_hidden_layers):
        b = f"encoder.layer.{i}."
        encoder[f"layer_{i}"] = {
            "layernorm_before": ln(b + "layernorm_before"),
            "attention": {
                "query": dense(b + "attention.attention.query", d, d, config.qkv_bias),
                "key": dense(b + "attention.attention.key", d, d, config.qkv_bias),
                "value": dense(b + "attention.attention.value", d, d, config.qkv_bias),
                "output": dense(b + "attention.output.dense", d, d),
            },
            "layernorm_after": ln(b + "layernorm_after"),
            "intermediate": dense(b + "intermediate.dense", d, config.intermediate_size),
            "output": dense(b + "output.dense", config.intermediate_size, d),
        }
    if reader.has(prefix + f"encoder.layer.{config.num_hidden_layers}.layernorm_before.weight"):
        raise ConversionError(f"{reader.source}: found more encoder layers than num_hidden_layers="
                              f"{config.num_hidden_layers} under {prefix!r}; is the config right?")
    params = {"embeddings": emb, "encoder": encoder}
    if final_norm:
        params["layernorm"] = ln("layernorm")
    return params


def vit_params_to_state_dict(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Our ViT tree -> classic HF keys (the inverse of ``vit_params_from_reader``)."""
    from evafusion_jax.convert.common import conv_back, linear_back

    sd = {}
    emb = params["embeddings"]
    sd[prefix + "embeddings.cls_token"] = np.asarray(emb["cls_token"])
    sd[prefix + "embeddings.position_embeddings"] = np.asarray(emb["position_embeddings"])
    if "patch_embeddings_projection" in emb:
        sd[prefix + "embeddings.patch_embeddings.projection.weight"] = conv_back(
            emb["patch_embeddings_projection"]["kernel"])
        sd[prefix + "embeddings.patch_embeddings.projection.bias"] = np.asarray(
            emb["patch_embeddings_projection"]["bias"])

    def dense(k, v):
        sd[k + ".weight"] = linear_back(v["kernel"])
        if "bias" in v:
            sd[k + ".bias"] = np.asarray(v["bias"])

    def ln(k, v):
        sd[k + ".weight"] = np.asarray(v["scale"])
        sd[k + ".bias"] = np.asarray(v["bias"])

    for name, layer in params["encoder"].items():
        i = int(name.split("_")[-1])
        b = f"{prefix}encoder.layer.{i}."
        ln(b + "layernorm_before", layer["layernorm_before"])
        for q in ("query", "key", "value"):
            dense(b + f"attention.attention.{q}", layer["attention"][q])
        dense(b + "attention.output.dense", layer["attention"]["output"])
        ln(b + "layernorm_after", layer["layernorm_after"])
        dense(b + "intermediate.dense", layer["intermediate"])
        dense(b + "output.dense", layer["output"])
    if "layernorm" in params:
        ln(prefix + "layernorm", params["layernorm"])
    return sd


def read_hf_folder(folder: str | Path) -> tuple[ViTConfig, dict[str, np.ndarray], str]:
    """Returns ``(config, state_dict, weights_file)`` of a local HF ViT folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder; give the local Hugging Face model folder "
                              "(config.json + model.safetensors or pytorch_model.bin)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{folder}: config.json not found")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_file} is not valid JSON: {e}") from e
    model_type = hf.get("model_type", "vit")
    if model_type != "vit":
        raise ConversionError(f"{cfg_file}: model_type is {model_type!r}, expected 'vit'")
    pre = None
    pre_file = folder / "preprocessor_config.json"
    if pre_file.is_file():
        pre = json.loads(pre_file.read_text())
    try:
        config = ViTConfig.from_hf_config(hf, pre)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{cfg_file}: {e}") from e
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        if (folder / "model.safetensors.index.json").is_file():
            raise ConversionError(f"{folder}: sharded checkpoints are not supported; "
                                  "re-save with save_pretrained(max_shard_size='10GB')")
        raise ConversionError(f"{folder}: neither model.safetensors nor pytorch_model.bin found")
    return config, load_state_dict(weights), str(weights)


def convert_state_dict(state_dict: dict, config: ViTConfig, source: str = "checkpoint"):
    """Returns ``(params, skipped_keys)`` for a ViTModel / ViTForImageClassification state dict."""
    if "embeddings.cls_token" in state_dict:
        prefix = ""
    elif "vit.embeddings.cls_token" in state_dict:
        prefix = "vit."
    else:
        raise ConversionError(f"{source}: no 'embeddings.cls_token' (or 'vit.embeddings.cls_token') key; "
                              "this does not look like a ViT checkpoint in the classic HF layout")
    reader = KeyReader(state_dict, source)
    params = vit_params_from_reader(reader, config, prefix)
    skip = (prefix + "pooler.", "classifier.", prefix + "embeddings.mask_token")
    skipped = reader.finish(lambda k: k.startswith(skip))
    return params, skipped


def convert(folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    config, sd, weights = read_hf_folder(folder)
    params, skipped = convert_state_dict(sd, config, weights)
    if skipped:
        log.info("skipped %d keys the forward pass never uses: %s", len(skipped), ", ".join(skipped))
    return checkpoints.save_params(out, params, config.to_dict(), "vit", overwrite=overwrite,
                                   extra={"source": str(weights), "skipped_keys": skipped})


def load_pretrained_vit(path: str | Path) -> tuple[dict, ViTConfig]:
    """``(params, config)`` of a pretrained ViT: our converted checkpoint (:func:`convert`) or a
    local Hugging Face ViT folder (``config.json`` + ``model.safetensors``; a
    ``pytorch_model.bin`` folder needs torch), converted in memory."""
    path = Path(path)
    if (path / "params").is_dir():
        params, vit_dict = checkpoints.load_params(path, "vit")
        return params, ViTConfig.from_dict(vit_dict)
    config, sd, weights = read_hf_folder(path)
    params, _ = convert_state_dict(sd, config, weights)
    return params, config


def init_from_pretrained_vit(path: str | Path, rng, mixer_init: str = "random", **config_fields):
    """A new reward model whose backbone is a pretrained ViT (:func:`load_pretrained_vit`).

    ``config_fields`` override other ``reward_model.RewardConfig`` fields (heads, dtype, ...).
    Returns ``(params, config)``; the mixing ViT and the heads are randomly initialised
    (``mixer_init="copy_backbone"`` copies the backbone blocks into the mixing ViT instead).
    """
    from evafusion_jax.models import reward_model

    backbone, vit_config = load_pretrained_vit(path)
    if "vit" in config_fields and config_fields["vit"] != vit_config:
        raise ValueError(f"the config names a ViT {config_fields['vit']} but {path} holds {vit_config}")
    config_fields["vit"] = vit_config
    config = reward_model.RewardConfig(**config_fields)
    return reward_model.init_params(config, rng, mixer_init=mixer_init, backbone=backbone), config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evafusion_jax.convert.vit_from_hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_folder", help="local Hugging Face ViT folder")
    ap.add_argument("out", help="output checkpoint folder")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = ap.parse_args(argv)
    return run_cli(lambda: convert(args.hf_folder, args.out, args.overwrite))

if __name__ == "__main__":
    sys.exit(main())
