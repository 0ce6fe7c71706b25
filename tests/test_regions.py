"""Tests of evafusion_jax.data.regions: packing, the region sources and the region cache."""

import json

import numpy as np
import pytest

from evafusion_jax.data import regions
from evafusion_jax.storage import fileio


def test_pack_unpack_round_trip_odd_width():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 7, 13)) > 0.5
    packed = regions.pack_masks(masks)
    assert packed.dtype == np.uint8 and packed.shape == (3, 7, 2)
    np.testing.assert_array_equal(regions.unpack_masks(packed, 13), masks)
    with pytest.raises(regions.RegionError, match="bytes per row"):
        regions.unpack_masks(packed, 17)
    with pytest.raises(regions.RegionError, match=r"\(K, H, W\)"):
        regions.pack_masks(masks[0])


def _rec(area_box, stab, iou=0.5, shape=(10, 10)):
    seg = np.zeros(shape, bool)
    y0, y1, x0, x1 = area_box
    seg[y0:y1, x0:x1] = True
    return {"segmentation": seg, "stability_score": stab, "predicted_iou": iou}


def test_select_sam_masks_ranking_and_padding():
    recs = [
        _rec((0, 2, 0, 2), 0.9),    # area 4
        _rec((0, 3, 0, 3), 0.5),    # area 9, lower stability
        _rec((5, 8, 5, 8), 0.8),    # area 9, higher stability -> before the previous one
        _rec((0, 0, 0, 0), 1.0),    # empty: dropped
        _rec((0, 5, 0, 5), 0.1),    # area 25: first
    ]
    masks, valid, area, score = regions.select_sam_masks(recs, 6, 10, 10)
    assert masks.shape == (6, 10, 10)
    np.testing.assert_array_equal(area, [25, 9, 9, 4, 0, 0])
    np.testing.assert_allclose(score, [0.1, 0.8, 0.5, 0.9, 0, 0])
    np.testing.assert_array_equal(valid, [True] * 4 + [False] * 2)
    np.testing.assert_array_equal(masks[1], recs[2]["segmentation"])
    assert not masks[4:].any()
    # K smaller than the number of masks keeps the best ones only.
    masks2, valid2, area2, _ = regions.select_sam_masks(recs, 2, 10, 10)
    np.testing.assert_array_equal(area2, [25, 9])
    assert valid2.all()
    with pytest.raises(regions.RegionError, match="shape"):
        regions.select_sam_masks([_rec((0, 1, 0, 1), 1.0, shape=(4, 4))], 2, 10, 10)


def test_grid_regions_partition_the_image():
    masks, valid = regions.grid_regions(40, 80, 8)
    assert valid.all() and masks.shape == (8, 40, 80)
    np.testing.assert_array_equal(masks.sum(0), 1)        # disjoint and covering
    assert regions.grid_shape(40, 80, 8) == (2, 4)        # square-ish tiles
    assert masks[0, :20, :20].all() and not masks[0, 20:].any()
    with pytest.raises(regions.RegionError, match="tile"):
        regions.grid_regions(1, 1, 8)


def test_random_crop_regions_deterministic_rectangles():
    a, va = regions.random_crop_regions(30, 50, 5, np.random.default_rng(3))
    b, _ = regions.random_crop_regions(30, 50, 5, np.random.default_rng(3))
    c, _ = regions.random_crop_regions(30, 50, 5, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and va.all()
    for m in a:
        ys, xs = np.nonzero(m)
        assert m.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)   # a filled rectangle
        assert 3 <= np.ptp(ys) + 1 <= 15 and 5 <= np.ptp(xs) + 1 <= 25


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_superpixels_find_flat_areas(method):
    img = np.zeros((32, 48), np.float32)
    img[:, 24:] = 1.0            # right half bright: 2 large flat areas
    masks, valid = regions.superpixel_regions(img, 12, method=method, n_segments=2,
                                              compactness=0.01)
    assert masks.shape == (12, 32, 48)
    assert valid.sum() >= 2
    assert not (masks.sum(0) > 1).any()                    # segments are disjoint
    # No segment straddles the edge between the two halves.
    for m in masks[valid]:
        assert not (m[:, :24].any() and m[:, 24:].any())
    # Slots are ordered by decreasing size.
    sizes = masks.reshape(12, -1).sum(-1)
    assert (np.diff(sizes[valid]) <= 0).all()
    with pytest.raises(regions.RegionError, match="method"):
        regions.superpixel_regions(img, 2, method="watershed")


def _write_cache(tmp_path, entries, k):
    images = {}
    for name, (masks, valid) in entries.items():
        images[name] = regions.write_region_file(tmp_path, name, masks, valid)
    fileio.write_json_atomic(tmp_path / "index.json", {
        "format_version": 1, "num_regions": k, "source": {"kind": "grid"}, "images": images,
        "complete": True})


def test_region_cache_round_trip_and_windows(tmp_path):
    rng = np.random.default_rng(1)
    masks = rng.random((3, 20, 27)) > 0.6
    valid = np.array([True, False, True])
    _write_cache(tmp_path, {"a.png": (masks, valid)}, 3)
    assert not list(tmp_path.glob("masks/.*"))  # no temp files left behind
    cache = regions.RegionCache(tmp_path)
    m, v = cache.load("a.png")
    np.testing.assert_array_equal(m, masks)
    np.testing.assert_array_equal(v, valid)
    w, _ = cache.load_window("a.png", 5, 9, 10, 12)
    np.testing.assert_array_equal(w, masks[:, 5:15, 9:21])
    assert cache.missing(["a.png", "b.png"]) == ["b.png"]
    with pytest.raises(regions.RegionError, match="b.png, c.png"):
        cache.check_covers(["a.png", "b.png", "c.png"])
    with pytest.raises(regions.RegionError, match="another size"):
        cache.check_covers(["a.png"], {"a.png": (20, 28)})
    # A damaged file is reported with its path.
    (tmp_path / "masks" / "a.png.npz").write_bytes(b"not a zip")
    with pytest.raises(regions.RegionError, match="a.png.npz.*unreadable"):
        cache.load("a.png")


def test_read_index_errors(tmp_path):
    with pytest.raises(regions.RegionError, match="precompute_regions"):
        regions.RegionCache(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(regions.RegionError, match="format_version"):
        regions.RegionCache(tmp_path)
    with pytest.raises(regions.RegionError, match="plain file name"):
        regions.mask_file_name("../x.png")


def test_compute_regions_dispatch():
    m, v = regions.compute_regions("grid", None, 16, 16, 4)
    assert v.all() and m.sum() == 256
    with pytest.raises(regions.RegionError, match="rng"):
        regions.compute_regions("random_crops", None, 16, 16, 4)
    with pytest.raises(regions.RegionError, match="cache"):
        regions.compute_regions("sam", None, 16, 16, 4)
