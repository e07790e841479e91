"""Experiment: what would a C++ autograd node around the ghost kernel give over the shipped ctypes path?

    python benchmarks/ghost_bn/cpp_op.py              # ~35 s to compile once, then ~1 min
    python benchmarks/ghost_bn/cpp_op.py --threads 2

The shipped path (``litplug.plugins.ghost_bn``) calls ``kernel.c`` through ctypes from a Python
``autograd.Function`` behind Python dispatch checks. This script compiles a small torch C++
extension whose ``torch::autograd::Function`` calls the *same* compiled C functions (their
addresses are handed over from the ctypes library, so both run identical machine code) and times
forward + backward of one layer against plain BatchNorm and the shipped layer, call by call and
warm, as ``run.py`` does. It is a measurement to decide on, not a shipped path: the extension
needs torch's C++ headers and ~35 s of compilation on first use (the C kernel: about a second),
and this node has no double backward. Writes ``RESULTS_cpp_op.md`` beside this file.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.cpp_extension import load_inline

from litplug.plugins.ghost_bn import GhostBatchNorm, compiled

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import _fwd_bwd, _time_bursts, _time_round_robin  # noqa: E402

CPP_SOURCE = r"""
#include <torch/extension.h>
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// kernel.c's entry points, as compiled.py builds them (addresses set from Python).
typedef int (*forward_fn)(const float*, const float*, const float*, float*, float*, float*, float*,
                          int64_t, int64_t, int64_t, int64_t, double, double);
typedef int (*backward_fn)(const float*, const float*, const float*, const float*, float*, float*,
                           float*, float*, int64_t, int64_t, int64_t, int64_t);
static forward_fn kernel_forward = nullptr;
static backward_fn kernel_backward = nullptr;

void set_kernels(int64_t forward_address, int64_t backward_address) {
  kernel_forward = reinterpret_cast<forward_fn>(forward_address);
  kernel_backward = reinterpret_cast<backward_fn>(backward_address);
}

struct GhostBatchNormNode : public torch::autograd::Function<GhostBatchNormNode> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor weight,
                               torch::Tensor bias, torch::Tensor running_mean,
                               torch::Tensor running_var, int64_t ghosts, double momentum,
                               double eps) {
    const int64_t batch = x.size(0), channels = x.size(1), spatial = x.numel() / (batch * channels);
    auto out = torch::empty_like(x);
    auto stats = torch::empty({3 * ghosts * channels}, x.options());
    TORCH_CHECK(kernel_forward(x.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
                               out.data_ptr<float>(), stats.data_ptr<float>(),
                               running_mean.data_ptr<float>(), running_var.data_ptr<float>(),
                               batch, channels, spatial, ghosts, eps, momentum) == 0, "out of memory");
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
    auto grad_x = torch::empty_like(x);
    auto grad_w = torch::empty({channels}, x.options()), grad_b = torch::empty({channels}, x.options());
    auto sums = torch::empty({2 * ghosts * channels}, x.options());
    TORCH_CHECK(kernel_backward(grad_out.data_ptr<float>(), x.data_ptr<float>(), weight.data_ptr<float>(),
                                stats.data_ptr<float>(), grad_x.data_ptr<float>(), grad_w.data_ptr<float>(),
                                grad_b.data_ptr<float>(), sums.data_ptr<float>(), batch, channels,
                                spatial, ghosts) == 0, "out of memory");
    torch::Tensor none;
    return {grad_x, grad_w, grad_b, none, none, none, none, none};
  }
};

torch::Tensor ghost_batch_norm(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                               torch::Tensor running_mean, torch::Tensor running_var, int64_t ghosts,
                               double momentum, double eps) {
  return GhostBatchNormNode::apply(x, weight, bias, running_mean, running_var, ghosts, momentum, eps);
}
"""


class CppNodeGhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Training-only layer calling the C++ node directly (no Python dispatch, no Python autograd)."""

    def __init__(self, extension: object, channels: int, ghost_batch_size: int) -> None:
        super().__init__(channels)
        self.extension = extension
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: Tensor) -> Tensor:
        assert self.num_batches_tracked is not None and self.running_mean is not None
        self.num_batches_tracked.add_(1)
        ghosts = x.shape[0] // self.ghost_batch_size
        return self.extension.ghost_batch_norm(  # type: ignore[attr-defined, no-any-return]
            x, self.weight, self.bias, self.running_mean, self.running_var, ghosts, 0.1, self.eps
        )


def build_extension() -> tuple[object, float]:
    lib = compiled.load_kernel()
    if lib is None:
        raise SystemExit("the C kernel is unavailable here (no C compiler?)")
    build_dir = Path(tempfile.gettempdir()) / "litplug_ghost_bn_cpp_op"
    build_dir.mkdir(exist_ok=True)
    start = time.perf_counter()
    extension = load_inline(
        "litplug_ghost_bn_cpp_op",
        cpp_sources=[CPP_SOURCE],
        functions=["ghost_batch_norm", "set_kernels"],
        extra_cflags=["-O2"],
        build_directory=str(build_dir),
    )
    seconds = time.perf_counter() - start
    address = ctypes.cast(lib.litplug_gbn_forward, ctypes.c_void_p).value
    backward_address = ctypes.cast(lib.litplug_gbn_backward, ctypes.c_void_p).value
    extension.set_kernels(address, backward_address)
    return extension, seconds


CASES = [((512, 256), 8), ((512, 256), 16), ((512, 256), 32), ((512, 256), 128), ((512, 32, 8, 8), 16)]


def measure(extension: object, shape: tuple[int, ...], ghost: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, grad_out = torch.randn(shape).requires_grad_(True), torch.randn(shape)
    plain = nn.BatchNorm1d(shape[1]) if len(shape) == 2 else nn.BatchNorm2d(shape[1])
    layers = {
        "plain": plain,
        "ctypes": GhostBatchNorm(shape[1], ghost),
        "cpp": CppNodeGhostBatchNorm(extension, shape[1], ghost),
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
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS_cpp_op.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extension, build_s = build_extension()
    load = os.getloadavg()
    lines = [
        "# Ghost batch norm: a C++ autograd node around the same kernel (experiment)",
        "",
        f"- Command: `python benchmarks/ghost_bn/cpp_op.py{' --threads ' + str(args.threads) if args.threads != 1 else ''}`",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M')} UTC; torch {torch.__version__}; "
        f"torch threads {torch.get_num_threads()}; load average before {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        f"- Extension build + load: {build_s:.1f} s (a cached build loads in well under a second)",
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
        r = measure(extension, shape, ghost, args.repeats)
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
