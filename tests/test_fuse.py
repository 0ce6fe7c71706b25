"""fuse CLI and library on synthetic pairs with a tiny random DCEvo (all images fall in one 32x32 bucket,
so the network compiles once for the whole module)."""

import jax
import numpy as np
import pytest
from PIL import Image

from evafusion_jax import fuse
from evafusion_jax.data import image_io
from evafusion_jax.models import dcevo
from evafusion_jax.storage import checkpoints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = dcevo.DCEvoConfig(dim=8, num_blocks=1, c2f_n=1, detail_layers=1, heads=2)
    params = dcevo.init_params(config, jax.random.PRNGKey(0))
    path = tmp_path_factory.mktemp("ckpt") / "dcevo_tiny"
    checkpoints.save_params(path, params, config.to_dict(), "dcevo")
    return path


def _write_pairs(root, rng):
    """a: 16-bit IR + colour visible (odd size); b: RGBA IR + palette grey visible (another odd size)."""
    (root / "ir").mkdir(parents=True)
    (root / "vi").mkdir()
    ir16 = (rng.random((23, 29)) * 65535).astype(np.uint16)
    Image.fromarray(ir16).save(root / "ir" / "a.png")
    vi_rgb = (rng.random((23, 29, 3)) * 255).astype(np.uint8)
    Image.fromarray(vi_rgb).save(root / "vi" / "a.png")
    ir_rgba = (rng.random((17, 31, 4)) * 255).astype(np.uint8)
    Image.fromarray(ir_rgba, mode="RGBA").save(root / "ir" / "b.png")
    Image.fromarray((rng.random((17, 31)) * 255).astype(np.uint8)).convert("P").save(root / "vi" / "b.png")
    return ir16, vi_rgb


