"""The end-to-end demo (python -m evafusion_jax.demo) at a very small size, and its input checks."""

import json

import numpy as np
import pytest

from evafusion_jax import demo
from evafusion_jax.storage import checkpoints
from evafusion_jax.train import metric_writer

SMALL = ["--steps", "2", "--train-pairs", "4", "--test-pairs", "2", "--feedback", "40",
         "--size", "48", "--crop", "32", "--batch", "2", "--regions", "4",
         "--reward-steps", "20", "--warmup-steps", "6"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert demo.main(["--out", str(out)] + SMALL) == 0
    return out


def test_demo_writes_the_report_with_every_stage(report):
    for name in ("report.md", "summary.json", "grid.png", "curves.png"):
        assert (report / name).is_file(), name
    md = (report / "report.md").read_text()
    assert "SYNTHETIC" in md
    for heading in ("## 1. Reward model", "## 2. DCEvo fusion warm-up", "## 3. Regions + GRPO",
                    "## 4. Held-out pairs before / after GRPO"):
        assert heading in md
    assert "| score | dev PLCC | dev SRCC | test PLCC | test SRCC |" in md
    assert "| metric | before GRPO | after GRPO | better |" in md
    for col in demo.DEMO_METRICS + ("R_Overall_Score", "reward"):
        assert f"| {col} " in md, col
    assert "![IR | visible | fused before | fused after | artifact heatmap](grid.png)" in md

    s = json.loads((report / "summary.json").read_text())
    assert s["synthetic_feedback"] and s["synthetic_pairs"]
    assert s["test_pairs"] == 2 and s["test_seed"] == 1000  # the fixed held-out set
    assert set(demo.STAGES) <= set(s["timings_s"])
    for split in ("dev", "test"):
        assert "score/plcc/Overall_Score" in s["reward_model"][split]
    for method in ("before", "after"):
        assert s["heldout"][method]["reward"]["n"] == 2
        assert s["heldout"][method]["EN"]["n"] == 2
    assert np.isfinite(s["grpo"]["reward_start"]) and np.isfinite(s["grpo"]["reward_end"])
    g = s["grpo"]
    assert np.isfinite(g["policy_reward_before"]) and np.isfinite(g["policy_reward_after"])
    from evafusion_jax.demo.config import GRPO_GROUP, GRPO_SIGMA
    assert g["policy_crops"] >= 2 and g["group_size"] == GRPO_GROUP
    assert g["lr_warmup_steps"] == 0  # an eighth of --steps 2, rounded down
    assert g["exploration_std"] == GRPO_SIGMA  # --grpo-sigma reaches train_grpo
    assert "DCEvo before GRPO" in md and "DCEvo after GRPO" in md
    # the before/after numbers a script compares (benchmarks/demo_seeds.py)
    assert g["region_reward"] == "composite"  # the demo default
    ba = s["before_after"]
    assert ba["policy_region_reward"] == {"before": g["policy_reward_before"],
                                          "after": g["policy_reward_after"]}
    assert ba["heldout_reward"] == {"before": s["heldout"]["before"]["reward"]["mean"],
                                    "after": s["heldout"]["after"]["reward"]["mean"]}


def test_demo_ran_each_training_stage(report):
    work = report / "work"
    # reward model: --reward-steps at least (whole epochs), with dev evaluations
    logs = metric_writer.read_jsonl(work / "reward" / "logs" / "metrics.jsonl")
    assert max(r["step"] for r in logs) >= 20
    assert any("val/score/plcc/Overall_Score" in r for r in logs)
    # fusion warm-up: --warmup-steps of the fusion losses
    logs = metric_writer.read_jsonl(work / "fusion" / "logs" / "metrics.jsonl")
    assert [r["step"] for r in logs] == list(range(1, 7))
    assert all("fusion_loss" in r and "reward" not in r for r in logs)
    # regions: a cache for every training pair, computed with superpixels
    index = json.loads((work / "regions" / "index.json").read_text())
    assert index["source"]["kind"] == "superpixels" and len(index["images"]) == 4
    # GRPO: steps with the reward model's terms
    logs = metric_writer.read_jsonl(work / "grpo" / "logs" / "metrics.jsonl")
    assert [r["step"] for r in logs] == [1, 2]
    assert all("reward/texture" in r and "kl" in r for r in logs)
    # GRPO changed the network it started from
    before, _ = checkpoints.load_params(work / "fusion" / "dcevo_final", "dcevo")
    after, _ = checkpoints.load_params(work / "grpo" / "dcevo_final", "dcevo")
    import jax
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after))]
    assert max(diffs) > 0
    # the held-out pairs were fused by both networks
    for tag in ("before", "after"):
        assert len(list((work / f"fused_{tag}").glob("*.png"))) == 2


