"""Admin initialisation (Liu et al. 2020) in pure torch: find, scale and profile post-LN sub-layers.

A post-LN residual sub-layer computes ``x_i = LN(omega_i * x_{i-1} + f_i(x_{i-1}))``. Admin sets
``omega_i`` so that the skip path grows with the variance accumulated by the earlier branches, which
keeps a deep post-LN stack from depending too heavily on its residual branches early in training.

Residual sub-layer protocol (what a model must offer, see
:class:`litplug.core.models.transformer.ResidualSublayer`): ``model.residual_sublayers()`` returns the
sub-layers in forward order; each has ``branch`` (``f_i``, called by the sub-layer's forward on the
sub-layer's input), ``norm`` (its LayerNorm), ``norm_position`` (``"post"`` or ``"pre"``) and a
registered parameter slot ``residual_scale`` (None until Admin assigns an ``nn.Parameter``).
Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = [
    "AdminModelError",
    "ProfileResult",
    "add_residual_scales",
    "closed_form_omega",
    "fill_residual_scales",
    "fold_omegas_into_weights",
    "post_ln_sublayers",
    "profile_omegas",
    "residual_scales",
]


class AdminModelError(ValueError):
    """The model does not follow the residual sub-layer protocol Admin needs."""


@dataclass(frozen=True)
class ProfileResult:
    """What one profiling pass measured, per post-LN sub-layer in forward order.

    ``omegas[i]`` is the scalar given to sub-layer ``i``; ``input_variances[i]`` is
    ``Var[omega_i * x_{i-1}]`` and ``branch_variances[i]`` is ``Var[f_i(x_{i-1})]``.
    """

    omegas: list[float]
    input_variances: list[float]
    branch_variances: list[float]


def closed_form_omega(num_sublayers: int) -> float:
    """admin-torch's profiling-free value ``sqrt((N + 1) / ln(N + 1) - 1)`` for ``N`` residual sub-layers.

    The same omega for every sub-layer; it does not depend on the batch, so it is the choice for very
    large batches where the profiled variances misbehave.
    """
    if num_sublayers < 1:
        raise ValueError(f"num_sublayers must be >= 1, got {num_sublayers}")
    n1 = num_sublayers + 1
    return math.sqrt(n1 / math.log(n1) - 1.0)


def post_ln_sublayers(model: nn.Module) -> list[nn.Module]:
    """The model's post-LN residual sub-layers in forward order (pre-LN ones are left out).

    Raises :class:`AdminModelError` when the model has no ``residual_sublayers()`` method, a sub-layer
    misses part of the protocol, or no sub-layer is post-LN (Admin only applies to post-LN).
    """
    getter = getattr(model, "residual_sublayers", None)
    if not callable(getter):
        raise AdminModelError(
            f"{type(model).__name__} has no residual_sublayers() method; Admin needs the residual "
            "sub-layer protocol (see litplug.core.models.transformer.ResidualSublayer)"
        )
    sublayers = list(getter())
    for index, sublayer in enumerate(sublayers):
        missing = [
            a for a in ("branch", "norm", "norm_position", "residual_scale") if not hasattr(sublayer, a)
        ]
        if missing:
            raise AdminModelError(
                f"residual sub-layer {index} ({type(sublayer).__name__}) lacks {missing} of the residual "
                "sub-layer protocol (branch, norm, norm_position, residual_scale)"
            )
    post = [s for s in sublayers if s.norm_position == "post"]
    if not post:
        raise AdminModelError(
            f"{type(model).__name__} has no post-LN residual sub-layers ({len(sublayers)} sub-layers, all "
            "norm_position != 'post'); Admin only applies to post-LN stacks (pre-LN needs no Admin)"
        )
    return post


def _width(sublayer: nn.Module) -> int:
    """The model width ``d`` of a sub-layer, read from its LayerNorm."""
    shape = getattr(sublayer.norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    weight = getattr(sublayer.norm, "weight", None)
    if isinstance(weight, Tensor) and weight.ndim >= 1:
        return int(weight.shape[-1])
    raise AdminModelError(
        f"cannot tell the width of {type(sublayer).__name__}: its norm has neither normalized_shape nor a weight"
    )


def _reference_tensor(sublayer: nn.Module) -> Tensor | None:
    """A parameter of the sub-layer, to create omegas on its device and dtype."""
    return next(iter(sublayer.parameters()), None)


def add_residual_scales(model: nn.Module, value: float = 1.0) -> int:
    """Give every post-LN sub-layer a trainable omega vector of size ``d`` filled with ``value``.

    Idempotent: a sub-layer that already has a ``residual_scale`` keeps it (so replaying the surgery
    before a checkpoint's weights load changes nothing). Returns how many omegas were created.
    """
    created = 0
    for sublayer in post_ln_sublayers(model):
        if sublayer.residual_scale is not None:
            continue
        reference = _reference_tensor(sublayer)
        kwargs: dict[str, Any] = {}
        if reference is not None:
            kwargs = {"device": reference.device, "dtype": reference.dtype}
        sublayer.residual_scale = nn.Parameter(torch.full((_width(sublayer),), float(value), **kwargs))
        created += 1
    return created


def residual_scales(model: nn.Module) -> list[nn.Parameter]:
    """The omega parameters of the post-LN sub-layers, in forward order (error if one is missing)."""
    scales = []
    for index, sublayer in enumerate(post_ln_sublayers(model)):
        scale = sublayer.residual_scale
        if not isinstance(scale, nn.Parameter):
            raise AdminModelError(
                f"post-LN sub-layer {index} has no residual_scale: run add_residual_scales first"
            )
        scales.append(scale)
    return scales


@torch.no_grad()
def fill_residual_scales(model: nn.Module, values: Sequence[float]) -> None:
    """Set every entry of omega ``i`` to ``values[i]`` in place (the optimizer keeps the same tensors)."""
    scales = residual_scales(model)
    if len(values) != len(scales):
        raise ValueError(f"got {len(values)} omega values for {len(scales)} post-LN sub-layers")
    for scale, value in zip(scales, values, strict=True):
        scale.fill_(float(value))


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Fork the global RNG (CPU, and the CUDA device in use) so profiling leaves training's stream as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _variance(x: Tensor) -> float:
    """Variance over all elements, in float64 (the recursion adds up dozens of terms)."""
    return float(x.detach().double().var())


def _distributed_world() -> int:
    """The ``torch.distributed`` world size, 1 when it is not initialised."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _moments(x: Tensor) -> Tensor:
    """``(count, mean, sum of squared deviations)`` of all elements of ``x``, in float64."""
    values = x.detach().double().reshape(-1)
    mean = values.mean()
    return torch.stack([values.new_tensor(float(values.numel())), mean, (values - mean).pow(2).sum()])


def _pooled_variances(tensors: Sequence[Tensor]) -> list[float]:
    """The variance over all elements of each tensor *across every rank's shard* (one collective).

    Each rank contributes ``(count, mean, M2)`` per tensor; the pooled variance is Chan et al.'s
    exact combination ``M2 = sum_k M2_k + sum_k n_k (mean_k - mean)^2``, ``var = M2 / (n - 1)``: the
    unbiased variance of the concatenated shards, as ``Tensor.var`` gives on the global batch in a
    single process (up to rounding). Every rank computes the same numbers from the same gathered
    tensor, so the results agree bit for bit across ranks.
    """
    dist = torch.distributed
    local = torch.stack([_moments(t) for t in tensors])  # (len(tensors), 3)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    stats = torch.stack(gathered)  # (world, len(tensors), 3)
    counts, means, m2 = stats[..., 0], stats[..., 1], stats[..., 2]
    total = counts.sum(dim=0)
    mean = (counts * means).sum(dim=0) / total
    pooled_m2 = m2.sum(dim=0) + (counts * (means - mean).pow(2)).sum(dim=0)
    return [float(v) for v in (pooled_m2 / (total - 1)).tolist()]


def _sublayer_variances(skip: Tensor, branch: Tensor) -> tuple[float, float]:
    """``Var[omega_i x_{i-1}]`` and ``Var[f_i(x_{i-1})]`` over the global batch.

    In one process: over this batch. Under ``torch.distributed`` (each rank holding a shard of the
    global batch): pooled across ranks, so the profile is that of the global batch on every rank.
    """
    if _distributed_world() == 1:
        return _variance(skip), _variance(branch)
    skip_var, branch_var = _pooled_variances([skip, branch])
    return skip_var, branch_var


@torch.no_grad()
def profile_omegas(model: nn.Module, inputs: Any) -> ProfileResult:
    """Admin's profiling pass: one forward of ``model(inputs)`` in training mode, setting omegas as it goes.

    With a running scalar ``r = 1``, for each post-LN sub-layer in the order the forward calls them:
    ``omega_i = r`` is written into the sub-layer's ``residual_scale`` before it runs, then
    ``r = sqrt(Var[omega_i * x_{i-1}] + Var[f_i(x_{i-1})])``, with ``x_{i-1}`` the sub-layer's input and
    ``f_i`` its branch output (after dropout: training mode). Later layers thus see the earlier
    layers' Admin outputs, as in the paper. Pre-LN sub-layers are skipped.

    The model's training/eval mode and the global RNG (CPU and the CUDA device) are restored, so
    training draws the same random numbers as without profiling. Gradients are off.

    Under ``torch.distributed`` with each rank holding a shard of the global batch, every variance is
    pooled across ranks (one all-gather of count, mean and sum of squared deviations per sub-layer),
    so the omegas are those of a single-process profile on the global batch, identical on every rank
    (every rank must call this, with the same model). Rank 0's scalars are broadcast at the end as a
    guard; they already agree.
    """
    sublayers = post_ln_sublayers(model)
    scales = residual_scales(model)
    state: dict[str, Any] = {"r": 1.0, "omegas": {}, "in_var": {}, "branch_var": {}, "order": []}
    branch_outputs: dict[int, Tensor] = {}
    handles = []

    def before_sublayer(index: int, sublayer: nn.Module, args: tuple[Any, ...]) -> None:
        if index in state["omegas"]:
            return  # a sub-layer called twice keeps its first omega
        state["omegas"][index] = state["r"]
        scales[index].fill_(state["r"])

    def after_branch(index: int, output: Tensor) -> None:
        branch_outputs.setdefault(index, output)

    def after_sublayer(index: int, sublayer: nn.Module, args: tuple[Any, ...]) -> None:
        if index in state["in_var"]:
            return
        if index not in branch_outputs:
            raise AdminModelError(f"post-LN sub-layer {index} ran without calling its branch")
        x = args[0]
        input_var, branch_var = _sublayer_variances(scales[index] * x, branch_outputs.pop(index))
        state["in_var"][index] = input_var
        state["branch_var"][index] = branch_var
        state["order"].append(index)
        state["r"] = math.sqrt(input_var + branch_var)

    for index, sublayer in enumerate(sublayers):
        handles.append(sublayer.register_forward_pre_hook(lambda m, a, i=index: before_sublayer(i, m, a)))
        handles.append(sublayer.register_forward_hook(lambda m, a, out, i=index: after_sublayer(i, m, a)))
        branch = cast(nn.Module, sublayer.branch)
        handles.append(branch.register_forward_hook(lambda m, a, out, i=index: after_branch(i, out)))
    was_training = model.training
    device = scales[0].device
    try:
        model.train()
        with _forked_rng(device):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [i for i in range(len(sublayers)) if i not in state["in_var"]]
    if missing:
        raise AdminModelError(f"the forward pass never called post-LN sub-layer(s) {missing}")
    omegas = [state["omegas"][i] for i in range(len(sublayers))]
    omegas = _broadcast_from_rank_zero(omegas, device)
    fill_residual_scales(model, omegas)
    return ProfileResult(
        omegas=omegas,
        input_variances=[state["in_var"][i] for i in range(len(sublayers))],
        branch_variances=[state["branch_var"][i] for i in range(len(sublayers))],
    )


def _broadcast_from_rank_zero(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's values on every rank when ``torch.distributed`` is initialised, else ``values``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return [float(v) for v in tensor.tolist()]


def _scale_branch_inputs(branch: nn.Module, inverse: Tensor) -> None:
    """Multiply the input features of the branch's first linear maps by ``inverse`` (in place)."""
    attention = getattr(branch, "attention", None)
    if isinstance(attention, nn.MultiheadAttention):
        if attention.in_proj_weight is None:
            raise AdminModelError("cannot fold into a MultiheadAttention with separate q/k/v projections")
        attention.in_proj_weight.mul_(inverse)
        return
    net = getattr(branch, "net", None)
    if isinstance(net, nn.Sequential) and isinstance(net[0], nn.Linear):
        net[0].weight.mul_(inverse)
        return
    raise AdminModelError(
        f"cannot fold an omega into a {type(branch).__name__} branch: only the reference model's "
        "CausalSelfAttention and FeedForward branches are supported"
    )


def _scale_sublayer_input(model: nn.Module, previous: nn.Module | None, omega: Tensor) -> None:
    """Multiply what feeds a sub-layer by ``omega``: the previous post-LN norm's affine or the embeddings."""
    if previous is None:
        token, position = getattr(model, "token_embedding", None), getattr(model, "position_embedding", None)
        if not (isinstance(token, nn.Embedding) and isinstance(position, nn.Embedding)):
            raise AdminModelError("cannot fold the first omega: the model has no token/position embeddings")
        token.weight.mul_(omega)
        position.weight.mul_(omega)
        return
    norm = previous.norm
    if previous.norm_position != "post" or not isinstance(norm, nn.LayerNorm) or norm.weight is None:
        raise AdminModelError(
            "cannot fold: a sub-layer's input must come from a post-LN LayerNorm with affine weights"
        )
    norm.weight.mul_(omega)
    if norm.bias is not None:
        norm.bias.mul_(omega)


@torch.no_grad()
def fold_omegas_into_weights(model: nn.Module, min_abs_omega: float = 1e-6) -> nn.Module:
    """A copy of ``model`` with every omega folded into the weights and ``residual_scale`` back to None.

    ``LN(omega * x + f(x))`` equals ``LN(x' + f(x' / omega))`` with ``x' = omega * x``: ``omega`` goes
    into what produces ``x`` (the previous sub-layer's LayerNorm affine, or the token and position
    embeddings for the first sub-layer) and ``1 / omega`` into the input columns of the branch's first
    linear maps (attention's packed q/k/v projection, the FFN's first layer). The copy computes the same
    function (up to rounding) with the plain post-LN forward, so it exports without Admin. Supports
    the reference :class:`~litplug.core.models.transformer.TransformerLanguageModel` layout (every
    sub-layer post-LN, applied in ``residual_sublayers()`` order); anything else is an error.
    """
    import copy

    folded = copy.deepcopy(model)
    sublayers: list[Any] = list(cast(Any, folded).residual_sublayers())  # the protocol is duck-typed
    post = post_ln_sublayers(folded)
    if len(post) != len(sublayers):
        raise AdminModelError("cannot fold omegas in a model that mixes pre-LN and post-LN sub-layers")
    previous: nn.Module | None = None
    for index, sublayer in enumerate(sublayers):
        omega = sublayer.residual_scale
        if omega is not None:
            if float(omega.abs().min()) < min_abs_omega:
                raise AdminModelError(f"omega of sub-layer {index} has an entry near 0: cannot divide by it")
            _scale_sublayer_input(folded, previous, omega)
            _scale_branch_inputs(sublayer.branch, 1.0 / omega)
            sublayer.residual_scale = None
        previous = sublayer
    return folded
