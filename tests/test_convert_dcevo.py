"""Tests of convert/dcevo_from_torch.py: strict key mapping, CLI/Orbax path, exact export round trip."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from golden_utils import dcevo_checkpoint, load_manifest, load_npz, rel_l2

from evafusion_jax.convert.common import ConversionError
from evafusion_jax.convert.dcevo_from_torch import (
    GROUPS,
    flax_path_to_torch_key,
    infer_config,
    main,
    params_to_torch,
    torch_to_params,
)
from evafusion_jax.models import dcevo
from evafusion_jax.models.dcevo import DCEvoConfig
from evafusion_jax.storage import checkpoints

TINY = DCEvoConfig.tiny()


@pytest.fixture(scope="module")
def golden_ckpt():
    return dcevo_checkpoint()


@pytest.fixture(scope="module")
def tiny_ckpt():
    """A tiny-config checkpoint in the released layout (via the exporter)."""
    import jax

    return params_to_torch(dcevo.init_params(TINY, jax.random.key(3)), TINY)


def _save_pth(obj, path):
    def to_torch(o):
        if isinstance(o, dict):
            return {k: to_torch(v) for k, v in o.items()}
        return torch.from_numpy(np.array(o)) if isinstance(o, np.ndarray) else o

    torch.save(to_torch(obj), path)
    return path


def _flat(params):
    from evafusion_jax.models.param_tree import flatten_tree

    return flatten_tree(params)


def test_key_mapping_rule():
    assert flax_path_to_torch_key("encoder_level1_0/net1/m_2/cv1/conv/kernel") == \
        "encoder_level1.0.net1.m.2.cv1.conv.weight"
    assert flax_path_to_torch_key("output_0/norm1/body/bias") == "output.0.norm1.body.bias"
    assert flax_path_to_torch_key("net_1/theta_rho/bottleneckBlock_8/kernel") == \
        "net.1.theta_rho.bottleneckBlock.8.weight"
    assert flax_path_to_torch_key("output_0/attn/temperature") == "output.0.attn.temperature"
    assert flax_path_to_torch_key("patch_embed/proj/kernel") == "patch_embed.proj.weight"


def test_infer_config_golden_and_tiny(golden_ckpt, tiny_ckpt):
    assert infer_config(golden_ckpt) == DCEvoConfig()
    assert infer_config(tiny_ckpt) == TINY


def test_export_matches_manifest_and_round_trips_exactly(golden_ckpt):
    params = torch_to_params(golden_ckpt, DCEvoConfig())
    # Layout: conv OIHW -> HWIO.
    w = golden_ckpt["DE_Decoder"]["module.output.2.weight"]
    np.testing.assert_array_equal(params["DE_Decoder"]["output_2"]["kernel"], w.transpose(2, 3, 1, 0))
    back = params_to_torch(params, DCEvoConfig())
    manifest = load_manifest("dcevo")
    assert sorted(back) == sorted(manifest) == sorted(GROUPS)
    for group, entries in manifest.items():
        want = {e["name"].split("/", 1)[1]: tuple(e["shape"]) for e in entries}
        got = {k: tuple(v.shape) for k, v in back[group].items()}
        assert got == want, group
        for k, v in back[group].items():
            assert v.dtype == np.float32
            assert np.array_equal(v, golden_ckpt[group][k]), f"{group}/{k} not bitwise equal"
    again = torch_to_params(back, DCEvoConfig())
    for k, v in _flat(params).items():
        assert np.array_equal(np.asarray(v), np.asarray(_flat(again)[k])), k


def test_keys_without_module_prefix_accepted(tiny_ckpt):
    plain = {g: {k[len("module."):]: v for k, v in sd.items()} for g, sd in tiny_ckpt.items()}
    a, b = torch_to_params(plain, TINY), torch_to_params(tiny_ckpt)
    for k, v in _flat(a).items():
        np.testing.assert_array_equal(v, _flat(b)[k])
    torch_tensors = params_to_torch(a, TINY, as_torch=True)
    assert isinstance(torch_tensors["DE_Encoder"]["module.patch_embed.proj.weight"], torch.Tensor)
    c = torch_to_params(torch_tensors, TINY)  # torch tensors are accepted too
    for k, v in _flat(a).items():
        np.testing.assert_array_equal(v, _flat(c)[k])


@pytest.mark.parametrize("mutation,match", [
    ("missing", r"missing key 'module\.output\.0\.attn\.temperature'"),
    ("unexpected", r"unexpected key\(s\) 'module\.output\.0\.attn\.extra\.weight'"),
    ("shape", r"'module\.reduce_channel\.weight' has shape \(8, 15, 1, 1\)"),
    ("missing_group", r"missing group\(s\) \['HighFreqExtractor'\]"),
    ("extra_group", r"unexpected top-level group\(s\) \['optimizer'\]"),
    ("group_not_dict", r"group 'LowFreqExtractor' is a ndarray"),
    ("mixed_prefix", r"mixes keys with and without"),
])
def test_conversion_errors_name_the_problem(tiny_ckpt, mutation, match):
    ck = copy.deepcopy(tiny_ckpt)
    dec = ck["DE_Decoder"]
    if mutation == "missing":
        del dec["module.output.0.attn.temperature"]
    elif mutation == "unexpected":
        dec["module.output.0.attn.extra.weight"] = np.zeros((1,), np.float32)
    elif mutation == "shape":
        dec["module.reduce_channel.weight"] = np.zeros((8, 15, 1, 1), np.float32)
    elif mutation == "missing_group":
        del ck["HighFreqExtractor"]
    elif mutation == "extra_group":
        ck["optimizer"] = {}
    elif mutation == "group_not_dict":
        ck["LowFreqExtractor"] = np.zeros(3, np.float32)
    elif mutation == "mixed_prefix":
        dec["output.5.weight"] = dec.pop("module.output.5.weight")
    with pytest.raises(ConversionError, match=match):
        torch_to_params(ck, TINY)
    if mutation in ("missing", "missing_group", "group_not_dict"):
        with pytest.raises(ConversionError, match=match):
            infer_config(ck)


def test_wrong_config_is_an_error(tiny_ckpt):
    with pytest.raises(ConversionError, match="missing key 'module.encoder_level1.1"):
        torch_to_params(tiny_ckpt, DCEvoConfig.tiny(num_blocks=2))
    with pytest.raises(ConversionError, match="has shape"):
        torch_to_params(tiny_ckpt, DCEvoConfig.tiny(dim=16))


@pytest.mark.parametrize("content", ["text", "tensor", "list"])
def test_cli_rejects_files_that_are_not_dcevo_checkpoints(tmp_path, content, caplog):
    src = tmp_path / "bad.pth"
    if content == "text":
        src.write_text("this is not a checkpoint\n")
        match = "not a readable PyTorch checkpoint"
    elif content == "tensor":
        torch.save(torch.zeros(3), src)
        match = "holds a ndarray, not the DCEvo checkpoint"
    else:
        torch.save([1, 2], src)
        match = "holds a list"
    out = tmp_path / "out"
    assert main([str(src), str(out)]) == 2
    assert match in caplog.text
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pth"]  # no temp folders left behind


def test_cli_convert_golden_then_export(tmp_path, golden_ckpt, caplog):
    """.pth -> CLI -> Orbax -> load_params -> golden parity; then --export -> .pth bitwise equal."""
    src = _save_pth(golden_ckpt, tmp_path / "DCEvo_fusion.pth")
    out = tmp_path / "dcevo_ckpt"
    assert main([str(src), str(out)]) == 0
    params, cfg_dict = checkpoints.load_params(out, expected_kind="dcevo")
    config = DCEvoConfig.from_dict(cfg_dict)
    assert config == DCEvoConfig()
    ref = torch_to_params(golden_ckpt, config)
    for k, v in _flat(ref).items():
        assert np.array_equal(np.asarray(_flat(params)[k]), np.asarray(v)), k

    inputs, golden = load_npz("dcevo", "inputs"), load_npz("dcevo", "outputs")
    ir, vi = (np.ascontiguousarray(inputs[n].transpose(0, 2, 3, 1)) for n in ("ir", "vi"))
    fused = np.asarray(dcevo.fuse_with_features(params, ir, vi, config)["fused"])
    want = golden["fused"].transpose(0, 2, 3, 1)
    assert rel_l2(fused, want) <= 1e-5
    assert np.max(np.abs(fused - want)) <= 1e-5

    # Existing output without --overwrite is refused and left intact.
    assert main([str(src), str(out)]) == 2
    assert "already exists" in caplog.text
    assert checkpoints.read_config(out)["kind"] == "dcevo"

    exported = tmp_path / "exported.pth"
    assert main(["--export", str(out), str(exported)]) == 0
    loaded = torch.load(exported, map_location="cpu", weights_only=True)
    assert sorted(loaded) == sorted(GROUPS)
    for g in GROUPS:
        assert sorted(loaded[g]) == sorted(golden_ckpt[g])
        for k, v in loaded[g].items():
            assert isinstance(v, torch.Tensor) and v.dtype == torch.float32
            assert np.array_equal(v.numpy(), golden_ckpt[g][k]), f"{g}/{k}"
    assert main(["--export", str(out), str(exported)]) == 2  # no silent overwrite
    assert main(["--export", str(out), str(exported), "--overwrite"]) == 0


def test_cli_config_json(tmp_path, tiny_ckpt, caplog):
    src = _save_pth(tiny_ckpt, tmp_path / "tiny.pth")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(TINY.to_dict()))
    out = tmp_path / "ck"
    assert main([str(src), str(out), "--config-json", str(good)]) == 0
    assert checkpoints.read_config(out)["config"] == TINY.to_dict()
    # Our own checkpoint's config.json is accepted as --config-json too.
    assert main([str(src), str(out), "--config-json", str(out / "config.json"), "--overwrite"]) == 0

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(DCEvoConfig.tiny(c2f_n=2).to_dict()))
    out2 = tmp_path / "ck2"
    assert main([str(src), str(out2), "--config-json", str(bad)]) == 2
    assert "does not match the given config" in caplog.text and "c2f_n" in caplog.text
    assert not out2.exists()
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert main([str(src), str(out2), "--config-json", str(garbage)]) == 2
    assert "not valid JSON" in caplog.text
