"""Converts the released DCEvo fusion checkpoint (``DCEvo_fusion.pth``) to an Orbax checkpoint, and back.

The PyTorch file is a dict of four groups, ``DE_Encoder``, ``DE_Decoder``,
``LowFreqExtractor`` and ``HighFreqExtractor``, each the ``state_dict()`` of an
``nn.DataParallel`` module (keys prefixed with ``module.``; keys without the
prefix are accepted too). Every tensor maps onto one leaf of the Flax tree of
:mod:`evafusion_jax.models.dcevo`: a torch key ``a.b.0.c.weight`` becomes the path
``a/b_0/c/kernel`` (conv weights OIHW -> HWIO); biases and the attention
``temperature`` keep their shape. The conversion is strict: a missing key, an
unexpected key, a wrong shape or a missing group is an error naming it.

Usage::

    python -m evafusion_jax.convert.dcevo_from_torch DCEvo_fusion.pth ckpts/dcevo [--config-json cfg.json] [--overwrite]
    python -m evafusion_jax.convert.dcevo_from_torch --export ckpts/dcevo exported.pth [--overwrite]

The second form writes our checkpoint back into a ``.pth`` that the original
``sleepnet.py`` modules (wrapped in ``nn.DataParallel``) load with
``load_state_dict``; the round trip is bitwise exact.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from evafusion_jax.convert.common import (
    ConversionError,
    KeyReader,
    load_torch_file,
    run_cli,
)
from evafusion_jax.models.param_tree import flatten_tree

log = logging.getLogger(__name__)

GROUPS = ("DE_Encoder", "DE_Decoder", "LowFreqExtractor", "HighFreqExtractor")
PREFIX = "module."

_INDEXED = re.compile(r"^(.+)_(\d+)$")


# ---- key mapping ---------------------------------------------------------------------------

def flax_path_to_torch_key(path: str) -> str:
    """``encoder_level1_0/net1/m_2/cv1/conv/kernel`` -> ``encoder_level1.0.net1.m.2.cv1.conv.weight``
    (path relative to a group, without the ``module.`` prefix)."""
    parts = path.split("/")
    out = []
    for i, p in enumerate(parts):
        if i == len(parts) - 1:
            out.append("weight" if p == "kernel" else p)
            continue
        m = _INDEXED.match(p)
        out.extend([m.group(1), m.group(2)] if m else [p])
    return ".".join(out)


def _torch_shape(flax_leaf_shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    if path.endswith("kernel"):
        h, w, i, o = flax_leaf_shape
        return (o, i, h, w)
    return tuple(flax_leaf_shape)


def _to_flax(value: np.ndarray, path: str) -> np.ndarray:
    if path.endswith("kernel"):
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    return np.ascontiguousarray(value)


def _to_torch(value: np.ndarray, path: str) -> np.ndarray:
    if path.endswith("kernel"):
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(value)


def _expected_tree(config) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{group: {flax_path: shape}}`` of the model for ``config`` (shapes only, nothing computed)."""
    from evafusion_jax.models import dcevo

    shapes = dcevo.param_shapes(config)
    out = {}
    for g in GROUPS:
        out[g] = {k: tuple(v.shape) for k, v in flatten_tree(shapes[g]).items()}
    return out


def _set_path(tree: dict, path: str, value) -> None:
    parts = path.split("/")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


# ---- reading the torch checkpoint ----------------------------------------------------------

def _check_ckpt(ckpt: Any, source: str) -> None:
    if not isinstance(ckpt, Mapping):
        raise ConversionError(f"{source} holds a {type(ckpt).__name__}, not the DCEvo checkpoint "
                              f"dict of groups {list(GROUPS)}; is this DCEvo_fusion.pth?")
    missing = [g for g in GROUPS if g not in ckpt]
    if missing:
        old = [g for g in ("DIDF_Encoder", "DIDF_Decoder", "BaseFuseLayer", "DetailFuseLayer") if g in ckpt]
        hint = (" (this looks like a CDDFuse-style checkpoint with groups "
                f"{old}; DCEvo needs {list(GROUPS)})") if old else ""
        raise ConversionError(f"{source}: missing group(s) {missing}; found top-level keys "
                              f"{sorted(map(str, ckpt))}{hint}")
    for g in GROUPS:
        if not isinstance(ckpt[g], Mapping):
            raise ConversionError(f"{source}: group {g!r} is a {type(ckpt[g]).__name__}, "
                                  "not a state dict")


def _group_prefix(sd: Mapping[str, Any], group: str, source: str) -> str:
    keys = list(sd)
    with_prefix = [k for k in keys if str(k).startswith(PREFIX)]
    if with_prefix and len(with_prefix) != len(keys):
        bad = [k for k in keys if not str(k).startswith(PREFIX)][:3]
        raise ConversionError(f"{source}: group {group!r} mixes keys with and without the "
                              f"{PREFIX!r} prefix (e.g. {bad})")
    return PREFIX if with_prefix else ""


