"""Tests for evafusion_jax.train.feature_cache (the frozen backbone's token cache)."""

import json
import os

import jax
import numpy as np
import pytest

from evafusion_jax.models import reward_model as rm
from evafusion_jax.train import feature_cache

CFG = rm.RewardConfig.tiny()


@pytest.fixture(scope="module")
def params():
    return jax.tree_util.tree_map(np.asarray, rm.init_params(CFG, jax.random.PRNGKey(0)))


def _write_data(tmp_path, n=12):
    from evafusion_jax.data import synthetic
    return synthetic.write_feedback_folder(tmp_path / "data", n, seed=1, size=32)


def test_feature_cache_build_reuse_invalidate(tmp_path, params):
    from evafusion_jax.data import feedback as fd
    data = _write_data(tmp_path)
    src = fd.open_split(data, "train")
    root = tmp_path / "cache"
    c1 = feature_cache.build_feature_cache(src, params["vit"], CFG, root, dtype="float32", batch_size=4)
    man = json.loads((root / "train" / "manifest.json").read_text())
    assert man["complete"] and man["num_records"] == len(src)
    # IR/visible images are shared by nothing here: 3 unique images per record at most
    assert man["num_unique_images"] <= 3 * len(src)
    ex = fd.preprocess_example(src[3], 32)
    item = c1[3]
    want = np.asarray(rm.encode(params, ex["fused"][None], CFG))[0]
    np.testing.assert_allclose(item["tok_fused"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(item["heatmap"], ex["heatmap"])
    np.testing.assert_array_equal(item["scores"], ex["scores"])
    mtime = (root / "train" / "tokens.npy").stat().st_mtime_ns

    # Same backbone, data, preprocessing and dtype: reused, not rebuilt.
    c2 = feature_cache.build_feature_cache(src, params["vit"], CFG, root, dtype="float32")
    assert (root / "train" / "tokens.npy").stat().st_mtime_ns == mtime
    assert c2.manifest["key"] == c1.manifest["key"]

    # Backbone changed -> new key, rebuilt.
    vit2 = jax.tree_util.tree_map(lambda x: x * 1.01, params["vit"])
    c3 = feature_cache.build_feature_cache(src, vit2, CFG, root, dtype="float32")
    assert c3.manifest["key"] != c1.manifest["key"]

    # Data changed (a file rewritten) -> rebuilt; float16 storage keeps values close.
    f = sorted((data / "fused").iterdir())[0]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    c4 = feature_cache.build_feature_cache(src, vit2, CFG, root, dtype="float16")
    assert c4.manifest["key"] not in (c1.manifest["key"], c3.manifest["key"])
    assert c4[0]["tok_fused"].dtype == np.float16
    c5 = feature_cache.build_feature_cache(src, vit2, CFG, root, dtype="bfloat16", name="bf")
    np.testing.assert_allclose(np.asarray(c5[3]["tok_ir"], np.float32),
                               np.asarray(c4[3]["tok_ir"], np.float32), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="dtype"):
        feature_cache.build_feature_cache(src, vit2, CFG, root, dtype="int8")
