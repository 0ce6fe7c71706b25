"""Reading human-feedback datasets: the three layouts, their validation, and ``open_split``.

Three on-disk layouts are read; all of them give the same records.

1. **The published EVAFusion layout, saved with ``datasets.Dataset(Dict).save_to_disk``.**
   ``path`` is either a ``DatasetDict`` folder (``dataset_dict.json`` plus a sub-folder per
   split), a single ``Dataset`` folder (``state.json``; it is used for whatever split is asked, or
   ``split=None``), or a folder that holds one such folder per split (``path/train``,
   ``path/dev``, ``path/test``; each may itself be a ``DatasetDict`` holding that split, which is
   how the released training script loads ``data/train`` and ``data/dev``).
2. **Parquet files per split** (as the Hugging Face hub stores datasets):
   ``{split}.parquet``, ``{split}-*.parquet``, ``{split}/*.parquet``, or the same under ``data/``;
   ``path`` may also be one ``.parquet`` file.
   Both of these layouts need the columns ``fused``, ``infrared``, ``visible`` (images),
   ``artifact_heatmap`` (a grayscale image) and ``scores`` (a struct/dict with the keys
   ``Thermal Retention``, ``Texture Preservation``, ``Artifacts``, ``Sharpness``, ``Overall Score``,
   each a number in [1, 5]). Images may be ``datasets.Image`` values (``{"bytes", "path"}``),
   encoded bytes, or file paths. ``datasets`` and ``pyarrow`` are imported only for these layouts.
3. **A plain folder for users' own annotations** (see ``FOLDER_LAYOUT_DOC`` below)::

       root/
         ir/            infrared source images
         vi/            visible source images
         fused/         fused images (sub-folders allowed: "methodA/0001.png")
         heatmap/       optional grayscale artifact heatmaps, same relative name as the fused image
         scores.jsonl   one JSON object per fused image
         splits.json    optional {"train": [fused names], "dev": [...], "test": [...]}

``open_split`` validates everything it can up front (columns, splits, scores, pairs, image headers,
heatmap sizes) and raises ``FeedbackDataError`` naming the file or field; it returns a
:class:`FeedbackSource`, a grain ``RandomAccessDataSource`` of raw records. Preprocessing and
loaders are in ``feedback``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evafusion_jax.data.feedback_decode import (
    FeedbackDataError,
    check_scores,
    decode_image,
    header_size,
    render_circles,
)
from evafusion_jax.data.image_io import IMAGE_EXTENSIONS
from evafusion_jax.models.score_names import DATASET_SCORE_NAMES

log = logging.getLogger(__name__)


#: Columns the published layout needs.
IMAGE_COLUMNS: tuple[str, ...] = ("infrared", "visible", "fused")
REQUIRED_COLUMNS: tuple[str, ...] = IMAGE_COLUMNS + ("artifact_heatmap", "scores")
SPLITS: tuple[str, ...] = ("train", "dev", "test")
_SPLIT_ALIASES = {"val": "dev", "validation": "dev", "valid": "dev"}
VALIDATE_LEVELS = ("none", "header", "full")

FOLDER_LAYOUT_DOC = """\
Folder layout for your own annotations
--------------------------------------
root/ir/, root/vi/          source images (any format PIL reads; 1 or 3 channels)
root/fused/                 fused images (sub-folders allowed)
root/heatmap/               optional grayscale artifact heatmaps (0 = no artifact, 255 = artifact),
                            same relative file name (or stem) as the fused image, same size
root/scores.jsonl           one JSON object per line, one line per fused image:
  "fused"     (required) file name relative to fused/, e.g. "0001.png" or "methodA/0001.png"
  "scores"    (required) {"Thermal Retention": s, "Texture Preservation": s, "Artifacts": s,
              "Sharpness": s, "Overall Score": s}, each a number in [1, 5]
              (the underscore spellings "Thermal_Retention", ... are accepted too)
  "ir", "vi"  (optional) source file names relative to ir/ and vi/; default: the fused file's
              base name. A missing extension or a different one is resolved by the file stem.
  "heatmap"   (optional) file name relative to heatmap/; default: the fused file name, used if it
              exists (a heatmap named explicitly must exist)
  "circles"   (optional) [{"x": col, "y": row, "r": radius}, ...] in pixels of the fused image;
              each is rendered as a filled disc of value 255 (pixel centres within r of (x, y));
              combined with a heatmap file by the pixel-wise maximum
  "split"     (optional) "train" | "dev" | "test"; if any line has it, every line must
  "synthetic" (optional) true for generated data (evafusion_jax.data.synthetic writes it)
  Other fields are ignored. No heatmap and no circles means "no artifacts" (an empty heatmap).
