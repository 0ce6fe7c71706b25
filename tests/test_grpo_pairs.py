"""Tests of the GRPO training-pair pipeline (evafusion_jax.data.grpo_pairs)."""

import json

import numpy as np
import pytest
from PIL import Image

from evafusion_jax.data import grpo_pairs as gp
from evafusion_jax.data import regions
from evafusion_jax.storage import fileio


def write_pairs(root, n=4, size=(40, 48), seed=0, colour_vi=True, levels=None):
    """Writes n random pairs; ``levels`` (n, H, W) ints in [0, 4) set the IR to level * 64."""
    rng = np.random.default_rng(seed)
    (root / "ir").mkdir(parents=True, exist_ok=True)
    (root / "vi").mkdir(parents=True, exist_ok=True)
    h, w = size
    names = []
    for i in range(n):
        name = f"img{i:02d}.png"
        ir = (levels[i] * 64).astype(np.uint8) if levels is not None else \
            rng.integers(0, 256, (h, w), dtype=np.uint8)
        vi = rng.integers(0, 256, (h, w, 3) if colour_vi else (h, w), dtype=np.uint8)
        Image.fromarray(ir).save(root / "ir" / name)
        Image.fromarray(vi).save(root / "vi" / name)
        names.append(name)
    return names


def write_cache(cache, entries, k, source=None):
    images = {name: regions.write_region_file(cache, name, m, v) for name, (m, v) in entries.items()}
    fileio.write_json_atomic(cache / "index.json", {
        "format_version": 1, "num_regions": k, "source": source or {"kind": "test"},
        "images": images, "complete": True})


