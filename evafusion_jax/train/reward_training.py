"""Reward-model training as pure functions: parameter split, optimizer, loss, steps, feature cache.

Facts taken from the released ``RichHF/train.py``:

* The backbone ViT and the mixing ViT (``vit_fusion``, randomly initialised in
  the release) are frozen; only ``projection``, ``heatmap_predictor`` and
  ``score_predictor`` learn. ``train_mixer=True`` also trains ``vit_fusion``;
  ``train_backbone=True`` (not in the release: for a randomly initialised
  backbone, e.g. the demo's) also trains the backbone ``vit`` (no feature cache then).
* AdamW (betas 0.9/0.999, eps 1e-8, weight decay 2e-3 on every trained
  parameter), learning rate from 2e-5 to 1e-5 by ``CosineAnnealingLR(T_max=
  num_epochs, eta_min=min_lr)`` stepped once per epoch with ``step(epoch)``
  *after* that epoch, so epoch ``e`` trains with ``cos_lr(max(e - 1, 0))``
  (``schedule="released"``); ``schedule="cosine"`` is a smooth per-step cosine
  over the whole run instead.
* loss = score_weight * sum over the five scores of MSE(pred, score/5)
  + heatmap_weight * MSE(pred heatmap, heatmap), means over the batch (and
  pixels); both weights 1.

Trained parameters are split from frozen ones (:func:`split_params`): the
optimizer only ever sees the trained subtree, so frozen parameters have no
optimizer state at all, and the step receives the frozen subtree as a constant.

The feature cache (:func:`build_feature_cache`) encodes every image of a split
once with the frozen backbone and stores its patch tokens in ``.npy`` files
read through memory maps; training then runs only the head
(:func:`reward_model.head`). A cache is identified by a key over the backbone
parameters (content hash), the data (file list with sizes and modification
times, or file contents), the preprocessing and the storage dtype; a cache
whose key differs is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from evafusion_jax.models import reward_model as rm
from evafusion_jax.storage.fileio import commit_dir, staging_dir
from evafusion_jax.storage.fingerprint import tree_fingerprint
from evafusion_jax.train import optimizer as optim
from evafusion_jax.train import parallel as par

logger = logging.getLogger(__name__)

TRAINED_KEYS = ("projection", "heatmap_predictor", "score_predictor")
MIXER_KEY = "vit_fusion"
BACKBONE_KEY = "vit"
CACHE_FORMAT_VERSION = 1
CACHE_DTYPES = ("float32", "float16", "bfloat16")


# ----------------------------------------------------------------------------- params / optimizer

def trained_keys(train_mixer: bool = False, train_backbone: bool = False) -> tuple[str, ...]:
    return (TRAINED_KEYS + ((MIXER_KEY,) if train_mixer else ())
            + ((BACKBONE_KEY,) if train_backbone else ()))


def split_params(params: Mapping[str, Any], train_mixer: bool = False,
                 train_backbone: bool = False) -> tuple[dict, dict]:
    """``(trained, frozen)`` top-level subtrees of a reward-model parameter tree."""
    keys = trained_keys(train_mixer, train_backbone)
    missing = [k for k in (BACKBONE_KEY, MIXER_KEY) + TRAINED_KEYS if k not in params]
    if missing:
        raise ValueError(f"reward-model params lack the top-level key(s) {missing}; "
                         f"got {sorted(params)}")
    trained = {k: params[k] for k in keys}
    frozen = {k: v for k, v in params.items() if k not in keys}
    return trained, frozen


def merge_params(trained: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    return {**frozen, **trained}


def released_epoch_lr(epoch: int | jax.Array, init_lr: float, min_lr: float, num_epochs: int):
    """The learning rate of (0-based) ``epoch`` in the released script (see module doc)."""
    e = jnp.maximum(jnp.asarray(epoch, jnp.float32) - 1.0, 0.0)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * e / max(num_epochs, 1)))


def make_schedule(init_lr: float, min_lr: float, num_epochs: int, steps_per_epoch: int,
                  schedule: str = "released") -> optax.Schedule:
    """Learning-rate schedule as a function of the optimizer step."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if schedule == "released":
        def fn(count):
            return released_epoch_lr(count // steps_per_epoch, init_lr, min_lr, num_epochs)
        return fn
    if schedule == "cosine":
        total = max(num_epochs * steps_per_epoch, 1)
        return optax.cosine_decay_schedule(init_lr, total, alpha=min_lr / init_lr if init_lr else 0.0)
    if schedule == "constant":
        return optax.constant_schedule(init_lr)
    raise ValueError(f"schedule must be 'released', 'cosine' or 'constant', got {schedule!r}")


def make_optimizer(init_lr: float = 2e-5, min_lr: float = 1e-5, num_epochs: int = 30,
                   steps_per_epoch: int = 1, weight_decay: float = 2e-3,
                   schedule: str = "released", grad_clip_norm: float = 0.0
                   ) -> optax.GradientTransformation:
    """AdamW as released (:func:`evafusion_jax.train.optimizer.adamw`) on :func:`make_schedule`."""
    return optim.adamw(make_schedule(init_lr, min_lr, num_epochs, steps_per_epoch, schedule),
                           weight_decay, grad_clip_norm)


def init_train_state(trained: Any, optimizer: optax.GradientTransformation) -> dict:
    """``{"params": trained, "opt_state": ..., "step": int32 0}``."""
    return {"params": trained, "opt_state": optimizer.init(trained),
            "step": jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------- loss / steps

def batch_tokens(params: Mapping[str, Any], batch: Mapping[str, Any], config: rm.RewardConfig,
                 train_backbone: bool = False):
    """(tokens_ir, tokens_vi, tokens_fused) of a batch: cached tokens, or encoded pixels.

    The backbone gets no gradient unless ``train_backbone``."""
    if "tok_fused" in batch:
        return tuple(jnp.asarray(batch[k], jnp.float32) for k in ("tok_ir", "tok_vi", "tok_fused"))
    sg = (lambda x: x) if train_backbone else jax.lax.stop_gradient
    vit = sg(params[BACKBONE_KEY])
    b = batch["fused"].shape[0]
    pix = jnp.concatenate([batch["ir"], batch["vi"], batch["fused"]], axis=0)
    tok = sg(rm.encode({BACKBONE_KEY: vit}, pix, config))
    return tok[:b], tok[b:2 * b], tok[2 * b:]


def forward(params: Mapping[str, Any], batch: Mapping[str, Any], config: rm.RewardConfig,
            train_backbone: bool = False) -> dict:
    """Reward-model outputs for a batch (cached tokens or pixel values)."""
    t_ir, t_vi, t_fu = batch_tokens(params, batch, config, train_backbone)
    return rm.head(params, t_ir, t_vi, t_fu, config)


def loss_terms(outputs: Mapping[str, Any], batch: Mapping[str, Any], config: rm.RewardConfig,
               score_weight: float = 1.0, heatmap_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """The released loss and its parts (batch means; see module doc)."""
    target = jnp.asarray(batch["scores"], jnp.float32)
    terms = {}
    total = jnp.zeros((), jnp.float32)
    for i, name in enumerate(config.score_types):
        pred = jnp.reshape(outputs["scores"][name], (-1,)).astype(jnp.float32)
        terms[f"loss/{name}"] = jnp.mean((pred - target[:, i]) ** 2)
        total = total + score_weight * terms[f"loss/{name}"]
    gt = jnp.asarray(batch["heatmap"], jnp.float32)
    for name in config.heatmap_types:
        pred = outputs["heatmaps"][name].astype(jnp.float32)
        terms[f"loss/{name}"] = jnp.mean((pred - gt) ** 2)
        total = total + heatmap_weight * terms[f"loss/{name}"]
    terms["loss"] = total
    return total, terms


def make_train_step(config: rm.RewardConfig, optimizer: optax.GradientTransformation,
                    mesh, *, score_weight: float = 1.0, heatmap_weight: float = 1.0,
                    debug_nan_at_step: int = -1, donate: bool = False,
                    train_backbone: bool = False) -> Callable:
    """Jitted data-parallel step ``(state, frozen, batch) -> (state, metrics)``.

    ``state`` from :func:`init_train_state` (replicated), ``frozen`` the frozen
    parameters (replicated), ``batch`` sharded over the mesh's ``"data"`` axis
    (:func:`parallel.shard_batch`). Gradients, loss and metrics are averaged
    over the shards, so the result equals the single-device step on the same
    global batch. ``debug_nan_at_step`` (>= 0) makes the loss NaN at that step
    (0-based), for testing the NaN guard.
    """

    def step(state, frozen, batch):
        def loss_fn(trained):
            out = forward(merge_params(trained, frozen), batch, config, train_backbone)
            return loss_terms(out, batch, config, score_weight, heatmap_weight)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        if debug_nan_at_step >= 0:
            bad = state["step"] == debug_nan_at_step
            loss = jnp.where(bad, jnp.nan, loss)
            terms["loss"] = loss
            grads = jax.tree_util.tree_map(lambda g: jnp.where(bad, jnp.nan, g), grads)
        grads = jax.lax.pmean(grads, par.DATA_AXIS)
        terms = jax.lax.pmean(terms, par.DATA_AXIS)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        terms["grad_norm"] = optax.tree.norm(grads)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, terms

    return par.data_parallel(step, mesh, batch_argnums=(2,), donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=8)
def make_predict_fn(config: rm.RewardConfig, mesh) -> Callable:
    """Jitted data-parallel ``(params, batch) -> {"scores": (B, 5), "heatmaps": (B, S, S)}``.

    Cached per (config, mesh), so that evaluating after every epoch compiles once.

    Per-example outputs stay sharded over ``"data"``; ``heatmaps`` is the first
    heatmap type (the release has one). The batch size must be a multiple of
    the mesh size (:func:`pad_batch`).
    """

    def predict(params, batch):
        out = forward(params, batch, config)
        return {"scores": rm.stack_scores(out["scores"], config).astype(jnp.float32),
                "heatmaps": out["heatmaps"][config.heatmap_types[0]].astype(jnp.float32)}

    return par.data_parallel(predict, mesh, batch_argnums=(1,), out_specs=P(par.DATA_AXIS))


def pad_batch(batch: Mapping[str, np.ndarray], multiple: int) -> tuple[dict, int]:
    """Pads every leaf's first axis (repeating the last row) to a multiple; returns (batch, n)."""
    n = len(next(iter(batch.values())))
    pad = (-n) % multiple
    if not pad:
        return dict(batch), n
    return {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)], axis=0)
            for k, v in batch.items()}, n


