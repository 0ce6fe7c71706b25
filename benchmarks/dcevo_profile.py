"""Where DCEvo's forward + backward spends time and memory on the CPU (issue #16, point 1).

    python benchmarks/dcevo_profile.py [--size 64] [--batch 2] [--repeats 3] [--top 12]

Random weights, the released widths. Compiles ``jax.grad`` of the mean fused output
with respect to the parameters twice: with the dense convolutions as ``flax.linen.Conv``
(XLA's kernel gradient; what ``dcevo.py`` used before) and as ``models/convolution.Conv``
(what ``dcevo.py`` uses: same forward, kernel gradient as per-tap matrix products), times them interleaved (median of ``--repeats``)
and prints, for each: XLA's FLOPs and bytes accessed, the temporary memory of the
compiled step, the HLO op kinds of the optimised module by count, and the ``--top``
largest arrays its entry computation produces (what holds the memory).
One JSON line per variant, then one with the timings.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_medians

from evafusion_jax.models import dcevo

_DT_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "pred": 1, "u32": 4, "s8": 1, "u8": 1}
_SHAPE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\(")


@contextlib.contextmanager
def dense_convs_as_flax_conv():
    """Inside: ``dcevo._conv`` builds its dense convolutions as ``flax.linen.Conv``."""
    orig = dcevo._conv

    def patched(features, kernel, name, config, padding=0, groups=1, use_bias=False):
        if groups > 1:
            return orig(features, kernel, name, config, padding, groups, use_bias)
        return nn.Conv(features, (kernel, kernel), padding=((padding, padding),) * 2,
                       use_bias=use_bias, dtype=config.compute_dtype, param_dtype=jnp.float32,
                       precision=config.lax_precision, name=name)

    dcevo._conv = patched
    try:
        yield
    finally:
        dcevo._conv = orig


def hlo_summary(compiled, top: int) -> dict:
    text = compiled.as_text()
    kinds = collections.Counter()
    arrays = []
    entry = text[text.find("ENTRY"):]
    for line in text.splitlines():
        m = _SHAPE.match(line)
        if m:
            kinds[m.group(4)] += 1
    for line in entry.splitlines():
        m = _SHAPE.match(line)
        if m and m.group(2) in _DT_BYTES:
            dims = [int(d) for d in m.group(3).split(",") if d]
            nbytes = int(np.prod(dims)) * _DT_BYTES[m.group(2)] if dims else _DT_BYTES[m.group(2)]
            arrays.append((nbytes, m.group(4), f"{m.group(2)}[{m.group(3)}]"))
    arrays.sort(reverse=True)
    return {"op_counts": dict(kinds.most_common(12)),
            "largest_entry_arrays": [{"mb": round(b / 2**20, 1), "op": op, "shape": s}
                                     for b, op, s in arrays[:top]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    cfg = dcevo.DCEvoConfig()
    params = dcevo.init_params(cfg, 0)
    shape = (args.batch, args.size, args.size, 1)
    ir = jax.random.uniform(jax.random.PRNGKey(0), shape)
    vi = jax.random.uniform(jax.random.PRNGKey(1), shape)

    def make():
        return jax.jit(jax.grad(lambda p, a, b: jnp.mean(dcevo.apply_model(p, a, b, cfg)["fused"])))

    compiled = {}
    for name, ctx in (("flax_conv", dense_convs_as_flax_conv()),
                      ("convolution_conv", contextlib.nullcontext())):
        with ctx:
            t0 = time.perf_counter()
            c = make().lower(params, ir, vi).compile()
            compile_s = time.perf_counter() - t0
        compiled[name] = c
        ca = c.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        mem = c.memory_analysis()
        print(json.dumps({"variant": name, "size": args.size, "batch": args.batch,
                          "compile_s": round(compile_s, 1),
                          "gflop": round(ca.get("flops", 0) / 1e9, 2),
                          "gbytes_accessed": round(ca.get("bytes accessed", 0) / 1e9, 2),
                          "temp_gb": round(mem.temp_size_in_bytes / 1e9, 3),
                          "argument_gb": round(mem.argument_size_in_bytes / 1e9, 3),
                          **hlo_summary(c, args.top)}), flush=True)
    grads = {n: c(params, ir, vi) for n, c in compiled.items()}
    a, b = (jax.tree_util.tree_leaves(g) for g in grads.values())
    rel = max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-30)) for x, y in zip(a, b))
    res = interleaved_medians({n: (lambda c=c: c(params, ir, vi)) for n, c in compiled.items()},
                              args.repeats, warmup=False)
    print(json.dumps({"timings_s": {n: r["times_s"] for n, r in res.items()},
                      "median_s": {n: round(r["median_s"], 4) for n, r in res.items()},
                      "speedup_convolution_conv": round(res["flax_conv"]["median_s"]
                                                        / res["convolution_conv"]["median_s"], 3),
                      "max_rel_grad_diff": rel}), flush=True)


if __name__ == "__main__":
    main()