def collect(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        if n is not None and i >= n:
            break
        out.append(b)
    return out


def test_read_gray_converts_colour_to_luma(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    g = gp.read_gray(tmp_path / "c.png")
    assert g.shape == (1, 4) and g.dtype == np.float32
    expected = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(g[0], expected[0], atol=1e-3)


def test_folder_errors_name_the_files(tmp_path):
    write_pairs(tmp_path, n=3)
    (tmp_path / "ir" / "img01.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ir" / "extra.png")
    with pytest.raises(gp.PairDataError, match=r"without a vi/ partner: extra.png.*"
                                               r"without an ir/ partner: img01.png"):
        gp.list_pairs(tmp_path)
    (tmp_path / "ir" / "extra.png").unlink()
    (tmp_path / "vi" / "img01.png").unlink()
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "vi" / "img02.png")
    with pytest.raises(gp.PairDataError, match=r"sizes differ.*img02.png \(ir 40x48, vi 5x7\)"):
        gp.PairDataSource(tmp_path)
    (tmp_path / "vi" / "img02.png").write_bytes(b"garbage, not a png")
    with pytest.raises(gp.PairDataError, match=r"cannot read image .*vi/img02.png"):
        gp.PairDataSource(tmp_path)
    with pytest.raises(gp.PairDataError, match="ir/ and vi/"):
        gp.list_pairs(tmp_path / "nowhere")


def test_crop_and_masks_are_aligned(tmp_path):
    """Cached masks are 'IR level == k': in every crop the mask must match the cropped IR."""
    n, h, w, k = 3, 40, 48, 4
    levels = np.random.default_rng(5).integers(0, k, (n, h, w))
    names = write_pairs(tmp_path / "d", n=n, size=(h, w), levels=levels)
    masks = {nm: (np.stack([levels[i] == j for j in range(k)]), np.ones(k, bool))
             for i, nm in enumerate(names)}
    write_cache(tmp_path / "c", masks, k)
    loader = gp.make_loader(tmp_path / "d", batch_size=2, seed=3, crop_size=16, num_regions=k,
                            region_source="sam", cache_dir=tmp_path / "c", num_epochs=2,
                            drop_remainder=False, shard_index=0, shard_count=1)
    batches = collect(loader)
    assert sum(b["ir"].shape[0] for b in batches) == 2 * n
    b = batches[0]
    assert b["ir"].shape == (2, 16, 16, 1) and b["vi"].shape == (2, 16, 16, 1)
    assert b["masks"].shape == (2, k, 16, 16) and b["masks"].dtype == np.float32
    assert b["valid"].shape == (2, k) and b["valid"].dtype == bool
    for b in batches:
        lvl = np.round(b["ir"][..., 0] * 255 / 64).astype(int)
        for j in range(k):
            np.testing.assert_array_equal(b["masks"][:, j], (lvl == j).astype(np.float32))
        assert 0.0 <= b["vi"].min() and b["vi"].max() <= 1.0


def test_empty_regions_are_retried_then_skipped(tmp_path):
    n, h, w, k = 8, 32, 32, 2
    names = write_pairs(tmp_path / "d", n=n, size=(h, w))
    entries = {}
    for i, nm in enumerate(names):
        m = np.zeros((k, h, w), bool)
        m[0, :, :8] = True                      # only crops with left < 8 see region 0
        valid = np.array([True, False])
        if i == 0:
            valid[:] = False                    # no region at all: always skipped
        entries[nm] = (m, valid)
    write_cache(tmp_path / "c", entries, k)

    def count(tries):
        ld = gp.make_loader(tmp_path / "d", batch_size=1, seed=0, crop_size=16, num_regions=k,
                            region_source="cache", cache_dir=tmp_path / "c", num_epochs=1,
                            max_crop_tries=tries, shard_index=0, shard_count=1)
        bs = collect(ld)
        for b in bs:
            assert b["valid"][0, 0] and not b["valid"][0, 1]
            assert b["masks"][0, 0].sum() > 0 and b["masks"][0, 1].sum() == 0
        return len(bs)

    assert count(30) == n - 1                   # retries find region 0 in every other image
    assert count(1) < n - 1                     # one try often misses it: samples skipped


def test_small_images_error_or_pad(tmp_path):
    write_pairs(tmp_path, n=2, size=(12, 20))
    with pytest.raises(gp.PairDataError, match=r"smaller than the crop size 16: img00.png \(12x20\)"):
        gp.make_loader(tmp_path, crop_size=16, region_source="grid", shard_index=0, shard_count=1)
    ld = gp.make_loader(tmp_path, batch_size=2, crop_size=16, region_source="grid",
                        num_regions=4, pad_small=True, num_epochs=1, shard_index=0, shard_count=1)
    (b,) = collect(ld)
    assert b["ir"].shape == (2, 16, 16, 1)
    # Mirror padding: row 12 repeats row 11.
    np.testing.assert_array_equal(b["ir"][:, 12], b["ir"][:, 11])


def test_padded_cache_masks_are_zero_in_the_padding(tmp_path):
    names = write_pairs(tmp_path / "d", n=1, size=(12, 16))
    write_cache(tmp_path / "c", {names[0]: (np.ones((1, 12, 16), bool), np.ones(1, bool))}, 1)
    ld = gp.make_loader(tmp_path / "d", batch_size=1, crop_size=16, num_regions=1,
                        cache_dir=tmp_path / "c", pad_small=True, num_epochs=1,
                        shard_index=0, shard_count=1)
    (b,) = collect(ld)
    assert b["masks"][0, 0, :12].all() and not b["masks"][0, 0, 12:].any()


def test_cache_errors(tmp_path):
    names = write_pairs(tmp_path / "d", n=3, size=(20, 20))
    m = np.ones((2, 20, 20), bool), np.ones(2, bool)
    write_cache(tmp_path / "c", {names[0]: m}, 2)
    with pytest.raises(regions.RegionError, match="no masks for 2 of 3 images: img01.png, img02.png"):
        gp.make_loader(tmp_path / "d", crop_size=8, num_regions=2, cache_dir=tmp_path / "c",
                       shard_index=0, shard_count=1)
    with pytest.raises(regions.RegionError, match="K=2"):
        gp.make_loader(tmp_path / "d", crop_size=8, num_regions=8, cache_dir=tmp_path / "c",
                       shard_index=0, shard_count=1)
    empty = np.zeros((2, 20, 20), bool), np.zeros(2, bool)
    write_cache(tmp_path / "e", {n: empty for n in names}, 2)
    with pytest.raises(regions.RegionError, match="no valid region for any image"):
        gp.make_loader(tmp_path / "d", crop_size=8, num_regions=2, cache_dir=tmp_path / "e",
                       shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="cache_dir"):
        gp.make_loader(tmp_path / "d", crop_size=8, region_source="sam")


@pytest.mark.parametrize("source", ["random_crops", "grid", "superpixels"])
def test_on_the_fly_sources(tmp_path, source):
    write_pairs(tmp_path, n=2, size=(24, 24))
    ld = gp.make_loader(tmp_path, batch_size=2, seed=1, crop_size=16, num_regions=4,
                        region_source=source, num_epochs=1, shard_index=0, shard_count=1)
    (b,) = collect(ld)
    assert b["masks"].shape == (2, 4, 16, 16)
    assert b["valid"][:, 0].all()
    sizes = b["masks"].sum((2, 3))
    assert ((sizes > 0) == b["valid"]).all()          # valid slots non-empty, others zero
    if source == "grid":
        np.testing.assert_array_equal(b["masks"].sum(1), 1.0)


def test_iterator_resume_and_determinism(tmp_path):
    write_pairs(tmp_path, n=5, size=(24, 28))
    kw = dict(batch_size=2, seed=7, crop_size=16, num_regions=3, region_source="random_crops",
              num_epochs=None, shard_index=0, shard_count=1)
    it = iter(gp.make_loader(tmp_path, **kw))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]     # crosses the epoch boundary
    it2 = iter(gp.make_loader(tmp_path, **kw))
    it2.set_state(state)
    for e in expected:
        got = next(it2)
        for key in e:
            np.testing.assert_array_equal(got[key], e[key])
    # Same seed -> same stream; another seed -> another one.
    first = next(iter(gp.make_loader(tmp_path, **kw)))
    again = next(iter(gp.make_loader(tmp_path, **kw)))
    other = next(iter(gp.make_loader(tmp_path, **dict(kw, seed=8))))
    np.testing.assert_array_equal(first["ir"], again["ir"])
    np.testing.assert_array_equal(first["masks"], again["masks"])
    assert not np.array_equal(first["ir"], other["ir"])