def _count_indices(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def infer_config(ckpt: Mapping[str, Mapping[str, Any]], source: str = "checkpoint"):
    """Reads the DCEvoConfig (dim, num_blocks, c2f_n, detail_layers, heads, ffn factor) off the tensor shapes."""
    from evafusion_jax.models.dcevo import DCEvoConfig

    _check_ckpt(ckpt, source)
    strip, prefixes = {}, {}
    for g in GROUPS:
        p = prefixes[g] = _group_prefix(ckpt[g], g, source)
        strip[g] = {str(k)[len(p):]: v for k, v in ckpt[g].items()}
    enc = strip["DE_Encoder"]

    def need(group, key, ndim):
        sd = strip[group]
        full = prefixes[group] + key
        if key not in sd:
            raise ConversionError(f"{source} [group {group}]: missing key {full!r} (needed to "
                                  "infer the model config)")
        shape = np.shape(sd[key])
        if len(shape) != ndim:
            raise ConversionError(f"{source} [group {group}]: key {full!r} has shape {shape}, "
                                  f"expected {ndim} dimensions")
        return shape

    dim = need("DE_Encoder", "patch_embed.proj.weight", 4)[0]
    num_blocks = _count_indices(enc, r"^encoder_level1\.(\d+)\.")
    c2f_n = _count_indices(enc, r"^encoder_level1\.0\.net1\.m\.(\d+)\.")
    if c2f_n == 0:
        c2f_n = _count_indices(strip["LowFreqExtractor"], r"^net1\.m\.(\d+)\.")
    detail_layers = _count_indices(enc, r"^detailFeature\.net\.(\d+)\.")
    heads = need("DE_Decoder", "output.0.attn.temperature", 3)[0]
    hidden2 = need("DE_Decoder", "output.0.ffn.project_in.weight", 4)[0]
    if hidden2 % 2:
        raise ConversionError(f"{source} [group DE_Decoder]: output.0.ffn.project_in.weight has "
                              f"{hidden2} output channels; expected an even number")
    factor = (hidden2 // 2) / dim
    if int(dim * factor) != hidden2 // 2:  # pragma: no cover - float corner cases
        raise ConversionError(f"{source}: cannot express FFN hidden size {hidden2 // 2} as "
                              f"int(dim * factor) with dim {dim}")
    try:
        return DCEvoConfig(dim=int(dim), num_blocks=max(num_blocks, 1), c2f_n=max(c2f_n, 1),
                           detail_layers=max(detail_layers, 1), heads=int(heads),
                           ffn_expansion_factor=float(factor))
    except ValueError as e:
        raise ConversionError(f"{source}: the tensor shapes give an invalid config: {e}") from e


def torch_to_params(ckpt: Mapping[str, Mapping[str, Any]], config=None,
                    source: str = "checkpoint") -> dict:
    """Maps the four-group torch checkpoint (NumPy or torch tensors) onto the Flax parameter tree.

    ``config`` defaults to :func:`infer_config`. Raises :class:`ConversionError`
    on any missing/unexpected key, wrong shape or missing group.
    """
    _check_ckpt(ckpt, source)
    if config is None:
        config = infer_config(ckpt, source)
    expected = _expected_tree(config)
    params: dict = {}
    extra_groups = sorted(str(g) for g in ckpt if g not in GROUPS)
    if extra_groups:
        raise ConversionError(f"{source}: unexpected top-level group(s) {extra_groups}; a DCEvo "
                              f"checkpoint has exactly {list(GROUPS)}")
    for g in GROUPS:
        sd = {str(k): _as_numpy(v) for k, v in ckpt[g].items()}
        reader = KeyReader(sd, source=f"{source} [group {g}]", prefix=_group_prefix(sd, g, source))
        group_params: dict = {}
        for path, shape in expected[g].items():
            value = reader.take(flax_path_to_torch_key(path), _torch_shape(shape, path))
            _set_path(group_params, path, _to_flax(value, path))
        reader.finish()
        params[g] = group_params
    return params


def params_to_torch(params: Mapping, config, as_torch: bool = False,
                    prefix: str = PREFIX) -> dict[str, dict[str, Any]]:
    """The reverse export: ``{group: {"module.<torch key>": tensor}}`` for ``sleepnet.py``.

    Tensors are NumPy float32 arrays, or ``torch.Tensor`` when ``as_torch``.
    The parameter tree is checked against ``config`` first.
    """
    expected = _expected_tree(config)
    out: dict[str, dict[str, Any]] = {}
    for g in GROUPS:
        if g not in params:
            raise ConversionError(f"parameter tree has no group {g!r} (top-level keys: "
                                  f"{sorted(params)})")
        flat = flatten_tree(params[g])
        missing = sorted(set(expected[g]) - set(flat))
        extra = sorted(set(flat) - set(expected[g]))
        if missing or extra:
            raise ConversionError(f"parameter group {g!r} does not match the config: missing "
                                  f"{missing[:5]}, unexpected {extra[:5]}")
        sd = {}
        for path, shape in expected[g].items():
            value = np.asarray(flat[path])
            if tuple(value.shape) != shape:
                raise ConversionError(f"parameter {g}/{path} has shape {value.shape}, the config "
                                      f"needs {shape}")
            arr = _to_torch(value.astype(np.float32, copy=False), path)
            sd[prefix + flax_path_to_torch_key(path)] = arr
        out[g] = sd
    if as_torch:
        import torch

        out = {g: {k: torch.from_numpy(np.array(v)) for k, v in sd.items()} for g, sd in out.items()}
    return out


def _as_numpy(v):
    if hasattr(v, "detach"):  # a torch tensor
        return v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
    return np.asarray(v)


# ---- file-level entry points ---------------------------------------------------------------

def _read_config_json(path: str | os.PathLike):
    from evafusion_jax.models.dcevo import DCEvoConfig

    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"--config-json {p}: no such file") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"--config-json {p} is not valid JSON: {e}") from e
    if isinstance(d, dict) and "config" in d and isinstance(d["config"], dict):
        d = d["config"]  # also accept our checkpoint's config.json
    try:
        return DCEvoConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"--config-json {p}: {e}") from e


