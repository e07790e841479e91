"""The compiled ghost batch norm kernel (``kernel.c``): build on first use, load, call. Pure torch + ctypes.

torch has no ghost batch norm, and emulating one with its kernels (ghosts folded into channels, see
functional.py) costs up to 2.9x plain BatchNorm on ``[B, C]`` activations. ``kernel.c`` normalises
each ghost batch while it is in cache: 0.3-0.75x plain BatchNorm's time on conv activations and
0.95-1.4x on ``[512, 256]`` with the input in cache; there the kernel itself is faster than
BatchNorm's, and this module's Python autograd node is the rest (``benchmarks/ghost_bn``). It is
plain C (no torch headers), so a C compiler builds it in about a second; the shared library is
cached per source, compiler, torch build and host under ``$LITPLUG_CACHE_DIR`` (default
``$XDG_CACHE_HOME/litplug`` or ``~/.cache/litplug``).

It links torch's own OpenMP runtime when torch ships one (``torch/lib/libgomp*``), so
``torch.set_num_threads`` governs its threads too and there is one thread pool, not two; otherwise it
builds single-threaded. Without a compiler, or with ``LITPLUG_GHOST_BN_KERNEL=0``, ghost batch norm
falls back to the torch-ops path with the same results (one warning says why).

Scope: float32 CPU tensors, contiguous, equal ghost batches, training mode. Everything else uses the
torch path. Backward through backward (``create_graph=True``) recomputes with torch ops, so double
differentiation works as through any torch op.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["KERNEL_ENV", "kernel_applies", "kernel_ghost_batch_norm", "load_kernel"]

KERNEL_ENV = "LITPLUG_GHOST_BN_KERNEL"
SOURCE = Path(__file__).with_name("kernel.c")
ABI_VERSION = 6
COMPILE_TIMEOUT_S = 120

_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None  # the kernel once built; None before, or after a failed build
_attempted = False  # whether a build (or load) was tried in this process


def _cache_dir() -> Path:
    explicit = os.environ.get("LITPLUG_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "litplug"


def _torch_openmp() -> Path | None:
    """The OpenMP runtime torch loaded, when it ships one and parallelises with OpenMP."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libgomp*.so*"))
    return candidates[0] if candidates else None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _build_commands(compiler: str, output: Path) -> list[list[str]]:
    """Compile, then link. Linking is a separate step so that OpenMP comes from torch's file only."""
    flags = ["-O3", "-fno-math-errno", "-fPIC", "-std=c99"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    openmp = _torch_openmp()
    flags.append("-fopenmp" if openmp is not None else "-fopenmp-simd")  # simd: pragmas, one thread
    obj = output.with_suffix(".o")
    link = [compiler, "-shared", str(obj), "-o", str(output), "-lm"]
    if openmp is not None:  # the very runtime torch loaded (same soname), found again through rpath
        link[3:3] = [str(openmp), f"-Wl,-rpath,{openmp.parent}"]
    return [[compiler, *flags, "-c", str(SOURCE), "-o", str(obj)], link]


def _library_path(compiler: str) -> Path:
    """Cache key: the source, the compiler, the flags, torch's build, the machine."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(repr(_build_commands(compiler, Path("out.so"))).encode())
    key.update(f"{torch.__version__} {platform.machine()} {platform.node()} {sys.platform}".encode())
    return _cache_dir() / f"ghost_bn_kernel_{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile to a temporary file in the cache directory, then rename: concurrent builders are safe."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        for command in _build_commands(compiler, tmp):
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if result.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(command)} exited with {result.returncode}: {result.stderr.strip()[-2000:]}"
                )
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, tmp.with_suffix(".o")):
            leftover.unlink(missing_ok=True)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.litplug_gbn_abi() != ABI_VERSION:
        raise RuntimeError(f"{path} reports ABI {lib.litplug_gbn_abi()}, expected {ABI_VERSION}")
    ptr, i64, f64, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.litplug_gbn_forward.argtypes = [ptr] * 7 + [i64] * 4 + [flag, f64, f64]
    lib.litplug_gbn_forward.restype = ctypes.c_int
    lib.litplug_gbn_backward.argtypes = [ptr] * 8 + [i64] * 4 + [flag]
    lib.litplug_gbn_backward.restype = ctypes.c_int
    return lib


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; ``None`` (with one warning) when unavailable.

    ``LITPLUG_GHOST_BN_KERNEL=0`` disables it silently (the torch path then runs everywhere).
    """
    global _loaded, _attempted
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return None
    if _attempted:  # the per-call fast path: GhostBatchNorm asks on every forward
        return _loaded
    with _lock:
        if _attempted:
            return _loaded
        lib: ctypes.CDLL | None = None
        compiler = _compiler()
        try:
            if compiler is None:
                raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
            path = _library_path(compiler)
            if not path.exists():
                _build(compiler, path)
            lib = _open(path)
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            warnings.warn(
                f"ghost_bn: the compiled kernel is unavailable ({err}); GhostBatchNorm uses torch ops "
                f"instead (same results, up to ~2.9x slower on [B, C] activations). "
                f"Set {KERNEL_ENV}=0 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
        _loaded, _attempted = lib, True
        return lib


def _reset_for_tests() -> None:
    """Forget the loaded kernel so the next call builds or loads again (tests only)."""
    global _loaded, _attempted
    _loaded, _attempted = None, False


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)  # not subclasses (FakeTensor, functorch wrappers, ...)


def _is_plain(t: Tensor) -> bool:
    return type(t) in _PLAIN_TYPES and t.dtype is torch.float32 and t.is_cpu


def kernel_applies(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the kernel can run: plain float32 CPU tensors (``params`` contiguous), not traced.

    ``x`` in another layout (channels_last) is made contiguous first: the torch path copies it too.
    Tracing (torch.compile, TorchScript) and torch.func transforms see through torch ops, not through
    a ctypes call, so they get the torch path.
    """
    # Runs on every training forward: cheap checks first, no generators (a measured ~5 us each).
    if not _is_plain(x) or x.dim() < 2 or x.numel() == 0:
        return False
    for t in params:
        if t is not None and not (_is_plain(t) and t.is_contiguous()):
            return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return not torch._C._are_functorch_transforms_active()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _GhostBatchNormKernel(torch.autograd.Function):
    """Training-mode ghost batch norm through ``kernel.c``; running statistics updated in place."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_ghosts: int,
        contiguous: bool,
        momentum: float,
        eps: float,
        reference: Any,
        lib: ctypes.CDLL,
    ) -> Tensor:
        batch, channels = x.shape[0], x.shape[1]
        spatial = x.numel() // (batch * channels)
        out = torch.empty_like(x)
        stats = x.new_empty(3 * num_ghosts * channels)  # mean, invstd, variance per ghost and channel
        status = lib.litplug_gbn_forward(
            x.data_ptr(), _ptr(weight), _ptr(bias), out.data_ptr(), stats.data_ptr(),
            _ptr(running_mean), _ptr(running_var), batch, channels, spatial, num_ghosts, int(contiguous),
            eps, momentum,
        )  # fmt: skip
        if status:
            raise MemoryError("ghost_bn kernel: out of memory for its per-thread scratch")
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.shape_info = (batch, channels, spatial, num_ghosts, int(contiguous))
        ctx.reference, ctx.lib = reference, lib
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, stats = ctx.saved_tensors
        batch, channels, spatial, num_ghosts, contiguous = ctx.shape_info
        nones = (None,) * 8
        if torch.is_grad_enabled():  # create_graph=True: differentiate the torch-ops twin instead
            return (*_differentiable_backward(ctx, x, weight, bias, grad_out), *nones)
        lib = ctx.lib
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)
        scratch = x.new_empty(2 * channels + 2 * num_ghosts * channels)  # grads, then per-ghost sums
        grad_w, grad_b, sums = scratch[:channels], scratch[channels : 2 * channels], scratch[2 * channels :]
        status = lib.litplug_gbn_backward(
            grad_out.data_ptr(), x.data_ptr(), _ptr(weight), stats.data_ptr(), grad_x.data_ptr(),
            grad_w.data_ptr(), grad_b.data_ptr(), sums.data_ptr(), batch, channels, spatial, num_ghosts,
            contiguous,
        )  # fmt: skip
        if status:
            raise MemoryError("ghost_bn kernel: out of memory for its per-thread scratch")
        needs = ctx.needs_input_grad
        return (
            grad_x if needs[0] else None,
            grad_w if weight is not None and needs[1] else None,
            grad_b if bias is not None and needs[2] else None,
            *nones,
        )


