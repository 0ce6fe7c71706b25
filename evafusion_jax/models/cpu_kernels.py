"""Native CPU kernels for the few operations XLA runs slowly on the CPU, called through XLA's FFI.

The depthwise convolution (:func:`depthwise_conv`, also its input gradient), its kernel
gradient (:func:`depthwise_kernel_grad`) and the kernel gradient of a dense convolution
(:func:`conv_kernel_grad`). XLA on the CPU runs the depthwise convolution as a shifted sum at
a few GFLOP/s and computes both kernel gradients from k*k shifted copies of an activation
(before its reductions or matrix products). The kernels in ``cpu_kernels.cc`` read each input
once: the depthwise ones keep the k*k sums (or weights) of 16 channels in registers over an
image row; the dense kernel gradient multiplies each output-gradient row in place with the
input rows it meets, 8 x 32 channels of sums in registers. DCEvo forward + backward, 64x64,
batch 2, 2 XLA devices on a 2-core CPU: 1.360 s without them, 1.080 s with them
(``benchmarks/dcevo_profile.py``, variant ``no_cpu_kernels``).

The library is built on first use with the system's C++ compiler (``$CXX``, else ``c++`` /
``g++``; headers from ``jax.ffi.include_dir()``), for this machine's instruction set, and
kept in ``$EVAFUSION_JAX_KERNEL_CACHE`` (default ``~/.cache/evafusion_jax/cpu_kernels``)
under a name that hashes the source, the flags, the compiler, jaxlib and the CPU. Nothing is
downloaded. Without a compiler, or with ``EVAFUSION_JAX_CPU_KERNELS=0``, :func:`available`
is False and callers use their XLA formulation (same values up to float rounding); a failed
build is logged once as a warning. Models use the kernels when JAX's default backend is
the CPU (:func:`enabled`; on a GPU / TPU host nothing is built), and then only in the CPU
branch of ``jax.lax.platform_dependent``: GPU and TPU programs never contain them. A CPU
program that contains one is not portable: ``jax.export`` refuses it unless given
``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(name)]`` (or run with
``EVAFUSION_JAX_CPU_KERNELS=0``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_DEPTHWISE_GRAD_TARGET = "evafusion_depthwise_kernel_grad"
_DEPTHWISE_CONV_TARGET = "evafusion_depthwise_conv"
_DENSE_GRAD_TARGET = "evafusion_conv_kernel_grad"
ENABLE_ENV = "EVAFUSION_JAX_CPU_KERNELS"
CACHE_ENV = "EVAFUSION_JAX_KERNEL_CACHE"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_fingerprint() -> str:
    """The CPU's model and feature flags (``-march=native`` code is only valid on such CPUs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines()
                if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "evafusion_jax"
                / "cpu_kernels")


