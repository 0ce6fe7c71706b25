import numpy as np
import pytest
from PIL import Image

from evafusion_jax.data import image_io


def _rng():
    return np.random.default_rng(0)


def test_read_8bit_gray_rgb_rgba_palette(tmp_path):
    r = _rng()
    gray = r.integers(0, 256, (7, 9), dtype=np.uint8)
    rgb = r.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, r.integers(0, 256, (7, 9, 1), dtype=np.uint8)], axis=-1)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    pal = Image.fromarray(rgb).quantize(colors=16)
    pal.save(tmp_path / "p.png")

    g = image_io.read_image(tmp_path / "g.png")
    assert g.shape == (7, 9, 1) and g.dtype == np.float32
    np.testing.assert_allclose(g[..., 0], gray / 255.0, atol=1e-7)
    c = image_io.read_image(tmp_path / "c.png")
    np.testing.assert_allclose(c, rgb / 255.0, atol=1e-7)
    a = image_io.read_image(tmp_path / "a.png")  # alpha dropped, colours as stored
    np.testing.assert_allclose(a, rgb / 255.0, atol=1e-7)
    p = image_io.read_image(tmp_path / "p.png")
    assert p.shape == (7, 9, 3)
    np.testing.assert_allclose(p, np.asarray(pal.convert("RGB")) / 255.0, atol=1e-7)