def test_round_trip_colour_16bit_odd_sizes(tmp_path, ckpt):
    ir16, vi_rgb = _write_pairs(tmp_path / "data", np.random.default_rng(0))
    out = tmp_path / "out"
    assert fuse.main(["--checkpoint", str(ckpt), "--pairs", str(tmp_path / "data"), "--out", str(out),
                      "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    a = Image.open(out / "a.png")
    b = Image.open(out / "b.png")
    assert a.mode == "RGB" and a.size == (29, 23)  # colour visible -> colour output, size kept
    assert b.mode == "L" and b.size == (31, 17)  # grey visible -> grey output

    # Y comes from the network, CbCr from the visible image.
    params, cfg = checkpoints.load_params(ckpt, "dcevo")
    fuser = fuse.Fuser(params, dcevo.DCEvoConfig.from_dict(cfg), bucket=32)
    ir = (ir16 / 65535.0).astype(np.float32)[..., None]
    vi_ycc = image_io.rgb_to_ycbcr(vi_rgb / 255.0)
    y = fuser(ir, vi_ycc[..., :1])
    got = image_io.rgb_to_ycbcr(np.asarray(a) / 255.0)
    inside = image_io.ycbcr_to_rgb(np.concatenate([y, vi_ycc[..., 1:]], -1))
    unclipped = np.all((inside > 0.01) & (inside < 0.99), axis=-1)  # RGB clipping moves YCbCr
    assert unclipped.mean() > 0.3
    np.testing.assert_allclose(got[..., 0][unclipped], y[..., 0][unclipped], atol=2.5 / 255)
    np.testing.assert_allclose(got[..., 1:][unclipped], vi_ycc[..., 1:][unclipped], atol=2.5 / 255)
    assert np.abs(got[..., 0] - vi_ycc[..., 0]).mean() > 5 / 255  # the Y channel was replaced
    # the same library path gives the same image
    lib = fuse.fuse_pair(fuser, ir, vi_rgb / 255.0)
    np.testing.assert_allclose(image_io.to_uint8(lib), np.asarray(a), atol=1)
    # --gray forces grey output
    out_g = tmp_path / "out_gray"
    assert fuse.main(["--checkpoint", str(ckpt), "--pairs", str(tmp_path / "data"), "--out", str(out_g),
                      "--gray", "--quiet"]) == 0
    assert Image.open(out_g / "a.png").mode == "L"


def test_bucketing_compiles_once_and_crops_back(ckpt):
    params, cfg = checkpoints.load_params(ckpt, "dcevo")
    config = dcevo.DCEvoConfig.from_dict(cfg)
    rng = np.random.default_rng(1)
    fuser = fuse.Fuser(params, config, bucket=32, batch_size=2)
    sizes = [(23, 29), (17, 31), (32, 32), (5, 9)]
    for h, w in sizes:
        x = rng.random((h, w, 1)).astype(np.float32)
        assert fuser(x, 1 - x).shape == (h, w, 1)
    assert fuser.compiled_shapes == {(2, 32, 32)}
    # an image already at the bucket size is not padded: identical to plain dcevo.fuse
    x = rng.random((32, 32, 1)).astype(np.float32)
    direct = np.asarray(dcevo.fuse(params, x[None], (1 - x)[None], config))[0]
    np.testing.assert_allclose(fuser(x, 1 - x), direct, atol=1e-6)
    assert fuse.padded_shape(33, 64, 32) == (64, 64)


def test_missing_pairs_are_listed_and_nothing_written(tmp_path, ckpt, capsys):
    _write_pairs(tmp_path, np.random.default_rng(2))
    (tmp_path / "vi" / "a.png").rename(tmp_path / "vi" / "c.png")
    out = tmp_path / "out"
    rc = fuse.main(["--checkpoint", str(ckpt), "--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi"),
                    "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing in vi" in err and "a" in err and "missing in ir" in err and "c" in err
    assert not out.exists()


def test_size_mismatch_and_resize_to(tmp_path, ckpt, capsys):
    (tmp_path / "ir").mkdir()
    (tmp_path / "vi").mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((20, 24)) * 255).astype(np.uint8)).save(tmp_path / "ir" / "x.png")
    Image.fromarray((rng.random((10, 12)) * 255).astype(np.uint8)).save(tmp_path / "vi" / "x.png")
    args = ["--checkpoint", str(ckpt), "--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi"), "--quiet"]
    assert fuse.main(args + ["--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "x: ir 24x20, vi 12x10" in err and "--resize-to" in err
    assert not (tmp_path / "o1").exists()
    assert fuse.main(args + ["--out", str(tmp_path / "o2"), "--resize-to", "ir"]) == 0
    assert Image.open(tmp_path / "o2" / "x.png").size == (24, 20)
    assert fuse.main(args + ["--out", str(tmp_path / "o3"), "--resize-to", "vi"]) == 0
    assert Image.open(tmp_path / "o3" / "x.png").size == (12, 10)


def test_existing_output_kept_unless_overwrite_and_bad_input_leaves_it_intact(tmp_path, ckpt, capsys):
    _write_pairs(tmp_path, np.random.default_rng(4))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["--checkpoint", str(ckpt), "--pairs", str(tmp_path), "--out", str(out), "--quiet"]
    assert fuse.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    # a file that opens (valid header) but fails to decode stops the run: the old folder survives
    data = (tmp_path / "vi" / "b.png").read_bytes()
    (tmp_path / "vi" / "b.png").write_bytes(data[: len(data) // 2])
    assert fuse.main(args + ["--overwrite"]) == 2 and "b.png" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ir", "out", "vi"]  # no temp folder left
    (tmp_path / "vi" / "b.png").write_bytes(b"garbage")
    assert fuse.main(args + ["--overwrite"]) == 2 and "unreadable" in capsys.readouterr().err
    Image.fromarray(np.zeros((17, 31), np.uint8)).save(tmp_path / "vi" / "b.png")
    assert fuse.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_tiled_fusion_blends_tiles_exactly_for_a_local_model(monkeypatch):
    """With a pixel-wise stand-in for the network, tiling with overlap must reproduce the
    untiled result (the blending weights sum to one everywhere); one tile shape is compiled."""
    monkeypatch.setattr(dcevo, "fuse", lambda p, ir, vi, c: 0.3 * ir + 0.7 * vi ** 2)
    rng = np.random.default_rng(0)
    ir = rng.random((45, 70, 1)).astype(np.float32)
    vi = rng.random((45, 70, 1)).astype(np.float32)
    whole = fuse.Fuser(None, None, bucket=1)(ir, vi)
    tiled = fuse.Fuser(None, None, bucket=1, batch_size=3, tile=16, overlap=5)
    np.testing.assert_allclose(tiled(ir, vi), whole, atol=1e-6)
    assert tiled.compiled_shapes == {(3, 16, 16)}
    assert fuse.tile_starts(70, 16, 5) == [0, 11, 22, 33, 44, 54]
    with pytest.raises(fuse.FuseError, match="overlap"):
        fuse.Fuser(None, None, tile=16, overlap=16)


def test_truncated_image_is_found_before_any_work_and_stale_staging_is_removed(tmp_path, ckpt,
                                                                               monkeypatch, capsys):
    import subprocess
    import sys

    from evafusion_jax.storage import fileio
    data = tmp_path / "data"
    _write_pairs(data, np.random.default_rng(1))
    good = (data / "vi" / "b.png").read_bytes()
    (data / "vi" / "b.png").write_bytes(good[: len(good) // 2])  # header intact, pixels cut
    loaded = []
    real_load = fuse.load_model
    monkeypatch.setattr(fuse, "load_model", lambda *a: loaded.append(a) or real_load(*a))
    out = tmp_path / "out"
    assert fuse.main(["--checkpoint", str(ckpt), "--pairs", str(data), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "b.png" in err and "truncated" in err and not loaded and not out.exists()
    # a staging folder left by a killed fuse (its process is gone) is removed by the next run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{fileio.host_name()}-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "a.png").write_bytes(b"partial")
    (data / "vi" / "b.png").write_bytes(good)
    assert fuse.main(["--checkpoint", str(ckpt), "--pairs", str(data), "--out", str(out), "--quiet"]) == 0
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


@pytest.mark.slow
def test_ctrl_c_and_sigterm_say_interrupted_and_remove_the_staging_folder(tmp_path):
    """Subprocesses: SIGINT exits 130 and SIGTERM 143, each with 'interrupted' on stderr and
    no staging folder or output left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from evafusion_jax.data import synthetic
    data = synthetic.write_pairs_folder(tmp_path / "data", 120, 48, 48, 0)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # one at a time: the other cannot finish meanwhile
        parent = tmp_path / f"p{int(sig)}"
        parent.mkdir()
        # a handled (not ignored) SIGINT here gives the child SIGINT at its default, so Python
        # installs its Ctrl-C handler there, even where the test runner inherited SIGINT
        # ignored (a shell's background job)
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", "evafusion_jax.fuse", "--init-random", "tiny", "--pairs",
                 str(data), "--out", str(parent / "out"), "--bucket", "1", "--quiet"],
                env=env, stderr=subprocess.PIPE, text=True)
        finally:
            signal.signal(signal.SIGINT, old)
        deadline = time.time() + 300
        while not any(parent.glob(".out.tmp-*")) and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, p.stderr.read()[-2000:]
        p.send_signal(sig)
        procs[sig] = (parent, p, p.communicate(timeout=300)[1])
    for sig, (parent, p, err) in procs.items():
        assert p.returncode == (130 if sig == signal.SIGINT else 143), err[-2000:]
        assert "interrupted" in err and "Traceback" not in err
        assert list(parent.iterdir()) == []
