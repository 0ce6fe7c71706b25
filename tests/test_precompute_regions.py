"""Tests of precompute_regions with a tiny randomly initialised SAM and the fallback sources."""

import json

import numpy as np
import pytest
from PIL import Image

from evafusion_jax import precompute_regions as pr
from evafusion_jax.data import grpo_pairs as gp
from evafusion_jax.data import regions

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

GEN = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
GEN_CLI = [f"--config.generator.{k}={v}" for k, v in GEN.items()]


def write_pairs(root, n=3, size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    (root / "ir").mkdir(parents=True, exist_ok=True)
    (root / "vi").mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n):
        # A bright block on a dark background gives SAM something to segment.
        ir = (rng.random((h, w)) * 60).astype(np.uint8)
        ir[5:25, 10:30] += 180
        Image.fromarray(ir).save(root / "ir" / f"p{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "vi" / f"p{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_sam():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a busy 2-core machine is far faster with one torch thread
    yield pr.build_tiny_sam(seed=0)
    torch.set_num_threads(threads)


class _CountWrites:
    def __init__(self, monkeypatch):
        self.n = 0
        orig = regions.write_region_file

        def wrapped(*a, **k):
            self.n += 1
            return orig(*a, **k)
        monkeypatch.setattr(regions, "write_region_file", wrapped)


def test_sam_cache_is_read_by_the_pipeline_and_resumed(tmp_path, tiny_sam, monkeypatch):
    data = write_pairs(tmp_path / "d")
    cache = tmp_path / "cache"
    index = pr.precompute_regions(data, cache, source="sam", image="vi", num_regions=4,
                                  sam_model=tiny_sam, generator_params=GEN, progress=False)
    assert set(index["images"]) == {"p0.png", "p1.png", "p2.png"} and index["complete"]
    on_disk = json.loads((cache / "index.json").read_text())
    assert on_disk["source"]["generator"]["points_per_side"] == 4
    assert on_disk["source"]["image"] == "vi"
    assert len(on_disk["source"]["sam"]["state_dict_sha256"]) == 64
    c = regions.RegionCache(cache)
    for name, entry in index["images"].items():
        masks, valid = c.load(name)
        assert masks.shape == (4, 40, 48) and entry["num_valid"] == valid.sum() >= 1
        assert not masks[~valid].any()
        areas = masks.reshape(4, -1).sum(-1)
        assert (np.diff(areas[valid]) <= 0).all()          # ranked by area

    loader = gp.make_loader(data, batch_size=3, crop_size=32, num_regions=4, cache_dir=cache,
                            num_epochs=1, shard_index=0, shard_count=1)
    (b,) = list(loader)
    assert b["masks"].shape == (3, 4, 32, 32) and b["valid"].any(axis=1).all()

    # Second run: everything is done, nothing is recomputed.
    counter = _CountWrites(monkeypatch)
    pr.precompute_regions(data, cache, source="sam", image="vi", num_regions=4,
                          sam_model=tiny_sam, generator_params=GEN, progress=False)
    assert counter.n == 0
    # A lost per-image file (e.g. killed run) is recomputed alone.
    before = (cache / "masks" / "p0.png.npz").read_bytes()
    (cache / "masks" / "p1.png.npz").unlink()
    pr.precompute_regions(data, cache, source="sam", image="vi", num_regions=4,
                          sam_model=tiny_sam, generator_params=GEN, progress=False)
    assert counter.n == 1 and (cache / "masks" / "p1.png.npz").is_file()
    assert (cache / "masks" / "p0.png.npz").read_bytes() == before

    # Other generator parameters: a clear error, unless overwrite.
    with pytest.raises(regions.RegionError, match="other parameters.*generator.*--overwrite"):
        pr.precompute_regions(data, cache, source="sam", image="vi", num_regions=4,
                              sam_model=tiny_sam, generator_params=dict(GEN, points_per_side=3),
                              progress=False)
    with pytest.raises(regions.RegionError, match="num_regions: cache 4, now 2"):
        pr.precompute_regions(data, cache, source="grid", num_regions=2, progress=False)
    pr.precompute_regions(data, cache, source="grid", num_regions=2, overwrite=True,
                          progress=False)
    assert regions.RegionCache(cache).source["kind"] == "grid"
    assert counter.n == 1 + 3


def test_cli_with_tiny_checkpoint_on_fused_images(tmp_path, tiny_sam, monkeypatch, capsys):
    """--sam-checkpoint (a tiny state dict) + --dcevo: the fused image is what SAM segments."""
    from evafusion_jax.models import dcevo
    from evafusion_jax.storage import checkpoints

    data = write_pairs(tmp_path / "d", n=2)
    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam.state_dict(), ckpt)
    cfg = dcevo.DCEvoConfig(dim=8, num_blocks=1, c2f_n=1, detail_layers=1, heads=2)
    dckpt = checkpoints.save_params(tmp_path / "dcevo", {"w": np.ones((2,), np.float32)},
                                    cfg.to_dict(), "dcevo")
    seen = []

    def fake_fuse(params, ir, vi, config):   # stands in for the network: "fused" = IR
        seen.append((float(params["w"][0]), config))
        return ir
    monkeypatch.setattr(dcevo, "fuse", fake_fuse)

    args = ["--data", str(data), "--cache", str(tmp_path / "c_fused"), "--num-regions", "3",
            "--sam-model-type", "tiny", "--sam-checkpoint", str(ckpt), "--dcevo", str(dckpt),
            "--no-progress"] + GEN_CLI
    assert pr.main(args) == 0
    assert seen and seen[0] == (1.0, cfg)
    index = json.loads((tmp_path / "c_fused" / "index.json").read_text())
    src = index["source"]
    assert src["image"] == "fused" and src["sam"]["model_type"] == "tiny"
    assert src["sam"]["checkpoint"]["size"] == ckpt.stat().st_size
    assert len(src["sam"]["checkpoint"]["sha256"]) == 64
    assert src["dcevo"]["config"] == cfg.to_dict() and src["dcevo"]["checkpoint"]

    pr.precompute_regions(data, tmp_path / "c_ir", source="sam", image="ir", num_regions=3,
                          sam_model=tiny_sam, generator_params=GEN, progress=False)
    for name in ("p0.png", "p1.png"):
        a = regions.RegionCache(tmp_path / "c_fused").load(name)
        b = regions.RegionCache(tmp_path / "c_ir").load(name)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])

    # A moved checkpoint with the same content still matches: nothing is recomputed.
    moved = tmp_path / "moved.pth"
    moved.write_bytes(ckpt.read_bytes())
    counter = _CountWrites(monkeypatch)
    assert pr.main([str(moved) if a == str(ckpt) else a for a in args]) == 0
    assert counter.n == 0
    index = json.loads((tmp_path / "c_fused" / "index.json").read_text())
    assert index["source"]["sam"]["checkpoint"]["path"] == str(moved)

    # Parameter mismatch through the CLI is a clean exit (input error, code 2) with the reason.
    capsys.readouterr()
    assert pr.main(args[:-len(GEN_CLI)] + ["--config.generator.points_per_side=5"] + GEN_CLI[1:]) == 2
    assert "points_per_side" in capsys.readouterr().err


