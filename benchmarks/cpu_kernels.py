"""The native CPU kernels of ``models/cpu_kernels`` alone, against the XLA formulations.

    python benchmarks/cpu_kernels.py [--repeats 20] [--devices 1]

For each kernel and shape (DCEvo's: 32 channels at 64x64 and 128x128, batch 1 and 2), times
the jitted kernel and the XLA formulation interleaved (median of ``--repeats``) and prints one
JSON line: milliseconds, GFLOP/s (2 per multiply-add) and the largest relative difference.
The XLA formulations are the ones used without the kernels: the shifted sum (depthwise
forward), the tap loop (depthwise kernel gradient) and the row-stacked products (dense
kernel gradient). The two kernel gradients split their rows over up to cores / XLA devices
threads of XLA's pool (the forward kernel runs on one thread); XLA's fusions and products use
the device's threads too. In a training step the kernels also avoid XLA's window copies and
fusion boundaries: ``dcevo_profile.py`` (variant ``no_cpu_kernels``) measures the whole step.

Measured (2-core x86-64 CPU with AVX-512, tcmalloc, one XLA device, so 2 threads; native vs
XLA): depthwise forward 1.3-2.4x, depthwise kernel gradient 7-22x, dense kernel gradient
1.13-1.42x (147-218 GFLOP/s against XLA's 130-155).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from host_devices import argv_int, force_host_device_count

    force_host_device_count(argv_int(sys.argv[1:], "--devices") or 1)

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_medians

from evafusion_jax.models import convolution, cpu_kernels, dcevo


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def cases(rng):
    """(name, flops, native fn, XLA fn, args) for each kernel and shape."""
    out = []
    for shape in [(1, 64, 64, 32), (2, 64, 64, 32), (1, 128, 128, 32), (2, 128, 128, 32)]:
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, shape[-1])), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 32)), jnp.float32)
        g32 = jnp.asarray(rng.standard_normal(shape[:3] + (32,)), jnp.float32)
        n = int(np.prod(shape))
        pads = ((1, 1), (1, 1))
        out += [
            (f"depthwise_conv {shape}", 2 * 9 * n,
             lambda a, b: cpu_kernels.depthwise_conv(a, b, 1),
             lambda a, b: dcevo._shifted_sum(dcevo._zero_pad_hw(a, 1), b, 3), (x, w)),
            (f"depthwise_kernel_grad {shape}", 2 * 9 * n,
             lambda a, b: cpu_kernels.depthwise_kernel_grad(a, b, 3, 1),
             lambda a, b: dcevo._depthwise_kernel_grad_xla(a, b, 3, 1), (x, g)),
            (f"conv_kernel_grad {shape} -> 32", 2 * 9 * n * 32,
             lambda a, b: cpu_kernels.conv_kernel_grad(a, b, (3, 3), pads),
             lambda a, b: convolution._kernel_grad_row_stacked(a, b, k.shape, pads, None,
                                                               jnp.float32), (x, g32)),
        ]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--devices", type=int, default=1,
                    help="XLA CPU devices (the functions run on the first; default 1)")
    args = ap.parse_args()
    if not cpu_kernels.available():
        sys.exit("the CPU kernels are not available here (no C++ compiler, a failed build - "
                 "see the warning above - or EVAFUSION_JAX_CPU_KERNELS=0)")
    for name, flops, native, xla, operands in cases(np.random.default_rng(0)):
        fns = {"native": jax.jit(native).lower(*operands).compile(),
               "xla": jax.jit(xla).lower(*operands).compile()}
        rel = _rel(fns["native"](*operands), fns["xla"](*operands))
        res = interleaved_medians({k: (lambda f=f: f(*operands)) for k, f in fns.items()},
                                  args.repeats, warmup=True)
        ms = {k: r["median_s"] * 1e3 for k, r in res.items()}
        print(json.dumps({"case": name, "native_ms": round(ms["native"], 3),
                          "xla_ms": round(ms["xla"], 3),
                          "native_gflops": round(flops / ms["native"] / 1e6, 1),
                          "xla_gflops": round(flops / ms["xla"] / 1e6, 1),
                          "speedup": round(ms["xla"] / ms["native"], 2),
                          "max_rel_diff": float(f"{rel:.2e}")}), flush=True)


if __name__ == "__main__":
    main()