def test_sharding_and_epochs(tmp_path):
    write_pairs(tmp_path, n=6, size=(16, 16))

    def records(index, count, epochs):
        ld = gp.make_loader(tmp_path, batch_size=1, crop_size=16, region_source="grid",
                            num_regions=2, shuffle=False, num_epochs=epochs,
                            shard_index=index, shard_count=count)
        return [b["ir"][0].tobytes() for b in ld]

    a, b = records(0, 2, 1), records(1, 2, 1)
    assert len(a) == len(b) == 3 and not set(a) & set(b)
    assert set(a) | set(b) == set(records(0, 1, 1))
    assert len(records(0, 2, 2)) == 6


def test_make_loader_from_config(tmp_path):
    write_pairs(tmp_path, n=2, size=(20, 20))
    cfg = gp.default_config()
    with pytest.raises(ValueError, match="data_dir"):
        gp.make_loader_from_config(cfg)
    cfg.data_dir = str(tmp_path)
    cfg.crop_size = 8
    cfg.region_source = "grid"
    cfg.num_epochs = 1
    batches = collect(gp.make_loader_from_config(cfg, shard_index=0, shard_count=1))
    assert len(batches) == 1 and batches[0]["masks"].shape == (2, 8, 8, 8)
    json.dumps(cfg.to_dict())  # plain, serialisable config
