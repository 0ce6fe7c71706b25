"""Ours (JAX) against the ORIGINAL PyTorch code, side by side in one run, same shapes and threads.

    python benchmarks/vs_pytorch.py --dcevo-src DIR --rahf-src DIR [--ref-python PY]
        [--only dcevo_fwd,dcevo_fwd_bwd,reward_fwd] [--batch 2] [--size 128] [--runs 5]

``--dcevo-src``: a local copy of the DCEvo repository (Beate-Suy-Zhang/DCEvo; its ``sleepnet.py``
is imported). ``--rahf-src``: a local copy of EVAFusion (ALKA-Wind/EVAFusion; its
``reward_model/model.py`` is imported). Neither is part of this project; never commit them.
``--ref-python``: the Python that runs the original code (default: this one). The original reward
model calls ``ViTModel(...).encoder``, absent in transformers 5: give a Python whose environment
has ``transformers==4.46.3`` (and torch, torchvision, timm, einops for DCEvo's ``sleepnet``).

Cases (float32, random weights, batch ``--batch``):
  dcevo_fwd       DCEvo forward at ``--size`` x ``--size`` (ours: jitted ``apply_model``).
  dcevo_fwd_bwd   forward + backward of ``mean(fused)`` w.r.t. all parameters.
  reward_fwd      reward model forward (3 backbone passes + mixing ViT + heads) at the
                  ViT-B/16-224 geometry (``--vit l16_384`` for the released one).

The original runs in a worker process; each run alternates ours and theirs (ours first on odd
runs, theirs first on even ones) after one warm-up each (and our compile), so that load from
other processes hits both alike. Reported: median wall time and median CPU time (all threads of
the process) over ``--runs``, and ratio = theirs / ours (> 1: ours is faster). PyTorch gets
``torch.set_num_threads(--threads)`` (default: all cores); XLA uses its default pool (all cores).

``--devices N`` (default: the number of cores, at most ``--batch``) runs ours on N XLA CPU
devices (``--xla_force_host_platform_device_count``, set before JAX starts) with the batch split
over them under ``shard_map``, as the trainers' data-parallel steps do (``train/parallel.py``;
the parameter gradient is averaged with ``pmean``). One XLA CPU device runs most of its
element-wise loops on one thread, so a batch split over as many devices as cores is how XLA
uses the cores that PyTorch's intra-op threads use. ``--devices 1``: one device, as a plain
``jax.jit`` on a CPU-only machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


if __name__ == "__main__":
    from host_devices import argv_int, force_host_device_count

    _dev, _batch = argv_int(sys.argv[1:], "--devices"), argv_int(sys.argv[1:], "--batch") or 2
    force_host_device_count(_dev if _dev is not None else max(1, min(os.cpu_count() or 1, _batch)))

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from evafusion_jax.models import dcevo
from evafusion_jax.models import reward_model as rm
from evafusion_jax.models.vit import ViTConfig
from evafusion_jax.train import parallel

VITS = {"b16_224": ViTConfig.vit_b16_224, "l16_384": ViTConfig.vit_l16_384,
        "tiny": lambda: ViTConfig.tiny(hidden_size=64, image_size=32, patch_size=16)}
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_torch_ref.py")


def _ours(cases, batch, size, vit, devices=1):
    """Our jitted callables; with ``devices`` > 1 the batch is split over that many devices."""
    out = {}
    key = jax.random.PRNGKey(0)
    mesh = parallel.data_mesh(jax.devices()[:devices]) if devices > 1 else None

    def compile_(fn, nbatch, per_example):
        # fn(params, *batch_args); per_example: outputs keep the batch axis (else replicated)
        if mesh is None:
            return jax.jit(fn)
        return parallel.data_parallel(fn, mesh, batch_argnums=tuple(range(1, 1 + nbatch)),
                                      out_specs=P(parallel.DATA_AXIS) if per_example else P())

    def place(params, *xs):
        if mesh is None:
            return (params, *xs)
        return (parallel.replicate(params, mesh), *parallel.shard_batch(xs, mesh))

    if {"dcevo_fwd", "dcevo_fwd_bwd"} & set(cases):
        dcfg = dcevo.DCEvoConfig()
        ir = jax.random.uniform(key, (batch, size, size, 1))
        vi = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 1))
        dp, ir, vi = place(dcevo.init_params(dcfg, 0), ir, vi)
        fwd = compile_(lambda p, a, b: dcevo.apply_model(p, a, b, dcfg)["fused"], 2, True)
        g = jax.grad(lambda p, a, b: jnp.mean(dcevo.apply_model(p, a, b, dcfg)["fused"]))
        grad = compile_(g if mesh is None else
                        (lambda p, a, b: jax.lax.pmean(g(p, a, b), parallel.DATA_AXIS)), 2, False)
        out["dcevo_fwd"] = lambda: fwd(dp, ir, vi)
        out["dcevo_fwd_bwd"] = lambda: grad(dp, ir, vi)
    if "reward_fwd" in cases:
        rcfg = rm.RewardConfig(vit=vit)
        x = jax.random.uniform(key, (batch, vit.image_size, vit.image_size, 3), minval=-1, maxval=1)
        rp, x = place(rm.init_params(rcfg, 0), x)
        f = compile_(lambda p, x: rm.apply(p, x, x, x, rcfg), 1, True)
        out["reward_fwd"] = lambda: f(rp, x)
    return {c: out[c] for c in cases}


def _time_ours(fn):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return {"wall": time.perf_counter() - t, "cpu": time.process_time() - c}


class _Theirs:
    def __init__(self, python, cfg):
        self.proc = subprocess.Popen([python, WORKER, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the PyTorch worker ({python} {WORKER}) failed to start; see its "
                             "error above (check --dcevo-src/--rahf-src and --ref-python)")
        self.ready = json.loads(line)["ready"]

    def run(self, case):
        self.proc.stdin.write(json.dumps({"case": case}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the PyTorch worker died during {case!r}")
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"case": "quit"}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dcevo-src", help="local copy of the DCEvo repository (holds sleepnet.py)")
    ap.add_argument("--rahf-src", help="local copy of EVAFusion (holds reward_model/model.py)")
    ap.add_argument("--ref-python", default=sys.executable,
                    help="Python that runs the original code (needs transformers 4.x for RAHF)")
    ap.add_argument("--only", default="dcevo_fwd,dcevo_fwd_bwd,reward_fwd")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="DCEvo image height = width")
    ap.add_argument("--vit", default="b16_224", choices=sorted(VITS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--devices", type=int, default=None,
                    help="XLA CPU devices for ours, the batch split over them (default: cores, "
                         "at most --batch; module docstring)")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    devices = args.devices if args.devices is not None else max(1, min(os.cpu_count() or 1,
                                                                        args.batch))
    if devices < 1 or args.batch % devices:
        ap.error(f"--batch {args.batch} must be a multiple of --devices {devices}")
    if len(jax.devices()) < devices:
        ap.error(f"--devices {devices}: JAX has {len(jax.devices())} device(s); run this file as "
                 f"a script (it sets XLA_FLAGS=--xla_force_host_platform_device_count before JAX "
                 f"starts) or set that flag yourself")
    cases = [c for c in args.only.split(",") if c]
    unknown = set(cases) - {"dcevo_fwd", "dcevo_fwd_bwd", "reward_fwd"}
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}")
    if any(c.startswith("dcevo") for c in cases) and not args.dcevo_src:
        ap.error("the dcevo cases need --dcevo-src")
    if "reward_fwd" in cases and not args.rahf_src:
        ap.error("reward_fwd needs --rahf-src")
    for flag, d in (("--dcevo-src", args.dcevo_src), ("--rahf-src", args.rahf_src)):
        if d and not os.path.isdir(d):
            ap.error(f"{flag} {d!r} is not a folder")
    vit = VITS[args.vit]()
    cfg = dict(threads=args.threads, batch=args.batch, dcevo_size=args.size,
               dcevo_src=args.dcevo_src if any(c.startswith("dcevo") for c in cases) else None,
               rahf_src=args.rahf_src if "reward_fwd" in cases else None,
               vit=dict(hidden_size=vit.hidden_size, num_hidden_layers=vit.num_hidden_layers,
                        num_attention_heads=vit.num_attention_heads,
                        intermediate_size=vit.intermediate_size, image_size=vit.image_size,
                        patch_size=vit.patch_size))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; jax {jax.__version__} on {jax.devices()[0].platform}; "
          f"torch threads {args.threads}; ours on {devices} XLA device(s); batch {args.batch}, DCEvo {args.size}x{args.size}, "
          f"ViT {args.vit}", flush=True)
    theirs = _Theirs(args.ref_python, cfg)
    ours = _ours(cases, args.batch, args.size, vit, devices)
    rows = []
    try:
        for case in cases:
            t = time.perf_counter()
            _time_ours(ours[case])  # compile + first run
            compile_s = time.perf_counter() - t
            theirs.run(case)  # warm-up
            res = {"ours": [], "theirs": []}
            for r in range(args.runs):
                order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
                for who in order:
                    res[who].append(_time_ours(ours[case]) if who == "ours" else theirs.run(case))
            row = {"case": case, "compile_s": round(compile_s, 1), "runs": args.runs,
                   "devices": devices,
                   "load_average": round(os.getloadavg()[0], 1)}
            for who in ("ours", "theirs"):
                for k in ("wall", "cpu"):
                    row[f"{who}_{k}_s"] = round(statistics.median(x[k] for x in res[who]), 3)
            row["ratio_wall"] = round(row["theirs_wall_s"] / row["ours_wall_s"], 2)
            row["ratio_cpu"] = round(row["theirs_cpu_s"] / row["ours_cpu_s"], 2)
            rows.append(row)
            print(f"{case:<14} PyTorch {row['theirs_wall_s']:8.3f} s ({row['theirs_cpu_s']:8.3f} s CPU)"
                  f"   ours {row['ours_wall_s']:8.3f} s ({row['ours_cpu_s']:8.3f} s CPU)   "
                  f"ratio {row['ratio_wall']:.2f}x wall, {row['ratio_cpu']:.2f}x CPU   "
                  f"(compile {compile_s:.0f} s, load {row['load_average']})", flush=True)
    finally:
        theirs.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
