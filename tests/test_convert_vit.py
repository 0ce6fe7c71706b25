"""convert/vit_from_hf: parity with transformers.ViTModel and strict key checking."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from evafusion_jax.convert import vit_from_hf  # noqa: E402
from evafusion_jax.convert.common import ConversionError  # noqa: E402
from evafusion_jax.models import vit  # noqa: E402
from evafusion_jax.storage import checkpoints

CONFIGS = {
    "small_bias": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, layer_norm_eps=1e-12, qkv_bias=True),
    "odd_nobias": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=80,
                       image_size=48, patch_size=16, layer_norm_eps=1e-6, qkv_bias=False, num_channels=3),
}


def _save_tiny(tmp_path, name, safe=True, classification=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(**CONFIGS[name])
    model = (transformers.ViTForImageClassification(cfg) if classification
             else transformers.ViTModel(cfg)).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters and embeddings
        for n, p in model.named_parameters():
            if "layernorm" in n or "cls_token" in n or "position" in n:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / f"{name}_{'cls' if classification else 'model'}"
    model.save_pretrained(folder)
    if not safe:  # transformers 5 writes safetensors only; make the classic .bin of older releases
        sd = {k: torch.from_numpy(v) for k, v in load_file(str(folder / "model.safetensors")).items()}
        torch.save(sd, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return model, folder


def _reference_tokens(model, x_nhwc):
    with torch.no_grad():
        base = model.vit if hasattr(model, "vit") else model
        return base(pixel_values=torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2))).last_hidden_state.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(tmp_path, name):
    model, folder = _save_tiny(tmp_path, name)
    out = vit_from_hf.convert(folder, tmp_path / "ckpt")
    params, cfg_dict = checkpoints.load_params(out, "vit")
    cfg = vit.ViTConfig.from_dict(cfg_dict)
    assert cfg.layer_norm_eps == CONFIGS[name]["layer_norm_eps"]
    x = np.random.default_rng(1).uniform(-1, 1, (2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(vit.apply(params, x, cfg))
    ref = _reference_tokens(model, x)
    assert ours.shape == ref.shape == (2, cfg.num_patches + 1, cfg.hidden_size)
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert err <= 1e-5, err


def test_pytorch_bin_and_classification_prefix(tmp_path):
    model, folder = _save_tiny(tmp_path, "small_bias", safe=False, classification=True, seed=3)
    assert (folder / "pytorch_model.bin").is_file()
    cfg, sd, _ = vit_from_hf.read_hf_folder(folder)
    params, skipped = vit_from_hf.convert_state_dict(sd, cfg)
    assert any(k.startswith("classifier.") for k in skipped)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(vit.apply(params, x, cfg))
    ref = _reference_tokens(model, x)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-5


def test_state_dict_round_trip(tmp_path):
    _, folder = _save_tiny(tmp_path, "odd_nobias")
    cfg, sd, _ = vit_from_hf.read_hf_folder(folder)
    params, skipped = vit_from_hf.convert_state_dict(sd, cfg)
    back = vit_from_hf.vit_params_to_state_dict(params)
    assert set(back) == set(sd) - set(skipped)
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k])


def _tamper(folder, fn):
    f = folder / "model.safetensors"
    sd = dict(load_file(str(f)))
    fn(sd)
    save_file(sd, str(f))


@pytest.mark.parametrize("case,match", [
    ("missing", "missing key 'encoder.layer.1.output.dense.weight'"),
    ("unexpected", "unexpected key.*'encoder.extra.weight'"),
    ("shape", r"key 'encoder.layer.0.intermediate.dense.weight' has shape \(64, 31\)"),
    ("extra_layer", "more encoder layers"),
])
def test_converter_key_errors(tmp_path, case, match):
    _, folder = _save_tiny(tmp_path, "small_bias")

    def edit(sd):
        if case == "missing":
            del sd["encoder.layer.1.output.dense.weight"]
        elif case == "unexpected":
            sd["encoder.extra.weight"] = np.zeros(3, np.float32)
        elif case == "shape":
            sd["encoder.layer.0.intermediate.dense.weight"] = np.zeros((64, 31), np.float32)
        else:
            for k in [k for k in sd if k.startswith("encoder.layer.0.")]:
                sd[k.replace("layer.0.", "layer.2.")] = sd[k]
    _tamper(folder, edit)
    with pytest.raises(ConversionError, match=match):
        vit_from_hf.convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converter_file_errors(tmp_path):
    with pytest.raises(ConversionError, match="is not a folder"):
        vit_from_hf.convert(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="config.json not found"):
        vit_from_hf.convert(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32,
                                                                 "num_attention_heads": 4}))
    with pytest.raises(ConversionError, match="neither model.safetensors"):
        vit_from_hf.convert(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "model.safetensors").write_text("not a safetensors file")
    with pytest.raises(ConversionError, match="not a readable safetensors"):
        vit_from_hf.convert(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="expected 'vit'"):
        vit_from_hf.convert(tmp_path / "empty", tmp_path / "out")


def test_cli_refuses_existing_output(tmp_path):
    _, folder = _save_tiny(tmp_path, "small_bias")
    assert vit_from_hf.main([str(folder), str(tmp_path / "ck")]) == 0
    assert vit_from_hf.main([str(folder), str(tmp_path / "ck")]) == 2
    assert vit_from_hf.main([str(folder), str(tmp_path / "ck"), "--overwrite"]) == 0


def test_init_from_pretrained_vit_folder_and_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")

    hf = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTModel(hf).save_pretrained(tmp_path / "hf")
    kw = dict(heatmap_channels=(32, 16), deconv_channels=(16, 16, 8), heatmap_last_channels=8,
              score_conv_divisors=(1, 2, 4, 8, 16, 32), score_hidden=(32, 16))
    p1, c1 = vit_from_hf.init_from_pretrained_vit(tmp_path / "hf", 0, **kw)
    vit_from_hf.convert(tmp_path / "hf", tmp_path / "vit_ckpt")
    p2, c2 = vit_from_hf.init_from_pretrained_vit(tmp_path / "vit_ckpt", 0, **kw)
    assert c1 == c2 and c1.vit.hidden_size == 32
    np.testing.assert_array_equal(p1["vit"]["layernorm"]["scale"], p2["vit"]["layernorm"]["scale"])
    np.testing.assert_array_equal(p1["vit"]["encoder"]["layer_0"]["output"]["kernel"],
                                  p2["vit"]["encoder"]["layer_0"]["output"]["kernel"])
    with pytest.raises(ValueError, match="names a ViT"):
        vit_from_hf.init_from_pretrained_vit(tmp_path / "vit_ckpt", 0, vit=vit.ViTConfig.tiny(hidden_size=64), **kw)