def _differentiable_backward(
    ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, grad_out: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients as a differentiable graph: the torch-ops forward, differentiated with create_graph."""
    inputs = [(i, t) for i, t in enumerate((x, weight, bias)) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        out = ctx.reference(x, weight, bias)
        grads = torch.autograd.grad(out, [t for _, t in inputs], grad_out, create_graph=True)
    result: list[Tensor | None] = [None, None, None]
    for (i, _), grad in zip(inputs, grads, strict=True):
        result[i] = grad
    return result[0], result[1], result[2]


def kernel_ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    num_ghosts: int,
    contiguous: bool,
    momentum: float,
    eps: float,
    reference: Any,
    lib: ctypes.CDLL,
) -> Tensor:
    """Training ghost batch norm of ``x`` in ``num_ghosts`` equal ghost batches (the kernel): contiguous
    chunks of rows, or with ``contiguous=False`` the strided partition (rows ``k, k + m, ...``).

    ``reference(x, weight, bias)`` must compute the same output with torch ops; it serves double
    backward. Call only when :func:`kernel_applies` says yes; ``lib`` is :func:`load_kernel`'s.
    """
    out: Tensor = _GhostBatchNormKernel.apply(
        x.contiguous(),
        weight,
        bias,
        running_mean,
        running_var,
        num_ghosts,
        contiguous,
        momentum,
        eps,
        reference,
        lib,
    )
    return out