def convert_file(in_path: str | os.PathLike, out_dir: str | os.PathLike, config=None,
                 overwrite: bool = False) -> Path:
    """Reads a DCEvo ``.pth``, converts it (strictly) and writes an Orbax checkpoint of kind ``dcevo``."""
    from evafusion_jax.storage import checkpoints

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    ckpt = load_torch_file(in_path)
    source = str(in_path)
    inferred = infer_config(ckpt, source)
    if config is not None:
        cfg_arch = {k: v for k, v in config.to_dict().items() if k not in ("dtype", "precision")}
        inf_arch = {k: v for k, v in inferred.to_dict().items() if k not in ("dtype", "precision")}
        if cfg_arch != inf_arch:
            diff = {k: (cfg_arch[k], inf_arch[k]) for k in cfg_arch if cfg_arch[k] != inf_arch[k]}
            raise ConversionError(f"{source} does not match the given config: "
                                  f"{{field: (given, in file)}} = {diff}")
    else:
        config = inferred
    params = torch_to_params(ckpt, config, source)
    checkpoints.save_params(out_dir, params, config.to_dict(), kind="dcevo", overwrite=overwrite,
                            extra={"source": os.path.basename(source), "converter": __name__})
    return out_dir


def export_file(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike,
                overwrite: bool = False) -> Path:
    """Writes our ``dcevo`` checkpoint back into a PyTorch ``.pth`` (four groups, ``module.`` keys)."""
    import torch

    from evafusion_jax.models.dcevo import DCEvoConfig
    from evafusion_jax.storage import checkpoints
    from evafusion_jax.storage.fileio import atomic_path

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; pass --overwrite to replace it")
    params, cfg_dict = checkpoints.load_params(ckpt_dir, expected_kind="dcevo")
    config = DCEvoConfig.from_dict(cfg_dict)
    state = params_to_torch(params, config, as_torch=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        torch.save(state, tmp)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evafusion_jax.convert.dcevo_from_torch",
        description="Convert DCEvo_fusion.pth to an evafusion_jax checkpoint folder "
                    "(or, with --export, a checkpoint folder back to a .pth).")
    parser.add_argument("src", help="DCEvo .pth file (or, with --export, a checkpoint folder)")
    parser.add_argument("dst", help="output checkpoint folder (or, with --export, the .pth to write)")
    parser.add_argument("--config-json", help="JSON file with DCEvoConfig fields; checked against "
                        "the file (default: inferred from the tensor shapes)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--export", action="store_true",
                        help="export an evafusion_jax dcevo checkpoint to a PyTorch .pth")
    args = parser.parse_args(argv)

    def action():
        if args.export:
            if args.config_json:
                raise ConversionError("--config-json is not used with --export (the checkpoint "
                                      "folder holds its config)")
            return export_file(args.src, args.dst, overwrite=args.overwrite)
        config = _read_config_json(args.config_json) if args.config_json else None
        return convert_file(args.src, args.dst, config=config, overwrite=args.overwrite)

    return run_cli(action)

if __name__ == "__main__":
    sys.exit(main())