def evaluate_batches(predict_fn: Callable, params: Any, batches: Iterable[Mapping[str, Any]],
                     mesh, config: rm.RewardConfig, *, score_weight: float = 1.0,
                     heatmap_weight: float = 1.0, seed: int = 0,
                     progress: Callable | None = None) -> dict[str, float]:
    """The released validation metrics of ``params`` over ``batches``, streamed.

    Uses ``reward_metrics.MetricAccumulator`` (PLCC/SRCC per score; heatmap MSE
    on empty ground truths, NSS/CC/similarity/KLD/AUC-Judd on the others;
    ``avg_metric``) and adds ``loss/val`` = the training loss over the set.
    Batches may have any size (padded to the mesh size here).
    """
    from evafusion_jax.eval import reward_metrics

    acc = reward_metrics.MetricAccumulator(seed=seed)
    n_dev = mesh.devices.size
    it = progress(batches) if progress else batches
    for batch in it:
        batch = {k: np.asarray(v) for k, v in batch.items() if k not in ("name", "heatmap_empty",
                                                                        "index")}
        padded, n = pad_batch(batch, n_dev)
        out = jax.device_get(predict_fn(params, par.shard_batch(padded, mesh)))
        acc.add(np.asarray(out["scores"])[:n], batch["scores"][:n],
                np.asarray(out["heatmaps"])[:n], batch["heatmap"][:n])
    metrics = acc.result()
    total = sum(score_weight * metrics[f"loss/{t}"] for t in config.score_types)
    total += heatmap_weight * metrics[f"loss/{config.heatmap_types[0]}"]
    metrics["loss/val"] = float(total)
    return {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- feature cache

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