def test_read_16bit(tmp_path):
    arr = _rng().integers(0, 65536, (5, 6), dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 0, 65535
    Image.fromarray(arr).save(tmp_path / "t.png")
    Image.fromarray(arr).save(tmp_path / "t.tif")
    for name in ("t.png", "t.tif"):
        x = image_io.read_image(tmp_path / name)
        assert x.shape == (5, 6, 1)
        np.testing.assert_allclose(x[..., 0], arr / 65535.0, atol=1e-6)


def test_unreadable_file_raises_with_name(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(image_io.ImageReadError, match="bad.png"):
        image_io.read_image(tmp_path / "bad.png")
    with pytest.raises(image_io.ImageReadError, match="bad.png"):
        image_io.image_size(tmp_path / "bad.png")


def test_ycbcr_matches_pillow_and_round_trips():
    rgb = _rng().integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ours = image_io.rgb_to_ycbcr(rgb / 255.0)
    pil = np.asarray(Image.fromarray(rgb).convert("YCbCr")) / 255.0
    assert np.max(np.abs(ours - pil)) <= 1.01 / 255.0  # Pillow uses integer arithmetic
    back = image_io.ycbcr_to_rgb(ours)
    np.testing.assert_allclose(back, rgb / 255.0, atol=1e-5)
    # grey pixels have neutral chroma
    g = image_io.rgb_to_ycbcr(np.full((2, 2, 3), 0.3))
    np.testing.assert_allclose(g[..., 1:], 128 / 255.0, atol=1e-6)
    np.testing.assert_allclose(g[..., 0], 0.3, atol=1e-6)


def test_to_gray_and_is_color():
    g = _rng().random((4, 5, 1)).astype(np.float32)
    rgb_gray = np.repeat(g, 3, axis=-1)
    np.testing.assert_allclose(image_io.to_gray(rgb_gray), g, atol=1e-6)
    assert not image_io.is_color(rgb_gray)
    col = rgb_gray.copy()
    col[..., 0] = 1.0 - col[..., 0]
    assert image_io.is_color(col)
    assert not image_io.is_color(g)


def test_save_round_trip(tmp_path):
    levels = _rng().integers(0, 256, (6, 7, 3)) / 255.0
    image_io.save_image(tmp_path / "x.png", levels)
    np.testing.assert_allclose(image_io.read_image(tmp_path / "x.png"), levels, atol=1e-7)
    g16 = _rng().integers(0, 65536, (6, 7)) / 65535.0
    image_io.save_image(tmp_path / "y.png", g16, bit_depth=16)
    np.testing.assert_allclose(image_io.read_image(tmp_path / "y.png")[..., 0], g16, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "y.png"]  # no temp files left


def test_pair_files(tmp_path):
    for d in ("ir", "vi"):
        (tmp_path / d).mkdir()
    img = Image.fromarray(np.zeros((4, 4), np.uint8))
    img.save(tmp_path / "ir" / "01.png")
    img.save(tmp_path / "vi" / "01.bmp")  # extensions may differ
    img.save(tmp_path / "ir" / "02.png")
    img.save(tmp_path / "vi" / "03.png")
    with pytest.raises(image_io.PairingError) as e:
        image_io.pair_files({"ir": tmp_path / "ir", "vi": tmp_path / "vi"})
    assert "missing in vi" in str(e.value) and "02" in str(e.value) and "03" in str(e.value)
    (tmp_path / "ir" / "02.png").unlink()
    (tmp_path / "vi" / "03.png").unlink()
    pairs = image_io.pair_files({"ir": tmp_path / "ir", "vi": tmp_path / "vi"})
    assert [(s, p["vi"].name) for s, p in pairs] == [("01", "01.bmp")]
    img.save(tmp_path / "ir" / "01.jpg")
    with pytest.raises(image_io.PairingError, match="two files"):
        image_io.pair_files({"ir": tmp_path / "ir", "vi": tmp_path / "vi"})


def test_output_dir_checks_and_commit(tmp_path):
    out = tmp_path / "out"
    image_io.check_output_dir(out)  # absent: fine
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(image_io.OutputFolderError, match="--overwrite"):
        image_io.check_output_dir(out)
    with pytest.raises(image_io.OutputFolderError, match="input folder"):
        image_io.check_output_dir(out / "sub", inputs=[out], overwrite=True)
    image_io.check_output_dir(out, overwrite=True)


# ----------------------------------------------------------------------------- OpenCV grey levels

def _all_colours():
    v = np.arange(256, dtype=np.uint8)
    r, g, b = np.meshgrid(v, v, v, indexing="ij")
    return np.stack([r, g, b], axis=-1).reshape(4096, 4096, 3)


def _tie_image():
    """Colour image made of every (R, G, B) whose exact BT.601 luma ends in .5, then random colours."""
    v = np.arange(256, dtype=np.int64)
    r, g, b = (a.ravel() for a in np.meshgrid(v, v, v, indexing="ij"))
    tie = (299 * r + 587 * g + 114 * b) % 1000 == 500
    rgb = np.stack([r[tie], g[tie], b[tie]], axis=-1).astype(np.uint8)
    n = 130 * 160
    rgb = np.concatenate([rgb, _rng().integers(0, 256, (n - len(rgb), 3), dtype=np.uint8)])
    return rgb.reshape(130, 160, 3)


def test_gray_levels_match_cvtcolor_on_every_colour():
    cv2 = pytest.importorskip("cv2")
    rgb = _all_colours()
    ours = image_io.gray_levels_opencv(rgb, "cvtcolor")
    assert np.array_equal(ours, cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2GRAY))
    # the exact luma rounded half to even is not OpenCV's rule at ties
    exact = np.round(rgb.reshape(-1, 3).astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    assert np.count_nonzero(exact != ours.ravel()) > 1000


@pytest.mark.parametrize("ext", ["png", "bmp", "tif", "ppm", "webp", "jpg"])
def test_read_gray_levels_match_opencv_on_ties(tmp_path, ext):
    cv2 = pytest.importorskip("cv2")
    rgb = _tie_image()
    path = str(tmp_path / f"ties.{ext}")
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == "webp" else []
    assert cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1]), params)
    want_imread = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    want_cvt = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY)
    assert not np.array_equal(want_imread, want_cvt) or ext == "webp"  # the two OpenCV paths differ
    got_imread = image_io.read_gray_levels(path, "imread")
    got_cvt = image_io.read_gray_levels(path, "cvtcolor")
    assert got_imread.dtype == np.float64 and got_imread.shape == rgb.shape[:2]
    np.testing.assert_array_equal(got_imread, want_imread)
    np.testing.assert_array_equal(got_cvt, want_cvt)


def test_read_gray_levels_grey_files_and_fallbacks(tmp_path):
    gray = _rng().integers(0, 256, (9, 11), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    for conv in image_io.GRAY_CONVENTIONS:
        np.testing.assert_array_equal(image_io.read_gray_levels(tmp_path / "g.png", conv), gray)
    rgb16 = _rng().random((6, 7)) * 0.5
    image_io.save_image(tmp_path / "g16.png", rgb16, bit_depth=16)
    np.testing.assert_array_equal(image_io.read_gray_levels(tmp_path / "g16.png"), np.round(rgb16 * 255))
    with pytest.raises(ValueError, match="grey convention"):
        image_io.read_gray_levels(tmp_path / "g.png", "matlab")
    with pytest.raises(ValueError, match="grey rule"):
        image_io.gray_levels_opencv(np.zeros((2, 2, 3)), "foo")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(image_io.ImageReadError, match="bad.png"):
        image_io.read_gray_levels(tmp_path / "bad.png")
