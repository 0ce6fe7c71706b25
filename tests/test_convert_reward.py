"""convert/reward_from_torch: error paths (parity lives in test_reward_model.py)."""

import numpy as np
import pytest
from golden_utils import load_manifest, reward_state_dict

from evafusion_jax.convert import reward_from_torch
from evafusion_jax.convert.common import ConversionError

VIT_CFG = dict(load_manifest("reward")["vit_config"], model_type="vit")


@pytest.fixture(scope="module")
def sd():
    return reward_state_dict()


def _convert(d):
    return reward_from_torch.convert_state_dict(d, None, "ckpt.pt", VIT_CFG)


def test_missing_key(sd):
    d = dict(sd)
    del d["score_predictor.Sharpness.linear_layers.2.bias"]
    with pytest.raises(ConversionError, match="missing key 'score_predictor.Sharpness.linear_layers.2.bias'"):
        _convert(d)


def test_unexpected_key(sd):
    d = dict(sd, **{"heatmap_predictor.artifact_heatmap.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match="unexpected key.*extra.weight"):
        _convert(d)


def test_wrong_shape(sd):
    d = dict(sd)
    d["vit_fusion.encoder.layer.1.attention.attention.key.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(ConversionError, match=r"vit_fusion.encoder.layer.1.attention.attention.key.weight' has shape \(64, 32\)"):
        _convert(d)


def test_not_a_reward_checkpoint(sd, tmp_path):
    with pytest.raises(ConversionError, match="not an EVAFusion reward checkpoint"):
        _convert({"DE_Encoder": np.zeros(1)})
    bad = tmp_path / "x.pt"
    bad.write_text("hello")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        reward_from_torch.convert(bad, tmp_path / "out")
    with pytest.raises(ConversionError, match="no such file"):
        reward_from_torch.convert(tmp_path / "missing.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vit_config_mismatch_and_nonstandard_width(sd):
    with pytest.raises(ConversionError, match="hidden_size=64, but the given ViT config says hidden_size=128"):
        reward_from_torch.convert_state_dict(sd, None, "ckpt.pt", dict(VIT_CFG, hidden_size=128,
                                                                      num_attention_heads=4))
    with pytest.raises(ConversionError, match="not a standard ViT width"):
        reward_from_torch.convert_state_dict(sd, None, "ckpt.pt", None)


def test_cli_returns_error_code(tmp_path):
    assert reward_from_torch.main([str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 2
