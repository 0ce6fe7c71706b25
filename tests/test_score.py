"""score CLI input checks: the size rule it shares with evaluate, the decode pre-pass (no model needed:
both fail before the checkpoint is read)."""

import numpy as np
import pytest
from PIL import Image

from evafusion_jax import evaluate, image_io, score


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
