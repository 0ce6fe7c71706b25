"""One reward-model preprocessing for every scoring path (score CLI, evaluate --reward,
reward_model.score_images, the GRPO / direct reward functions)."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from evafusion_jax import evaluate, score
from evafusion_jax.data import feedback as fd
from evafusion_jax.data import image_io
from evafusion_jax.models import reward_model as rm
from evafusion_jax.rl import rewards
from evafusion_jax.storage import checkpoints

H, W = 37, 53  # not the model's input size: every path resizes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score_paths")
    cfg = rm.RewardConfig.tiny()
    params = rm.init_params(cfg, jax.random.PRNGKey(3))
    ckpt = checkpoints.save_params(tmp / "reward", params, cfg.to_dict(), "reward")
    rng = np.random.default_rng(0)
    imgs = {"ir": rng.integers(0, 256, (H, W), dtype=np.uint8),
            "vi": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
            "fused": rng.integers(0, 256, (H, W), dtype=np.uint8)}
    for k, a in imgs.items():
        (tmp / k).mkdir()
        Image.fromarray(a).save(tmp / k / "0001.png")
    f32 = {k: (a.reshape(H, W, -1).astype(np.float32) / 255.0)[None] for k, a in imgs.items()}
    return tmp, ckpt, cfg, params, imgs, f32


def test_every_scoring_path_gives_the_same_scores(setup):
    tmp, ckpt, cfg, params, imgs, f32 = setup
    ref = rm.score_images(params, f32["ir"], f32["vi"], f32["fused"], cfg)["scores"]
    ref = {k: float(v[0]) for k, v in ref.items()}
    assert len(set(round(v, 4) for v in ref.values())) > 1  # not a degenerate model

    # score CLI (CSV on the 1-5 scale with 4 decimals)
    assert score.main(["--checkpoint", str(ckpt), "--fused", str(tmp / "fused"), "--ir",
                       str(tmp / "ir"), "--vi", str(tmp / "vi"), "--output", str(tmp / "out"),
                       "--no_progress"]) == 0
    with open(tmp / "out" / "scores.csv") as fh:
        row = next(csv.DictReader(fh))
    for k, v in ref.items():
        assert float(row[k]) / fd.SCORE_MAX == pytest.approx(v, abs=1.1e-5), k

    # evaluate --reward
    tasks = evaluate.plan_evaluation(tmp / "ir", tmp / "vi", {"m": tmp / "fused"})
    ev = evaluate.reward_scores(ckpt, tasks, batch_size=2, progress=False)[0]
    for k, v in ref.items():
        assert ev[f"R_{k}"] == pytest.approx(v, abs=1e-6), k

    # the GRPO / direct reward function: whole image, and a whole-image region of a sample
    fn = rewards.ModelReward(cfg)
    total, terms = jax.jit(fn.image)(params, f32["fused"], f32["ir"], f32["vi"])
    w = fn.weights
    assert float(terms["texture"][0]) / w.texture == pytest.approx(ref["Texture_Preservation"],
                                                                   abs=1e-6)
    assert float(terms["thermal"][0]) / w.thermal == pytest.approx(ref["Thermal_Retention"],
                                                                   abs=1e-6)
    assert float(terms["sharpness"][0]) / w.sharpness == pytest.approx(ref["Sharpness"], abs=1e-6)
    assert float(terms["artifacts"][0]) / w.artifacts == pytest.approx(ref["Artifacts"], abs=1e-6)
    ones = jnp.ones((1, 2, H, W))
    for mode in rewards.REGION_MODES:
        fm = rewards.ModelReward(cfg, region_mode=mode)
        r, _ = jax.jit(fm.sample_regions)(params, jnp.asarray(f32["fused"])[:, None], f32["ir"],
                                          f32["vi"], ones, jnp.zeros_like(f32["fused"]))
        np.testing.assert_allclose(np.asarray(r), float(total[0]), atol=1e-5, err_msg=mode)


def test_training_preprocessing_differs_from_scoring_only_by_8bit_rounding(setup):
    """Training resizes 8-bit images with PIL itself (bit-exact to the release's processor);
    scoring resizes floats with the same filter: pixels differ by PIL's rounding only."""
    tmp, ckpt, cfg, params, imgs, f32 = setup
    s = cfg.vit.image_size
    rec = dict(imgs, heatmap=np.zeros((H, W), np.uint8), scores=np.ones(5, np.float32))
    train = fd.preprocess_example(rec, s, cfg.vit.image_mean, cfg.vit.image_std)
    for k in ("ir", "vi", "fused"):
        pix = np.asarray(rm.preprocess(f32[k], cfg))[0]
        diff = np.abs(pix - train[k])
        assert diff.max() <= 2 * 1.01 / 255, k  # one 8-bit level on [-1, 1]
        assert diff.mean() < 1.0 / 255, k  # half an 8-bit level on average


def test_preprocess_is_pil_bilinear_and_differentiable():
    cfg = rm.RewardConfig.tiny()
    s = cfg.vit.image_size
    rng = np.random.default_rng(1)
    for h, w in ((329, 530), (20, 24), (64, 64), (10, 7)):
        a = rng.random((h, w)).astype(np.float32)
        ref = np.asarray(Image.fromarray(a, "F").resize((s, s), Image.BILINEAR))
        pix = np.asarray(rm.preprocess(a[None, ..., None], cfg))[0]
        np.testing.assert_allclose(pix[..., 0], (ref - 0.5) / 0.5, atol=2e-6)
    g = jax.grad(lambda x: rm.preprocess(x, cfg).sum())(jnp.ones((1, 50, 40, 1)))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


# Input checks (no model needed: both fail before the checkpoint is read).

def _folders(root, fused_size=(12, 16)):
    for sub in ("ir", "vi", "fused"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for sub in ("ir", "vi"):
            Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint8)).save(root / sub / f"{name}.png")
        size = fused_size if name == "b" else (12, 16)
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / "fused" / f"{name}.png")
    return root


def test_score_and_evaluate_follow_one_size_rule(tmp_path, capsys):
    d = _folders(tmp_path / "d", fused_size=(10, 10))
    with pytest.raises(score.ScoreInputError, match=r"(?s)same size.*\n  b: fused 10x10, ir 16x12, vi 16x12"):
        score.score_folder(tmp_path / "no_checkpoint", d / "fused", d / "ir", d / "vi", tmp_path / "o",
                           progress=False)
    with pytest.raises(evaluate.EvaluationError, match=r"(?s)same size.*\n  m/b: fused 10x10, ir 16x12, vi 16x12"):
        evaluate.plan_evaluation(d / "ir", d / "vi", {"m": d / "fused"})
    assert score.main(["--checkpoint", str(tmp_path / "no_checkpoint"), "--fused", str(d / "fused"),
                       "--ir", str(d / "ir"), "--vi", str(d / "vi"), "--output", str(tmp_path / "o")]) == 2
    assert image_io.SAME_SIZE_RULE[:40] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_truncated_fused_image_is_found_before_any_work(tmp_path):
    d = _folders(tmp_path / "d")
    raw = (d / "fused" / "b.png").read_bytes()
    (d / "fused" / "b.png").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(score.ScoreInputError, match=r"b.png.*truncated"):
        score.score_folder(tmp_path / "no_checkpoint", d / "fused", d / "ir", d / "vi", tmp_path / "o",
                           progress=False)
    with pytest.raises(image_io.ImageReadError, match=r"(?s)1 unreadable file.*b.png"):
        evaluate.plan_evaluation(d / "ir", d / "vi", {"m": d / "fused"})
