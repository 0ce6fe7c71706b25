"""evafusion_jax.models.reward_model: golden parity with the released RAHF, both head layouts, API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_utils import load_manifest, load_npz, rel_l2, reward_state_dict

from evafusion_jax.convert.reward_from_torch import convert_state_dict
from evafusion_jax.models import reward_model as rm
from evafusion_jax.models import vit

VIT_CFG = dict(load_manifest("reward")["vit_config"], model_type="vit")


@pytest.fixture(scope="module")
def golden():
    sd = reward_state_dict()
    params, cfg, skipped = convert_state_dict(sd, None, "golden", VIT_CFG)
    inputs = {k: jnp.asarray(v.transpose(0, 2, 3, 1)) for k, v in load_npz("reward", "inputs").items()}
    return sd, params, cfg, skipped, inputs, load_npz("reward", "outputs")


def _forward(params, cfg, inputs):
    with jax.default_matmul_precision("highest"):
        return jax.jit(lambda p, a, b, c: rm.apply(p, a, b, c, cfg))(
            params, inputs["ir"], inputs["vi"], inputs["fused"])


def test_golden_parity_multi_heads(golden):
    _, params, cfg, skipped, inputs, expected = golden
    assert cfg.multi_heads and cfg.vit.hidden_size == 64 and cfg.vit.num_attention_heads == 4
    assert set(skipped) == {
        "vit.pooler.dense.weight", "vit.pooler.dense.bias",
        "vit_fusion.pooler.dense.weight", "vit_fusion.pooler.dense.bias",
        "vit_fusion.layernorm.weight", "vit_fusion.layernorm.bias",
        "vit_fusion.embeddings.patch_embeddings.projection.weight",
        "vit_fusion.embeddings.patch_embeddings.projection.bias"}
    out = _forward(params, cfg, inputs)
    for t in rm.SCORE_TYPES:
        got = np.asarray(out["scores"][t])
        assert got.shape == (2,)
        assert np.abs(got - expected[f"score_{t}"]).max() <= 2e-6, t
    hm = np.asarray(out["heatmaps"]["artifact_heatmap"])
    assert hm.shape == (2, 64, 64)
    assert rel_l2(hm, expected["heatmap_artifact"]) <= 1e-5


def test_golden_parity_single_head_layout(golden):
    """multi_heads=False: one heatmap head and one score head shared by all score types.
    Built from the golden Overall_Score / artifact_heatmap heads, it must reproduce them."""
    sd, _, _, _, inputs, expected = golden
    single = {}
    for k, v in sd.items():
        if k.startswith("heatmap_predictor.artifact_heatmap."):
            single[k.replace("heatmap_predictor.artifact_heatmap.", "heatmap_predictor.")] = v
        elif k.startswith("score_predictor.Overall_Score."):
            single[k.replace("score_predictor.Overall_Score.", "score_predictor.")] = v
        elif not k.startswith(("heatmap_predictor.", "score_predictor.")):
            single[k] = v
    params, cfg, _ = convert_state_dict(single, None, "single", VIT_CFG)
    assert not cfg.multi_heads
    assert set(params["score_predictor"]) == {f"conv_layers_{i}" for i in (0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16)} | {
        "linear_layers_0", "linear_layers_2", "linear_layers_4"}
    out = _forward(params, cfg, inputs)
    for t in rm.SCORE_TYPES:
        assert np.abs(np.asarray(out["scores"][t]) - expected["score_Overall_Score"]).max() <= 2e-6
    assert rel_l2(out["heatmaps"]["artifact_heatmap"], expected["heatmap_artifact"]) <= 1e-5


def test_cli_conversion_through_torch_file(golden, tmp_path):
    torch = pytest.importorskip("torch")
    from evafusion_jax.convert import reward_from_torch
    from evafusion_jax.storage import checkpoints

    sd, _, _, _, inputs, expected = golden
    src = tmp_path / "model_best.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
    cfg_file = tmp_path / "vit_config.json"
    import json
    cfg_file.write_text(json.dumps(VIT_CFG))
    assert reward_from_torch.main([str(src), str(tmp_path / "ck"), "--vit-config", str(cfg_file)]) == 0
    params, cfg_dict = checkpoints.load_params(tmp_path / "ck", "reward")
    cfg = rm.RewardConfig.from_dict(cfg_dict)
    out = _forward(params, cfg, inputs)
    assert np.abs(np.asarray(out["scores"]["Overall_Score"]) - expected["score_Overall_Score"]).max() <= 2e-6


@pytest.fixture(scope="module")
def tiny():
    cfg = rm.RewardConfig.tiny()
    params = rm.init_params(cfg, jax.random.PRNGKey(0))
    fns = dict(apply=jax.jit(lambda p, a, b, c: rm.apply(p, a, b, c, cfg)),
               encode=jax.jit(lambda p, x: rm.encode(p, x, cfg)),
               head=jax.jit(lambda p, a, b, c: rm.head(p, a, b, c, cfg)))
    return cfg, params, fns


def test_encode_head_split_matches_apply(tiny):
    cfg, params, fns = tiny
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    ir, vi, fu = (jax.random.uniform(kk, (2, 32, 32, 3), minval=-1, maxval=1) for kk in k)
    full = fns["apply"](params, ir, vi, fu)
    t_ir, t_vi = fns["encode"](params, ir), fns["encode"](params, vi)
    assert t_ir.shape == (2, 16, 32)
    split = fns["head"](params, t_ir, t_vi, fns["encode"](params, fu))
    for t in cfg.score_types:
        np.testing.assert_allclose(split["scores"][t], full["scores"][t], rtol=1e-6, atol=1e-6)
        assert np.all((np.asarray(full["scores"][t]) > 0) & (np.asarray(full["scores"][t]) < 1))
    np.testing.assert_allclose(split["heatmaps"]["artifact_heatmap"], full["heatmaps"]["artifact_heatmap"],
                               atol=1e-6)
    assert full["heatmaps"]["artifact_heatmap"].shape == (2, 32, 32)
    # the fused image matters
    other = fns["head"](params, t_ir, t_vi, t_vi)
    assert not np.allclose(other["scores"]["Overall_Score"], full["scores"]["Overall_Score"])
    with pytest.raises(ValueError, match="tokens_vi must have shape"):
        rm.head(params, t_ir, t_vi[:, :3], t_ir, cfg)


def test_preprocess_gray_resize_normalise():
    cfg = rm.RewardConfig.tiny()
    img = jnp.full((1, 20, 24, 1), 0.75)
    pix = rm.preprocess(img, cfg)
    assert pix.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(pix, 0.5, atol=1e-6)  # (0.75 - 0.5) / 0.5
    ramp = jnp.linspace(0, 1, 64).reshape(1, 1, 64, 1) * jnp.ones((1, 64, 1, 1))
    pix = rm.preprocess(ramp, cfg)  # 2x downsampling with PIL's bilinear (triangle) filter
    from PIL import Image
    expected = np.asarray(Image.fromarray(np.asarray(ramp[0, ..., 0]), "F").resize(
        (32, 32), Image.BILINEAR))[0]
    np.testing.assert_allclose(pix[0, 0, :, 0], (expected - 0.5) / 0.5, atol=1e-6)
    # in the interior a linear ramp is still the mean of each pair of pixels
    pairs = (np.linspace(0, 1, 64).reshape(32, 2).mean(1) - 0.5) / 0.5
    np.testing.assert_allclose(pix[0, 0, 1:-1, 0], pairs[1:-1], atol=1e-6)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        rm.preprocess(jnp.zeros((1, 8, 8, 2)), cfg)


def test_score_images_accepts_any_size(tiny):
    cfg, params, _ = tiny
    ir = jnp.full((1, 40, 50, 1), 0.3)
    vi = jnp.full((1, 40, 50, 3), 0.6)
    out = jax.jit(lambda p, a, b, c: rm.score_images(p, a, b, c, cfg))(params, ir, vi, (ir + vi) / 2)
    assert out["scores"]["Sharpness"].shape == (1,)


def test_init_from_backbone_and_mixer_copy():
    cfg = rm.RewardConfig.tiny()
    backbone = vit.init_params(cfg.vit, jax.random.PRNGKey(7))
    params = rm.init_params(cfg, jax.random.PRNGKey(0), mixer_init="copy_backbone", backbone=backbone)
    np.testing.assert_array_equal(params["vit"]["encoder"]["layer_0"]["output"]["kernel"],
                                  backbone["encoder"]["layer_0"]["output"]["kernel"])
    np.testing.assert_array_equal(params["vit_fusion"]["encoder"]["layer_0"]["attention"]["query"]["kernel"],
                                  backbone["encoder"]["layer_0"]["attention"]["query"]["kernel"])
    assert "layernorm" not in params["vit_fusion"]
    random_mixer = rm.init_params(cfg, jax.random.PRNGKey(0), backbone=backbone)
    assert not np.allclose(random_mixer["vit_fusion"]["embeddings"]["cls_token"],
                           backbone["embeddings"]["cls_token"])
    wrong = vit.init_params(vit.ViTConfig.tiny(hidden_size=48, num_attention_heads=2), 0)
    with pytest.raises(ValueError, match="shape"):
        rm.init_params(cfg, jax.random.PRNGKey(0), backbone=wrong)
    mask = rm.frozen_mask(params)
    assert mask["vit"]["layernorm"]["scale"] and mask["vit_fusion"]["embeddings"]["cls_token"]
    assert not mask["projection"]["kernel"]
    assert not rm.frozen_mask(params, train_mixer=True)["vit_fusion"]["embeddings"]["cls_token"]


def test_config_validation_and_round_trip():
    cfg = rm.RewardConfig.tiny(multi_heads=False)
    assert rm.RewardConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="upsamplings"):
        rm.RewardConfig.tiny(deconv_channels=(8, 8))
    with pytest.raises(ValueError, match="dtype"):
        rm.RewardConfig.tiny(dtype="int8")
    assert rm.RewardConfig().vit.image_size == 384


def test_bfloat16_reward_model_close_to_float32(tiny):
    cfg, params, fns = tiny
    x = jax.random.uniform(jax.random.PRNGKey(3), (1, 32, 32, 3), minval=-1, maxval=1)
    a = fns["apply"](params, x, x, x)
    bcfg = cfg.replace(dtype="bfloat16")
    b = jax.jit(lambda p, x: rm.apply(p, x, x, x, bcfg))(params, x)
    assert abs(float(a["scores"]["Overall_Score"][0]) - float(b["scores"]["Overall_Score"][0])) < 0.02
