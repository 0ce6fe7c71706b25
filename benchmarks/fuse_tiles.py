"""Benchmark: the seam error of tiled fusion (``fuse --tile T --overlap O``) against untiled fusion.

    python benchmarks/fuse_tiles.py [--pair ../shared/data/M3FD 00000.png] [--tile 256]
        [--overlaps 0 16 32 64] [--dim 16 --num-blocks 2] [--checkpoint CKPT]

Fuses one real pair (the visible luma with the infrared, as ``fuse`` does) whole and in
T x T tiles, and prints for each overlap the difference of the 8-bit outputs: max and mean
absolute difference (levels), PSNR of the tiled result against the untiled one, and the mean
absolute difference inside an 8-pixel band around the tile boundaries vs. elsewhere (the
"seam" excess). Without ``--checkpoint`` the DCEvo has random weights of a small
configuration (no trained weights can be downloaded here): the numbers then indicate the
order of magnitude only.
"""

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from evafusion_jax import fuse
from evafusion_jax.data import image_io
from evafusion_jax.models import dcevo


def _boundary_band(h, w, tile, overlap, band=8):
    m = np.zeros((h, w), bool)
    for starts, n, axis in ((fuse.tile_starts(h, min(tile, h), overlap), h, 0),
                            (fuse.tile_starts(w, min(tile, w), overlap), w, 1)):
        for s in starts[1:]:
            for edge in (s, s + overlap):  # where one tile's ramp starts and ends
                lo, hi = max(0, edge - band), min(n, edge + band)
                if axis == 0:
                    m[lo:hi] = True
                else:
                    m[:, lo:hi] = True
    return m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pair", nargs=2, default=(str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                                    / "M3FD"), "00000.png"), metavar=("DIR", "NAME"))
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlaps", type=int, nargs="+", default=(0, 16, 32, 64))
    p.add_argument("--checkpoint", help="a DCEvo checkpoint (default: random small DCEvo)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=2)
    a = p.parse_args()
    root, name = Path(a.pair[0]), a.pair[1]
    ir = image_io.read_image(root / "ir" / name)
    vi = image_io.read_image(root / "vi" / name)
    ir_y, vi_y, _ = fuse.prepare_pair(ir, vi)
    if a.checkpoint:
        params, cfg = fuse.load_model(a.checkpoint)
    else:
        cfg = dcevo.DCEvoConfig(dim=a.dim, num_blocks=a.num_blocks, c2f_n=1, detail_layers=1, heads=2)
        params = dcevo.init_params(cfg, jax.random.PRNGKey(0))
    h, w = ir_y.shape[:2]
    t0 = time.perf_counter()
    whole = image_io.to_uint8(fuse.Fuser(params, cfg, bucket=32)(ir_y, vi_y)).astype(np.float64)
    print(f"pair {root.name}/{name} {w}x{h}; DCEvo {'checkpoint' if a.checkpoint else 'random'} "
          f"dim={cfg.dim} blocks={cfg.num_blocks}; untiled {time.perf_counter() - t0:.1f} s")
    print("| tile | overlap | max abs (levels) | mean abs (levels) | PSNR (dB) | mean abs near seams | elsewhere |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for ov in a.overlaps:
        fu = fuse.Fuser(params, cfg, bucket=32, tile=a.tile, overlap=ov)
        tiled = image_io.to_uint8(fu(ir_y, vi_y)).astype(np.float64)
        d = np.abs(tiled - whole)[..., 0]
        mse = float(np.mean(d ** 2))
        psnr = 10 * np.log10(255.0 ** 2 / mse) if mse > 0 else float("inf")
        band = _boundary_band(*fu.padded_shape(h, w), a.tile, ov)[:h, :w]
        print(f"| {a.tile} | {ov} | {d.max():.0f} | {d.mean():.3f} | {psnr:.1f} | "
              f"{d[band].mean():.3f} | {d[~band].mean():.3f} |")


if __name__ == "__main__":
    main()
