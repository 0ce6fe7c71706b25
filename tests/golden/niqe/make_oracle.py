"""Computes the NIQE oracle values of ``oracle.json`` with BasicSR's ``calculate_niqe`` (not a test).

BasicSR (Apache-2.0) reproduces MATLAB's ``niqe`` ("the same results as MATLAB": 5.7296 for its
baboon.png) and cannot be installed next to this project's test environment (its requirements pull
``opencv-python`` and ``tb-nightly``, which overwrite ``opencv-python-headless`` and ``tensorboard``).
So it runs from its unpacked source distribution, importing only the three modules NIQE needs::

    pip download --no-deps --no-build-isolation -d /tmp/bsr basicsr==1.4.2
    tar xzf /tmp/bsr/basicsr-1.4.2.tar.gz -C /tmp/bsr
    PYTHONPATH=. python tests/golden/niqe/make_oracle.py --basicsr /tmp/bsr/basicsr-1.4.2 \\
        [--data ../shared/data]

(it needs numpy, scipy and torch, which the test environment has). Every image is first read as
grey levels with ``image_io.read_gray_levels(path, "cvtcolor")`` (bit-exact ``cv2.cvtColor``) and given
to BasicSR as an ``(H, W)`` array (``input_order="HW"``, ``crop_border=0``): what ``evaluate`` feeds
``niqe_matlab``. The synthetic images (``synthetic_images()``, exact integer arithmetic, so the
tests rebuild them bit for bit) cover the RoadScene size 597x161, flat regions, one-block images
and odd sizes; the real ones are every infrared and visible image of TNO, M3FD and FMB in
``../shared/data``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def synthetic_images() -> dict[str, np.ndarray]:
    """Deterministic ``uint8 (H, W)`` test images built with integer arithmetic only."""
    rng = np.random.default_rng(20261202)

    def textured(h, w, k):
        z = rng.integers(0, 256, (h + k, w + k)).astype(np.int64)
        c = np.cumsum(np.cumsum(np.pad(z, ((1, 0), (1, 0))), 0), 1)  # box sums of k x k
        box = c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]
        ramp = (np.arange(w)[None, :] * 60) // max(w - 1, 1)
        return np.clip(box // (k * k) + ramp + rng.integers(-20, 21, (h, w)) - 30, 0, 255).astype(np.uint8)

    roadscene = textured(161, 597, 5)
    flat = textured(250, 300, 3)
    flat[:, :120] = 77  # a constant left part: whole blocks with zero MSCN (NaN features)
    flat[100:, 200:] = 200
    return {"roadscene_597x161": roadscene, "flat_regions_300x250": flat,
            "one_block_150x120": textured(120, 150, 7), "odd_389x203": textured(203, 389, 2)}


def real_images(data: Path) -> dict[str, Path]:
    out = {}
    for ds in ("TNO", "M3FD", "FMB"):
        for role in ("ir", "vi"):
            folder = data / ds / role
            if folder.is_dir():
                for p in sorted(folder.iterdir()):
                    out[f"{ds}/{role}/{p.name}"] = p
    return out


def _load_basicsr_niqe(src: Path):
    """``basicsr.metrics.niqe`` without running ``basicsr/__init__.py`` (which imports all of BasicSR)."""
    def load(name, rel):
        spec = importlib.util.spec_from_file_location(name, src / rel)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    for pkg in ("basicsr", "basicsr.utils", "basicsr.metrics"):
        sys.modules[pkg] = types.ModuleType(pkg)
    color = load("basicsr.utils.color_util", "basicsr/utils/color_util.py")
    sys.modules["basicsr.utils"].bgr2ycbcr = color.bgr2ycbcr
    load("basicsr.utils.registry", "basicsr/utils/registry.py")
    load("basicsr.utils.matlab_functions", "basicsr/utils/matlab_functions.py")
    load("basicsr.metrics.metric_util", "basicsr/metrics/metric_util.py")
    return load("basicsr.metrics.niqe", "basicsr/metrics/niqe.py")


def main():
    repo = HERE.parents[2]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--basicsr", required=True, type=Path, help="unpacked basicsr-1.4.2 source distribution")
    p.add_argument("--data", type=Path, default=repo.parent / "shared" / "data")
    args = p.parse_args()
    import warnings

    from evafusion_jax.data import image_io
    warnings.simplefilter("ignore")  # BasicSR's NaN means of flat blocks, scipy.ndimage.filters
    niqe_mod = _load_basicsr_niqe(args.basicsr)
    calc = lambda g: float(niqe_mod.calculate_niqe(g.astype(np.float64), crop_border=0, input_order="HW"))
    values = {"synthetic": {}, "real": {}}
    for name, img in synthetic_images().items():
        try:
            values["synthetic"][name] = calc(img)
        except Exception as e:  # noqa: BLE001 - record what the reference does
            values["synthetic"][name] = f"error: {type(e).__name__}"
    for name, path in real_images(args.data).items():
        values["real"][name] = calc(image_io.read_gray_levels(path, "cvtcolor"))
    doc = {"source": "basicsr 1.4.2 calculate_niqe(img, crop_border=0, input_order='HW') on cvtColor grey levels",
           "values": values}
    (HERE / "oracle.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(json.dumps(values["synthetic"], indent=1), len(values["real"]), "real images")


if __name__ == "__main__":
    main()