def test_argument_errors(tmp_path):
    data = write_pairs(tmp_path / "d", n=1, size=(16, 16))
    with pytest.raises(regions.RegionError, match="--sam-checkpoint"):
        pr.precompute_regions(data, tmp_path / "c", source="sam", image="vi", progress=False)
    with pytest.raises(regions.RegionError, match="--dcevo"):
        pr.precompute_regions(data, tmp_path / "c", source="superpixels", image="fused",
                              progress=False)
    with pytest.raises(regions.RegionError, match="does not exist"):
        pr.load_sam("vit_b", tmp_path / "missing.pth")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(regions.RegionError, match="non-empty folder"):
        pr.precompute_regions(data, tmp_path / "busy", source="grid", progress=False)
    with pytest.raises(regions.RegionError, match="unknown parameters"):
        pr.precompute_regions(data, tmp_path / "c", source="grid", region_params={"x": 1},
                              progress=False)
    assert not (tmp_path / "c").exists()       # nothing written on bad input


@pytest.mark.parametrize("source", ["random_crops", "grid", "superpixels"])
def test_fallback_sources_precomputed(tmp_path, source):
    data = write_pairs(tmp_path / "d", n=2, size=(24, 32))
    cache = tmp_path / "c"
    index = pr.precompute_regions(data, cache, source=source, image="ir", num_regions=4,
                                  seed=3, progress=False)
    assert index["source"]["kind"] == source and index["complete"]
    c = regions.RegionCache(cache)
    masks, valid = c.load("p0.png")
    assert masks.shape == (4, 24, 32) and valid[0]
    if source == "grid":
        np.testing.assert_array_equal(masks, regions.grid_regions(24, 32, 4)[0])
    if source == "random_crops":   # deterministic with the seed
        again = pr.precompute_regions(data, tmp_path / "c2", source=source, num_regions=4,
                                      seed=3, progress=False)
        assert again["source"] == index["source"]
        np.testing.assert_array_equal(regions.RegionCache(tmp_path / "c2").load("p0.png")[0],
                                      masks)
    if source == "superpixels":    # segments of the IR image with the default parameters
        expected, expected_valid = regions.superpixel_regions(gp.read_gray(data / "ir" / "p0.png"), 4)
        np.testing.assert_array_equal(masks, expected)
        np.testing.assert_array_equal(valid, expected_valid)
    ld = gp.make_loader(data, batch_size=2, crop_size=16, num_regions=4, region_source="cache",
                        cache_dir=cache, num_epochs=1, shard_index=0, shard_count=1)
    (b,) = list(ld)
    assert b["masks"].shape == (2, 4, 16, 16) and b["valid"].any(axis=1).all()


