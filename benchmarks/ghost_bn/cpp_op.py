"""Experiment: what would a C++ autograd node around the ghost kernel give over the shipped ctypes path?

    python benchmarks/ghost_bn/cpp_op.py                   # lean build (~20 s), then ~1 min
    python benchmarks/ghost_bn/cpp_op.py --build inline    # load_inline (~30 s)
    python benchmarks/ghost_bn/cpp_op.py --threads 2

The shipped path (``litplug.plugins.ghost_bn``) calls ``kernel.c`` through ctypes from a Python
``autograd.Function`` behind Python dispatch checks. This script compiles a small C++ library
whose ``torch::autograd::Function`` calls the *same* compiled C functions (their addresses are
handed over from the ctypes library, so both run identical machine code) and times forward +
backward of one layer against plain BatchNorm and the shipped layer, call by call and warm, as
``run.py`` does. Two ways to build it, each timed from nothing: ``library`` (default) registers the
op with torch's dispatcher (``TORCH_LIBRARY``) and needs one compiler call against torch's headers
and ``torch.ops.load_library``: no Python headers, pybind11 or ninja; ``inline`` is
``torch.utils.cpp_extension.load_inline``. It is a measurement to decide on, not a shipped path:
either build costs a C++ compiler and tens of seconds on first use (the C kernel: about a second),
and this node has no double backward. Writes ``RESULTS_cpp_op.md`` beside this file.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.cpp_extension import include_paths, load_inline

from litplug.plugins.ghost_bn import GhostBatchNorm, compiled

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import _fwd_bwd, _time_bursts, _time_round_robin  # noqa: E402

INLINE_HEADER = "#include <torch/extension.h>\n"  # load_inline: pybind11 bindings, ninja
# The lean build: the op registered with the dispatcher, loaded by torch.ops.load_library (no
# Python headers, no pybind11, no ninja: one compiler call).
LIBRARY_HEADER = """#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>
"""
LIBRARY_TAIL = r"""
void set_kernels_op(int64_t forward_address, int64_t backward_address) {
  set_kernels(forward_address, backward_address);
}
at::Tensor ghost_batch_norm_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               at::Tensor& running_mean, at::Tensor& running_var, int64_t ghosts,
                               double momentum, double eps) {
  return ghost_batch_norm(x, weight, bias, running_mean, running_var, ghosts, momentum, eps);
}
TORCH_LIBRARY(litplug_gbn_experiment, m) {
  m.def("ghost_batch_norm(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, int ghosts, float momentum, float eps) -> Tensor");
  m.def("set_kernels(int forward_address, int backward_address) -> ()", &set_kernels_op);
}
TORCH_LIBRARY_IMPL(litplug_gbn_experiment, CompositeImplicitAutograd, m) {
  m.impl("ghost_batch_norm", &ghost_batch_norm_op);
}
"""
CPP_BODY = r"""
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// kernel.c's entry points, as compiled.py builds them (addresses set from Python).
typedef int (*forward_fn)(const float*, const float*, const float*, float*, float*, float*, float*,
                          int64_t, int64_t, int64_t, int64_t, int, double, double);
typedef int (*backward_fn)(const float*, const float*, const float*, const float*, float*, float*,
                           float*, float*, int64_t, int64_t, int64_t, int64_t, int);
static forward_fn kernel_forward = nullptr;
static backward_fn kernel_backward = nullptr;

void set_kernels(int64_t forward_address, int64_t backward_address) {
  kernel_forward = reinterpret_cast<forward_fn>(forward_address);
  kernel_backward = reinterpret_cast<backward_fn>(backward_address);
}

