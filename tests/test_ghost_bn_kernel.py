"""The compiled ghost batch norm kernel against the torch-ops path: values, gradients, fallbacks."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from litplug.plugins.ghost_bn import GhostBatchNorm, compiled

pytestmark = pytest.mark.skipif(
    compiled._compiler() is None, reason="no C compiler on this machine: the torch path is tested alone"
)


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for this module: the first test builds the kernel (about a second)."""
    return tmp_path_factory.mktemp("litplug_cache")


@contextlib.contextmanager
def _cache_at(monkeypatch: pytest.MonkeyPatch, directory: Path) -> Iterator[Path]:
    """Kernel cache in ``directory``, kernel on, nothing loaded yet; forgotten again afterwards."""
    monkeypatch.setenv("LITPLUG_CACHE_DIR", str(directory))
    monkeypatch.delenv(compiled.KERNEL_ENV, raising=False)
    compiled._reset_for_tests()
    try:
        yield directory
    finally:
        compiled._reset_for_tests()


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch, kernel_cache: Path) -> Iterator[Path]:
    """The kernel loaded anew from this module's cache (built there by the first test to ask)."""
    with _cache_at(monkeypatch, kernel_cache) as directory:
        yield directory


@pytest.fixture
def empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A cold, empty cache directory: the next call builds (or fails to build) into it."""
    with _cache_at(monkeypatch, tmp_path) as directory:
        yield directory


def _layer(channels: int, ghost: int, **kwargs: object) -> GhostBatchNorm:
    layer = GhostBatchNorm(channels, ghost, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.normal_()
        if layer.running_mean is not None:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    return layer


def _run(layer: nn.Module, x: Tensor, grad_out: Tensor, use_kernel: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(compiled.KERNEL_ENV, "1" if use_kernel else "0")
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    kernel_ran = type(y.grad_fn).__name__.startswith("_GhostBatchNormKernel")
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(y, [x, *params], grad_out)
    return y.detach(), grads, kernel_ran


CASES = {  # name -> (input shape, ghost size, GhostBatchNorm keywords)
    "mlp_64_ghosts": ((512, 256), 8, {}),
    "mlp_4_ghosts": ((512, 256), 128, {}),
    "channels_over_one_block": ((64, 700), 8, {}),  # 8 * 700 columns: blocks end mid-ghost
    "seq_1d": ((96, 5, 3), 4, {}),
    "conv_2d": ((64, 6, 5, 5), 16, {}),
    "conv_3d": ((40, 3, 2, 2, 2), 4, {}),
    "no_affine": ((48, 7, 4), 6, {"affine": False}),
    "no_running_stats": ((48, 7), 6, {"track_running_stats": False}),
    "cumulative_momentum": ((48, 7, 2, 2), 12, {"momentum": None}),
    # 2^20 values, 64 per channel: a 4 MB activation, well past the caches' per-ghost reuse
    "conv_large": ((256, 64, 8, 8), 16, {}),
    # as large, with 49 values per channel: runs that are not whole vectors
    "conv_large_unaligned_runs": ((384, 64, 7, 7), 16, {}),
    # short channels (S < 64) take the column-block path
    "conv_short_channels": ((512, 64, 4, 4), 16, {}),
    "conv_short_channels_uneven_blocks": ((96, 7, 3, 3), 8, {}),  # 504-column blocks, a partial last one
    # long channels (S >= 64) take the one-ghost-per-item path
    "conv_long_channels": ((64, 3, 40, 40), 32, {}),
}
LARGE_CASE = "conv_large"
# [B, C] matrices of few 512-column blocks: with several threads the kernel narrows its blocks
# (to 128 and 64 columns here with 2 and 4 threads; the second ends in a partial block)
NARROWED_CASES = {"two_ghosts_of_128": ((256, 256), 128), "partial_narrow_block": ((200, 300), 100)}


PARTITIONS = ["contiguous", "strided"]


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_torch_path(
    case: str, partition: str, fresh_kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape, ghost, kwargs = CASES[case]
    torch.manual_seed(0)
    reference = _layer(shape[1], ghost, partition=partition, **kwargs)
    layer = copy.deepcopy(reference)
    for _ in range(3):  # several steps: the running statistics compound
        x = torch.randn(*shape) * 3 + 1
        grad_out = torch.randn(*shape)
        y_ref, grads_ref, ran_ref = _run(reference, x, grad_out, False, monkeypatch)
        y, grads, ran = _run(layer, x, grad_out, True, monkeypatch)
        assert ran and not ran_ref, "the kernel ran on one side only"
        torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(grads[0], grads_ref[0], atol=1e-5, rtol=1e-4)
        # weight / bias gradients are float sums over B * S terms that largely cancel: against a
        # float64 reference both paths are off by up to ~7e-5 on the 2^20-value cases
        for got, want in zip(grads[1:], grads_ref[1:], strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(dict(layer.named_buffers())[name], buf, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("case", list(NARROWED_CASES))
def test_narrowed_blocks_equal_torch_path(
    case: str, threads: int, partition: str, fresh_kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape, ghost = NARROWED_CASES[case]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(4)
        reference = _layer(shape[1], ghost, partition=partition)
        layer = copy.deepcopy(reference)
        x, grad_out = torch.randn(*shape) * 2 - 1, torch.randn(*shape)
        y_ref, grads_ref, _ = _run(reference, x, grad_out, False, monkeypatch)
        y, grads, ran = _run(layer, x, grad_out, True, monkeypatch)
    finally:
        torch.set_num_threads(before)
    assert ran
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(dict(layer.named_buffers())[name], buf, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("partition", PARTITIONS)
def test_result_does_not_depend_on_the_thread_count(partition: str, fresh_kernel: Path) -> None:
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        torch.manual_seed(1)
        try:
            # 2^18-2^20 values, far above the size from which the kernel runs threaded
            # (PARALLEL_MIN_VALUES), one per path: [B, C], long and short channels, a 4 MB one, and
            # [B, C] matrices whose blocks narrow under 2 threads
            cases = (
                ((1024, 256), 8),
                ((512, 8, 8, 8), 16),
                ((512, 64, 4, 4), 16),
                CASES[LARGE_CASE][:2],
                *NARROWED_CASES.values(),
            )
            for shape, ghost in cases:
                layer = _layer(shape[1], ghost, partition=partition)
                x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), requires_grad=True)
                y = layer(x)
                results.append((y, *torch.autograd.grad(y, [x, *layer.parameters()], torch.ones_like(y))))
        finally:
            torch.set_num_threads(threads)
    half = len(results) // 2
    for one, two in zip(results[:half], results[half:], strict=True):
        for a, b in zip(one, two, strict=True):
            assert torch.equal(a, b)


def test_double_backward_goes_through_torch_ops(fresh_kernel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gradient penalty (d/dparams of |dy/dx|^2) is the same with and without the kernel.

    dy/dx is taken against fixed random output weights: against ``y`` itself it is analytically
    ~0 (a normalisation's output is orthogonal to its input gradient), which compares only rounding.
    """
    torch.manual_seed(2)
    reference = _layer(12, 4)
    layer = copy.deepcopy(reference)
    x0 = torch.randn(32, 12)
    out_weights = torch.randn(32, 12)

    def penalty_grads(module: GhostBatchNorm, use_kernel: bool) -> list[Tensor]:
        monkeypatch.setenv(compiled.KERNEL_ENV, "1" if use_kernel else "0")
        x = x0.clone().requires_grad_(True)
        y = module(x)
        assert type(y.grad_fn).__name__.startswith("_GhostBatchNormKernel") == use_kernel
        (grad_x,) = torch.autograd.grad((y * out_weights).sum(), x, create_graph=True)
        inputs = [x, *module.parameters()]  # the bias drops out of dy/dx: its gradient is zero
        return list(torch.autograd.grad(grad_x.pow(2).sum(), inputs, materialize_grads=True))

    for got, want in zip(penalty_grads(layer, True), penalty_grads(reference, False), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_channels_last_runs_the_kernel_and_equals_contiguous(fresh_kernel: Path) -> None:
    torch.manual_seed(3)
    layer = _layer(4, 8)
    twin = copy.deepcopy(layer)
    x = torch.randn(32, 4, 3, 3)
    y = layer(x.contiguous(memory_format=torch.channels_last))
    assert type(y.grad_fn).__name__ == "_GhostBatchNormKernelBackward"  # fed a contiguous copy
    assert torch.equal(y, twin(x))
    assert torch.equal(layer.running_var, twin.running_var)


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda: torch.randn(32, 6, dtype=torch.float64), id="float64"),
        pytest.param(lambda: torch.randn(30, 6), id="uneven_batch"),
    ],
)
def test_outside_its_scope_the_torch_path_runs(make_input, fresh_kernel: Path) -> None:  # type: ignore[no-untyped-def]
    x = make_input()
    layer = GhostBatchNorm(6, 8).to(x.dtype)
    y = layer(x.requires_grad_(True))
    assert not type(y.grad_fn).__name__.startswith("_GhostBatchNormKernel")


