"""Collect human feedback in the browser: scores and artifact circles, expert review of model
annotations, and a blind ranking study of fusion methods.

    # score fused images (five 1-5 scores, artifact circles) into a folder train_reward reads
    python -m evafusion_jax.annotate --ir data/ir --vi data/vi \
        --fused MethodA=results/A --fused MethodB=results/B --out feedback/
    # the same, pre-filled with a reward model's scores and thresholded heatmap, for correction
    python -m evafusion_jax.annotate ... --out feedback/ --review runs/reward/best_model
    # blind ranking of the methods, pair by pair, and its report
    python -m evafusion_jax.annotate ... --out study/ --rank
    python -m evafusion_jax.annotate --report study/

The server listens on 127.0.0.1 (a free port unless ``--port`` is given) and prints its address;
the page is plain HTML/JS shipped in ``evafusion_jax/data/`` and loads nothing from elsewhere.
Fused images are identified on the page only by opaque tokens (derived from a secret kept in
``FEEDBACK/annotate_session.json``) and are shown in a random order per annotator, so the page
never reveals which method made an image.

What is written to ``FEEDBACK`` (the folder layout of ``feedback``; ``train_reward
--config.data.path=FEEDBACK`` reads it as it is):

* ``ir/``, ``vi/``, ``fused/<METHOD>/``: copies of the images that have a record;
* ``annotations.jsonl``: every submit, in order (the log; one JSON object a line, with
  ``annotator`` and ``time``); ``scores.jsonl``: the latest record of each fused image, rebuilt
  from the log after every submit (``{"fused", "ir", "vi", "scores", "circles", "annotator",
  "time"[, "review"]}``);
* ``rankings.jsonl`` (``--rank``): one line per submitted ranking: ``{"pair", "ranking": [methods,
  best first], "shown": [methods in the order shown], "participant", "time"}``;
* ``predictions/<METHOD>/`` (``--review``): the reward model's scores and raw heatmaps
  (``score.score_folder``), computed once and reused after a restart.

Every submit is validated first (a malformed request gets a 4xx answer with a message and
changes nothing), then, under a lock that also holds between processes (``fcntl.flock``): the
images are copied, the record is appended to the log with one write and fsynced, and
``scores.jsonl`` is atomically replaced; only then does the page hear "saved". A restart rebuilds
``scores.jsonl`` from the log and the page continues at the annotator's first unannotated image.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import http.server
import importlib.resources
import io
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import sys
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evafusion_jax.models import score_names
from evafusion_jax.storage import fileio

try:  # POSIX: a lock that also holds between server processes sharing one folder
    import fcntl
except ImportError:  # pragma: no cover - Windows: the in-process lock only
    fcntl = None

logger = logging.getLogger(__name__)

SCORE_NAMES: tuple[str, ...] = score_names.DATASET_SCORE_NAMES
ANNOTATIONS_LOG = "annotations.jsonl"
SCORES_FILE = "scores.jsonl"
RANKINGS_LOG = "rankings.jsonl"
SESSION_FILE = "annotate_session.json"
LOCK_FILE = ".annotate.lock"
MAX_BODY = 1 << 20
MAX_DRAIN = 64 << 20  # longer bodies are not read at all: the connection is closed
MAX_CIRCLES = 200
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_WHO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@ -]{0,63}$")
_STATIC = {"/": ("annotate.html", "text/html; charset=utf-8"),
           "/annotate.js": ("annotate.js", "text/javascript; charset=utf-8"),
           "/annotate.css": ("annotate.css", "text/css; charset=utf-8")}


class AnnotateError(ValueError):
    """Unusable command-line inputs (folders, method names, output folder, feedback files)."""


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Item:
    """One fused image to score: ``rel`` is its name under ``FEEDBACK/fused/`` ("METHOD/file")."""
    rel: str
    method: str
    stem: str
    fused: Path
    ir: Path
    vi: Path


@dataclasses.dataclass(frozen=True)
class Pair:
    """One source pair with every method's fused image (blind ranking)."""
    stem: str
    ir: Path
    vi: Path
    fused: dict  # method -> Path