def test_changed_images_are_recomputed_and_refused_by_the_pipeline(tmp_path, caplog, monkeypatch):
    """Same names, other pixels (rotated by 180 degrees): the pipeline refuses the old cache
    naming the files, and a rerun of precompute recomputes exactly those images. A temporary
    mask file left by a killed run is removed."""
    import shutil
    import subprocess
    import sys

    from evafusion_jax.storage import fileio
    data = write_pairs(tmp_path / "d", n=3, size=(24, 32))
    cache = tmp_path / "c"
    kw = dict(source="superpixels", image="ir", num_regions=4, progress=False)
    index = pr.precompute_regions(data, cache, **kw)
    assert len(index["images"]["p1.png"]["ir_sha256"]) == 64
    for role in ("ir", "vi"):
        img = Image.open(data / role / "p1.png")
        img.rotate(180).save(data / role / "p1.png")
    old = tmp_path / "old_cache"
    shutil.copytree(cache, old)
    with pytest.raises(regions.RegionError, match=r"other image contents.*ir/p1.png.*vi/p1.png"):
        gp.make_loader(data, batch_size=1, crop_size=16, num_regions=4, region_source="cache",
                       cache_dir=old, num_epochs=1, shard_index=0, shard_count=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / "masks" / f".p2.png.tmp-{fileio.host_name()}-{dead.pid}-x1y2.npz"
    stale.write_bytes(b"half")
    counter = _CountWrites(monkeypatch)
    with caplog.at_level("WARNING"):
        again = pr.precompute_regions(data, cache, **kw)
    assert counter.n == 1 and "p1.png" in caplog.text and "changed" in caplog.text
    assert not stale.exists() and again["complete"]
    fresh = regions.superpixel_regions(gp.read_gray(data / "ir" / "p1.png"), 4)[0]
    np.testing.assert_array_equal(regions.RegionCache(cache).load("p1.png")[0], fresh)
    gp.make_loader(data, batch_size=1, crop_size=16, num_regions=4, region_source="cache",
                   cache_dir=cache, num_epochs=1, shard_index=0, shard_count=1)
