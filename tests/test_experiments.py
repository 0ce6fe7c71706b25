"""The ablation-study runner (evafusion_jax.experiments): a smoke run (one variant, one seed, two
steps, tiny random models, synthetic pairs), resume, tables, and config errors."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from evafusion_jax import config as config_lib
from evafusion_jax import demo, experiments
from evafusion_jax.data import synthetic
from evafusion_jax.models import reward_model as rm
from evafusion_jax.storage import checkpoints
from evafusion_jax.train import metric_writer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_assets")
    pairs = synthetic.write_pairs_folder(root / "pairs", 6, 48, 48, seed=0)
    dcfg = demo.demo_dcevo_config()
    from evafusion_jax.models import dcevo
    dckpt = checkpoints.save_params(root / "dcevo", jax.tree_util.tree_map(
        np.asarray, dcevo.init_params(dcfg, jax.random.PRNGKey(0))), dcfg.to_dict(), "dcevo")
    rcfg = demo.demo_reward_config()
    rckpt = checkpoints.save_params(root / "reward", jax.tree_util.tree_map(
        np.asarray, rm.init_params(rcfg, jax.random.PRNGKey(1))), rcfg.to_dict(), "reward")
    return {"pairs": pairs, "dcevo": dckpt, "reward": rckpt}


def _config(assets, out, *extra):
    argv = ["prog", "--config", str(REPO / "configs" / "experiments.py"),
            f"--config.out_dir={out}", "--config.progress=False",
            f"--config.init.dcevo_checkpoint={assets['dcevo']}",
            f"--config.init.reward_checkpoint={assets['reward']}",
            f"--config.data.train_dir={assets['pairs']}", "--config.data.train_name=synthetic",
            "--config.data.heldout=2", "--config.data.eval_dirs=",
            "--config.regions.source=grid", "--config.variants=baseline,ppo", "--config.seeds=0",
            "--config.train.max_steps=2", "--config.train.checkpoint_every_steps=1",
            "--config.train.data.crop_size=32", "--config.train.data.num_regions=4",
            "--config.train.group_size=2", "--config.eval.metrics=CC,PSNR_unit,Qabf,SSIM",
            "--config.eval.bucket=16"] + list(extra)
    return config_lib.parse_cli_config(argv, str(REPO / "configs" / "experiments.py"))


def test_unknown_variant_is_a_clear_error_before_any_work(assets, tmp_path):
    with pytest.raises(experiments.ExperimentError, match=r"unknown variant\(s\) \['sft'\].*wo_sam"):
        experiments.run(_config(assets, tmp_path / "s", "--config.variants=full,sft"))
    assert not (tmp_path / "s").exists()
    assert experiments.resolve_variants("grpo,full,dpo") == ["full", "dpo"]
    with pytest.raises(experiments.ExperimentError, match="seeds"):
        experiments.parse_seeds("0,0")


def test_initial_stages_get_the_demo_options(assets, tmp_path):
    """init.* reaches the demo's stages as its command-line options."""
    args = experiments._demo_args(_config(assets, tmp_path / "s",
                                          "--config.init.pairs_min_detail=0.05"))
    assert args.pairs_min_detail == 0.05 and args.pairs == str(assets["pairs"])
    assert args.reward == str(assets["reward"]) and args.test_pairs == 2
    default = experiments._demo_args(_config(assets, tmp_path / "s"))
    assert default.pairs_min_detail == synthetic.REAL_MIN_DETAIL


@pytest.mark.slow
def test_smoke_study_writes_tables_and_resumes(assets, tmp_path):
    out = tmp_path / "study"
    doc = experiments.run(_config(assets, out))
    assert set(doc["variants"]) == {"baseline", "ppo"}
    ppo = doc["variants"]["ppo"]["synthetic"]
    for m in ("CC", "PSNR_unit", "Qabf", "SSIM", "R_Overall_Score"):
        assert np.isfinite(ppo[m]["mean"]) and ppo[m]["n_seeds"] == 1, m
    assert 0 < ppo["PSNR_unit"]["mean"] and ppo["PSNR_unit"]["std"] == 0.0
    md = (out / "ablation.md").read_text()
    assert "| PPO |" in md and "| Baseline (DCEvo) |" in md and "| DPO |" not in md
    assert (out / "ablation.csv").read_text().splitlines()[0].startswith("table,row,variant,set")
    assert (out / "ablation.png").stat().st_size > 1000
    result = out / "units" / "ppo" / "seed_0" / "result.json"
    logs = metric_writer.read_jsonl(out / "units" / "ppo" / "seed_0" / "train" / "logs" / "metrics.jsonl")
    assert [r["step"] for r in logs] == [1, 2] and "baseline" in logs[-1]

    # a rerun finds every unit finished: nothing is trained or evaluated again
    stamp = result.stat().st_mtime_ns
    doc2 = experiments.run(_config(assets, out))
    assert result.stat().st_mtime_ns == stamp
    assert doc2["variants"] == json.loads(json.dumps(doc["variants"]))
    # only the tables, from the finished units of the variants asked for
    doc3 = experiments.run(_config(assets, out, "--config.tables_only=True",
                                   "--config.variants=baseline"))
    assert set(doc3["variants"]) == {"baseline"} and result.stat().st_mtime_ns == stamp
    # the same folder with another training config is refused
    with pytest.raises(experiments.ExperimentError, match="train.*max_steps"):
        experiments.run(_config(assets, out, "--config.train.max_steps=3"))