def parse_methods(specs: Sequence[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` -> ``{NAME: DIR}``, checking names (used as folder names) and folders."""
    methods: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise AnnotateError(f"--fused {spec!r}: expected NAME=DIR, e.g. --fused DCEvo=results/dcevo")
        if not _NAME_RE.match(name):
            raise AnnotateError(f"--fused {spec!r}: method name {name!r} must be 1-64 letters, digits, "
                                "'_', '.', '-' (it becomes a folder name), starting with a letter or digit")
        if name in methods:
            raise AnnotateError(f"--fused: method name {name!r} is given twice")
        if not Path(folder).is_dir():
            raise AnnotateError(f"--fused {spec!r}: folder {folder!r} does not exist")
        methods[name] = Path(folder)
    if not methods:
        raise AnnotateError("give at least one --fused NAME=DIR")
    return methods


def collect(ir_dir, vi_dir, methods: Mapping[str, Path]) -> tuple[list[Item], list[Pair]]:
    """Every fused image of every method with its sources (matched by file stem, as ``score``
    does), and the source pairs that every method fused (for ranking)."""
    from evafusion_jax import score

    items: list[Item] = []
    by_stem: dict[str, dict[str, Item]] = {}
    for name, folder in methods.items():
        try:
            triples = score.match_sources(folder, ir_dir, vi_dir)
        except (score.ScoreInputError, FileNotFoundError) as e:
            raise AnnotateError(f"method {name}: {e}") from e
        for f, i, v in triples:
            it = Item(rel=f"{name}/{f.name}", method=name, stem=f.stem, fused=f, ir=i, vi=v)
            items.append(it)
            by_stem.setdefault(f.stem, {})[name] = it
    pairs = []
    for stem in sorted(by_stem):
        got = by_stem[stem]
        if len(got) == len(methods):
            first = next(iter(got.values()))
            pairs.append(Pair(stem=stem, ir=first.ir, vi=first.vi,
                              fused={m: got[m].fused for m in methods}))
    return items, pairs


# --------------------------------------------------------------------------------------------
# The feedback folder: lock, logs, scores.jsonl
# --------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def read_log(path: Path) -> list[dict]:
    """The JSON objects of a log. A line that does not parse can only be a write torn by a crash
    (``fileio.append_durable`` starts the next record on a new line); it is skipped with a
    warning."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                logger.warning("%s:%d: skipping an unreadable line (an interrupted write?): %s",
                               path, k, e)
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


class FeedbackStore:
    """The output folder. Every write happens under :meth:`lock` (threads and processes)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tlock = threading.Lock()
        if (self.root / SCORES_FILE).exists() and not (self.root / ANNOTATIONS_LOG).exists():
            raise AnnotateError(f"{self.root / SCORES_FILE} exists but was not written by this "
                                f"tool (no {ANNOTATIONS_LOG} next to it); it would be replaced: "
                                "choose another --out")
        with self.lock():
            sess = self.root / SESSION_FILE
            if sess.exists():
                try:
                    self.secret = json.loads(sess.read_text())["secret"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise AnnotateError(f"{sess}: unreadable session file ({e}); it holds the "
                                        "secret behind the page's image tokens") from e
            else:
                self.secret = secrets.token_hex(16)
                fileio.write_durable(sess, json.dumps({"secret": self.secret,
                                                       "created": _now()}).encode())
            if (self.root / ANNOTATIONS_LOG).exists():
                self._rebuild_scores()

    @contextlib.contextmanager
    def lock(self):
        with self._tlock:
            if fcntl is None:  # pragma: no cover
                yield
                return
            with open(self.root / LOCK_FILE, "a+b") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def token(self, *parts: str) -> str:
        return hashlib.sha256(":".join((self.secret,) + parts).encode()).hexdigest()[:16]

    def rng(self, *parts: str) -> random.Random:
        return random.Random(int(self.token("rng", *parts), 16))

    # ---- reading
    def annotations(self) -> list[dict]:
        return read_log(self.root / ANNOTATIONS_LOG)

    def latest_annotations(self) -> dict[str, dict]:
        """fused name -> its latest record (insertion order: first annotation of each image)."""
        latest: dict[str, dict] = {}
        for rec in self.annotations():
            if isinstance(rec.get("fused"), str):
                latest[rec["fused"]] = rec
        return latest

    def rankings(self) -> list[dict]:
        return read_log(self.root / RANKINGS_LOG)

    # ---- writing (call under lock)
    def _rebuild_scores(self) -> None:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                       for r in self.latest_annotations().values())
        fileio.write_durable(self.root / SCORES_FILE, body.encode("utf-8"))

    def _copy(self, src: Path, rel: str) -> None:
        dst = self.root / rel
        if dst.exists():
            if dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
                return
            raise RequestError(409, f"{dst} exists and differs from {src}; this feedback folder "
                                    "was started with other input images (use another --out)")
        with fileio.atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        fileio.fsync_dir(dst.parent)

    def add_annotation(self, item: Item, record: dict) -> None:
        with self.lock():
            self._copy(item.ir, f"ir/{item.ir.name}")
            self._copy(item.vi, f"vi/{item.vi.name}")
            self._copy(item.fused, f"fused/{item.rel}")
            fileio.append_durable(self.root / ANNOTATIONS_LOG,
                                  (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            self._rebuild_scores()

    def add_ranking(self, record: dict) -> None:
        with self.lock():
            fileio.append_durable(self.root / RANKINGS_LOG,
                                  (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Review mode: the reward model's annotations
# --------------------------------------------------------------------------------------------

def heatmap_to_circles(heat: np.ndarray, height: int, width: int, threshold: float = 0.5,
                       min_area: int = 4) -> list[dict]:
    """A predicted heatmap (h, w) in [0, 1] -> artifact circles in pixels of a (height, width)
    fused image: the heatmap is resized bilinearly to the image, thresholded, and every connected
    region of at least ``min_area`` pixels becomes the circle of equal area at its centroid
    (x = column, y = row, r = radius; the format of ``scores.jsonl``)."""
    from PIL import Image
    from scipy import ndimage

    h = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize((width, height), Image.BILINEAR))
    labels, n = ndimage.label(h > threshold)
    circles = []
    for k in range(1, n + 1):
        rows, cols = np.nonzero(labels == k)
        if rows.size < min_area:
            continue
        circles.append({"x": round(float(cols.mean()), 1), "y": round(float(rows.mean()), 1),
                        "r": round(max(1.0, math.sqrt(rows.size / math.pi)), 1)})
    return circles


def load_predictions(checkpoint, ir_dir, vi_dir, methods: Mapping[str, Path], root: Path,
                     items: Sequence[Item], threshold: float = 0.5) -> dict[str, dict]:
    """Scores every method's images with ``score.score_folder`` into ``root/predictions/<method>``
    (reused when it was made from the same checkpoint and images) and returns
    ``{fused rel: {"scores": {name: float}, "circles": [...]}}``."""
    import csv

    from PIL import Image

    from evafusion_jax import score
    from evafusion_jax.data import image_io

    ck = str(Path(checkpoint).resolve())
    preds: dict[str, dict] = {}
    for name, folder in methods.items():
        out = root / "predictions" / name
        files = sorted(p.name for p in image_io.list_images(folder))
        stamp = {"checkpoint": ck, "fused": str(Path(folder).resolve()), "files": files}
        meta = out / "made_from.json"
        if not (meta.exists() and json.loads(meta.read_text()) == stamp):
            logger.info("review: scoring %s with %s", name, checkpoint)
            score.score_folder(checkpoint, folder, ir_dir, vi_dir, out, raw_heatmaps=True,
                               overwrite=True, progress=True)
            fileio.write_durable(meta, json.dumps(stamp).encode())
        with open(out / "scores.csv", newline="") as fh:
            rows = {r["fused"]: r for r in csv.DictReader(fh)}
        for it in (i for i in items if i.method == name):
            r = rows[it.fused.name]
            raw = np.asarray(Image.open(out / "heatmaps_raw" / f"{it.stem}.png").convert("L"),
                             np.float32) / 255.0
            hgt, wid = image_io.image_size(it.fused)
            preds[it.rel] = {
                "scores": {n: round(float(r[score_names.SCORE_COLUMNS[n]]), 4) for n in SCORE_NAMES},
                "circles": heatmap_to_circles(raw, hgt, wid, threshold)}
    return preds


def _prefill_scores(pred: Mapping[str, float]) -> dict[str, int]:
    return {n: int(min(5, max(1, round(float(pred[n]))))) for n in SCORE_NAMES}


def _same_circles(a: Sequence[Mapping], b: Sequence[Mapping], tol: float = 0.5) -> bool:
    return len(a) == len(b) and all(
        all(abs(float(x[f]) - float(y[f])) <= tol for f in ("x", "y", "r")) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------
# The application (HTTP-independent request handling)
# --------------------------------------------------------------------------------------------

def _require(cond: bool, message: str, status: int = 400) -> None:
    if not cond:
        raise RequestError(status, message)


def _check_who(who: Any) -> str:
    _require(isinstance(who, str) and bool(_WHO_RE.match(who)),
             f"annotator/participant id {who!r} is missing or invalid: 1-64 letters, digits, "
             "spaces or '_.@-', starting with a letter or digit")
    return who


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class App:
    """The annotation server's state and request handling (``handle`` is called per request)."""

    def __init__(self, store: FeedbackStore, items: Sequence[Item], pairs: Sequence[Pair], *,
                 mode: str = "annotate", predictions: Mapping[str, dict] | None = None,
                 checkpoint: str | None = None):
        if mode not in ("annotate", "review", "rank"):
            raise ValueError(f"mode must be annotate, review or rank, got {mode!r}")
        if mode == "review" and predictions is None:
            raise ValueError("review mode needs predictions")
        if mode == "rank" and len(pairs) == 0:
            raise AnnotateError("--rank: no source pair has a fused image from every method "
                                "(fused files are matched to each other by file stem)")
        self.store, self.mode, self.checkpoint = store, mode, checkpoint
        self.predictions = dict(predictions or {})
        self.items = {store.token("item", it.rel): it for it in items}
        self.pairs = {store.token("pair", p.stem): p for p in pairs}
        self.images: dict[str, Path] = {}
        for it in items:
            for kind, p in (("ir", it.ir), ("vi", it.vi), ("fused", it.fused)):
                self.images[self.image_token(kind, p)] = p
        self._sizes: dict[Path, tuple[int, int]] = {}

    def image_token(self, kind: str, path: Path) -> str:
        return self.store.token("img", kind, str(path))

    def size(self, path: Path) -> tuple[int, int]:
        from evafusion_jax.data import image_io
        if path not in self._sizes:
            self._sizes[path] = image_io.image_size(path)
        return self._sizes[path]

    # ---- routing
    def handle(self, method: str, path: str, query: Mapping[str, str], body: bytes | None):
        """-> (status, content type, body bytes); raises RequestError for a refused request."""
        if path in _STATIC:
            _require(method == "GET", f"{path} accepts GET only", 405)
            fname, ctype = _STATIC[path]
            return 200, ctype, _static(fname)
        if path.startswith("/img/"):
            _require(method == "GET", "images accept GET only", 405)
            tok = path[len("/img/"):].removesuffix(".png")
            _require(tok in self.images, f"no image {tok!r}", 404)
            return 200, "image/png", _png(str(self.images[tok]))
        routes = {"/api/config": ("GET", self.api_config), "/api/items": ("GET", self.api_items),
                  "/api/item": ("GET", self.api_item), "/api/submit": ("POST", self.api_submit),
                  "/api/rank": ("POST", self.api_rank)}
        _require(path in routes, f"no such page or API: {path}", 404)
        verb, fn = routes[path]
        _require(method == verb, f"{path} accepts {verb} only", 405)
        if verb == "POST":
            try:
                data = json.loads((body or b"").decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RequestError(400, f"the request body is not valid JSON ({e})") from None
            _require(isinstance(data, dict), "the request body must be a JSON object")
            out = fn(data)
        else:
            out = fn(query)
        return 200, "application/json", json.dumps(out).encode()

    # ---- GET
    def api_config(self, query) -> dict:
        return {"mode": self.mode, "score_names": list(SCORE_NAMES),
                "count": len(self.pairs) if self.mode == "rank" else len(self.items)}

    def _order(self, who: str) -> list[str]:
        ids = sorted(self.pairs if self.mode == "rank" else self.items)
        self.store.rng("order", who).shuffle(ids)
        return ids

    def _done(self, who: str) -> set[str]:
        if self.mode == "rank":
            stems = {r.get("pair") for r in self.store.rankings() if r.get("participant") == who}
            return {t for t, p in self.pairs.items() if p.stem in stems}
        latest = self.store.latest_annotations()
        return {t for t, it in self.items.items() if it.rel in latest}

    def api_items(self, query) -> dict:
        who = _check_who(query.get("who"))
        done = self._done(who)
        ids = self._order(who)
        return {"items": [{"id": t, "done": t in done} for t in ids], "done": len(done),
                "count": len(ids)}

    def _labels(self, who: str, pair: Pair) -> list[tuple[str, str]]:
        methods = sorted(pair.fused)
        self.store.rng("shown", who, pair.stem).shuffle(methods)
        return [(chr(ord("A") + k), m) for k, m in enumerate(methods)]

    def api_item(self, query) -> dict:
        who = _check_who(query.get("who"))
        tok = query.get("id", "")
        if self.mode == "rank":
            _require(tok in self.pairs, f"no pair {tok!r}", 404)
            pair = self.pairs[tok]
            labels = self._labels(who, pair)
            saved = None
            for r in self.store.rankings():
                if r.get("participant") == who and r.get("pair") == pair.stem:
                    by_method = {m: lab for lab, m in labels}
                    saved = [by_method.get(m) for m in r.get("ranking", [])]
            h, w = self.size(pair.ir)
            return {"id": tok, "width": w, "height": h,
                    "ir": f"/img/{self.image_token('ir', pair.ir)}.png",
                    "vi": f"/img/{self.image_token('vi', pair.vi)}.png",
                    "candidates": [{"label": lab,
                                    "url": f"/img/{self.image_token('fused', pair.fused[m])}.png"}
                                   for lab, m in labels],
                    "saved": saved}
        _require(tok in self.items, f"no image {tok!r}", 404)
        it = self.items[tok]
        h, w = self.size(it.fused)
        rec = self.store.latest_annotations().get(it.rel)
        out = {"id": tok, "width": w, "height": h,
               "ir": f"/img/{self.image_token('ir', it.ir)}.png",
               "vi": f"/img/{self.image_token('vi', it.vi)}.png",
               "fused": f"/img/{self.image_token('fused', it.fused)}.png",
               "saved": rec is not None, "prefilled": False,
               "scores": None, "circles": [], "saved_by": None}
        if rec is not None:
            out.update(scores=rec.get("scores"), circles=rec.get("circles", []),
                       saved_by=rec.get("annotator"), saved_at=rec.get("time"))
        elif self.mode == "review":
            pred = self.predictions[it.rel]
            out.update(scores=_prefill_scores(pred["scores"]), circles=pred["circles"],
                       prefilled=True)
        return out

    # ---- POST
    def api_submit(self, data: dict) -> dict:
        _require(self.mode in ("annotate", "review"), "this server runs a ranking study; "
                 "submit rankings to /api/rank")
        extra = set(data) - {"id", "who", "scores", "circles"}
        _require(not extra, f"unknown field(s) {sorted(extra)}; expected id, who, scores, circles")
        who = _check_who(data.get("who"))
        tok = data.get("id")
        _require(isinstance(tok, str) and tok in self.items, f"no image {tok!r}", 404)
        it = self.items[tok]
        scores = data.get("scores")
        _require(isinstance(scores, dict), f"'scores' must be an object with the keys {list(SCORE_NAMES)}")
        _require(set(scores) == set(SCORE_NAMES),
                 f"'scores' must have exactly the keys {list(SCORE_NAMES)}, got {sorted(scores)}")
        for n, v in scores.items():
            _require(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 5,
                     f"score {n!r} = {v!r}: scores are whole numbers from 1 to 5")
        circles = data.get("circles", [])
        _require(isinstance(circles, list) and len(circles) <= MAX_CIRCLES,
                 f"'circles' must be a list of at most {MAX_CIRCLES} circles")
        h, w = self.size(it.fused)
        clean = []
        for k, c in enumerate(circles):
            _require(isinstance(c, dict) and set(c) == {"x", "y", "r"}
                     and all(_number(c[f]) for f in ("x", "y", "r")),
                     f"circles[{k}] = {c!r}: each circle is {{\"x\", \"y\", \"r\"}} numbers")
            _require(0 <= c["x"] <= w and 0 <= c["y"] <= h and 0 < c["r"] <= max(w, h),
                     f"circles[{k}] = {c!r} lies outside the {w}x{h} image or has r <= 0")
            clean.append({f: round(float(c[f]), 1) for f in ("x", "y", "r")})
        record = {"fused": it.rel, "ir": it.ir.name, "vi": it.vi.name,
                  "scores": {n: scores[n] for n in SCORE_NAMES}, "circles": clean,
                  "annotator": who, "time": _now()}
        if self.mode == "review":
            pred = self.predictions[it.rel]
            pre = _prefill_scores(pred["scores"])
            changed = [n for n in SCORE_NAMES if pre[n] != scores[n]]
            if not _same_circles(clean, pred["circles"]):
                changed.append("circles")
            record["review"] = {"checkpoint": self.checkpoint, "predicted": pred,
                                "prefilled_scores": pre, "changed": changed}
        self.store.add_annotation(it, record)
        done = self._done(who)
        return {"saved": True, "id": tok, "time": record["time"], "done": len(done),
                "count": len(self.items)}

    def api_rank(self, data: dict) -> dict:
        _require(self.mode == "rank", "this server collects scores; start it with --rank for a "
                 "ranking study")
        extra = set(data) - {"id", "who", "order"}
        _require(not extra, f"unknown field(s) {sorted(extra)}; expected id, who, order")
        who = _check_who(data.get("who"))
        tok = data.get("id")
        _require(isinstance(tok, str) and tok in self.pairs, f"no pair {tok!r}", 404)
        pair = self.pairs[tok]
        labels = self._labels(who, pair)
        order = data.get("order")
        names = sorted(lab for lab, _ in labels)
        _require(isinstance(order, list) and all(isinstance(x, str) for x in order)
                 and sorted(order) == names,
                 f"'order' must list every image label {names} once, best first; got {order!r}")
        method_of = dict(labels)
        record = {"pair": pair.stem, "ranking": [method_of[x] for x in order],
                  "shown": [m for _, m in labels], "participant": who, "time": _now()}
        self.store.add_ranking(record)
        done = self._done(who)
        return {"saved": True, "id": tok, "time": record["time"], "done": len(done),
                "count": len(self.pairs)}


@functools.lru_cache(maxsize=8)
def _static(name: str) -> bytes:
    return (importlib.resources.files("evafusion_jax") / "resources" / name).read_bytes()


@functools.lru_cache(maxsize=64)
def _png(path: str) -> bytes:
    """Any image the project reads (16-bit, TIFF, ...) as an 8-bit PNG a browser shows."""
    from PIL import Image

    from evafusion_jax.data import image_io
    arr = image_io.to_uint8(image_io.read_image(path))
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    app: App  # set on the subclass made by make_server
    local_only: bool = True  # refuse requests that name another host (when bound to loopback)
    server_version = "evafusion-annotate"

    def log_message(self, fmt, *args):  # noqa: D401 - quiet: debug log instead of stderr
        logger.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, ctype: str, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self):
        """The POST body, or the RequestError (411/413) that answers it; an over-long body of up
        to ``MAX_DRAIN`` bytes is read and dropped so that the client can read the 413."""
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return RequestError(411, "a POST needs a Content-Length header")
        if 0 <= n <= MAX_BODY:
            return self.rfile.read(n)
        left = n if 0 < n <= MAX_DRAIN else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        return RequestError(413, f"request body of {n} bytes is over the {MAX_BODY}-byte limit")

    def _dispatch(self, method: str):
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            body = None
            if method == "POST":  # read (or, when too long, drain) the body before any answer:
                body = self._read_body()  # answering first would break the client's pipe
            if self.local_only:  # a page of another site reaching us by DNS rebinding is refused
                host = urllib.parse.urlsplit("//" + self.headers.get("Host", "")).hostname
                _require(host in ("127.0.0.1", "localhost", "::1"),
                         f"Host {self.headers.get('Host')!r} is not this machine", 403)
            if method == "POST":
                ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
                _require(ctype == "application/json", "POST bodies must be sent as "
                         f"Content-Type: application/json (got {ctype or 'none'!r})", 415)
                if isinstance(body, RequestError):
                    raise body
            status, ctype, data = self.app.handle(method, url.path, query, body)
        except RequestError as e:
            status, ctype = e.status, "application/json"
            data = json.dumps({"error": e.message}).encode()
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - answer 500 with the reason, keep serving
            logger.exception("request %s %s failed", method, self.path)
            status, ctype = 500, "application/json"
            data = json.dumps({"error": f"server error: {type(e).__name__}: {e}"}).encode()
        self._send(status, ctype, data)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")


def make_server(app: App, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server for ``app`` (``port=0``: a free port; ``server.server_address``)."""
    loopback = host in ("127.0.0.1", "localhost", "::1")
    if not loopback:
        logger.warning("listening on %s: other machines can reach the page (no authentication)",
                       host)
    handler = type("Handler", (_Handler,), {"app": app, "local_only": loopback})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def build_app(ir, vi, fused: Mapping[str, Path] | Sequence[str], out, *, rank: bool = False,
              review: str | None = None, threshold: float = 0.5) -> App:
    """Checks the inputs and opens the feedback folder; returns the :class:`App`."""
    methods = dict(fused) if isinstance(fused, Mapping) else parse_methods(fused)
    methods = {k: Path(v) for k, v in methods.items()}
    for role, d in (("--ir", ir), ("--vi", vi)):
        if not Path(d).is_dir():
            raise AnnotateError(f"{role} folder {str(d)!r} does not exist")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnnotateError(f"--out {str(out)!r} exists and is not a folder")
    out_r = out.resolve()
    for d in [ir, vi, *methods.values()]:
        d = Path(d).resolve()
        if out_r == d or d in out_r.parents or out_r in d.parents:
            raise AnnotateError(f"--out {str(out)!r} must not be, contain or lie inside the input "
                                f"folder {str(d)!r}")
    if rank and review:
        raise AnnotateError("--rank and --review are separate modes; give one")
    if rank and len(methods) < 2:
        raise AnnotateError("--rank compares methods: give at least two --fused NAME=DIR")
    items, pairs = collect(ir, vi, methods)
    store = FeedbackStore(out)
    preds = None
    if review:
        preds = load_predictions(review, ir, vi, methods, out, items, threshold)
    mode = "rank" if rank else "review" if review else "annotate"
    return App(store, items, pairs, mode=mode, predictions=preds, checkpoint=review)


# --------------------------------------------------------------------------------------------
# Report of a ranking study
# --------------------------------------------------------------------------------------------

def kendalls_w(ranks: np.ndarray) -> float:
    """Kendall's coefficient of concordance of ``ranks`` (m raters x k objects, ranks 1..k
    without ties): 12 S / (m^2 (k^3 - k)), S = sum of squared deviations of the rank sums."""
    ranks = np.asarray(ranks, np.float64)
    m, k = ranks.shape
    if m < 2 or k < 2:
        return float("nan")
    sums = ranks.sum(axis=0)
    s = float(((sums - sums.mean()) ** 2).sum())
    return 12.0 * s / (m * m * (k ** 3 - k))


def rank_report(feedback, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean rank per method (1 = best) with a bootstrap confidence interval (pairs resampled with
    replacement, all their rankings kept together), and agreement between participants (Kendall's
    W: per pair over its participants, averaged; and over the participants' mean ranks).

    The latest ranking of each (participant, pair) counts.
    """
    from scipy import stats
    from scipy.stats import rankdata

    path = Path(feedback) / RANKINGS_LOG
    if not path.exists():
        raise AnnotateError(f"{path} does not exist: --report reads the rankings of a --rank study")
    latest: dict[tuple[str, str], list[str]] = {}
    for k, r in enumerate(read_log(path)):
        if not (isinstance(r.get("pair"), str) and isinstance(r.get("participant"), str)
                and isinstance(r.get("ranking"), list) and len(r["ranking"]) >= 2):
            raise AnnotateError(f"{path}: record {k + 1} is not a ranking "
                                "({\"pair\", \"participant\", \"ranking\": [methods, best first]})")
        latest[(r["participant"], r["pair"])] = list(r["ranking"])
    if not latest:
        raise AnnotateError(f"{path}: no rankings yet")
    methods = sorted({m for rk in latest.values() for m in rk})
    for (who, pair), rk in latest.items():
        if sorted(rk) != methods:
            raise AnnotateError(f"{path}: participant {who!r} ranked {rk} on pair {pair!r}, not "
                                f"the study's methods {methods}")
    col = {m: j for j, m in enumerate(methods)}
    pairs = sorted({p for _, p in latest})
    people = sorted({w for w, _ in latest})
    k = len(methods)
    # ranks[i] = ranks of the methods (columns) in ranking i
    keys = sorted(latest)
    ranks = np.zeros((len(keys), k))
    for i, key in enumerate(keys):
        for pos, m in enumerate(latest[key]):
            ranks[i, col[m]] = pos + 1
    pair_index = {p: j for j, p in enumerate(pairs)}
    pair_of = np.array([pair_index[p] for _, p in keys])
    mean = ranks.mean(axis=0)
    rng = np.random.default_rng(seed)
    per_pair_sum = np.zeros((len(pairs), k))
    per_pair_n = np.zeros(len(pairs))
    np.add.at(per_pair_sum, pair_of, ranks)
    np.add.at(per_pair_n, pair_of, 1)
    boots = np.empty((n_boot, k))
    for b in range(n_boot):
        idx = rng.integers(0, len(pairs), len(pairs))
        boots[b] = per_pair_sum[idx].sum(axis=0) / per_pair_n[idx].sum()
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    first = (ranks == 1).sum(axis=0)

    w_pairs = []
    for j, p in enumerate(pairs):
        sel = ranks[pair_of == j]
        if len(sel) >= 2:
            w_pairs.append(kendalls_w(sel))
    w_pair = float(np.mean(w_pairs)) if w_pairs else float("nan")
    w_people = p_people = float("nan")
    if len(people) >= 2:
        who_index = {w: i for i, w in enumerate(people)}
        who_of = np.array([who_index[w] for w, _ in keys])
        per = np.stack([rankdata(ranks[who_of == i].mean(axis=0)) for i in range(len(people))])
        sums = per.sum(axis=0)
        s = float(((sums - sums.mean()) ** 2).sum())
        m = len(people)
        # ties in a participant's mean ranks: the tie-corrected W
        counts = [np.unique(r, return_counts=True)[1].astype(np.float64) for r in per]
        ties = float(sum((t ** 3 - t).sum() for t in counts))
        denom = m * m * (k ** 3 - k) - m * ties
        w_people = 12.0 * s / denom if denom > 0 else float("nan")
        p_people = float(stats.chi2.sf(m * (k - 1) * w_people, k - 1))
    rows = [{"method": mth, "mean_rank": float(mean[j]), "ci_low": float(lo[j]),
             "ci_high": float(hi[j]), "n": int(len(keys)), "first": int(first[j])}
            for j, mth in enumerate(methods)]
    rows.sort(key=lambda r: r["mean_rank"])
    return {"methods": rows, "pairs": len(pairs), "participants": len(people),
            "rankings": len(keys), "level": level, "n_boot": n_boot,
            "kendalls_w_per_pair": w_pair, "pairs_with_2_or_more": len(w_pairs),
            "kendalls_w_participants": w_people, "kendalls_w_participants_p": p_people}


def format_report(rep: Mapping[str, Any]) -> str:
    """The report as a Markdown table and summary lines."""
    pct = int(round(rep["level"] * 100))
    lines = [f"Blind ranking: {rep['rankings']} rankings of {rep['pairs']} pairs by "
             f"{rep['participants']} participant(s); rank 1 = best", "",
             f"| method | mean rank | {pct}% CI (bootstrap over pairs) | ranked first |",
             "|---|---|---|---|"]
    for r in rep["methods"]:
        lines.append(f"| {r['method']} | {r['mean_rank']:.3f} | [{r['ci_low']:.3f}, "
                     f"{r['ci_high']:.3f}] | {r['first']} / {r['n']} |")
    lines += ["", f"Kendall's W per pair (mean over {rep['pairs_with_2_or_more']} pairs ranked by "
                  f"two or more participants): {rep['kendalls_w_per_pair']:.3f}",
              f"Kendall's W over the participants' mean ranks: {rep['kendalls_w_participants']:.3f}"
              f" (chi-square p = {rep['kendalls_w_participants_p']:.3g})"]
    return "\n".join(lines) + "\n"


def plot_report(rep: Mapping[str, Any], path) -> Path:
    """Mean rank per method with its confidence interval, as a PNG (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["methods"]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.5))
    y = np.arange(len(rows))[::-1]
    mean = np.array([r["mean_rank"] for r in rows])
    err = np.array([[r["mean_rank"] - r["ci_low"] for r in rows],
                    [r["ci_high"] - r["mean_rank"] for r in rows]])
    ax.errorbar(mean, y, xerr=err, fmt="o", capsize=4)
    ax.set_yticks(y, [r["method"] for r in rows])
    ax.set_xlabel(f"mean rank (1 = best), {int(round(rep['level'] * 100))}% bootstrap CI")
    ax.set_title(f"{rep['rankings']} rankings, {rep['participants']} participant(s), "
                 f"W = {rep['kendalls_w_participants']:.2f}")
    ax.set_xlim(0.8, len(rows) + 0.2)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evafusion_jax.annotate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ir", help="folder of infrared source images")
    ap.add_argument("--vi", help="folder of visible source images")
    ap.add_argument("--fused", action="append", default=[], metavar="NAME=DIR",
                    help="a method's fused images (repeat per method; matched to the sources by stem)")
    ap.add_argument("--out", help="the feedback folder to write (created; reopened to resume)")
    ap.add_argument("--review", metavar="CHECKPOINT",
                    help="pre-fill scores and circles with this reward checkpoint's predictions")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="--review: heatmap value above which a pixel is an artifact")
    ap.add_argument("--rank", action="store_true", help="blind ranking study of the methods")
    ap.add_argument("--report", metavar="FEEDBACK",
                    help="print the ranking report of a --rank folder and write its plot")
    ap.add_argument("--plot", help="--report: plot file (default FEEDBACK/rank_report.png)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="--report: bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="--report: bootstrap seed")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (keep it local)")
    ap.add_argument("--port", type=int, default=0, help="port (0 = a free one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from evafusion_jax.storage import checkpoints

    if args.report:
        try:
            rep = rank_report(args.report, n_boot=args.bootstrap, seed=args.seed)
        except AnnotateError as e:
            logger.error("%s", e)
            return 2
        plot = plot_report(rep, args.plot or Path(args.report) / "rank_report.png")
        fileio.write_durable(Path(args.report) / "rank_report.json", json.dumps(rep, indent=1).encode())
        sys.stdout.write(format_report(rep) + f"\nplot: {plot}\n")
        return 0
    missing = [f"--{k}" for k in ("ir", "vi", "out") if not getattr(args, k)]
    if missing or not args.fused:
        ap.error(f"missing {', '.join(missing + ([] if args.fused else ['--fused NAME=DIR']))} "
                 "(or give --report FEEDBACK)")
    try:
        app = build_app(args.ir, args.vi, args.fused, args.out, rank=args.rank,
                        review=args.review, threshold=args.threshold)
    except (AnnotateError, checkpoints.CheckpointError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    server = make_server(app, args.host, args.port)
    host, port = server.server_address[:2]
    sys.stdout.write(f"{app.mode}: {app.api_config({})['count']} "
                     f"{'pairs' if app.mode == 'rank' else 'images'}; writing to {args.out}\n"
                     f"open http://{host}:{port}/ in a browser (Ctrl+C stops the server)\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