struct GhostBatchNormNode : public torch::autograd::Function<GhostBatchNormNode> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor x, at::Tensor weight,
                               at::Tensor bias, at::Tensor running_mean,
                               at::Tensor running_var, int64_t ghosts, double momentum,
                               double eps) {
    const int64_t batch = x.size(0), channels = x.size(1), spatial = x.numel() / (batch * channels);
    auto out = at::empty_like(x);
    auto stats = at::empty({3 * ghosts * channels}, x.options());
    TORCH_CHECK(kernel_forward(x.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
                               out.data_ptr<float>(), stats.data_ptr<float>(),
                               running_mean.data_ptr<float>(), running_var.data_ptr<float>(),
                               batch, channels, spatial, ghosts, /*contiguous=*/1, eps, momentum) == 0,
                "out of memory");
    ctx->save_for_backward({x, weight, stats});
    ctx->saved_data["ghosts"] = ghosts;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], weight = saved[1], stats = saved[2];
    const int64_t ghosts = ctx->saved_data["ghosts"].toInt();
    auto grad_out = grads[0].contiguous();
    const int64_t batch = x.size(0), channels = x.size(1), spatial = x.numel() / (batch * channels);
    auto grad_x = at::empty_like(x);
    auto grad_w = at::empty({channels}, x.options()), grad_b = at::empty({channels}, x.options());
    auto sums = at::empty({2 * ghosts * channels}, x.options());
    TORCH_CHECK(kernel_backward(grad_out.data_ptr<float>(), x.data_ptr<float>(), weight.data_ptr<float>(),
                                stats.data_ptr<float>(), grad_x.data_ptr<float>(), grad_w.data_ptr<float>(),
                                grad_b.data_ptr<float>(), sums.data_ptr<float>(), batch, channels,
                                spatial, ghosts, /*contiguous=*/1) == 0, "out of memory");
    at::Tensor none;
    return {grad_x, grad_w, grad_b, none, none, none, none, none};
  }
};

at::Tensor ghost_batch_norm(at::Tensor x, at::Tensor weight, at::Tensor bias,
                               at::Tensor running_mean, at::Tensor running_var, int64_t ghosts,
                               double momentum, double eps) {
  return GhostBatchNormNode::apply(x, weight, bias, running_mean, running_var, ghosts, momentum, eps);
}
"""


class CppNodeGhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Training-only layer calling the C++ node directly (no Python dispatch, no Python autograd)."""

    def __init__(self, op: Callable[..., Tensor], channels: int, ghost_batch_size: int) -> None:
        super().__init__(channels)
        self.op = op
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: Tensor) -> Tensor:
        assert self.num_batches_tracked is not None and self.running_mean is not None
        self.num_batches_tracked.add_(1)
        ghosts = x.shape[0] // self.ghost_batch_size
        return self.op(x, self.weight, self.bias, self.running_mean, self.running_var, ghosts, 0.1, self.eps)


def _kernel_addresses() -> tuple[int, int]:
    lib = compiled.load_kernel()
    if lib is None:
        raise SystemExit("the C kernel is unavailable here (no C compiler?)")
    forward = ctypes.cast(lib.litplug_gbn_forward, ctypes.c_void_p).value
    backward = ctypes.cast(lib.litplug_gbn_backward, ctypes.c_void_p).value
    assert forward is not None and backward is not None
    return forward, backward


def build_inline() -> tuple[Callable[..., Tensor], float]:
    """torch.utils.cpp_extension.load_inline: pybind11 bindings, built with ninja."""
    addresses = _kernel_addresses()
    build_dir = Path(tempfile.mkdtemp(prefix="litplug_ghost_bn_cpp_op_"))  # from nothing every run
    start = time.perf_counter()
    extension: Any = load_inline(
        "litplug_ghost_bn_cpp_op",
        cpp_sources=[INLINE_HEADER + CPP_BODY],
        functions=["ghost_batch_norm", "set_kernels"],
        extra_cflags=["-O2"],
        build_directory=str(build_dir),
    )
    seconds = time.perf_counter() - start
    extension.set_kernels(*addresses)
    return extension.ghost_batch_norm, seconds