Splits are taken from, in this order: the "split" fields; root/splits.json
({"train": [fused names], "dev": [...], "test": [...]}); otherwise a deterministic split by hash:
each source pair (ir, vi names) is hashed with `split_seed` to a number u in [0, 1) and goes to
train if u < f_train, dev if u < f_train + f_dev, else test (`split_fractions`, default
0.8/0.1/0.1), so all fused versions of one source pair land in the same split and the split of a
pair never changes when others are added. split="all" (or None) gives every record.
"""



# --------------------------------------------------------------------------------------------
# The data source
# --------------------------------------------------------------------------------------------

class FeedbackSource:
    """A validated split of a human-feedback dataset: a grain ``RandomAccessDataSource``.

    ``source[i]`` is a raw record::

        {"index": int, "name": str,
         "ir", "vi", "fused": uint8 (H, W, 3) RGB,
         "heatmap": uint8 (H, W) (0..255; 0 everywhere = no artifacts),
         "scores": float32 (5,) ratings in [1, 5], SCORE_TYPES order}

    Attributes: ``path``, ``split``, ``layout`` ("hf_disk" | "parquet" | "folder"), ``names``
    (one identifier per record: the fused file name, or "split/row" for tables), ``scores``
    ((N, 5) float32 raw ratings, read up front).
    """

    def __init__(self, path: str, split: str | None, layout: str, names: list[str],
                 scores: np.ndarray, reader: "_Reader"):
        self.path = path
        self.split = split
        self.layout = layout
        self.names = names
        self.scores = scores
        self._reader = reader

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        if i < 0 or i >= len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        rec = self._reader.read(i, f"{self.path} [{self.split}] record {i} ({self.names[i]})")
        rec["index"] = i
        rec["name"] = self.names[i]
        rec["scores"] = self.scores[i].copy()
        return rec

    def __repr__(self) -> str:
        return (f"FeedbackSource(path={self.path!r}, split={self.split!r}, layout={self.layout!r}, "
                f"len={len(self)})")


class _Reader:
    def read(self, i: int, where: str) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


def _finish_record(ir, vi, fused, heat, where: str) -> dict[str, Any]:
    if heat.shape != fused.shape[:2]:
        raise FeedbackDataError(
            f"{where}: heatmap size {heat.shape[1]}x{heat.shape[0]} (WxH) differs from the fused "
            f"image size {fused.shape[1]}x{fused.shape[0]}")
    return {"ir": ir, "vi": vi, "fused": fused, "heatmap": heat}


# ---------------------------- table layouts (save_to_disk / parquet) -------------------------

class _TableReader(_Reader):
    """Reads rows of a ``datasets.Dataset`` (images not decoded) or a ``pyarrow.Table``."""

    def __init__(self, table: Any, kind: str, columns: dict[str, str]):
        self.table = table  # datasets.Dataset or pyarrow.Table
        self.kind = kind
        self.columns = columns  # role -> column name

    def row(self, i: int) -> dict[str, Any]:
        if self.kind == "hf":
            r = self.table[i]
            return {role: r[col] for role, col in self.columns.items()}
        return {role: self.table.column(col)[i].as_py() for role, col in self.columns.items()}

    def read(self, i: int, where: str) -> dict[str, Any]:
        r = self.row(i)
        ir = decode_image(r["infrared"], f"{where}: column 'infrared'", "RGB")
        vi = decode_image(r["visible"], f"{where}: column 'visible'", "RGB")
        fused = decode_image(r["fused"], f"{where}: column 'fused'", "RGB")
        heat = decode_image(r["artifact_heatmap"], f"{where}: column 'artifact_heatmap'", "L")
        return _finish_record(ir, vi, fused, heat, where)


def _normalise_split(split: str | None) -> str | None:
    if split is None:
        return None
    return _SPLIT_ALIASES.get(split, split)


def _find_parquet(root: Path, split: str | None) -> list[str]:
    if root.is_file() and root.suffix == ".parquet":
        return [str(root)]
    if split is None:
        return []
    pats = [f"{split}.parquet", f"{split}-*.parquet", f"{split}_*.parquet", f"{split}/*.parquet"]
    for base in (root, root / "data"):
        for p in pats:
            hits = sorted(glob.glob(str(base / p)))
            if hits:
                return hits
    return []


def _any_parquet(root: Path) -> bool:
    return bool(glob.glob(str(root / "*.parquet")) or glob.glob(str(root / "*" / "*.parquet")))


def _import_datasets():
    try:
        import datasets  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FeedbackDataError(
            "reading a datasets/parquet layout needs the 'datasets' and 'pyarrow' packages: "
            "pip install 'evafusion_jax[datasets]'") from e
    return datasets


def _load_hf(root: Path, split: str | None, depth: int = 0):
    """Returns (datasets.Dataset, split_name) from a save_to_disk folder, or None if not one."""
    datasets = _import_datasets()
    if (root / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(root))
        avail = list(dd.keys())
        if split is None:
            if len(avail) == 1:
                return dd[avail[0]], avail[0]
            raise FeedbackDataError(
                f"{root}: a DatasetDict with splits {avail}; name the split to read")
        if split not in dd:
            raise FeedbackDataError(
                f"{root}: split '{split}' not found; the DatasetDict has splits {avail}")
        return dd[split], split
    if (root / "state.json").exists():
        ds = datasets.load_from_disk(str(root))
        return ds, split
    if depth == 0 and split is not None and (root / split).is_dir():
        sub = _load_hf(root / split, split, depth + 1)
        if sub is not None:
            return sub
    return None


def _table_source(root: Path, split: str | None, validate: str) -> FeedbackSource:
    parquet_files: list[str] = []
    loaded = None
    if root.is_dir():
        loaded = _load_hf(root, split)
    if loaded is not None:
        ds, split_name = loaded
        kind, layout = "hf", "hf_disk"
        col_names = list(ds.column_names)
        n = len(ds)
        where = f"{root} [{split_name}]"
    else:
        parquet_files = _find_parquet(root, split)
        if not parquet_files:
            if root.is_dir() and (_any_parquet(root) or (root / "data").is_dir()):
                found = sorted({Path(p).name for p in glob.glob(str(root / "**" / "*.parquet"),
                                                                 recursive=True)})
                raise FeedbackDataError(
                    f"{root}: no parquet file for split '{split}' ({split}.parquet, "
                    f"{split}-*.parquet or {split}/*.parquet, also under data/); "
                    f"found {found[:10]}")
            raise FeedbackDataError(
                f"{root}: not a recognised feedback dataset (expected a datasets save_to_disk "
                "folder, parquet files per split, or a folder with scores.jsonl)")
        _import_datasets()
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415
        try:
            tables = [pq.read_table(f) for f in parquet_files]
        except (OSError, pa.ArrowException) as e:
            raise FeedbackDataError(f"{parquet_files}: unreadable parquet file ({e})") from e
        try:
            ds = (pa.concat_tables(tables, promote_options="default") if len(tables) > 1
                  else tables[0])
        except pa.ArrowException as e:
            raise FeedbackDataError(f"{parquet_files}: parquet files of split '{split}' have "
                                    f"different schemas ({e})") from e
        kind, layout, split_name = "pa", "parquet", split
        col_names = list(ds.column_names)
        n = ds.num_rows
        where = f"{parquet_files[0] if len(parquet_files) == 1 else root} [{split_name}]"

    # ---- columns
    missing = [c for c in REQUIRED_COLUMNS if c not in col_names]
    flat_scores = False
    if "scores" in missing and all(s in col_names for s in DATASET_SCORE_NAMES):
        missing.remove("scores")
        flat_scores = True
    if missing:
        raise FeedbackDataError(
            f"{where}: missing column(s) {missing}; found {col_names}. The EVAFusion layout needs "
            f"columns {list(REQUIRED_COLUMNS)}")
    if n == 0:
        raise FeedbackDataError(f"{where}: the split is empty (0 rows)")

    # ---- scores, read up front (cheap: no images)
    if kind == "hf":
        if flat_scores:
            sub = ds.select_columns(list(DATASET_SCORE_NAMES))
            raw_scores = [dict(zip(DATASET_SCORE_NAMES, vals)) for vals in
                          zip(*(sub[s] for s in DATASET_SCORE_NAMES))]
        else:
            raw_scores = list(ds.select_columns(["scores"])["scores"])
        datasets = _import_datasets()
        feats = ds.features
        for c in REQUIRED_COLUMNS:
            if c != "scores" and isinstance(feats.get(c), datasets.Image):
                ds = ds.cast_column(c, datasets.Image(decode=False))
    else:
        if flat_scores:
            vals = [ds.column(s).to_pylist() for s in DATASET_SCORE_NAMES]
            raw_scores = [dict(zip(DATASET_SCORE_NAMES, v)) for v in zip(*vals)]
        else:
            raw_scores = ds.column("scores").to_pylist()
        ds = ds.select([c for c in REQUIRED_COLUMNS if c in col_names])
    scores = np.stack([check_scores(s, f"{where} row {i}: column 'scores'")
                       for i, s in enumerate(raw_scores)])
    names = [f"{split_name}/{i}" if split_name else str(i) for i in range(n)]
    roles = {c: c for c in IMAGE_COLUMNS + ("artifact_heatmap",)}
    reader = _TableReader(ds, kind, roles)

    if validate != "none":
        full = validate == "full"
        for i in range(n):
            r = reader.row(i)
            wi = f"{where} row {i}"
            sizes = {c: header_size(r[c], f"{wi}: column '{c}'", full) for c in roles}
            if sizes["artifact_heatmap"] != sizes["fused"]:
                (hh, hw), (fh, fw) = sizes["artifact_heatmap"], sizes["fused"]
                raise FeedbackDataError(
                    f"{wi}: column 'artifact_heatmap' is {hw}x{hh} (WxH) but 'fused' is {fw}x{fh}; "
                    "the heatmap must have the fused image's size")
    return FeedbackSource(str(root), split_name, layout, names, scores, reader)


# ---------------------------------- folder layout ------------------------------------------

class _FolderReader(_Reader):
    def __init__(self, entries: list[dict[str, Any]]):
        self.entries = entries

    def read(self, i: int, where: str) -> dict[str, Any]:
        e = self.entries[i]
        ir = decode_image(e["ir"], f"{where}: {e['ir']}", "RGB")
        vi = decode_image(e["vi"], f"{where}: {e['vi']}", "RGB")
        fused = decode_image(e["fused"], f"{where}: {e['fused']}", "RGB")
        h, w = fused.shape[:2]
        if e["heatmap"] is not None:
            heat = decode_image(e["heatmap"], f"{where}: {e['heatmap']}", "L")
            if heat.shape != (h, w):
                return _finish_record(ir, vi, fused, heat, f"{where}: {e['heatmap']}")
        else:
            heat = np.zeros((h, w), np.uint8)
        if e["circles"]:
            heat = np.maximum(heat, render_circles(e["circles"], h, w))
        return _finish_record(ir, vi, fused, heat, where)


def _stem_index(folder: Path) -> dict[str, list[str]]:
    idx: dict[str, list[str]] = {}
    if not folder.is_dir():
        return idx
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            rel = p.relative_to(folder).as_posix()
            idx.setdefault(str(Path(rel).with_suffix("")), []).append(rel)
    return idx


def _resolve(folder: Path, name: str, stems: dict[str, list[str]], what: str,
             where: str) -> str:
    p = folder / name
    if p.is_file():
        return str(p)
    key = str(Path(name).with_suffix("")) if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
    hits = stems.get(key, [])
    if len(hits) == 1:
        return str(folder / hits[0])
    if len(hits) > 1:
        raise FeedbackDataError(f"{where}: {what} '{name}' is ambiguous in {folder}: {hits}")
    raise FeedbackDataError(
        f"{where}: {what} image '{name}' not found in {folder} (missing pair; name it with the "
        f"'{what}' field if it differs from the fused file name)")


def _hash_unit(seed: int, key: str) -> float:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def _folder_source(root: Path, split: str | None, validate: str, split_seed: int,
                   split_fractions: Sequence[float]) -> FeedbackSource:
    scores_path = root / "scores.jsonl"
    for sub in ("ir", "vi", "fused"):
        if not (root / sub).is_dir():
            raise FeedbackDataError(f"{root}: folder '{sub}/' is missing (the folder layout needs "
                                    "ir/, vi/, fused/ and scores.jsonl)")
    lines = []
    with open(scores_path, encoding="utf-8") as f:
        for ln, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise FeedbackDataError(f"{scores_path}:{ln}: invalid JSON ({e})") from e
            if not isinstance(obj, dict):
                raise FeedbackDataError(f"{scores_path}:{ln}: each line must be a JSON object")
            lines.append((ln, obj))
    if not lines:
        raise FeedbackDataError(f"{scores_path}: empty dataset (no annotation lines)")

    stems = {sub: _stem_index(root / sub) for sub in ("ir", "vi", "fused", "heatmap")}
    entries, names, scores, pair_keys, line_splits = [], [], [], [], []
    seen: dict[str, int] = {}
    for ln, obj in lines:
        where = f"{scores_path}:{ln}"
        fused_name = obj.get("fused")
        if not isinstance(fused_name, str) or not fused_name:
            raise FeedbackDataError(f"{where}: field 'fused' (the fused image's file name) is "
                                    "missing")
        if fused_name in seen:
            raise FeedbackDataError(f"{where}: fused image '{fused_name}' is listed twice (also on "
                                    f"line {seen[fused_name]})")
        seen[fused_name] = ln
        if "scores" not in obj:
            raise FeedbackDataError(f"{where}: field 'scores' is missing")
        sc = check_scores(obj["scores"], f"{where}: field 'scores'")
        fused_p = _resolve(root / "fused", fused_name, stems["fused"], "fused", where)
        base = Path(fused_name).name
        ir_name = obj.get("ir", base)
        vi_name = obj.get("vi", base)
        ir_p = _resolve(root / "ir", ir_name, stems["ir"], "ir", where)
        vi_p = _resolve(root / "vi", vi_name, stems["vi"], "vi", where)
        heat_p = None
        if "heatmap" in obj and obj["heatmap"] is not None:
            heat_p = _resolve(root / "heatmap", obj["heatmap"], stems["heatmap"], "heatmap", where)
        elif stems["heatmap"]:
            key = str(Path(fused_name).with_suffix(""))
            hits = stems["heatmap"].get(key, [])
            if len(hits) > 1:
                raise FeedbackDataError(f"{where}: heatmap for '{fused_name}' is ambiguous: {hits}")
            if hits:
                heat_p = str(root / "heatmap" / hits[0])
        circles = obj.get("circles") or []
        if not isinstance(circles, list):
            raise FeedbackDataError(f"{where}: field 'circles' must be a list of "
                                    '{"x": .., "y": .., "r": ..} objects')
        for k, c in enumerate(circles):
            ok = isinstance(c, dict) and all(
                isinstance(c.get(f), (int, float)) and not isinstance(c.get(f), bool)
                for f in ("x", "y", "r"))
            if not ok or not all(math.isfinite(c[f]) for f in ("x", "y", "r")) or c["r"] <= 0:
                raise FeedbackDataError(f"{where}: circles[{k}] = {c!r}; each circle needs numbers "
                                        "x, y (pixel column, row) and r > 0")
        entries.append({"ir": ir_p, "vi": vi_p, "fused": fused_p, "heatmap": heat_p,
                        "circles": circles})
        names.append(fused_name)
        scores.append(sc)
        pair_keys.append(f"{ir_name}|{vi_name}")
        line_splits.append((where, obj.get("split")))

    # ---- splits
    n_with = sum(s is not None for _, s in line_splits)
    split = _normalise_split(split)
    if split in (None, "all"):
        keep = list(range(len(entries)))
        split_name = "all"
    else:
        if n_with:
            if n_with != len(line_splits):
                where = next(w for w, s in line_splits if s is None)
                raise FeedbackDataError(f"{where}: field 'split' is missing; when any line has a "
                                        "'split' field, every line must")
            assign = [_normalise_split(s) for _, s in line_splits]
            for (where, s), a in zip(line_splits, assign):
                if a not in SPLITS:
                    raise FeedbackDataError(f"{where}: split {s!r} is not one of {list(SPLITS)}")
        elif (root / "splits.json").exists():
            try:
                spl = json.loads((root / "splits.json").read_text())
            except json.JSONDecodeError as e:
                raise FeedbackDataError(f"{root / 'splits.json'}: invalid JSON ({e})") from e
            if not isinstance(spl, dict):
                raise FeedbackDataError(f"{root / 'splits.json'}: expected an object "
                                        '{"train": [...], "dev": [...], "test": [...]}')
            by_name: dict[str, str] = {}
            for s, members in spl.items():
                for m in members:
                    if m not in seen:
                        raise FeedbackDataError(f"{root / 'splits.json'}: split '{s}' lists "
                                                f"'{m}', which is not in scores.jsonl")
                    by_name[m] = _normalise_split(s)
            assign = [by_name.get(nm) for nm in names]
        else:
            fr = [float(x) for x in split_fractions]
            if len(fr) != 3 or any(x < 0 for x in fr) or abs(sum(fr) - 1.0) > 1e-6:
                raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, "
                                 f"got {split_fractions}")
            assign = []
            for key in pair_keys:
                u = _hash_unit(split_seed, key)
                assign.append("train" if u < fr[0] else "dev" if u < fr[0] + fr[1] else "test")
        keep = [i for i, a in enumerate(assign) if a == split]
        split_name = split
        if not keep:
            raise FeedbackDataError(f"{root}: split '{split}' is empty (0 of {len(entries)} "
                                    "annotated images are assigned to it)")
    entries = [entries[i] for i in keep]
    names = [names[i] for i in keep]
    scores_arr = np.stack([scores[i] for i in keep])

    if validate != "none":
        full = validate == "full"
        for e, nm in zip(entries, names):
            sizes = {k: header_size(e[k], f"{root} ({nm}): {e[k]}", full)
                     for k in ("ir", "vi", "fused")}
            if e["heatmap"] is not None:
                hs = header_size(e["heatmap"], f"{root} ({nm}): {e['heatmap']}", full)
                if hs != sizes["fused"]:
                    raise FeedbackDataError(
                        f"{e['heatmap']}: heatmap is {hs[1]}x{hs[0]} (WxH) but the fused image "
                        f"{e['fused']} is {sizes['fused'][1]}x{sizes['fused'][0]}; the heatmap "
                        "must have the fused image's size")
    return FeedbackSource(str(root), split_name, "folder", names, scores_arr,
                          _FolderReader(entries))


def detect_layout(path: str | os.PathLike) -> str:
    """Returns "folder", "hf_disk" or "parquet" for ``path`` (without reading data)."""
    root = Path(path)
    if root.is_file() and root.suffix == ".parquet":
        return "parquet"
    if (root / "scores.jsonl").is_file():
        return "folder"
    for base in [root] + ([p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []):
        if (base / "dataset_dict.json").exists() or (base / "state.json").exists():
            return "hf_disk"
    if root.is_dir() and glob.glob(str(root / "**" / "*.parquet"), recursive=True):
        return "parquet"
    raise FeedbackDataError(
        f"{root}: not a recognised feedback dataset (expected a datasets save_to_disk folder, "
        "parquet files per split, or a folder with ir/, vi/, fused/ and scores.jsonl)")


def open_split(path: str | os.PathLike, split: str | None = "train", *, validate: str = "header",
               split_seed: int = 0,
               split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> FeedbackSource:
    """Opens and validates one split of a human-feedback dataset in any supported layout.

    Args:
      path: dataset root (see the module docstring for the layouts).
      split: "train", "dev" or "test" ("val"/"validation" mean "dev"); None (or "all" for the
        folder layout) for a dataset with a single split / every record.
      validate: "none" (schema, scores, pairs only), "header" (also open every image's header:
        readability, heatmap size == fused size; the default, cheap), or "full" (decode every
        image).
      split_seed, split_fractions: the hash split of the folder layout when it names no splits.

    Raises:
      FeedbackDataError naming the file/row/field for: a missing path, column, split or pair, an
      unreadable image, a missing score or one outside [1, 5], a heatmap whose size differs from the
      fused image, an empty dataset.
    """
    if validate not in VALIDATE_LEVELS:
        raise ValueError(f"validate must be one of {VALIDATE_LEVELS}, got {validate!r}")
    root = Path(path)
    if not root.exists():
        raise FeedbackDataError(f"{root}: dataset path does not exist")
    split = _normalise_split(split)
    if split is not None and split != "all" and split not in SPLITS:
        log.warning("split %r is not one of %s", split, SPLITS)
    if (root / "scores.jsonl").is_file():
        return _folder_source(root, split, validate, split_seed, split_fractions)
    if root.is_dir() and (root / "ir").is_dir() and (root / "fused").is_dir():
        raise FeedbackDataError(f"{root}: scores.jsonl is missing (the folder layout needs "
                                "ir/, vi/, fused/ and scores.jsonl)")
    return _table_source(root, split, validate)

