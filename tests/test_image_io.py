import numpy as np
import pytest
from PIL import Image

from evafusion_jax import image_io


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
