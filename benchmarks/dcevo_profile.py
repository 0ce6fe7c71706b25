"""Where DCEvo's forward + backward spends time and memory on the CPU (issue #16, point 1).

    python benchmarks/dcevo_profile.py [--size 64] [--batch 2] [--repeats 3] [--top 12] [--thunks]
        [--bounds] [--devices 1]

Random weights, the released widths. Compiles ``jax.grad`` of the mean fused output
with respect to the parameters six ways: ``current`` (what ``dcevo.py`` does),
``flax_conv`` (the dense convolutions as ``flax.linen.Conv``: XLA's kernel gradient, what
``dcevo.py`` used before ``models/convolution.Conv``), ``unrolled_dw_grad`` (the
depthwise kernel gradient written as one fusion per tap, what ``dcevo.depthwise_conv`` did
before its tap loop), ``conv_1x1`` (1x1 convolutions as XLA convolutions instead of
matrix products, as ``convolution.conv2d`` ran them before), ``no_cpu_kernels`` (without
the native kernels of ``models/cpu_kernels``: XLA's depthwise formulations and dense kernel
gradient from row-stacked windows) and ``no_cpu_kernels_per_tap`` (also the dense kernel
gradient as one product per tap), times them interleaved (median of ``--repeats``) and
prints, for each:
XLA's FLOPs and bytes accessed, the temporary memory of the compiled step, the HLO op kinds
of the optimised module by count, and the ``--top`` largest arrays its entry computation
produces (what holds the memory). One JSON line per variant, then one with the timings.

``--thunks``: also traces two steps of ``current`` with ``jax.profiler`` and prints the time
of XLA's CPU thunks per step, by thunk kind and by where they come from (forward or
backward; bottleneck 3x3 convolution, its kernel gradient, the depthwise convolution, its
kernel-gradient loop, the detail branch, the decoder's transformer block, ...). Thunks of
the two threads overlap, so their sum exceeds the step's wall time.

``--bounds``: also times two steps that are NOT DCEvo's gradient, only bounds on what a
faster kernel gradient could give: ``no_dw_kernel_grad`` (every depthwise convolution's
kernel gradient replaced by zeros) and ``no_kernel_grads`` (the dense convolutions' per-tap
kernel gradient too; 1x1 convolutions keep theirs). XLA then drops that work, so their
medians are the step's time if those kernel gradients were free. Left out of the gradient
comparison.

``--devices N`` (default 1): the batch split over N XLA CPU devices under ``shard_map``, the
gradient averaged with ``pmean``, as ``vs_pytorch.py`` and the trainers run it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import re
import sys
import tempfile
import time

if __name__ == "__main__":
    from host_devices import argv_int, force_host_device_count

    force_host_device_count(argv_int(sys.argv[1:], "--devices") or 1)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_medians

from evafusion_jax.models import convolution, cpu_kernels, dcevo
from evafusion_jax.train import parallel

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


@contextlib.contextmanager
def depthwise_kernel_grad_unrolled():
    """Inside: ``dcevo.DepthwiseConv`` uses a depthwise convolution whose kernel gradient is
    k*k separate fusions (per tap: the per-sample products summed, then one reduction of the
    stacked taps), as ``dcevo.depthwise_conv`` computed it before its tap loop."""

    def bwd(padding, res, dy):
        x, w = res
        dx = dcevo._depthwise_input_grad(dy, w, padding, x)
        k = w.shape[0]
        xp = dcevo._zero_pad_hw(x, padding)
        b, ho, wo = dy.shape[:3]
        taps = []
        for i in range(k):
            for j in range(k):
                xs = xp[:, i:i + ho, j:j + wo, :]
                t = xs[0] * dy[0]
                for n in range(1, b):
                    t = t + xs[n] * dy[n]
                taps.append(t)
        return dx, jnp.sum(jnp.stack(taps), axis=(1, 2)).reshape(w.shape).astype(w.dtype)

    unrolled = jax.custom_vjp(dcevo.depthwise_conv.fun, nondiff_argnums=(2,))
    unrolled.defvjp(lambda x, w, p: (unrolled(x, w, p), (x, w)), bwd)
    orig = dcevo.depthwise_conv
    dcevo.depthwise_conv = unrolled
    try:
        yield
    finally:
        dcevo.depthwise_conv = orig


@contextlib.contextmanager
def without_cpu_kernels(per_tap: bool = False):
    """Inside: no ``models/cpu_kernels``: the depthwise convolutions, their input and kernel
    gradients use XLA's formulations (shifted sums, the tap loop) and the dense kernel
    gradient XLA's products of row-stacked windows; with ``per_tap`` one product per tap
    (k*k window copies of the output gradient), as before the row-stacked products."""
    orig_enabled, orig_rows = cpu_kernels.enabled, convolution._kernel_grad_row_stacked

    def per_tap_products(x, dy, kernel_shape, pads, precision, acc):
        return convolution._kernel_grad_per_tap(x, dy, kernel_shape, pads, (1, 1), precision, acc)

    cpu_kernels.enabled = lambda: False
    if per_tap:
        convolution._kernel_grad_row_stacked = per_tap_products
    try:
        yield
    finally:
        cpu_kernels.enabled, convolution._kernel_grad_row_stacked = orig_enabled, orig_rows


@contextlib.contextmanager
def kernel_grads_as_zeros(dense: bool):
    """Inside (timing only, the gradients are wrong): the depthwise convolutions' kernel
    gradient is zeros, and with ``dense`` also that of ``convolution.conv2d``'s convolutions
    (not its 1x1 matrix products); their input gradients are unchanged."""

    def dw_bwd(padding, res, dy):
        x, w = res
        return dcevo._depthwise_input_grad(dy, w, padding, x), jnp.zeros_like(w)

    def conv_bwd(pads, lhs_dilation, precision, res, dy):
        x, kernel = res
        _, vjp_x = jax.vjp(lambda x_: convolution._lax_conv(x_, kernel, pads, lhs_dilation,
                                                            precision), x)
        return vjp_x(dy)[0], jnp.zeros_like(kernel)

    dw = jax.custom_vjp(dcevo.depthwise_conv.fun, nondiff_argnums=(2,))
    dw.defvjp(lambda x, w, p: (dw(x, w, p), (x, w)), dw_bwd)
    conv = jax.custom_vjp(convolution._conv.fun, nondiff_argnums=(2, 3, 4))
    conv.defvjp(convolution._conv_fwd, conv_bwd)
    orig_dw, orig_conv = dcevo.depthwise_conv, convolution._conv
    dcevo.depthwise_conv = dw
    if dense:
        convolution._conv = conv
    try:
        yield
    finally:
        dcevo.depthwise_conv, convolution._conv = orig_dw, orig_conv


@contextlib.contextmanager
def pointwise_as_convolution():
    """Inside: ``convolution.conv2d`` runs 1x1 convolutions as XLA convolutions (with the
    per-tap kernel gradient), as it did before they became matrix products."""
    orig = convolution.conv2d

    def conv2d(x, kernel, padding="SAME", lhs_dilation=(1, 1), precision=None):
        d = tuple(int(v) for v in lhs_dilation)
        return convolution._conv(x, kernel, convolution._pads(padding, kernel.shape[:2], d), d,
                                 precision)

    convolution.conv2d = conv2d
    try:
        yield
    finally:
        convolution.conv2d = orig


_SOURCES = (  # (regular expression searched in the op_name, label), first match wins
    (r"/while/", "depthwise kernel-gradient loop"),
    (r"/m_\d+/cv2/", "depthwise 3x3 conv + SiLU (C2f bottleneck)"),
    (r"/m_\d+/cv1/conv/(dot_general|slice|pad)", "3x3 conv kernel gradient (C2f bottleneck)"),
    (r"/m_\d+/cv1/", "3x3 conv + SiLU (C2f bottleneck)"),
    (r"detailFeature|HighFreqExtractor", "detail branch (HighFreqExtractor)"),
    (r"output_0", "decoder transformer block"),
    (r"/net[12]/", "C2f 1x1 convs, concat, gate"),
)


def thunk_profile(compiled, args, steps: int = 2) -> dict:
    """Milliseconds per step of XLA's CPU thunks, by kind and by source (see the docstring)."""
    meta = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
        if m:
            meta[m.group(1)] = m.group(2)
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
        by_kind, by_source = collections.Counter(), collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLAEigen"):
                    continue
                for ev in line.events:
                    # ThunkExecutor and while events contain other thunks' events: skip them
                    if ev.name.startswith(("ThunkExecutor", "while")):
                        continue
                    ms = ev.duration_ns / 1e6 / steps
                    by_kind[re.sub(r"\.\d+$", "", ev.name)] += ms
                    op = meta.get(ev.name, "")
                    phase = "backward" if "transpose(" in op else "forward"
                    label = next((lab for pat, lab in _SOURCES if re.search(pat, op)), "other")
                    by_source[f"{phase}: {label}"] += ms
    total = sum(by_kind.values())
    return {"thunk_ms_per_step": round(total, 1),
            "by_source_ms": {k: round(v, 1) for k, v in by_source.most_common()},
            "by_kind_ms": {k: round(v, 1) for k, v in by_kind.most_common(15)}}


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
    ap.add_argument("--thunks", action="store_true",
                    help="also print XLA's CPU thunk times of the current variant (jax.profiler)")
    ap.add_argument("--bounds", action="store_true",
                    help="also time the step without the depthwise / all per-tap kernel "
                         "gradients (timing only: wrong gradients)")
    ap.add_argument("--devices", type=int, default=1,
                    help="XLA CPU devices, the batch split over them (default 1)")
    args = ap.parse_args()
    if args.devices < 1 or args.batch % args.devices or len(jax.devices()) < args.devices:
        ap.error(f"--devices {args.devices}: needs a divisor of --batch {args.batch} and at most "
                 f"the {len(jax.devices())} device(s) JAX has (run this file as a script: it "
                 f"sets XLA_FLAGS before JAX starts, unless XLA_FLAGS already sets a count)")
    cfg = dcevo.DCEvoConfig()
    params = dcevo.init_params(cfg, 0)
    shape = (args.batch, args.size, args.size, 1)
    ir = jax.random.uniform(jax.random.PRNGKey(0), shape)
    vi = jax.random.uniform(jax.random.PRNGKey(1), shape)

    mesh = parallel.data_mesh(jax.devices()[:args.devices]) if args.devices > 1 else None
    if mesh is not None:
        params = parallel.replicate(params, mesh)
        ir, vi = parallel.shard_batch((ir, vi), mesh)

    def make():
        g = jax.grad(lambda p, a, b: jnp.mean(dcevo.apply_model(p, a, b, cfg)["fused"]))
        if mesh is None:
            return jax.jit(g)
        return parallel.data_parallel(lambda p, a, b: jax.lax.pmean(g(p, a, b), parallel.DATA_AXIS),
                                      mesh, batch_argnums=(1, 2))

    variants = [("current", contextlib.nullcontext()),
                ("flax_conv", dense_convs_as_flax_conv()),
                ("unrolled_dw_grad", depthwise_kernel_grad_unrolled()),
                ("conv_1x1", pointwise_as_convolution()),
                ("no_cpu_kernels", without_cpu_kernels()),
                ("no_cpu_kernels_per_tap", without_cpu_kernels(per_tap=True))]
    bounds = ("no_dw_kernel_grad", "no_kernel_grads")
    if args.bounds:
        variants += [(bounds[0], kernel_grads_as_zeros(dense=False)),
                     (bounds[1], kernel_grads_as_zeros(dense=True))]
    compiled = {}
    for name, ctx in variants:
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
    grads = {n: jax.tree_util.tree_leaves(c(params, ir, vi)) for n, c in compiled.items()}

    def rel_diff(name):
        return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-30))
                   for x, y in zip(grads["current"], grads[name]))

    res = interleaved_medians({n: (lambda c=c: c(params, ir, vi)) for n, c in compiled.items()},
                              args.repeats, warmup=False)
    cur = res["current"]["median_s"]
    print(json.dumps({"timings_s": {n: r["times_s"] for n, r in res.items()},
                      "median_s": {n: round(r["median_s"], 4) for n, r in res.items()},
                      "current_speedup_over": {n: round(r["median_s"] / cur, 3) for n, r in
                                               res.items() if n != "current" and n not in bounds},
                      "bound_fraction_of_current": {n: round(r["median_s"] / cur, 3)
                                                    for n, r in res.items() if n in bounds},
                      "max_rel_grad_diff_to_current": {n: rel_diff(n) for n in compiled
                                                       if n != "current" and n not in bounds}}),
          flush=True)
    if args.thunks:
        print(json.dumps({"thunks_of": "current",
                          **thunk_profile(compiled["current"], (params, ir, vi))}), flush=True)

if __name__ == "__main__":
    main()
