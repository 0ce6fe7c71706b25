"""The reward model's feature cache: every image of a feedback split encoded once by the frozen backbone.

:func:`build_feature_cache` stores the backbone's patch tokens in ``.npy`` files read through
memory maps (:class:`FeatureCacheSource`); reward training then runs only the head
(:func:`reward_model.head`). A cache is identified by a key over the backbone parameters
(content hash, ``tree_fingerprint``), the data (file list with sizes and modification times, or
file contents; :func:`data_fingerprint`), the preprocessing and the storage dtype; a cache whose
key differs is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from evafusion_jax.models import reward_model as rm
from evafusion_jax.storage.fileio import commit_dir, staging_dir
from evafusion_jax.storage.fingerprint import tree_fingerprint
from evafusion_jax.train import parallel as par
from evafusion_jax.train.reward_training import BACKBONE_KEY, pad_batch

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_DTYPES = ("float32", "float16", "bfloat16")


def data_fingerprint(source: Any, mode: str = "stat") -> dict:
    """Identity of a dataset split: its records and the files under ``source.path``.

    ``mode="stat"`` hashes relative path, size and modification time of every
    file; ``"content"`` hashes the file bytes (slower, survives copies/touches).
    Also covers the split name, record names and score table.
    """
    if mode not in ("stat", "content"):
        raise ValueError(f"cache fingerprint mode must be 'stat' or 'content', got {mode!r}")
    h = hashlib.sha256()
    root = Path(getattr(source, "path", "") or "")
    files = []
    if root.is_file():
        files = [root]
        base = root.parent
    elif root.is_dir():
        base = root
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    else:
        base = root
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(base)).encode())
        if mode == "stat":
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    h.update(repr(getattr(source, "split", None)).encode())
    names = list(getattr(source, "names", []) or [])
    h.update(json.dumps(names).encode())
    scores = getattr(source, "scores", None)
    if scores is not None:
        h.update(np.ascontiguousarray(np.asarray(scores, np.float32)).tobytes())
    return {"mode": mode, "num_files": len(files), "num_records": len(source), "sha256": h.hexdigest()}


def _cache_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCacheSource:
    """A grain data source over a built feature cache (memory-mapped ``.npy`` files).

    ``source[i]`` -> ``{"tok_ir", "tok_vi", "tok_fused": (N_tok, D) stored dtype,
    "heatmap": float32 (S, S), "scores": float32 (5,), "heatmap_empty": bool, "index": int32}``,
    the same targets as ``feedback.preprocess_example``.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        man_file = self.directory / "manifest.json"
        if not man_file.is_file():
            raise FileNotFoundError(f"{self.directory} is not a complete feature cache "
                                    "(manifest.json missing)")
        self.manifest = json.loads(man_file.read_text())
        d = self.directory
        self.tokens = np.load(d / "tokens.npy", mmap_mode="r")
        self.img_index = np.load(d / "image_index.npy")      # (N, 3): ir, vi, fused rows
        self.heatmap = np.load(d / "heatmap.npy", mmap_mode="r")  # uint8 (N, S, S)
        self.scores = np.load(d / "scores.npy")              # (N, 5) float32 in [0, 1]
        self.dtype = self.manifest["dtype"]

    def __len__(self) -> int:
        return int(self.img_index.shape[0])

    def __repr__(self) -> str:
        return f"FeatureCacheSource({str(self.directory)!r}, key={self.manifest.get('key')!r})"

    def _tok(self, row: int) -> np.ndarray:
        t = np.asarray(self.tokens[row])
        if self.dtype == "bfloat16":
            import ml_dtypes
            t = t.view(ml_dtypes.bfloat16)
        return t

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        r_ir, r_vi, r_fu = (int(x) for x in self.img_index[i])
        heat = np.asarray(self.heatmap[i], np.float32) / 255.0
        return {"tok_ir": self._tok(r_ir), "tok_vi": self._tok(r_vi), "tok_fused": self._tok(r_fu),
                "heatmap": heat, "scores": self.scores[i].copy(),
                "heatmap_empty": np.bool_(not np.any(heat > 0)), "index": np.int32(i)}


