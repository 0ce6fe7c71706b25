"""Human-feedback preprocessing and grain loaders (evafusion_jax.data.feedback)."""


import numpy as np
import pytest
from PIL import Image

from evafusion_jax.data import feedback as fd
from evafusion_jax.data import synthetic


@pytest.fixture(scope="module")
def synth_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fb") / "synthetic"
    return synthetic.write_feedback_folder(root, 10, seed=3, size=16,
                                           split_fractions=(0.6, 0.2, 0.2))


def test_preprocess_matches_released_processors():
    """PIL bilinear + /255 + (x - .5)/.5 like ViTImageProcessor (PIL backend); heatmap like
    torchvision Resize + ToTensor on a grayscale PIL image, as the released script does."""
    transformers = pytest.importorskip("transformers")
    tvt = pytest.importorskip("torchvision.transforms")
    try:  # transformers >= 5: the PIL backend; 4.x: ViTImageProcessor itself uses PIL
        from transformers.models.vit.image_processing_pil_vit import (
            ViTImageProcessorPil as Proc,
        )
    except ImportError:
        Proc = transformers.ViTImageProcessor
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    heat = np.zeros((37, 53), np.uint8)
    heat[5:20, 10:30] = 255
    rec = {"ir": gray, "vi": rgb, "fused": rgb, "heatmap": heat,
           "scores": np.array([1, 2, 3, 4, 5], np.float32), "index": 7}
    out = fd.preprocess_example(rec, image_size=24)
    proc = Proc(size={"height": 24, "width": 24})
    ref_rgb = proc(Image.fromarray(rgb), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ref_ir = proc(Image.fromarray(gray).convert("RGB"),
                  return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(out["vi"], ref_rgb, atol=1e-6)
    np.testing.assert_allclose(out["ir"], ref_ir, atol=1e-6)
    ref_h = tvt.Compose([tvt.Resize((24, 24)), tvt.ToTensor()])(Image.fromarray(heat, "L"))
    np.testing.assert_allclose(out["heatmap"], ref_h.numpy()[0], atol=1e-6)
    np.testing.assert_allclose(out["scores"], [0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-6)
    assert out["vi"].dtype == np.float32 and out["vi"].shape == (24, 24, 3)
    assert not out["heatmap_empty"] and out["index"] == 7
    rec["heatmap"] = np.zeros_like(heat)
    assert fd.preprocess_example(rec, image_size=24)["heatmap_empty"]


# ------------------------------------------------------------------------ folder layout


def _take(it, k):
    return [next(it) for _ in range(k)]


def _eq(a, b):
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_loader_resume_from_state_gives_same_batches(synth_folder):
    src = fd.open_split(synth_folder, "all")  # 10 records
    mk = lambda: fd.make_loader(src, batch_size=2, seed=4, num_epochs=3, image_size=8,  # noqa
                                shard_index=0, shard_count=1)
    it = iter(mk())
    first = _take(it, 7)  # crosses the epoch boundary (5 batches per epoch)
    state = it.get_state()
    rest = list(it)
    assert len(rest) == 8
    it2 = iter(mk())
    it2.set_state(state)
    assert _eq(list(it2), rest)
    # deterministic with the seed; another seed gives another order; epochs reshuffle
    assert _eq(_take(iter(mk()), 7), first)
    other = _take(iter(fd.make_loader(src, 2, seed=5, num_epochs=1, image_size=8,
                                      shard_index=0, shard_count=1)), 5)
    order = lambda bs: np.concatenate([b["index"] for b in bs]).tolist()  # noqa: E731
    assert order(other) != order(first[:5])
    epoch1, epoch2 = order(first[:5]), order(first[5:] + rest[:3])
    assert sorted(epoch1) == sorted(epoch2) == list(range(10))
    assert epoch1 != epoch2 and epoch1 != sorted(epoch1)  # shuffled, reshuffled per epoch
    b = first[0]
    assert b["fused"].shape == (2, 8, 8, 3) and b["scores"].shape == (2, 5)
    assert b["heatmap"].shape == (2, 8, 8) and b["heatmap_empty"].dtype == np.bool_


def test_loader_sharding_and_errors(synth_folder):
    src = fd.open_split(synth_folder, "all")
    seen = []
    for i in range(2):
        ld = fd.make_loader(src, batch_size=2, seed=0, shuffle=True, shard_index=i, shard_count=2,
                            image_size=8, drop_remainder=False)
        seen.append(np.concatenate([b["index"] for b in ld]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(src)))
    ld = fd.make_loader(src, batch_size=4, shuffle=False, shard_index=0, shard_count=1,
                        image_size=8, drop_remainder=False)
    idx = [b["index"].tolist() for b in ld]
    assert idx == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(fd.FeedbackDataError, match="fewer than batch_size=6"):
        fd.make_loader(src, batch_size=6, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="both shard_index and shard_count"):
        fd.make_loader(src, batch_size=2, shard_index=0)
    # map_fn replaces preprocessing; default sharding follows the JAX process (1 process here)
    ld = fd.make_loader(src, batch_size=5, shuffle=False, map_fn=lambda r: {"i": r["index"]})
    assert [b["i"].tolist() for b in ld] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
