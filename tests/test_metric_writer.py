"""Tests for evafusion_jax.train.metric_writer."""

import jax.numpy as jnp
import numpy as np

from evafusion_jax.train import metric_writer


def test_metric_writer(tmp_path):
    with metric_writer.MetricWriter(tmp_path / "logs") as w:
        w.scalars(1, {"loss": jnp.float32(0.25), "bad": float("inf")}, prefix="train/")
        w.scalars(2, {"loss": 0.125}, prefix="train/")
        w.images(2, {"heat": np.random.rand(8, 8)})
    recs = metric_writer.read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["train/loss"] == 0.25 and recs[0]["train/bad"] is None
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").iterdir())
    off = metric_writer.MetricWriter(tmp_path / "off", enabled=False)
    off.scalars(1, {"a": 1})
    assert not (tmp_path / "off").exists()


def test_metric_writer_drops_steps_after_the_resumed_checkpoint(tmp_path):
    with metric_writer.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
        for step in range(1, 6):
            w.scalars(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line cut by the kill
    with metric_writer.MetricWriter(tmp_path, enabled=True, tensorboard=False, resume_step=3) as w:
        w.scalars(4, {"loss": 40.0})
    rows = metric_writer.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 40.0
