import csv
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from evafusion_jax import evaluate
from evafusion_jax.data import image_io
from evafusion_jax.eval import metrics

NAMES = ["EN", "SD", "MI", "SSIM", "CC", "PSNR_unit", "MSE", "VIF", "Qabf", "BRISQUE"]


def _make_dataset(root, n=3, shape=(48, 64), seed=0):
    """ir/, vi/ and two 'methods': the pixel mean (good) and the mean plus heavy noise (bad)."""
    rng = np.random.default_rng(seed)
    for d in ("ir", "vi", "good", "bad"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        ir = ndimage.gaussian_filter(rng.random(shape), 2)
        vi = ndimage.gaussian_filter(rng.random(shape), 1)
        ir, vi = [(x - x.min()) / (x.max() - x.min()) for x in (ir, vi)]
        mean = (ir + vi) / 2
        bad = np.clip(mean + rng.normal(0, 0.15, shape), 0, 1)
        for d, x in (("ir", ir), ("vi", vi), ("good", mean), ("bad", bad)):
            image_io.save_image(root / d / f"{i:02d}.png", x)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    _make_dataset(root)
    return root


def _args(root, out, *extra):
    return ["--ir", str(root / "ir"), "--vi", str(root / "vi"), "--fused", f"good={root / 'good'}",
            "--fused", f"bad={root / 'bad'}", "--out", str(out), "--quiet", "--metrics", ",".join(NAMES), *extra]


def test_two_methods_better_one_wins(dataset, tmp_path, capsys):
    out = tmp_path / "res"
    assert evaluate.main(_args(dataset, out, "--workers", "2", "--std")) == 0
    printed = capsys.readouterr().out
    assert "| good |" in printed and "| bad |" in printed and "±" in printed
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json", "metrics.md", "per_image.csv"]
    doc = json.loads((out / "metrics.json").read_text())
    good, bad = doc["methods"]["good"], doc["methods"]["bad"]
    for m in ("SSIM", "PSNR_unit", "CC", "VIF", "Qabf"):
        assert good[m]["mean"] > bad[m]["mean"], m
    assert good["MSE"]["mean"] < bad["MSE"]["mean"]
    assert good["BRISQUE"]["n"] == 3 and good["SSIM"]["n"] == 3
    with open(out / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and set(rows[0]) == {"method", "image", *NAMES}
    # the summary is the mean of the per-image rows
    ssim_good = [float(r["SSIM"]) for r in rows if r["method"] == "good"]
    assert good["SSIM"]["mean"] == pytest.approx(np.mean(ssim_good))
    with open(out / "metrics.csv") as fh:
        summary_rows = list(csv.DictReader(fh))
    assert [r["method"] for r in summary_rows] == ["good", "bad"]
    # the pool and the in-process path agree
    serial = evaluate.evaluate(evaluate.plan_evaluation(dataset / "ir", dataset / "vi", {"good": dataset / "good"}),
                               NAMES, workers=1, progress=False)
    assert [r["SSIM"] for r in serial] == pytest.approx(ssim_good)
    # an existing results folder is kept unless --overwrite
    assert evaluate.main(_args(dataset, out)) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_small_images_give_nan_niqe(dataset, tmp_path):
    task = evaluate.plan_evaluation(dataset / "ir", dataset / "vi", {"good": dataset / "good"})[0]
    row = evaluate.evaluate_image(task, ["NIQE", "EN"])
    assert np.isnan(row["NIQE"]) and row["EN"] > 0


def test_missing_and_mismatched_fused_files(dataset, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (dataset / "good").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "01.png").unlink()
    args = ["--ir", str(dataset / "ir"), "--vi", str(dataset / "vi"), "--fused", f"x={broken}", "--quiet",
            "--metrics", "EN"]
    assert evaluate.main(args + ["--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert "method 'x'" in err and "missing in fused" in err and "01" in err
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(broken / "01.png")
    assert evaluate.main(args + ["--out", str(tmp_path / "r2")]) == 2
    assert "x/01: fused 10x10, ir 64x48" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    assert evaluate.main(args + ["--out", str(tmp_path / "r3"), "--metrics", "FOO"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("evafusion_jax.models.reward_model") is None,
                    reason="evafusion_jax.models.reward_model not available")
def test_reward_columns(dataset, tmp_path):
    import jax

    from evafusion_jax.models import reward_model
    from evafusion_jax.storage import checkpoints
    config = reward_model.RewardConfig.tiny()
    params = reward_model.init_params(config, jax.random.PRNGKey(0))
    ckpt = tmp_path / "reward"
    checkpoints.save_params(ckpt, params, config.to_dict(), "reward")
    out = tmp_path / "res"
    assert evaluate.main(_args(dataset, out, "--metrics", "EN", "--workers", "1", "--reward", str(ckpt),
                               "--reward-batch-size", "4")) == 0
    doc = json.loads((out / "metrics.json").read_text())
    cols = [c for c in doc["columns"] if c.startswith("R_")]
    assert set(cols) == {f"R_{s}" for s in reward_model.SCORE_TYPES}
    for m in ("good", "bad"):
        for c in cols:
            assert 0.0 <= doc["methods"][m][c]["mean"] <= 1.0 and doc["methods"][m][c]["n"] == 3
    # batched (and padded) scoring equals score_images on one triplet
    with open(out / "per_image.csv") as fh:
        row = [r for r in csv.DictReader(fh) if r["method"] == "bad" and r["image"] == "02"][0]
    read = lambda d: image_io.read_image(dataset / d / "02.png")[None]
    ref = jax.jit(reward_model.score_images, static_argnames="config")(
        params, read("ir"), read("vi"), read("bad"), config=config)["scores"]
    for s in reward_model.SCORE_TYPES:
        assert float(row[f"R_{s}"]) == pytest.approx(float(np.asarray(ref[s])[0]), abs=1e-5)


def test_grey_conventions_and_variant_columns(dataset, tmp_path):
    # a colour visible folder: the default grey levels are OpenCV's cvtColor ones, bit for bit
    col = tmp_path / "vi_col"
    col.mkdir()
    rng = np.random.default_rng(5)
    for f in sorted((dataset / "vi").iterdir()):
        g = np.asarray(Image.open(f)).astype(np.int64)
        rgb = np.clip(g[..., None] + rng.integers(-40, 41, g.shape + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(col / f.name)
    task = evaluate.plan_evaluation(dataset / "ir", col, {"good": dataset / "good"})[0]
    rgb = np.asarray(Image.open(task[4])).astype(np.int64)
    cvt = (9798 * rgb[..., 0] + 19235 * rgb[..., 1] + 3735 * rgb[..., 2] + 16384) >> 15
    np.testing.assert_array_equal(evaluate._load_gray(task[4], True) * 255.0, cvt)
    names = ["SSIM", "SSIM_255", "CC"]
    row = evaluate.evaluate_image(task, names)
    f, a = (evaluate._load_gray(p, True) for p in task[2:4])
    assert row["SSIM"] == pytest.approx(metrics.ssim_evaluator(f, a, cvt / 255.0))
    assert row["SSIM_255"] == pytest.approx(metrics.ssim(f, a, cvt / 255.0))
    for grey in ("imread", "float"):
        assert np.isfinite(evaluate.evaluate_image(task, names, grey=grey)["CC"])
    out = tmp_path / "res"
    args = ["--ir", str(dataset / "ir"), "--vi", str(col), "--fused", f"good={dataset / 'good'}", "--quiet",
            "--workers", "1", "--metrics", "SSIM,SSIM_255,NIQE", "--grey", "float", "--out", str(out)]
    assert evaluate.main(args) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["columns"] == ["SSIM", "SSIM_255", "NIQE"] and doc["methods"]["good"]["NIQE"]["n"] == 0