def build_library() -> tuple[Callable[..., Tensor], float]:
    """One compiler call against torch's headers and libraries, loaded with torch.ops.load_library."""
    addresses = _kernel_addresses()
    build_dir = Path(tempfile.mkdtemp(prefix="litplug_ghost_bn_cpp_lib_"))
    source, target = build_dir / "node.cpp", build_dir / "node.so"
    source.write_text(LIBRARY_HEADER + CPP_BODY + LIBRARY_TAIL)
    lib_dir = Path(torch.__file__).parent / "lib"
    command = [
        os.environ.get("CXX", "c++"), "-O2", "-std=c++17", "-fPIC", "-shared", "-w",
        *(f"-I{path}" for path in include_paths()), str(source), "-o", str(target),
        f"-L{lib_dir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib_dir}",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    torch.ops.load_library(str(target))
    seconds = time.perf_counter() - start
    torch.ops.litplug_gbn_experiment.set_kernels(*addresses)
    return torch.ops.litplug_gbn_experiment.ghost_batch_norm, seconds


CASES = [((512, 256), 8), ((512, 256), 16), ((512, 256), 32), ((512, 256), 128), ((512, 32, 8, 8), 16)]


def measure(op: Callable[..., Tensor], shape: tuple[int, ...], ghost: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, grad_out = torch.randn(shape).requires_grad_(True), torch.randn(shape)
    plain = nn.BatchNorm1d(shape[1]) if len(shape) == 2 else nn.BatchNorm2d(shape[1])
    layers = {
        "plain": plain,
        "ctypes": GhostBatchNorm(shape[1], ghost),
        "cpp": CppNodeGhostBatchNorm(op, shape[1], ghost),
    }
    torch.testing.assert_close(layers["cpp"](x), layers["ctypes"](x), atol=1e-6, rtol=1e-5)
    steps = {name: _fwd_bwd(layer, x, grad_out) for name, layer in layers.items()}
    inner = max(1, int(1_000_000 // x.numel()))
    call = _time_round_robin(steps, repeats, inner)
    warm = _time_bursts(steps, repeats, inner + 1)
    result = {f"call {k}": statistics.median(v) for k, v in call.items()}
    result.update({f"warm {k}": statistics.median(v) for k, v in warm.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--build",
        choices=("library", "inline"),
        default="library",
        help="library: TORCH_LIBRARY op, one compiler call; inline: load_inline (pybind11, ninja)",
    )
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS_cpp_op.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    op, build_s = (build_library if args.build == "library" else build_inline)()
    load = os.getloadavg()
    lines = [
        "# Ghost batch norm: a C++ autograd node around the same kernel (experiment)",
        "",
        f"- Command: `python benchmarks/ghost_bn/cpp_op.py{' '.join([''] + sys.argv[1:])}`",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M')} UTC; torch {torch.__version__}; "
        f"torch threads {torch.get_num_threads()}; load average before {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        f"- Build ({args.build}: "
        + (
            "one compiler call, TORCH_LIBRARY op, torch.ops.load_library"
            if args.build == "library"
            else "torch.utils.cpp_extension.load_inline, pybind11, ninja"
        )
        + f") + load, from nothing: {build_s:.1f} s on one core (a cached build loads in well under a second)",
        "",
        "Forward + backward of one layer; medians of >= "
        f"{args.repeats} calls (call by call, shuffled order) and of bursts (warm; see run.py). "
        "ctypes = the shipped GhostBatchNorm; C++ node = the same compiled C functions behind a "
        "`torch::autograd::Function`, called straight from the module (no Python dispatch checks).",
        "",
        "| activation | ghost g | plain BN ms (warm) | ctypes / BN, call by call | C++ node / BN, call by call "
        "| ctypes / BN, warm | C++ node / BN, warm |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, ghost in CASES:
        r = measure(op, shape, ghost, args.repeats)
        row = (
            f"| {list(shape)} | {ghost} | {r['warm plain']:.3f} | {r['call ctypes'] / r['call plain']:.2f}x | "
            f"{r['call cpp'] / r['call plain']:.2f}x | {r['warm ctypes'] / r['warm plain']:.2f}x | "
            f"{r['warm cpp'] / r['warm plain']:.2f}x |"
        )
        print(row, flush=True)
        lines.append(row)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
