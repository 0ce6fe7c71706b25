"""Human-feedback dataset layouts and validation errors (evafusion_jax.data.feedback_readers,
through its public names in evafusion_jax.data.feedback)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evafusion_jax.data import feedback as fd
from evafusion_jax.data import synthetic

SCORES = {"Thermal Retention": 4, "Texture Preservation": 3.5, "Artifacts": 2,
          "Sharpness": 5, "Overall Score": 1}


def _img(seed, size=(12, 16), mode="L"):
    rng = np.random.default_rng(seed)
    shape = size if mode == "L" else size + (3,)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _write_folder(root: Path, lines, n_pairs=3, heatmaps=None, size=(12, 16)):
    """A hand-made folder layout: pairs p0..p{n-1}.png, fused files named in ``lines``."""
    for sub in ("ir", "vi", "fused"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for p in range(n_pairs):
        _img(p, size).save(root / "ir" / f"p{p}.png")
        _img(100 + p, size, "RGB").save(root / "vi" / f"p{p}.png")
    for ln in lines:
        _img(hash(ln["fused"]) % 1000, size, "RGB").save(root / "fused" / ln["fused"])
    for name, im in (heatmaps or {}).items():
        (root / "heatmap").mkdir(exist_ok=True)
        im.save(root / "heatmap" / name)
    with open(root / "scores.jsonl", "w") as f:
        for ln in lines:
            f.write(json.dumps(ln) + "\n")
    return root


def _line(fused, pair, **kw):
    d = {"fused": fused, "ir": f"p{pair}.png", "vi": f"p{pair}.png", "scores": dict(SCORES)}
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def synth_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fb") / "synthetic"
    return synthetic.write_feedback_folder(root, 10, seed=3, size=16,
                                           split_fractions=(0.6, 0.2, 0.2))


def _hf_rows(src):
    rows = {"infrared": [], "visible": [], "fused": [], "artifact_heatmap": [], "scores": []}
    for i in range(len(src)):
        r = src[i]
        rows["infrared"].append(Image.fromarray(r["ir"]))
        rows["visible"].append(Image.fromarray(r["vi"]))
        rows["fused"].append(Image.fromarray(r["fused"]))
        rows["artifact_heatmap"].append(Image.fromarray(r["heatmap"], "L"))
        rows["scores"].append(dict(zip(fd.DATASET_SCORE_NAMES, map(float, r["scores"]))))
    return rows


def _features():
    import datasets
    return datasets.Features({
        "infrared": datasets.Image(), "visible": datasets.Image(), "fused": datasets.Image(),
        "artifact_heatmap": datasets.Image(),
        "scores": {k: datasets.Value("float32") for k in fd.DATASET_SCORE_NAMES}})


@pytest.fixture(scope="module")
def table_layouts(synth_folder, tmp_path_factory):
    """The synthetic folder rewritten as save_to_disk folders and parquet files."""
    datasets = pytest.importorskip("datasets")
    base = tmp_path_factory.mktemp("tables")
    splits = {}
    for s in fd.SPLITS:
        splits[s] = datasets.Dataset.from_dict(_hf_rows(fd.open_split(synth_folder, s)),
                                               features=_features())
    dd = datasets.DatasetDict(splits)
    dd.save_to_disk(str(base / "hf_dict"))
    for s in fd.SPLITS:  # the released script's layout: data/<split> is a DatasetDict
        datasets.DatasetDict({s: splits[s]}).save_to_disk(str(base / "hf_nested" / s))
    (base / "pq").mkdir()
    splits["train"].to_parquet(str(base / "pq" / "train.parquet"))
    (base / "pq" / "data").mkdir()
    splits["dev"].to_parquet(str(base / "pq" / "data" / "dev-00000-of-00001.parquet"))
    splits["test"].to_parquet(str(base / "pq" / "test.parquet"))
    return base, splits


# ------------------------------------------------------------------------------ layouts

def test_all_layouts_give_identical_records(synth_folder, table_layouts):
    base, _ = table_layouts
    for split in fd.SPLITS:
        ref = fd.open_split(synth_folder, split, validate="full")
        assert ref.layout == "folder" and len(ref) > 0
        for path, layout in ((base / "hf_dict", "hf_disk"), (base / "hf_nested", "hf_disk"),
                             (base / "pq", "parquet")):
            src = fd.open_split(path, split, validate="full")
            assert src.layout == layout and len(src) == len(ref)
            np.testing.assert_array_equal(src.scores, ref.scores)
            for i in range(len(ref)):
                a, b = src[i], ref[i]
                for k in ("ir", "vi", "fused", "heatmap"):
                    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{path} {split} {i} {k}")
                assert a["index"] == i
    assert fd.detect_layout(base / "hf_dict") == "hf_disk"
    assert fd.detect_layout(base / "pq") == "parquet"
    assert fd.detect_layout(synth_folder) == "folder"
    # a single parquet file and the "validation" alias
    one = fd.open_split(base / "pq" / "test.parquet", None)
    assert len(one) == len(fd.open_split(synth_folder, "test"))
    assert fd.open_split(base / "hf_dict", "validation").split == "dev"


def test_record_contents_and_scores(synth_folder):
    src = fd.open_split(synth_folder, "train")
    lines = [json.loads(x) for x in (synth_folder / "scores.jsonl").read_text().splitlines()]
    lines = [ln for ln in lines if ln["split"] == "train"]
    assert src.names == [ln["fused"] for ln in lines]
    r = src[1]
    assert r["ir"].dtype == np.uint8 and r["ir"].shape == (16, 16, 3)
    assert r["heatmap"].shape == (16, 16)
    np.testing.assert_allclose(r["scores"], [lines[1]["scores"][k] for k in fd.DATASET_SCORE_NAMES],
                               rtol=1e-6)
    assert fd.SCORE_TYPES == ("Thermal_Retention", "Texture_Preservation", "Artifacts",
                              "Sharpness", "Overall_Score")
    with pytest.raises(IndexError):
        src[len(src)]



def test_folder_circles_stems_and_defaults(tmp_path):
    heat = np.zeros((12, 16), np.uint8)
    heat[0, 0] = 128
    lines = [_line("a.png", 0, circles=[{"x": 5, "y": 4, "r": 2}]),
             _line("b.png", 1),                      # heatmap file by name, no circles
             {"fused": "p2.png", "scores": SCORES}]  # ir/vi default to the fused name
    root = _write_folder(tmp_path / "d", lines, heatmaps={"b.png": Image.fromarray(heat)})
    # the IR source of pair 1 as .jpg: resolved by its stem
    Image.open(root / "ir" / "p1.png").save(root / "ir" / "p1.jpg")
    (root / "ir" / "p1.png").unlink()
    src = fd.open_split(root, "all")
    assert len(src) == 3
    h0 = src[0]["heatmap"]
    yy, xx = np.mgrid[0:12, 0:16]
    np.testing.assert_array_equal(h0 > 0, (xx - 5) ** 2 + (yy - 4) ** 2 <= 4)
    assert h0.max() == 255
    np.testing.assert_array_equal(src[1]["heatmap"], heat)
    assert not src[2]["heatmap"].any()
    np.testing.assert_array_equal(src[2]["ir"][..., 0], np.asarray(_img(2)))


def test_folder_split_sources(tmp_path):
    lines = [_line(f"f{i}_{k}.png", i) for i in range(3) for k in range(2)]
    root = _write_folder(tmp_path / "d", lines)
    # deterministic hash split: every fused version of a pair lands in the same split
    sizes = {}
    for s in fd.SPLITS:
        try:
            src = fd.open_split(root, s, split_fractions=(0.34, 0.33, 0.33), split_seed=1)
        except fd.FeedbackDataError:
            continue
        sizes[s] = len(src)
        pairs = {n.split("_")[0] for n in src.names}
        assert sum(1 for n in src.names) == 2 * len(pairs)
        again = fd.open_split(root, s, split_fractions=(0.34, 0.33, 0.33), split_seed=1)
        assert again.names == src.names
    assert sum(sizes.values()) == 6
    # splits.json
    (root / "splits.json").write_text(json.dumps({"train": ["f0_0.png", "f1_1.png"],
                                                  "dev": ["f2_0.png"]}))
    assert fd.open_split(root, "train").names == ["f0_0.png", "f1_1.png"]
    assert fd.open_split(root, "dev").names == ["f2_0.png"]
    # the split field has priority over splits.json
    lines2 = [dict(ln, split="test" if i == 0 else "train") for i, ln in enumerate(lines)]
    (root / "scores.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines2))
    assert fd.open_split(root, "test").names == ["f0_0.png"]


# -------------------------------------------------------------------------- bad inputs

def _corrupt(root):
    (root / "fused" / "a.png").write_bytes(b"not an image")


@pytest.mark.parametrize("case, lines, mutate, split, match", [
    ("missing pair", [_line("a.png", 0, ir="nope.png")], None, "all",
     r"scores.jsonl:1: ir image 'nope.png' not found .*missing pair"),
    ("unreadable", [_line("a.png", 0)], _corrupt, "all", r"a.png: unreadable image"),
    ("score > 5", [_line("a.png", 0, scores=dict(SCORES, Sharpness=6))], None, "all",
     r"scores.jsonl:1: field 'scores': score 'Sharpness' = 6 is outside \[1, 5\]"),
    ("score < 1", [_line("a.png", 0, scores=dict(SCORES, Artifacts=0.2))], None, "all",
     r"score 'Artifacts' = 0.2 is outside"),
    ("missing score", [_line("a.png", 0, scores={k: 3 for k in list(SCORES)[:4]})], None, "all",
     r"score 'Overall Score' is missing"),
    ("no scores field", [{"fused": "a.png", "ir": "p0.png", "vi": "p0.png"}], None, "all",
     r"scores.jsonl:1: field 'scores' is missing"),
    ("bad circle", [_line("a.png", 0, circles=[{"x": 1, "y": 2}])], None, "all",
     r"circles\[0\]"),
    ("heatmap size", [_line("a.png", 0)],
     lambda r: (r / "heatmap").mkdir() or Image.new("L", (5, 5)).save(r / "heatmap" / "a.png"),
     "all", r"heatmap is 5x5 \(WxH\) but the fused image .* is 16x12"),
    ("missing split", [_line("a.png", 0, split="train")], None, "test",
     r"split 'test' is empty"),
    ("partial split field", [_line("a.png", 0, split="train"), _line("b.png", 1)], None,
     "train", r"scores.jsonl:2: field 'split' is missing"),
    ("empty", [], None, "all", r"empty dataset"),
    ("no scores.jsonl", [_line("a.png", 0)], lambda r: (r / "scores.jsonl").unlink(), "all",
     r"scores.jsonl is missing"),
    ("duplicate", [_line("a.png", 0), _line("a.png", 1)], None, "all", r"listed twice"),
])
def test_folder_bad_input(tmp_path, case, lines, mutate, split, match):
    root = _write_folder(tmp_path / "d", lines)
    if mutate:
        mutate(root)
    with pytest.raises(fd.FeedbackDataError, match=match):
        fd.open_split(root, split)


def test_table_bad_input(tmp_path, table_layouts):
    datasets = pytest.importorskip("datasets")
    _, splits = table_layouts
    good = splits["dev"]
    # missing column
    p = tmp_path / "nocol"
    datasets.DatasetDict({"dev": good.remove_columns(["artifact_heatmap"])}).save_to_disk(str(p))
    with pytest.raises(fd.FeedbackDataError, match=r"missing column\(s\) \['artifact_heatmap'\]"):
        fd.open_split(p, "dev")
    # missing split
    with pytest.raises(fd.FeedbackDataError, match=r"split 'train' not found.*\['dev'\]"):
        fd.open_split(p, "train")
    # scores out of range / missing, heatmap size mismatch, unreadable image, empty
    rows = {k: list(good[k]) for k in good.column_names}
    bad_scores = dict(rows, scores=[dict(s) for s in rows["scores"]])
    bad_scores["scores"][1]["Artifacts"] = 7.0
    bad_none = dict(rows, scores=[dict(s) for s in rows["scores"]])
    bad_none["scores"][0]["Sharpness"] = None
    bad_heat = dict(rows, artifact_heatmap=[Image.new("L", (3, 3))] + rows["artifact_heatmap"][1:])
    no_ir = dict(rows, infrared=[None] + rows["infrared"][1:])
    cases = [(no_ir, r"row 0: column 'infrared': image is missing"),
             (bad_scores, r"row 1: column 'scores': score 'Artifacts' = 7.0 is outside"),
             (bad_none, r"row 0: column 'scores': score 'Sharpness' is missing"),
             (bad_heat, r"row 0: column 'artifact_heatmap' is 3x3 \(WxH\) but 'fused' is 16x16"),
             ({k: [] for k in rows}, r"the split is empty")]
    for k, (r, match) in enumerate(cases):
        path = tmp_path / f"bad{k}"
        datasets.Dataset.from_dict(r, features=_features()).to_parquet(str(path) + ".parquet")
        with pytest.raises(fd.FeedbackDataError, match=match):
            fd.open_split(str(path) + ".parquet", None)
    # an image whose bytes are not an image
    feats = _features()
    feats["fused"] = datasets.Value("binary")
    r = dict(rows, fused=[b"garbage"] * len(rows["fused"]))
    datasets.Dataset.from_dict(r, features=feats).to_parquet(str(tmp_path / "garb.parquet"))
    with pytest.raises(fd.FeedbackDataError, match=r"row 0: column 'fused': unreadable image"):
        fd.open_split(tmp_path / "garb.parquet", None)
    src = fd.open_split(tmp_path / "garb.parquet", None, validate="none")
    with pytest.raises(fd.FeedbackDataError, match=r"record 0 .*column 'fused': unreadable"):
        src[0]
    # a parquet folder without the requested split, a path that does not exist
    with pytest.raises(fd.FeedbackDataError, match=r"no parquet file for split 'nope'"):
        fd.open_split(table_layouts[0] / "pq", "nope")
    with pytest.raises(fd.FeedbackDataError, match="does not exist"):
        fd.open_split(tmp_path / "missing", "train")


# ------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("value, kind", [("4", "str"), (True, "bool")])
def test_string_or_boolean_score_is_rejected_with_file_and_line(tmp_path, value, kind):
    lines = [_line("a.png", 0), _line("b.png", 1, scores=dict(SCORES, Sharpness=value))]
    root = _write_folder(tmp_path / "d", lines)
    with pytest.raises(fd.FeedbackDataError,
                       match=rf"scores.jsonl:2: field 'scores': score 'Sharpness' = .* is a {kind}"):
        fd.open_split(root, "all")