def test_torch_func_transforms_get_the_torch_path(fresh_kernel: Path) -> None:
    """torch.func cannot see through a ctypes call; per-sample gradients of a GBN model still work."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), GhostBatchNorm(6, 4), nn.Linear(6, 1))
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(16, 5)

    def loss(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, (p, b), (x,)).pow(2).mean()

    grads = torch.func.grad(loss)(params, buffers)  # buffers are inputs: GBN updates them in place
    expected = torch.autograd.grad(model(x).pow(2).mean(), list(params.values()))
    for got, want in zip(grads.values(), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_a_failing_build_warns_once_and_falls_back(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled, "_compiler", lambda: "false")  # a "compiler" that always fails
    layer = _layer(6, 4)
    twin = copy.deepcopy(layer)
    x = torch.randn(16, 6)
    with pytest.warns(RuntimeWarning, match="ghost_bn: the compiled kernel is unavailable"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        layer(x)
    monkeypatch.setenv(compiled.KERNEL_ENV, "0")
    torch.testing.assert_close(y, twin(x), atol=0, rtol=0)


def test_disabled_by_environment(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compiled.KERNEL_ENV, "0")
    assert compiled.load_kernel() is None
    assert not any(empty_cache.iterdir()), "a disabled kernel must not be built"


def test_builds_into_an_empty_cache_and_reuses_it(empty_cache: Path) -> None:
    lib = compiled.load_kernel()
    assert lib is not None and lib.litplug_gbn_abi() == compiled.ABI_VERSION
    built = sorted(empty_cache.iterdir())
    assert [p.suffix for p in built] == [".so"], f"expected one library and no leftovers, got {built}"
    compiled._reset_for_tests()
    mtime = built[0].stat().st_mtime_ns
    assert compiled.load_kernel() is not None
    assert built[0].stat().st_mtime_ns == mtime, "a cached kernel was rebuilt"


def test_concurrent_first_builds_share_one_library(empty_cache: Path) -> None:
    """Two processes (e.g. DDP ranks, pytest workers) building at once both load the kernel."""
    script = (
        "import torch; from litplug.plugins.ghost_bn import compiled; "
        "assert compiled.load_kernel() is not None; print('ok')"
    )
    env = {**os.environ, "LITPLUG_CACHE_DIR": str(empty_cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() == "ok", err[-2000:]
    built = sorted(empty_cache.iterdir())
    assert [p.suffix for p in built] == [".so"], f"expected one library and no leftovers, got {built}"


def test_an_unwritable_cache_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the cache directory should be")
    with _cache_at(monkeypatch, blocker / "litplug"):
        with pytest.warns(RuntimeWarning, match="compiled kernel is unavailable"):
            assert compiled.load_kernel() is None
        layer = GhostBatchNorm(6, 4)
        y = layer(torch.randn(16, 6, requires_grad=True))
        assert not type(y.grad_fn).__name__.startswith("_GhostBatchNormKernel")


def test_inputs_outside_its_scope_never_build_it(empty_cache: Path) -> None:
    """GPU or float64 users do not pay for (or get warned about) a CPU float32 kernel."""
    layer = GhostBatchNorm(6, 4).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(16, 6, dtype=torch.float64))
    assert not any(empty_cache.iterdir())