def test_cross_judge_scores_every_seed_with_every_reward_model(report, tmp_path):
    """benchmarks/demo_seeds.py --cross-judge on two "seeds" that are the same run: every judge
    gives both the same numbers, equal to the run's own held-out reward."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "demo_seeds.py"
    spec = importlib.util.spec_from_file_location("demo_seeds", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for seed in (3, 4):
        (tmp_path / f"seed_{seed}").symlink_to(report, target_is_directory=True)
    res = mod.cross_judge(tmp_path, [3, 4])
    s = json.loads((report / "summary.json").read_text())
    own = s["before_after"]["heldout_reward"]
    for v in list(res["judges"].values()) + [res["mean_over_judges"]]:
        np.testing.assert_allclose(v["before"], [own["before"]] * 2, rtol=1e-5)
        np.testing.assert_allclose(v["after"], [own["after"]] * 2, rtol=1e-5)
        assert v["before_std"] < 1e-6
    text = mod.format_cross_judge(res)
    assert "| mean over judges |" in text and text.count("\n| ") == 4


def test_demo_refuses_a_non_empty_out_folder(report):
    before = sorted(p.name for p in report.iterdir())
    assert demo.main(["--out", str(report)] + SMALL) == 2
    assert sorted(p.name for p in report.iterdir()) == before


@pytest.mark.parametrize("bad, message", [
    (["--pairs", "/definitely/not/here"], "--pairs /definitely/not/here does not exist"),
    (["--regions", "1"], "--regions must be >= 2"),
    (["--grpo-group", "3"], "--grpo-group must be an even number"),
    (["--size", "32", "--crop", "32"], "need pairs of at least 48x48"),
    (["--crop", "80", "--size", "64"], "larger than the synthetic pairs"),
    (["--seed", "7", "--test-seed", "7"], "--seed 7 equals --test-seed"),
    (["--pairs-min-detail", "-0.1"], "--pairs-min-detail must be >= 0"),
    (["--grpo-sigma", "0"], "--grpo-sigma must be > 0"),
    (["--steps", "8", "--grpo-lr-warmup", "8"],
     "--grpo-lr-warmup must be >= 0 and below --steps (8)"),
    (["--grpo-lr-warmup", "-1"], "--grpo-lr-warmup must be >= 0"),
])
def test_demo_rejects_bad_options_before_writing(tmp_path, caplog, bad, message):
    out = tmp_path / "out"
    assert demo.main(["--out", str(out)] + bad) == 2
    assert message in caplog.text
    assert not out.exists()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, steps", [([], 10), (["--steps", "40"], 5), (["--steps", "7"], 0),
                                         (["--grpo-lr-warmup", "3"], 3)])
def test_grpo_lr_warmup_is_an_eighth_of_the_steps_unless_given(argv, steps):
    from evafusion_jax.demo import config
    args = config.build_parser().parse_args(argv)
    config.validate(args)
    assert config.grpo_lr_warmup(args) == steps


def test_heldout_pairs_are_the_same_for_every_seed(report, tmp_path):
    """Synthetic held-out pairs come from --test-seed, not --seed: one test set for all runs
    (the training pairs do follow --seed)."""
    from evafusion_jax.demo import config, stages
    args = config.build_parser().parse_args(SMALL + ["--seed", "3", "--reward", "unused"])
    data = stages.stage_data(args, tmp_path)
    ours = report / "work" / "data"
    for sub in ("ir", "vi"):
        names = sorted(p.name for p in (data["test"] / sub).glob("*.png"))
        assert names == sorted(p.name for p in (ours / "pairs_test" / sub).glob("*.png"))
        for n in names:
            theirs = (ours / "pairs_test" / sub / n).read_bytes()
            assert (data["test"] / sub / n).read_bytes() == theirs
    first = "ir/00000.png"
    assert (data["train"] / first).read_bytes() != (ours / "pairs_train" / first).read_bytes()


def test_pairs_folder_without_partner_files_is_an_error(tmp_path, caplog):
    pairs = tmp_path / "pairs"
    (pairs / "ir").mkdir(parents=True)
    (pairs / "vi").mkdir()
    from PIL import Image
    Image.new("L", (64, 64)).save(pairs / "ir" / "a.png")
    assert demo.main(["--out", str(tmp_path / "out"), "--pairs", str(pairs)]) == 2
    assert "a.png" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_on_real_pairs_builds_feedback_from_them(tmp_path):
    """--pairs: pairs resized to --pairs-side, the feedback set made of crops of the TRAINING
    pairs, GRPO on them, the held-out pairs evaluated (here stand-in pairs of another size)."""
    from evafusion_jax.data import synthetic
    pairs = synthetic.write_pairs_folder(tmp_path / "pairs", 5, 72, 96, seed=9)
    out = tmp_path / "report"
    assert demo.main(["--out", str(out), "--pairs", str(pairs), "--pairs-side", "48"]
                     + SMALL[:2] + SMALL[6:]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert not s["synthetic_pairs"] and s["heldout"]["after"]["reward"]["n"] == 1
    data = out / "work" / "data"
    from PIL import Image
    assert Image.open(data / "pairs_train" / "ir" / "00000.png").size == (64, 48)
    assert len(list((data / "pairs_train" / "ir").iterdir())) == 4
    assert (data / "pairs_test" / "ir" / "00004.png").is_file()
    fb = [json.loads(x) for x in (data / "feedback_SYNTHETIC" / "scores.jsonl").read_text()
          .splitlines()]
    assert len(fb) == 40
    assert s["pairs_min_detail"] == synthetic.REAL_MIN_DETAIL
    from evafusion_jax.demo.config import GRPO_SIGMA_PAIRS
    assert s["grpo"]["exploration_std"] == GRPO_SIGMA_PAIRS  # real pairs: less contrast
    assert "visible-detail rms >= " in (data / "feedback_SYNTHETIC" / "README.txt").read_text()
    assert all(np.isfinite(v) for k in ("policy_region_reward", "heldout_reward")
               for v in s["before_after"][k].values())