def _build(cxx: str) -> Path:
    """Compile ``cpu_kernels.cc`` (or reuse the cached build) and return the library's path."""
    import jaxlib

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(_FLAGS), cxx, version,
                                    jaxlib.__version__, _cpu_fingerprint()]).encode())
    out_dir = cache_dir()
    lib = out_dir / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
        logger.info("building the CPU kernels: %s", " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders each install a complete library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _load() -> bool:
    if os.environ.get(ENABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        logger.info("CPU kernels disabled by %s", ENABLE_ENV)
        return False
    cxx = _compiler()
    if cxx is None:
        logger.warning("no C++ compiler found ($CXX, c++, g++, clang++): the CPU kernels are "
                       "off and XLA's slower formulations are used")
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
        for target, symbol in ((_DEPTHWISE_GRAD_TARGET, lib.EvafusionDepthwiseKernelGrad),
                               (_DEPTHWISE_CONV_TARGET, lib.EvafusionDepthwiseConv),
                               (_DENSE_GRAD_TARGET, lib.EvafusionConvKernelGrad)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: use the XLA formulation
        logger.warning("the CPU kernels could not be built or loaded (%s); XLA's slower "
                       "formulations are used. Set %s=0 to skip the attempt.", e, ENABLE_ENV)
        return False
    return True


def _threads() -> int:
    """Threads a kernel may use: the cores per local XLA device (a data-parallel step on N
    devices runs N kernels at once, one per device; splitting each over every core only makes
    them compete)."""
    return max(1, (os.cpu_count() or 1) // max(1, jax.local_device_count()))


def available() -> bool:
    """Whether the CPU kernels are built and registered (builds them on the first call)."""
    return _load()


def enabled() -> bool:
    """Whether models should use the kernels: JAX's default backend is the CPU and they are
    :func:`available` (on a GPU / TPU host nothing is built)."""
    return jax.default_backend() == "cpu" and available()


def depthwise_kernel_grad(x, dy, k: int, padding: int):
    """``dw[i, j, c] = sum over (b, h, w) of x[b, h + i - p, w + j - p, c] * dy[b, h, w, c]``.

    The kernel gradient of a stride-1 depthwise correlation of NHWC ``x`` with a (k, k, C)
    kernel and zero padding ``padding`` (``x`` zero outside the image), in float32, shape
    (k, k, C). CPU only, and only when :func:`available`.
    """
    b, h, w, c = x.shape
    want = (b, h + 2 * padding - k + 1, w + 2 * padding - k + 1, c)
    if tuple(dy.shape) != want:
        raise ValueError(f"depthwise_kernel_grad: dy has shape {tuple(dy.shape)}, expected "
                         f"{want} for x {tuple(x.shape)}, k={k}, padding={padding}")
    call = jax.ffi.ffi_call(_DEPTHWISE_GRAD_TARGET, jax.ShapeDtypeStruct((k * k, c), jnp.float32),
                            vmap_method="sequential")
    dw = call(x.astype(jnp.float32), dy.astype(jnp.float32), k=int(k), padding=int(padding),
              threads=_threads())
    return dw.reshape(k, k, c)


def depthwise_conv(x, w, padding: int):
    """``y[b, h, w, c] = sum over (i, j) of x[b, h + i - p, w + j - p, c] * w[i, j, c]``.

    Stride-1 depthwise correlation of NHWC ``x`` with ``w`` (k, k, C), zero padding
    ``padding`` (negative crops), in float32. CPU only, and only when :func:`available`.
    """
    b, h, wd, c = x.shape
    k = w.shape[0]
    if w.shape != (k, k, c):
        raise ValueError(f"depthwise_conv: kernel of shape {tuple(w.shape)}, expected "
                         f"({k}, {k}, {c}) for x {tuple(x.shape)}")
    out = (b, h + 2 * padding - k + 1, wd + 2 * padding - k + 1, c)
    if out[1] < 1 or out[2] < 1:
        raise ValueError(f"depthwise_conv: x {tuple(x.shape)} with padding {padding} is smaller "
                         f"than the {k}x{k} kernel")
    call = jax.ffi.ffi_call(_DEPTHWISE_CONV_TARGET, jax.ShapeDtypeStruct(out, jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), w.astype(jnp.float32).reshape(k * k, c), k=int(k),
                padding=int(padding))


def conv_kernel_grad_supported(c_in: int, c_out: int) -> bool:
    """Whether :func:`conv_kernel_grad` takes these channel counts (its register tiles are 8
    input x 32 output channels)."""
    return c_in % 8 == 0 and c_out % 32 == 0


def conv_kernel_grad(x, dy, kernel_hw: tuple[int, int], pads):
    """``dk[i, j] = sum over (b, h, w) of x[b, h + i - pt, w + j - pl, :]^T dy[b, h, w, :]``.

    The kernel gradient of a stride-1, undilated dense convolution of NHWC ``x`` with an HWIO
    kernel of spatial size ``kernel_hw`` and paddings ``pads`` ((top, bottom), (left, right);
    ``x`` zero outside the image), in float32, shape (kh, kw, C_in, C_out); the output
    gradient ``dy`` has the convolution's output shape. Without copies of shifted windows:
    each output row's gradient meets the input rows it needs in the cache. CPU only, when
    :func:`available`, for channel counts :func:`conv_kernel_grad_supported` accepts.
    """
    kh, kw = (int(k) for k in kernel_hw)
    (pt, pb), (pl, pr) = pads
    b, h, w, c_in = x.shape
    want = (b, h + pt + pb - kh + 1, w + pl + pr - kw + 1)
    if tuple(dy.shape[:3]) != want:
        raise ValueError(f"conv_kernel_grad: dy has shape {tuple(dy.shape)}, expected {want} + "
                         f"(C_out,) for x {tuple(x.shape)}, kernel {kh}x{kw}, pads {pads}")
    c_out = dy.shape[3]
    if not conv_kernel_grad_supported(c_in, c_out):
        raise ValueError(f"conv_kernel_grad: {c_in} -> {c_out} channels; needs C_in % 8 == 0 "
                         f"and C_out % 32 == 0 (use the XLA formulation otherwise)")
    call = jax.ffi.ffi_call(_DENSE_GRAD_TARGET,
                            jax.ShapeDtypeStruct((kh * kw, c_in, c_out), jnp.float32),
                            vmap_method="sequential")
    dk = call(x.astype(jnp.float32), dy.astype(jnp.float32), kh=kh, kw=kw, pt=int(pt),
              pl=int(pl), threads=_threads())
    return dk.reshape(kh, kw, c_in, c_out)
