"""Benchmark: DCEvo fusion throughput at 640x480, and the effect of bucket padding.

    python benchmarks/fuse.py [--size 480 640] [--repeats 5] [--config full|tiny] [--pad-check-size 128 160]

Uses random weights (``dcevo.init_params``, PyTorch-style initialisation) of the
release architecture (``DCEvoConfig()``); speed does not depend on the values. Prints:

* the first call (compilation + one run) and the steady-state images/s at
  batch size 1 on whatever JAX backend is active (CPU here);
* how much bucket padding changes the output: a (H-10)x(W-10) pair fused
  unpadded vs reflect-padded to the 32-multiple HxW bucket of ``--pad-check-size``
  (max / mean absolute difference in 8-bit levels, overall and outside a
  16-pixel border band). With random weights this only indicates the order of
  magnitude.
"""

import argparse
import time

import jax
import numpy as np
from scipy import ndimage

from evafusion_jax import fuse
from evafusion_jax.models import dcevo


def _images(h, w, seed=0):
    rng = np.random.default_rng(seed)
    ir = ndimage.gaussian_filter(rng.random((h, w)), 3)
    vi = ndimage.gaussian_filter(rng.random((h, w)), 1)
    ir, vi = [((x - x.min()) / (x.max() - x.min())).astype(np.float32)[..., None] for x in (ir, vi)]
    return ir, vi


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--config", choices=("full", "tiny"), default="full")
    p.add_argument("--pad-check-size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"),
                   help="bucket size for the padding check (smaller than --size: it compiles two more shapes)")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args()
    config = dcevo.DCEvoConfig() if args.config == "full" else dcevo.DCEvoConfig.tiny()
    params = dcevo.init_params(config, jax.random.PRNGKey(0))
    fuser = fuse.Fuser(params, config, bucket=32)
    if not args.skip_throughput:
        throughput(fuser, config, *args.size, args.repeats)
    padding_effect(params, config, fuser, *args.pad_check_size)


def throughput(fuser, config, h, w, repeats):
    ir, vi = _images(h, w)
    t0 = time.perf_counter()
    fuser(ir, vi)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        fuser(ir, vi)
    per = (time.perf_counter() - t0) / repeats
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), DCEvo dim {config.dim}, {w}x{h}: "
          f"first call (compile + run) {first:.1f} s; {1 / per:.3f} images/s ({per:.2f} s/image, batch 1)")


def padding_effect(params, config, fuser, h, w):
    """(h-10)x(w-10) fused unpadded vs reflect-padded to the bucket (h, w)."""
    ir, vi = _images(h, w, seed=1)
    hs, ws = h - 10, w - 10
    a, b = ir[:hs, :ws], vi[:hs, :ws]
    exact = fuse.Fuser(params, config, bucket=1)(a, b)
    padded = fuser(a, b)
    d = np.abs(exact - padded)[..., 0] * 255
    band = 16
    inner = d[band:-band, band:-band]
    print(f"padding {ws}x{hs} -> {fuser.padded_shape(hs, ws)[1]}x{fuser.padded_shape(hs, ws)[0]}: |diff| in 8-bit "
          f"levels max {d.max():.3f}, mean {d.mean():.4f}; >{band} px from the border: max {inner.max():.3f}, "
          f"mean {inner.mean():.4f}")


if __name__ == "__main__":
    main()
