"""The train_grpo CLI: kill-and-resume equality, NaN stop, export, config errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evafusion_jax import config as config_lib
from evafusion_jax import train_grpo
from evafusion_jax.data import synthetic
from evafusion_jax.storage import checkpoints
from evafusion_jax.train import checkpointer, metric_writer

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config.dcevo.dim=8", "--config.dcevo.num_blocks=1", "--config.dcevo.c2f_n=1",
        "--config.dcevo.detail_layers=1", "--config.dcevo.heads=2"]


def _args(data, workdir, *extra):
    return (["--config", str(REPO / "configs" / "grpo.py"), f"--config.data.data_dir={data}",
             "--config.data.region_source=grid", "--config.data.crop_size=16",
             "--config.data.num_regions=4", "--config.reward_kind=contrast",
             "--config.max_steps=4", "--config.checkpoint_every_steps=2",
             "--config.log_every_steps=1", "--config.image_every_steps=0",
             "--config.learning_rate=1e-3", "--config.progress=False",
             f"--config.workdir={workdir}"] + TINY + list(extra))


def _run(args, cache):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    # the runs compile the same step: share a persistent compilation cache
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return subprocess.run([sys.executable, "-m", "evafusion_jax.train_grpo"] + args, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs") / "data"
    synthetic.write_pairs_folder(d, 4, 24, 24, 0)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_kill_and_resume_gives_identical_parameters_and_nan_keeps_last_checkpoint(
        objective, data, tmp_path):
    # ppo: its running reward baseline is part of the train state and must resume too
    cache = tmp_path / "jax_cache"
    obj = f"--config.objective={objective}"
    full = _run(_args(data, tmp_path / "full", obj), cache)
    assert full.returncode == 0, full.stderr[-3000:]
    logs = metric_writer.read_jsonl(tmp_path / "full" / "logs" / "metrics.jsonl")
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    for key in ("reward", "kl", "clip_fraction", "adv_std", "reward/contrast", "loss"):
        assert key in logs[-1]
    if objective == "ppo":
        assert "baseline" in logs[-1]

    # killed right after step 2 (os._exit, as by a signal): the step-2 checkpoint survives
    run = tmp_path / "interrupted"
    killed = _run(_args(data, run, obj, "--config.debug_exit_at_step=1"), cache)
    assert killed.returncode == 75, killed.stderr[-3000:]
    assert checkpointer.TrainCheckpointer(run / "checkpoints").latest_step() == 2
    # restarted; the loss becomes NaN at step 4 (0-based 3): the run stops with an
    # error and keeps the step-3 checkpoint as the last good one, without exporting
    bad = _run(_args(data, run, obj, "--config.debug_nan_at_step=3",
                     "--config.checkpoint_every_steps=1"), cache)
    assert bad.returncode == 3  # the documented non-finite stop (evafusion_jax.cli)
    assert "resumed from" in bad.stderr and "non-finite" in bad.stderr
    assert checkpointer.TrainCheckpointer(run / "checkpoints").latest_step() == 3
    assert not (run / "dcevo_final").exists()
    # resumed again: the result equals the uninterrupted run bit for bit
    resumed = _run(_args(data, run, obj), cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, cfg_a = checkpoints.load_params(tmp_path / "full" / "dcevo_final", expected_kind="dcevo")
    b, _ = checkpoints.load_params(run / "dcevo_final", expected_kind="dcevo")
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    assert cfg_a["dim"] == 8


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def test_config_errors_name_the_field(data, tmp_path):
    cfg = config_lib.parse_cli_config(["prog"] + _args(data, tmp_path / "w", "--config.objective=reinforce"),
                              str(REPO / "configs" / "grpo.py"))
    with pytest.raises(train_grpo.ConfigError, match="objective"):
        train_grpo.train(cfg)
    cfg = config_lib.parse_cli_config(["prog"] + _args(data, tmp_path / "w", "--config.reward_kind=model"),
                              str(REPO / "configs" / "grpo.py"))
    with pytest.raises(train_grpo.ConfigError, match="reward_checkpoint"):
        train_grpo.train(cfg)
    cfg = config_lib.parse_cli_config(["prog"] + _args(data, tmp_path / "w", "--config.group_size=3"),
                              str(REPO / "configs" / "grpo.py"))
    with pytest.raises(train_grpo.ConfigError, match="even group_size"):
        train_grpo.train(cfg)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_two_process_run_finishes_and_process_zero_exports(data, tmp_path):
    # Two processes (jax.distributed on 127.0.0.1, one CPU device each): training, the
    # Orbax train-state checkpoints (all processes) and the final export (process 0 only)
    # must not wait on each other forever.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path / "w"
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "evafusion_jax.train_grpo"]
            + _args(data, work, "--config.data.batch_size=2"),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        try:
            _, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process of the 2-process run hung")
        assert p.returncode == 0, err[-3000:]
    params, cfg = checkpoints.load_params(work / "dcevo_final", "dcevo")
    assert cfg["dim"] == 8
    assert [r["step"] for r in metric_writer.read_jsonl(work / "logs" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (work / "checkpoints" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2", "4"]


@pytest.mark.slow
def test_huge_learning_rate_stops_with_code_3_and_a_lower_one_proceeds(data, tmp_path, capsys):
    import logging
    root = logging.getLogger()
    handlers = list(root.handlers)  # main() calls basicConfig(force=True): restored below
    try:
        _huge_learning_rate(data, tmp_path, capsys)
    finally:
        root.handlers[:] = handlers


def _huge_learning_rate(data, tmp_path, capsys):
    """lr=1e30 saves finite but useless weights at step 1 and gives NaN at step 2: that
    checkpoint is deleted, so the advice (lower the learning rate, rerun) works; the
    rerun's metrics.jsonl holds each step once. A region cache of other images is a clean
    input error (code 2) before any work."""
    from evafusion_jax import precompute_regions
    w = tmp_path / "w"
    assert train_grpo.main(["prog"] + _args(data, w, "--config.learning_rate=1e30",
                                            "--config.checkpoint_every_steps=1")) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "checkpoint 1, whose parameters gave this loss, was deleted" in err
    assert checkpointer.TrainCheckpointer(w / "checkpoints").latest_step() is None
    assert train_grpo.main(["prog"] + _args(data, w, "--config.max_steps=2")) == 0
    assert [r["step"] for r in metric_writer.read_jsonl(w / "logs" / "metrics.jsonl")] == [1, 2]
    params, _ = checkpoints.load_params(w / "dcevo_final", "dcevo")
    assert all(np.isfinite(v).all() and np.abs(v).max() < 1e3 for v in _flat(params).values())

    other = synthetic.write_pairs_folder(tmp_path / "other", 2, 24, 24, 5)
    for f in sorted((other / "ir").iterdir()):
        for role in ("ir", "vi"):
            (other / role / f.name).rename(other / role / ("x" + f.name))
    precompute_regions.precompute_regions(other, tmp_path / "cache", source="grid", num_regions=4,
                                          progress=False)
    assert train_grpo.main(["prog"] + _args(data, tmp_path / "w2", "--config.data.region_source=sam",
                                            f"--config.data.cache_dir={tmp_path / 'cache'}")) == 2
    err = capsys.readouterr().err
    assert "has no masks for 4 of 4 images" in err and "Traceback" not in err
    assert not (tmp_path / "w2").exists()


def test_warmup_steps_raise_the_learning_rate_linearly_from_zero(data, tmp_path):
    """``warmup_steps`` (the demo's ``--grpo-lr-warmup``) reaches the optimizer: the first update
    uses learning rate 0, the rate then rises linearly to ``learning_rate``."""
    w = tmp_path / "w"
    assert train_grpo.main(["prog"] + _args(data, w, "--config.max_steps=3",
                                            "--config.warmup_steps=2")) == 0
    lrs = [r["learning_rate"] for r in metric_writer.read_jsonl(w / "logs" / "metrics.jsonl")]
    np.testing.assert_allclose(lrs, [0.0, 5e-4, 1e-3], rtol=1e-6, atol=1e-12)
