"""Synthetic infrared/visible scenes and the synthetic human-feedback folder."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from evafusion_jax.data import feedback as fd
from evafusion_jax.data import synthetic as syn


def test_make_pair_shapes_range_determinism():
    ir, vi = syn.make_pair(np.random.default_rng(0), 40, 56)
    assert ir.shape == (40, 56) and vi.shape == (40, 56, 3)
    assert ir.dtype == vi.dtype == np.float32
    assert 0 <= ir.min() and ir.max() <= 1 and 0 <= vi.min() and vi.max() <= 1
    ir2, vi2 = syn.make_pair(0, 40, 56)
    np.testing.assert_array_equal(ir, ir2)
    np.testing.assert_array_equal(vi, vi2)
    ir3, _ = syn.make_pair(1, 40, 56)
    assert not np.array_equal(ir, ir3)


def test_scene_has_ir_only_targets_and_vi_only_texture():
    for seed in range(4):
        sc = syn.make_scene(seed, 64, 64)
        t = sc["target_mask"] > 0
        # warm objects: much brighter than the background in IR, not in the visible image
        ir_contrast = sc["ir"][t].mean() - sc["ir"][~t].mean()
        vi_contrast = abs(sc["vi_gray"][t].mean() - sc["vi_gray"][~t].mean())
        assert ir_contrast > 0.25 and vi_contrast < ir_contrast / 2
        # fine texture: high-frequency energy in the visible image, hardly any in IR
        hf = lambda a: np.mean((a - ndimage.gaussian_filter(a, 2.0)) ** 2)  # noqa: E731
        assert hf(sc["vi_gray"]) > 5 * hf(sc["ir"])


def test_score_rule_values():
    p = {"ir_loss": 0.25, "texture_loss": 0.5, "blur_sigma": syn.BLUR_MAX / 2,
         "noise_std": syn.NOISE_MAX / 2, "circles": [{"strength": 0.75}]}
    s = syn.score_rule(p)
    assert s["Thermal Retention"] == pytest.approx(4.0)
    assert s["Texture Preservation"] == pytest.approx(3.0)
    assert s["Sharpness"] == pytest.approx(3.0)
    # severity = 0.4 * 0.5 + 0.6 * min(1, 0.75 / 1.5) = 0.5
    assert s["Artifacts"] == pytest.approx(3.0)
    assert s["Overall Score"] == pytest.approx(0.3 * 4 + 0.3 * 3 + 0.2 * 3 + 0.2 * 3)
    best = syn.score_rule({"ir_loss": 0, "texture_loss": 0, "blur_sigma": 0, "noise_std": 0,
                           "circles": []})
    worst = syn.score_rule({"ir_loss": 1, "texture_loss": 1, "blur_sigma": syn.BLUR_MAX,
                            "noise_std": syn.NOISE_MAX, "circles": [{"strength": 1.0}] * 3})
    assert set(best.values()) == {5.0} and set(worst.values()) == {1.0}
    assert list(s) == list(fd.DATASET_SCORE_NAMES)


def test_degradations_change_the_image_as_documented():
    scene = syn.make_scene(7, 64, 64)
    base = {"ir_loss": 0.0, "texture_loss": 0.0, "blur_sigma": 0.0, "noise_std": 0.0,
            "circles": []}
    clean = syn.fuse_degraded(scene, base, 0)
    t = scene["target_mask"] > 0
    lost = syn.fuse_degraded(scene, dict(base, ir_loss=1.0), 0)
    assert clean[t].mean() - lost[t].mean() > 0.2          # IR targets lost
    np.testing.assert_allclose(clean[~t], lost[~t], atol=0.02)
    hf = lambda a: np.mean((a - ndimage.gaussian_filter(a, 1.5)) ** 2)  # noqa: E731
    assert hf(syn.fuse_degraded(scene, dict(base, texture_loss=1.0), 0)) < 0.3 * hf(clean)
    assert hf(syn.fuse_degraded(scene, dict(base, blur_sigma=2.0), 0)) < 0.3 * hf(clean)
    noisy = syn.fuse_degraded(scene, dict(base, noise_std=0.05), 0)
    assert 0.03 < np.std(noisy - clean) < 0.07
    circ = {"x": 32.0, "y": 32.0, "r": 8.0, "strength": 1.0}
    for kind in ("ringing", "blocking"):
        art = syn.fuse_degraded(scene, dict(base, circles=[dict(circ, kind=kind)]), 0)
        inside = fd.render_circles([circ], 64, 64) > 0
        assert np.abs(art - clean)[inside].mean() > 0.03
        np.testing.assert_array_equal(art[~inside], clean[~inside])


def test_write_feedback_folder_deterministic_labelled_and_loadable(tmp_path):
    a = syn.write_feedback_folder(tmp_path / "a", 12, seed=1, size=32, fused_per_pair=2)
    b = syn.write_feedback_folder(tmp_path / "b", 12, seed=1, size=32, fused_per_pair=2)
    c = syn.write_feedback_folder(tmp_path / "c", 6, seed=1, size=32, fused_per_pair=2)
    la = (a / "scores.jsonl").read_text().splitlines()
    assert la == (b / "scores.jsonl").read_text().splitlines()
    # prefix property (the split assignment depends on n, the samples do not)
    drop = lambda ls: [{k: v for k, v in json.loads(x).items() if k != "split"} for x in ls]  # noqa
    assert drop((c / "scores.jsonl").read_text().splitlines()) == drop(la[:6])
    for sub in ("ir", "vi", "fused", "heatmap"):
        for f in sorted((a / sub).iterdir()):
            assert f.read_bytes() == (b / sub / f.name).read_bytes()
    assert "SYNTHETIC" in (a / "README.txt").read_text()
    lines = [json.loads(x) for x in la]
    assert len(lines) == 12 and all(ln["synthetic"] is True for ln in lines)
    assert [ln["split"] for ln in lines] == ["train"] * 10 + ["dev"] * 2  # 6 pairs: 5/1/0
    assert lines[0]["ir"] == lines[1]["ir"] == "00000.png"  # two fused versions per pair
    for ln in lines:
        deg = dict(ln["degradation"])
        deg["circles"] = [{"strength": s} for s in deg.pop("circle_strengths")]
        expect = syn.score_rule(deg)
        for k, v in ln["scores"].items():
            assert v == pytest.approx(expect[k], abs=1e-3)
        heat = np.asarray(Image.open(a / "heatmap" / ln["heatmap"]))
        np.testing.assert_array_equal(heat, fd.render_circles(ln["circles"], 32, 32))
    assert any(not ln["circles"] for ln in lines) and any(ln["circles"] for ln in lines)
    src = fd.open_split(a, "train", validate="full")
    assert len(src) == 10 and src[3]["fused"].shape == (32, 32, 3)
    np.testing.assert_allclose(src.scores[3], [lines[3]["scores"][k]
                                               for k in fd.DATASET_SCORE_NAMES], atol=1e-4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        syn.write_feedback_folder(a, 2, seed=0, size=32)
    syn.write_feedback_folder(a, 2, seed=0, size=32, overwrite=True)
    assert len((a / "scores.jsonl").read_text().splitlines()) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_write_pairs_folder(tmp_path):
    p = syn.write_pairs_folder(tmp_path / "pairs", 3, height=20, width=24, seed=2)
    names = sorted(x.name for x in (p / "ir").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
    ir = np.asarray(Image.open(p / "ir" / "00001.png"))
    vi = np.asarray(Image.open(p / "vi" / "00001.png"))
    assert ir.shape == (20, 24) and vi.shape == (20, 24, 3)
    ref_ir, _ = syn.make_pair(np.random.default_rng([2, 1]), 20, 24)
    np.testing.assert_array_equal(ir, np.round(ref_ir * 255).astype(np.uint8))
    assert "SYNTHETIC" in (p / "README.txt").read_text()


def test_degradation_subset_switches_others_off():
    full = syn.sample_degradation(np.random.default_rng(9), 64)
    sub = syn.sample_degradation(np.random.default_rng(9), 64, degradations=("ir_loss", "blur"))
    assert sub["ir_loss"] == full["ir_loss"] and sub["blur_sigma"] == full["blur_sigma"]
    assert sub["texture_loss"] == sub["noise_std"] == 0.0 and sub["circles"] == []
    s = syn.score_rule(sub)
    assert s["Texture Preservation"] == s["Artifacts"] == 5.0
    with pytest.raises(ValueError, match="unknown degradation"):
        syn.sample_degradation(0, 64, degradations=("sharpen",))


def test_feedback_from_real_pairs_and_masked_examples(tmp_path):
    # "real" pairs: any ir/ vi/ folder (here written by write_pairs_folder at another size)
    pairs = syn.write_pairs_folder(tmp_path / "pairs", 3, 40, 56, seed=5)
    a = syn.write_feedback_folder(tmp_path / "a", 16, seed=2, size=24, fused_per_pair=2,
                                  pairs=pairs, masked_fraction=0.5)
    lines = [json.loads(x) for x in (a / "scores.jsonl").read_text().splitlines()]
    masked = [ln for ln in lines if ln.get("masked")]
    plain = {ln["fused"]: ln for ln in lines if not ln.get("masked")}
    assert len(plain) == 16 and 0 < len(masked) < 16
    outside = []
    for ln in masked:  # same scores as its source image, black outside the region
        src = plain[ln["fused"].replace("_masked", "")]
        assert ln["scores"] == src["scores"] and ln["split"] == src["split"]
        m = np.asarray(Image.open(a / "fused" / ln["fused"]), np.float32)
        f = np.asarray(Image.open(a / "fused" / src["fused"]), np.float32)
        out = m == 0
        assert out.mean() < 1 and np.all((m == f) | out)
        outside.append(out.mean())
    assert max(outside) > 0.1
    # the scenes are crops of the real pairs: their IR images are not procedural ones
    ir = np.asarray(Image.open(a / "ir" / "00000.png"), np.float32) / 255
    assert ir.shape == (24, 24)
    sc = syn.scene_from_pair(ir, ir)
    np.testing.assert_allclose(sc["ir_background"] + sc["ir_targets"], ir, atol=1e-6)
    assert sc["ir_targets"].min() >= 0
    src = fd.open_split(a, "train", validate="full")
    assert len(src) > 0


def test_real_pairs_crops_show_texture(tmp_path):
    """Feedback crops of real pairs come from where the visible image has detail: a flat crop
    would carry Texture/Sharpness labels that nothing in the image shows."""
    rng = np.random.default_rng(0)
    vi = np.full((96, 96), 0.5)
    vi[:, 56:] += 0.2 * rng.standard_normal((96, 40))  # texture only on the right
    vi = np.clip(vi, 0, 1)[..., None]
    ir = np.clip(0.4 + 0.1 * rng.standard_normal((96, 96, 1)), 0, 1)
    pairs = [(ir, vi)]
    detail = lambda sc: syn._rms(sc["texture"])  # noqa: E731
    picked = [detail(syn._real_scene(pairs, np.random.default_rng([1, p]), 16))
              for p in range(40)]
    anywhere = [detail(syn._real_scene(pairs, np.random.default_rng([1, p]), 16, min_detail=0))
                for p in range(40)]
    assert min(picked) >= syn.REAL_MIN_DETAIL
    assert sum(d < syn.REAL_MIN_DETAIL for d in anywhere) >= 10  # most random crops are flat
    # min_detail 0 keeps the first random crop: the rule before the selection existed
    first = syn._real_scene(pairs, np.random.default_rng([1, 3]), 16, min_detail=0)
    again = syn._real_scene(pairs, np.random.default_rng([1, 3]), 16, min_detail=0, tries=1)
    np.testing.assert_array_equal(first["vi_gray"], again["vi_gray"])
    # write_feedback_folder passes it on and says so in README.txt
    folder = tmp_path / "pairs"
    for sub, img in (("ir", ir), ("vi", vi)):
        (folder / sub).mkdir(parents=True)
        Image.fromarray((img[..., 0] * 255).round().astype(np.uint8), "L").save(
            folder / sub / "a.png")
    out = syn.write_feedback_folder(tmp_path / "fb", 8, seed=1, size=16, pairs=folder)
    assert f"visible-detail rms >= {syn.REAL_MIN_DETAIL}" in (out / "README.txt").read_text()
    for name in sorted((out / "vi").iterdir()):
        g = np.asarray(Image.open(name).convert("L"), np.float64) / 255
        detail_layer = syn.scene_from_pair(g, g)["texture"]
        assert syn._rms(detail_layer) >= syn.REAL_MIN_DETAIL - 0.01  # 8-bit rounding


def test_texture_score_counts_the_texture_that_the_blur_leaves():
    """Texture Preservation measures the visible detail kept by texture loss AND blur, so a
    blurred image that shows no texture is not labelled as rich in texture."""
    scene = syn.make_scene(3, 32, 32)
    base = {"ir_loss": 0.0, "texture_loss": 0.0, "blur_sigma": 0.0, "noise_std": 0.0,
            "circles": []}
    assert syn.texture_retained(scene, base) == 1.0
    assert syn.texture_retained(scene, dict(base, texture_loss=0.25)) == pytest.approx(0.75)
    kept = [syn.texture_retained(scene, dict(base, blur_sigma=s)) for s in (0.5, 1.0, 2.0)]
    assert 1.0 > kept[0] > kept[1] > kept[2] and kept[2] < 0.3
    blurred = syn.make_feedback_sample(0, 32, dict(base, blur_sigma=2.0))
    assert blurred["scores"]["Texture Preservation"] < 2.2
    assert blurred["scores"]["Texture Preservation"] == pytest.approx(
        5 - 4 * (1 - blurred["params"]["texture_retained"]))