def cache_identity(source: Any, backbone_params: Any, config: rm.RewardConfig,
                   dtype: str = "float16", fingerprint: str = "stat",
                   backbone_fingerprint: str | None = None) -> dict:
    """The parts that identify a feature cache, and its ``key``."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"feature cache dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
    v = config.vit
    parts = {
        "format_version": CACHE_FORMAT_VERSION,
        "backbone": backbone_fingerprint or tree_fingerprint(backbone_params),
        "backbone_config": v.to_dict(),
        "compute_dtype": config.dtype, "precision": config.precision,
        "preprocessing": {"image_size": v.image_size, "mean": list(v.image_mean),
                          "std": list(v.image_std), "resize": "PIL bilinear, /255",
                          "function": "feedback.preprocess_example"},
        "data": data_fingerprint(source, fingerprint),
        "dtype": dtype,
    }
    return {"key": _cache_key(parts), "parts": parts}


def build_feature_cache(source: Any, backbone_params: Any, config: rm.RewardConfig,
                        cache_root: str | os.PathLike, *, dtype: str = "float16",
                        batch_size: int = 8, fingerprint: str = "stat", name: str | None = None,
                        mesh=None, progress: Callable | None = None,
                        backbone_fingerprint: str | None = None) -> FeatureCacheSource:
    """Encodes every image of ``source`` once with the frozen backbone; returns the cache.

    Reuses ``cache_root/<name>`` when its manifest has the same key; otherwise
    (backbone, data, preprocessing or dtype changed) rebuilds it in a
    temporary folder and renames it into place, so an interrupted build never
    leaves a cache that looks complete. Identical images (e.g. an IR/visible
    pair shared by several fused images) are encoded and stored once.

    Args:
      source: a ``feedback.FeedbackSource`` (raw records).
      backbone_params: the backbone ViT params (``params["vit"]``).
      config: the reward-model config (the backbone architecture and preprocessing).
      cache_root: folder holding caches; one sub-folder per split.
      dtype: storage dtype of the tokens: float32, float16 or bfloat16.
      batch_size: images per encoder call.
      fingerprint: how the data is identified (:func:`data_fingerprint`).
      name: sub-folder name (default: the split name).
      mesh: encode data-parallel over this (process-local) mesh; default: all
        local devices.
      backbone_fingerprint: precomputed :func:`tree_fingerprint` of the backbone.
    """
    from evafusion_jax.data import feedback as fd

    ident = cache_identity(source, backbone_params, config, dtype, fingerprint,
                           backbone_fingerprint)
    name = name or str(getattr(source, "split", None) or "all")
    cache_root = Path(cache_root).absolute()
    target = cache_root / name
    man_file = target / "manifest.json"
    if man_file.is_file():
        try:
            old = json.loads(man_file.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("key") == ident["key"] and old.get("complete"):
            logger.info("feature cache %s is up to date (key %s)", target, ident["key"])
            return FeatureCacheSource(target)
        changed = [k for k in ident["parts"] if old.get("parts", {}).get(k) != ident["parts"][k]]
        logger.info("feature cache %s is stale (changed: %s); rebuilding", target, changed)

    v = config.vit
    mesh = mesh or par.data_mesh(jax.local_devices())
    n_dev = mesh.devices.size
    bs = max(batch_size, n_dev) + (-max(batch_size, n_dev)) % n_dev
    enc = jax.jit(lambda p, x: rm.encode({BACKBONE_KEY: p}, x, config))
    p_rep = par.replicate(backbone_params, mesh)
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]

    tmp = staging_dir(target)
    try:
        n = len(source)
        if n == 0:
            raise fd.FeedbackDataError(f"{source!r}: empty dataset, nothing to cache")
        s = v.image_size
        img_index = np.zeros((n, 3), np.int64)
        heat = np.lib.format.open_memmap(tmp / "heatmap.npy", "w+", np.uint8, (n, s, s))
        scores = np.zeros((n, len(config.score_types)), np.float32)
        # Unique images are found first (by content hash of the preprocessed pixels) so the
        # token file can be allocated with its final size.
        pending: list[np.ndarray] = []
        uniq: dict[str, int] = {}
        tok_file = tmp / "tokens_parts"
        tok_file.mkdir()
        n_rows = 0
        part_files = []

        def flush():
            nonlocal n_rows
            if not pending:
                return
            x = np.stack(pending)
            padded, m = pad_batch({"x": x}, bs) if len(x) % bs else ({"x": x}, len(x))
            out = np.asarray(jax.device_get(enc(p_rep, par.shard_batch(padded["x"], mesh))))[:m]
            if dtype == "bfloat16":
                import ml_dtypes
                out = out.astype(ml_dtypes.bfloat16).view(np.uint16)
            else:
                out = out.astype(np_dtype)
            f = tok_file / f"{len(part_files):06d}.npy"
            np.save(f, out)
            part_files.append(f)
            n_rows += len(out)
            pending.clear()

        it = range(n)
        if progress is not None:
            it = progress(it)
        for i in it:
            ex = fd.preprocess_example(source[i], s, v.image_mean, v.image_std)
            for j, k in enumerate(("ir", "vi", "fused")):
                h = hashlib.sha1(ex[k].tobytes()).hexdigest()
                if h not in uniq:
                    uniq[h] = len(uniq)
                    pending.append(ex[k])
                    if len(pending) == bs:
                        flush()
                img_index[i, j] = uniq[h]
            heat[i] = np.round(ex["heatmap"] * 255.0).astype(np.uint8)
            scores[i] = ex["scores"]
        flush()
        heat.flush()
        del heat
        tokens = None
        for f in part_files:
            part = np.load(f)
            if tokens is None:
                tokens = np.lib.format.open_memmap(tmp / "tokens.npy", "w+", part.dtype,
                                                   (n_rows,) + part.shape[1:])
                row = 0
            tokens[row:row + len(part)] = part
            row += len(part)
            f.unlink()
        tokens.flush()
        del tokens
        shutil.rmtree(tok_file)
        np.save(tmp / "image_index.npy", img_index)
        np.save(tmp / "scores.npy", scores)
        manifest = {"key": ident["key"], "parts": ident["parts"], "complete": True,
                    "dtype": dtype, "num_records": n, "num_unique_images": n_rows,
                    "tokens_shape": [n_rows, v.num_patches, v.hidden_size],
                    "names": list(getattr(source, "names", []) or []),
                    "source": repr(source), "created": time.time()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built feature cache %s: %d records, %d unique images", target, n, n_rows)
    return FeatureCacheSource(target)
