"""Tests of the ghost batch norm plugin: exactness against BatchNorm and a chunk loop, surgery, errors."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litplug.core.data import DigitsDataModule
from litplug.core.discovery import builtin_plugins
from litplug.core.errors import PluginConfigError, PluginSetupError
from litplug.core.models import MLP, SmallCNN
from litplug.core.module import LitplugModule
from litplug.plugins.ghost_bn import (
    GhostBatchNorm,
    GhostBatchNormPlugin,
    ghost_batch_norm,
    ghost_batch_sizes,
    replace_batchnorms,
)

SHAPES = {  # BatchNorm class -> an input shape (batch first)
    "1d": (nn.BatchNorm1d, (24, 6)),
    "1d_seq": (nn.BatchNorm1d, (24, 6, 5)),
    "2d": (nn.BatchNorm2d, (24, 4, 3, 3)),
    "3d": (nn.BatchNorm3d, (24, 3, 2, 3, 2)),
}


def _random_bn(bn_cls: type[nn.Module], channels: int) -> nn.Module:
    bn = bn_cls(channels)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def _step(layer: nn.Module, x: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out)
    assert x.grad is not None
    return y.detach(), x.grad


# -- the layer against BatchNorm ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("ghost", [24, 32, 1000])
def test_ghost_covering_the_batch_equals_batchnorm(kind: str, ghost: int) -> None:
    torch.manual_seed(0)
    bn_cls, shape = SHAPES[kind]
    bn = _random_bn(bn_cls, shape[1])
    gbn = GhostBatchNorm.from_batchnorm(copy.deepcopy(bn), ghost)
    for _ in range(3):  # several steps: running statistics accumulate identically
        x, grad_out = torch.randn(shape) * 2 + 0.5, torch.randn(shape)
        y_bn, gx_bn = _step(bn, x, grad_out)
        y_g, gx_g = _step(gbn, x, grad_out)
        torch.testing.assert_close(y_g, y_bn, atol=1e-6, rtol=0)
        torch.testing.assert_close(gx_g, gx_bn, atol=1e-6, rtol=0)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(gbn, name).grad, getattr(bn, name).grad, atol=1e-6, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(gbn, name), getattr(bn, name), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_eval_mode_traces_and_exports_for_any_batch_size(kind: str) -> None:
    """Eval is BatchNorm whatever the batch: jit.trace (ONNX's legacy exporter) and torch.export
    with a free batch size must not record the ghost split of the example's batch size."""
    torch.manual_seed(2)
    bn_cls, shape = SHAPES[kind]
    bn = _random_bn(bn_cls, shape[1]).eval()
    gbn = GhostBatchNorm.from_batchnorm(copy.deepcopy(bn), 8).eval()
    example, other = torch.randn(shape), torch.randn(5, *shape[1:])
    with torch.no_grad():
        traced = torch.jit.trace(gbn, example)
    exported = torch.export.export(gbn, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with torch.no_grad():
        for run in (traced, exported.module()):
            torch.testing.assert_close(run(other), bn(other), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_eval_equals_batchnorm_eval(kind: str) -> None:
    torch.manual_seed(1)
    bn_cls, shape = SHAPES[kind]
    gbn = GhostBatchNorm.from_batchnorm(_random_bn(bn_cls, shape[1]), 8)
    gbn(torch.randn(shape))  # a ghost training step moves the running statistics
    bn = bn_cls(shape[1])
    bn.load_state_dict(gbn.state_dict())  # same names: a plain BatchNorm loads the ghost state
    bn.eval()
    gbn.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(gbn(x), bn(x), atol=0, rtol=0)


# -- the layer against a reference loop over ghost batches ----------------------------------------


def _reference_loop(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running: tuple[Tensor, Tensor],
    ghost: int,
    momentum: float,
    eps: float,
    partition: str = "contiguous",
) -> Tensor:
    """Python loop over the documented ghost batches: the equal part (contiguous chunks, or strided
    rows ``k, k + m, ...``), then one tail batch.

    Normalises each with hand-written statistics and updates ``running`` with the documented rule
    (size-weighted mean of ghost means, dof-weighted mean of unbiased ghost variances).
    """
    num_equal, _, tail = ghost_batch_sizes(x.shape[0], ghost)
    if partition == "contiguous":
        groups = [torch.arange(k * ghost, (k + 1) * ghost) for k in range(num_equal)]
    else:
        groups = [torch.arange(k, num_equal * ghost, num_equal) for k in range(num_equal)]
    if tail:
        groups.append(torch.arange(num_equal * ghost, x.shape[0]))
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    out = torch.empty_like(x)
    means, variances, dofs, sizes = [], [], [], []
    for idx in groups:
        chunk = x[idx]
        mean = chunk.mean(dims, keepdim=True)
        var = chunk.var(dims, unbiased=False, keepdim=True)
        out[idx] = (chunk - mean) / torch.sqrt(var + eps) * weight.view(view) + bias.view(view)
        count = chunk.numel() // x.shape[1]
        means.append(mean.flatten().detach())
        variances.append(var.flatten().detach() * count / (count - 1))
        dofs.append(count - 1)
        sizes.append(len(idx))
    w_mean = torch.tensor(sizes, dtype=x.dtype)[:, None]
    w_var = torch.tensor(dofs, dtype=x.dtype)[:, None]
    pooled_mean = (w_mean * torch.stack(means)).sum(0) / w_mean.sum()
    pooled_var = (w_var * torch.stack(variances)).sum(0) / w_var.sum()
    running[0].mul_(1 - momentum).add_(momentum * pooled_mean)
    running[1].mul_(1 - momentum).add_(momentum * pooled_var)
    return out


@pytest.mark.parametrize("partition", ["contiguous", "strided"])
@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("batch", [64, 70, 76])  # even; remainder 6 joins a ghost; remainder 12 alone
def test_matches_reference_chunk_loop(kind: str, batch: int, partition: str) -> None:
    torch.manual_seed(2)
    bn_cls, shape = SHAPES[kind]
    shape = (batch, *shape[1:])
    bn = _random_bn(bn_cls, shape[1])
    x = torch.randn(shape) * 3 - 1
    grad_out = torch.randn(shape)

    weight = bn.weight.detach().clone().requires_grad_(True)
    bias = bn.bias.detach().clone().requires_grad_(True)
    running = (bn.running_mean.clone(), bn.running_var.clone())
    x_ref = x.clone().requires_grad_(True)
    _reference_loop(x_ref, weight, bias, running, 16, 0.1, bn.eps, partition).backward(grad_out)

    gbn = GhostBatchNorm.from_batchnorm(bn, 16, partition=partition)  # type: ignore[arg-type]
    y, gx = _step(gbn, x, grad_out)
    y_ref = _reference_loop(
        x, weight.detach(), bias.detach(), (running[0].clone(), running[1].clone()), 16, 0.1, 1e-5, partition
    )
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gbn.weight.grad, weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gbn.bias.grad, bias.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gbn.running_mean, running[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gbn.running_var, running[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ghost", [8, 32])
def test_equal_ghosts_match_reference_over_steps_in_double(ghost: int) -> None:
    """The fused equal-ghost path (running buffers tiled into the kernel) against the loop, 3 steps.

    float64, so agreement to 1e-10 checks the formulas, not float32 rounding: outputs, gradients of
    input, weight and bias, and the running statistics after each step (MLP-shaped input).
    """
    torch.manual_seed(6)
    bn = _random_bn(nn.BatchNorm1d, 16).double()
    gbn = GhostBatchNorm.from_batchnorm(copy.deepcopy(bn), ghost)
    weight = bn.weight.detach().clone().requires_grad_(True)
    bias = bn.bias.detach().clone().requires_grad_(True)
    running = (bn.running_mean.clone(), bn.running_var.clone())
    for step in range(3):
        x = (torch.randn(128, 16, dtype=torch.float64) * (step + 1) + step).requires_grad_(True)
        grad_out = torch.randn(128, 16, dtype=torch.float64)
        weight.grad = bias.grad = gbn.weight.grad = gbn.bias.grad = None
        y_ref = _reference_loop(x, weight, bias, running, ghost, 0.1, bn.eps)
        gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, [x, weight, bias], grad_out)
        y = gbn(x)
        gx, gw, gb = torch.autograd.grad(y, [x, gbn.weight, gbn.bias], grad_out)
        for got, want in [(y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)]:
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        torch.testing.assert_close(gbn.running_mean, running[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(gbn.running_var, running[1], atol=1e-12, rtol=0)


def test_running_statistics_update_the_shared_buffers_in_place() -> None:
    """from_batchnorm shares buffers: a ghost training step must move the original layer's too."""
    bn = nn.BatchNorm1d(4)
    gbn = GhostBatchNorm.from_batchnorm(bn, 4)
    mean_before = bn.running_mean.clone()
    gbn(torch.randn(16, 4) + 3)
    assert gbn.running_mean is bn.running_mean
    assert (bn.running_mean - mean_before).abs().min() > 0.1  # moved towards 3 by momentum 0.1
    torch.testing.assert_close(gbn.running_var, bn.running_var, atol=0, rtol=0)


def test_without_running_statistics() -> None:
    torch.manual_seed(7)
    x = torch.randn(32, 5)
    gbn = GhostBatchNorm(5, ghost_batch_size=8, track_running_stats=False)
    assert gbn.running_mean is None
    expected = ghost_batch_norm(x, torch.zeros(5), torch.ones(5), gbn.weight, gbn.bias, 8)
    torch.testing.assert_close(gbn(x), expected, atol=0, rtol=0)
    gbn.eval()  # no running statistics: ghost statistics in eval too, like BatchNorm's batch stats
    torch.testing.assert_close(gbn(x), expected, atol=0, rtol=0)


def test_channels_last_input_equals_contiguous() -> None:
    torch.manual_seed(8)
    gbn = GhostBatchNorm.from_batchnorm(_random_bn(nn.BatchNorm2d, 4), 8)
    ref = copy.deepcopy(gbn)
    x = torch.randn(32, 4, 3, 3)
    grad_out = torch.randn(32, 4, 3, 3)
    y_ref, gx_ref = _step(ref, x, grad_out)
    y, gx = _step(gbn, x.contiguous(memory_format=torch.channels_last), grad_out)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(gbn.running_var, ref.running_var, atol=1e-7, rtol=0)


def test_twice_differentiable() -> None:
    """The fused path stays differentiable twice (gradient penalties, torch.func)."""
    torch.manual_seed(9)
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return ghost_batch_norm(x, None, None, weight, bias, 4)

    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_ghost_split_rule() -> None:
    assert ghost_batch_sizes(512, 32) == (16, 32, 0)
    assert ghost_batch_sizes(233, 32) == (6, 32, 41)  # remainder 9 <= 16 joins the last ghost batch
    assert ghost_batch_sizes(530, 32) == (16, 32, 18)  # remainder 18 > 16 is its own ghost batch
    assert ghost_batch_sizes(40, 32) == (0, 32, 40)  # one ghost batch: plain BatchNorm
    for batch in range(2, 200):
        for ghost in (2, 3, 8, 32):
            num_equal, g, tail = ghost_batch_sizes(batch, ghost)
            assert num_equal * g + tail == batch
            assert tail == 0 or tail >= 2


def test_ghost_statistics_differ_from_full_batch() -> None:
    torch.manual_seed(3)
    bn = nn.BatchNorm1d(5)
    gbn = GhostBatchNorm.from_batchnorm(copy.deepcopy(bn), 8)
    x = torch.randn(64, 5) * torch.linspace(0.5, 3, 64)[:, None]  # ghost batches differ in scale
    y_ghost, y_full = gbn(x), bn(x)
    assert (y_ghost - y_full).abs().max() > 0.1
    for k in range(8):  # ghost k = rows 8k .. 8k+7: each is normalised by its own statistics
        rows = y_ghost[8 * k : 8 * k + 8]
        torch.testing.assert_close(rows.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.var(0, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_cumulative_momentum_none() -> None:
    torch.manual_seed(4)
    gbn = GhostBatchNorm(3, ghost_batch_size=4, momentum=None)
    batches = [torch.randn(16, 3) + i for i in range(3)]
    for x in batches:
        gbn(x)
    expected = torch.stack([x.mean(0) for x in batches]).mean(0)  # equal ghosts: pooled mean = batch mean
    torch.testing.assert_close(gbn.running_mean, expected, atol=1e-5, rtol=0)
    assert int(gbn.num_batches_tracked) == 3


def test_functional_rejects_bad_arguments() -> None:
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="momentum"):
        ghost_batch_norm(x, torch.zeros(3), torch.ones(3), None, None, 4, None, 1e-5, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ghost_batch_size"):
        ghost_batch_norm(x, None, None, None, None, 1, 0.1, 1e-5, True)
    with pytest.raises(ValueError, match="expected"):
        GhostBatchNorm.from_batchnorm(nn.BatchNorm2d(3), 4)(x)
    with pytest.raises(
        ValueError, match=r"ghost_batch_norm: partition must be one of \('strided', 'contiguous'\)"
    ):
        ghost_batch_norm(x, None, None, None, None, 4, 0.1, 1e-5, True, partition="chunked")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="GhostBatchNorm: partition"):
        GhostBatchNorm(3, 4, partition="rows")  # type: ignore[arg-type]


def test_partitions_group_the_documented_examples() -> None:
    """Contiguous: ghost k is rows k*g .. k*g+g-1 (a chunk loop's batches); strided: rows k, k+m, ..."""
    torch.manual_seed(7)
    x = torch.randn(24, 5) * 2 + 1
    chunks = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.chunk(3)])
    strided = torch.empty_like(x)
    for k in range(3):
        strided[k::3] = F.batch_norm(x[k::3], None, None, training=True)
    for use_kernel in (True, False):
        got_c = ghost_batch_norm(x, None, None, None, None, 8, use_kernel=use_kernel)
        got_s = ghost_batch_norm(x, None, None, None, None, 8, partition="strided", use_kernel=use_kernel)
        torch.testing.assert_close(got_c, chunks, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_s, strided, atol=1e-6, rtol=0)
    assert not torch.allclose(chunks, strided, atol=1e-3)  # the two really group differently


# -- surgery --------------------------------------------------------------------------------------


def test_surgery_is_idempotent_and_keeps_state_dict() -> None:
    model = SmallCNN(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {name: id(p) for name, p in model.named_parameters()}
    replace_batchnorms(model, 8)
    ghosts = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 2 and all(g.ghost_batch_size == 8 for g in ghosts)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0)
    assert {name: id(p) for name, p in model.named_parameters()} == params  # optimizer-visible objects

    replace_batchnorms(model, 16)  # already ghost: left alone
    assert [m for m in model.modules() if isinstance(m, GhostBatchNorm)] == ghosts
    assert all(g.ghost_batch_size == 8 for g in ghosts)
    assert isinstance(replace_batchnorms(nn.BatchNorm1d(3), 4), GhostBatchNorm)  # the root itself


def test_plugin_hook_replaces_layers_once() -> None:
    model = MLP(batch_norm=True, hidden_dims=(16, 16))
    module = LitplugModule(model, plugins=[GhostBatchNormPlugin(ghost_batch_size=4)])
    module.apply_surgery()
    module.surgery_done = False
    module.apply_surgery()  # the hook itself runs twice: nothing changes
    ghosts = [m for m in module.model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 2


# -- plugin configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_bad_ghost_batch_size(bad: object) -> None:
    with pytest.raises(PluginConfigError, match="ghost_batch_size"):
        GhostBatchNormPlugin(ghost_batch_size=bad)  # type: ignore[arg-type]


def test_bad_partition_names_plugin_argument_and_choices() -> None:
    with pytest.raises(PluginConfigError, match=r"ghost_bn.*partition.*'strided', 'contiguous'.*'rows'"):
        GhostBatchNormPlugin(partition="rows")  # type: ignore[arg-type]


@pytest.mark.parametrize("partition", ["contiguous", "strided"])
def test_plugin_passes_its_partition_to_every_layer(partition: str) -> None:
    module = LitplugModule(SmallCNN(width=4), plugins=[GhostBatchNormPlugin(8, partition=partition)])  # type: ignore[arg-type]
    module.apply_surgery()
    ghosts = [m for m in module.model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 2 and all(g.partition == partition for g in ghosts)


def test_model_without_batchnorm() -> None:
    with pytest.raises(PluginSetupError, match="ghost_bn"):
        LitplugModule(MLP(batch_norm=False), plugins=[GhostBatchNormPlugin()])
    LitplugModule(MLP(batch_norm=False), plugins=[GhostBatchNormPlugin(allow_no_batchnorm=True)])


def _trainer(**kwargs: object) -> L.Trainer:
    defaults: dict[str, object] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**defaults, **kwargs})  # type: ignore[arg-type]


def test_ghost_larger_than_per_device_batch_fails_at_setup() -> None:
    module = LitplugModule(SmallCNN(width=4), plugins=[GhostBatchNormPlugin(ghost_batch_size=32)])
    data = DigitsDataModule(form="image", batch_size=16)
    with pytest.raises(PluginConfigError, match=r"ghost_batch_size.*32.*16"):
        _trainer(max_steps=1).fit(module, datamodule=data)


def test_ghost_larger_than_first_batch_without_datamodule() -> None:
    module = LitplugModule(
        MLP(batch_norm=True, hidden_dims=(8,)), plugins=[GhostBatchNormPlugin(ghost_batch_size=32)]
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(40, 64), torch.randint(0, 10, (40,))), batch_size=10
    )
    with pytest.raises(PluginConfigError, match=r"ghost_batch_size.*32.*10"):
        _trainer(max_steps=1).fit(module, train_dataloaders=loader)


def test_registered_and_example() -> None:
    assert any(info.cls is GhostBatchNormPlugin for info in builtin_plugins())
    example = GhostBatchNormPlugin.example()
    assert example.ghost_batch_size == 8
    assert GhostBatchNormPlugin.summary().startswith("Ghost batch norm")
    assert example.state_dict() == {}


# -- a short fit ----------------------------------------------------------------------------------


def test_short_fit_on_digits() -> None:
    torch.manual_seed(5)
    module = LitplugModule(
        SmallCNN(width=8),
        plugins=[GhostBatchNormPlugin(ghost_batch_size=16)],
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    )
    data = DigitsDataModule(form="image", batch_size=128)
    trainer = _trainer(max_steps=6, limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    ghosts = [m for m in module.model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 2
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    for ghost in ghosts:
        assert id(ghost.weight) in optimized and id(ghost.bias) in optimized
        assert int(ghost.num_batches_tracked) == 6
    assert not torch.allclose(ghosts[0].weight, torch.ones_like(ghosts[0].weight))  # affine params trained
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_f_batch_norm_reference_is_what_plain_path_calls() -> None:
    """Guard: one ghost batch goes through F.batch_norm unchanged (the exactness tests rely on it)."""
    x = torch.randn(10, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    out = ghost_batch_norm(x, rm.clone(), rv.clone(), None, None, 10, 0.1, 1e-5, True)
    torch.testing.assert_close(out, F.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5), atol=0, rtol=0)


@pytest.mark.parametrize("partition", ["contiguous", "strided"])
@pytest.mark.parametrize("batch", [32, 36])  # equal ghost batches; a tail of 4 joins the last one
@pytest.mark.parametrize("model_fn", [lambda: MLP(64, [16], batch_norm=True), lambda: SmallCNN(width=4)])
def test_vmapped_deep_ensemble_equals_its_sequential_members(model_fn, batch: int, partition: str) -> None:
    """A deep ensemble's vmap path (torch.func over stacked members) runs ghost batch norm like a
    loop over the members: outputs, gradients and every member's running statistics."""
    from litplug.plugins.ensemble import MemberStack, make_members, sum_of_member_losses

    inputs = torch.rand(batch, 64) if isinstance(model_fn(), MLP) else torch.rand(batch, 1, 8, 8)
    targets = torch.randint(0, 10, (batch,))
    results = []
    for path in ("sequential", "vmap"):
        torch.manual_seed(0)
        model = replace_batchnorms(model_fn(), 8, partition=partition)
        stack = MemberStack(make_members(model, 3, base_seed=0)).train()
        loss = sum_of_member_losses(stack.forward_with(path, inputs), targets)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in stack.parameters()], list(stack.buffers())))
    (loss_a, grads_a, buffers_a), (loss_b, grads_b, buffers_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(buffers_a, buffers_b, strict=True):
        torch.testing.assert_close(a, b)
    assert all(int(b) == 1 for b in buffers_b if not b.is_floating_point())
