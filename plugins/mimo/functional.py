"""MIMO (Havasi et al. 2021) in pure torch: model surgery, member batches, loss and prediction.

One network holds ``M`` subnetworks. Its input layer takes the ``M`` members' inputs concatenated
along dim 1 (channels of ``[B, C, H, W]`` images, features of ``[B, F]`` vectors) and its output
layer gives ``M`` heads side by side along the last dim (``[B, M * K]``, head ``m`` in block ``m``).

Layout conventions used everywhere below:

- member inputs: ``[B, M * S0, *S[1:]]`` for examples of shape ``S``; block ``m`` of dim 1 is
  member ``m``'s input. A model that flattens its input (the reference MLP) therefore sees member
  ``m``'s features in block ``m`` of the flat vector, which is how the widened first Linear is laid out.
- member targets: ``[B, M]`` (training) or ``[B]`` (evaluation: every head has the same target).
- outputs: ``[B, M * K]``; :func:`split_heads` views them as ``[B, M, K]``.

No Lightning import: usable in any training loop.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MIMO_MEMBERS_ATTR",
    "MIMOInputConv2d",
    "MIMOInputLinear",
    "MIMOSurgeryError",
    "default_layer_paths",
    "ensemble_log_probs",
    "get_layer",
    "member_indices",
    "member_log_probs",
    "member_metrics",
    "mimo_loss",
    "mimo_predict",
    "repeat_inputs",
    "resolve_layer_paths",
    "set_layer",
    "split_heads",
    "stack_member_inputs",
    "sum_member_blocks",
    "widen_input_layer",
    "widen_model",
    "widen_output_layer",
]

#: Attribute set on a widened model: its number of members (makes the surgery idempotent).
MIMO_MEMBERS_ATTR = "_litplug_mimo_members"

WidenableLayer = nn.Linear | nn.Conv2d


class MIMOSurgeryError(ValueError):
    """A model's input/output layer cannot be found or widened; ``argument`` names the culprit."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        self.problem = problem
        super().__init__(f"{argument}: {problem}")


# -------------------------------------------------------------------------------------------------
# Finding layers
# -------------------------------------------------------------------------------------------------


def get_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted attribute path (``"body.1"``, ``"encoder.proj"``)."""
    module: nn.Module = model
    for part in path.split("."):
        child = module._modules.get(part) if part else None
        if child is None:
            raise AttributeError(f"{type(module).__name__} has no submodule '{part}' (path '{path}')")
        module = child
    return module


def set_layer(model: nn.Module, path: str, layer: nn.Module) -> None:
    """Replace the submodule at a dotted attribute path."""
    parent_path, _, name = path.rpartition(".")
    parent = get_layer(model, parent_path) if parent_path else model
    setattr(parent, name, layer)


def _first_widenable(module: nn.Module, prefix: str) -> str | None:
    """Dotted path of the first Linear/Conv2d among ``module``'s descendants (registration order)."""
    for name, child in module.named_modules(prefix=prefix):
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            return name
    return None


def default_layer_paths(model: nn.Module) -> tuple[str | None, str | None]:
    """Input and output layer paths for the reference models, ``None`` where no convention applies.

    Input: ``stem`` (SmallCNN), else the first Linear/Conv2d inside ``body`` (MLP). Output: ``head``.
    """
    children = dict(model.named_children())
    input_path: str | None = None
    if "stem" in children:
        input_path = "stem"
    elif "body" in children:
        input_path = _first_widenable(children["body"], "body")
    output_path = "head" if "head" in children else None
    return input_path, output_path


def resolve_layer_paths(
    model: nn.Module, input_layer: str | None, output_layer: str | None
) -> tuple[str, str]:
    """Validated ``(input_path, output_path)``: named paths, or the reference models' defaults.

    Raises :class:`MIMOSurgeryError` naming ``input_layer`` / ``output_layer`` when a layer is
    missing, is not a Linear/Conv2d, or cannot be widened (grouped convolutions, a non-Linear head).
    """
    default_in, default_out = default_layer_paths(model)
    paths = {"input_layer": input_layer or default_in, "output_layer": output_layer or default_out}
    for argument, path in paths.items():
        if path is None:
            raise MIMOSurgeryError(
                argument,
                f"{type(model).__name__} has no default {argument.replace('_', ' ')} (the reference "
                "MLP uses body/head, SmallCNN stem/head); name it by attribute path, e.g. "
                f"{argument}: 'encoder.0'",
            )
        try:
            layer = get_layer(model, path)
        except AttributeError as err:
            raise MIMOSurgeryError(argument, f"'{path}' not found: {err}") from None
        _check_widenable(argument, path, layer)
    if paths["input_layer"] == paths["output_layer"]:
        raise MIMOSurgeryError("output_layer", f"'{paths['output_layer']}' is also the input layer")
    return paths["input_layer"], paths["output_layer"]  # type: ignore[return-value]


def _check_widenable(argument: str, path: str, layer: nn.Module) -> None:
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise MIMOSurgeryError(
            argument,
            f"'{path}' is a {type(layer).__name__}; only torch.nn.Linear and torch.nn.Conv2d can be "
            "widened (put a Linear/Conv2d adapter in front of / behind your model, see the README)",
        )
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise MIMOSurgeryError(
            argument, f"'{path}' is a grouped Conv2d (groups={layer.groups}); use groups=1"
        )


# -------------------------------------------------------------------------------------------------
# Widening layers
# -------------------------------------------------------------------------------------------------


def _fresh_like(layer: WidenableLayer) -> WidenableLayer:
    """A new layer of the same type and shape, initialised by its own ``reset_parameters``."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="cpu")
    return nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,  # type: ignore[arg-type]
        stride=layer.stride,  # type: ignore[arg-type]
        padding=layer.padding,  # type: ignore[arg-type]
        dilation=layer.dilation,  # type: ignore[arg-type]
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        device="cpu",
    )


def sum_member_blocks(weight: Tensor, num_members: int) -> Tensor:
    """Sum of a widened input layer's ``M`` member blocks along its input dim (dim 1).

    ``[out, M * in]`` (Linear) or ``[out, M * C, kh, kw]`` (Conv2d) -> ``[out, in]`` / ``[out, C, kh, kw]``.
    A Linear/Conv2d is linear in its input, so applying the summed weight to ``x`` equals applying the
    wide weight to ``x`` tiled ``M`` times (zero padding of a convolution included): the evaluation
    forward without building the tiled input.
    """
    out_dim, wide_in = weight.shape[0], weight.shape[1]
    return weight.reshape(out_dim, num_members, wide_in // num_members, *weight.shape[2:]).sum(1)


class _SummedEvalInput:
    """Shared by the widened input layers: a plain (untiled) input goes through the summed weight.

    The input's dim 1 decides: ``M * in`` (member inputs side by side, training) -> the wide weight;
    ``in`` (one input meant for every member, evaluation) -> :func:`sum_member_blocks` of the wide
    weight. Without gradients and outside training mode the summed weight is cached; the cache key is
    the weight's storage and version counter (every in-place change: optimizer steps, ``copy_``,
    ``load_state_dict``), and ``train()`` / ``eval()`` drop it. Writes through ``weight.data``
    bypass the version counter: call ``train()`` / ``eval()`` after them (Lightning does between
    stages) or evaluate with tiled inputs.
    """

    num_members: int
    weight: Tensor  # a Parameter at runtime; declared as nn.Linear / nn.Conv2d declare it
    training: bool
    _summed_cache: tuple[tuple[int, int, torch.dtype], Tensor] | None

    def __init__(self, *args: Any, num_members: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the layer class after this mixin (nn.Linear, nn.Conv2d)
        self.num_members = num_members
        self._summed_cache = None

    def train(self, mode: bool = True) -> Any:
        self._summed_cache = None
        return super().train(mode)  # type: ignore[misc]

    def _summed_weight(self) -> Tensor:
        weight = self.weight
        # Not cached when differentiable, nor under torch.export / compile: the key needs a data pointer.
        if (
            self.training
            or (torch.is_grad_enabled() and weight.requires_grad)
            or torch.compiler.is_compiling()
        ):
            return sum_member_blocks(weight, self.num_members)
        key = (weight.data_ptr(), weight._version, weight.dtype)
        cache = self._summed_cache
        if cache is None or cache[0] != key:
            cache = (key, sum_member_blocks(weight.detach(), self.num_members))
            self._summed_cache = cache
        return cache[1]

    def _input_width(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define _input_width")

    def _is_plain_input(self, x: Tensor) -> bool:
        width = x.shape[1] if x.dim() > 1 else -1
        wide = self._input_width()
        if width == wide:
            return False
        if width * self.num_members == wide:
            return True
        raise ValueError(
            f"MIMO input layer expects dim 1 of size {wide} (the {self.num_members} members' inputs side "
            f"by side) or {wide // self.num_members} (one input for every member), got {tuple(x.shape)}"
        )


class MIMOInputLinear(_SummedEvalInput, nn.Linear):
    """``nn.Linear`` over ``M`` members' features side by side that also takes one plain input
    (evaluation: the same example for every member) through its summed weight blocks."""

    def _input_width(self) -> int:
        return self.in_features

    def forward(self, x: Tensor) -> Tensor:
        if self._is_plain_input(x):
            return F.linear(x, self._summed_weight(), self.bias)
        return super().forward(x)


class MIMOInputConv2d(_SummedEvalInput, nn.Conv2d):
    """``nn.Conv2d`` over ``M`` members' channels side by side that also takes one plain input
    (evaluation: the same example for every member) through its summed weight blocks."""

    def _input_width(self) -> int:
        return self.in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self._is_plain_input(x):
            return self._conv_forward(x, self._summed_weight(), self.bias)
        return super().forward(x)


def _widened_shell(
    layer: WidenableLayer, in_mult: int, out_mult: int, input_members: int = 0
) -> WidenableLayer:
    """An uninitialised copy of ``layer`` with ``in_mult`` x inputs and ``out_mult`` x outputs.

    ``input_members > 0`` builds the MIMO input-layer class (:class:`MIMOInputLinear` /
    :class:`MIMOInputConv2d`, same parameters and state-dict keys as the plain layer). Built on the
    meta device and then given empty storage (what ``skip_init`` does), so it draws nothing from any
    random generator (its values are overwritten).
    """
    has_bias = layer.bias is not None
    extra: dict[str, Any] = {"num_members": input_members} if input_members else {}
    shell: WidenableLayer
    if isinstance(layer, nn.Linear):
        cls_linear = MIMOInputLinear if input_members else nn.Linear
        shell = cls_linear(
            layer.in_features * in_mult, layer.out_features * out_mult, bias=has_bias, device="meta", **extra
        )
    else:
        cls_conv = MIMOInputConv2d if input_members else nn.Conv2d
        shell = cls_conv(
            layer.in_channels * in_mult,
            layer.out_channels * out_mult,
            layer.kernel_size,  # type: ignore[arg-type]
            stride=layer.stride,  # type: ignore[arg-type]
            padding=layer.padding,  # type: ignore[arg-type]
            dilation=layer.dilation,  # type: ignore[arg-type]
            bias=has_bias,
            padding_mode=layer.padding_mode,
            device="meta",
            **extra,
        )
    return shell.to_empty(device=layer.weight.device).to(layer.weight.dtype)


def _member_weights(layer: WidenableLayer, num_members: int) -> list[WidenableLayer]:
    """Member 0 is ``layer`` itself; members 1.. are fresh layers from the same initialiser.

    Drawn on the CPU inside ``fork_rng`` so the surgery is a function of the global seed but does not
    shift the training random stream (dropout masks, member batches) compared with a run without MIMO.
    """
    with torch.random.fork_rng(devices=[]):
        fresh = [_fresh_like(layer) for _ in range(num_members - 1)]
    return [layer, *fresh]


@torch.no_grad()
def widen_input_layer(layer: WidenableLayer, num_members: int) -> WidenableLayer:
    """Input layer taking ``num_members`` inputs concatenated along its input dim.

    Weight block ``m`` (input columns / channels ``m*in:(m+1)*in``) reads member ``m``. Block 0
    keeps ``layer``'s weights; blocks 1.. are drawn from the layer's own default initialiser (so
    every member's block has the plain layer's init distribution); the bias is ``layer``'s.
    The result is a :class:`MIMOInputLinear` / :class:`MIMOInputConv2d` (an ``nn.Linear`` /
    ``nn.Conv2d`` with the same parameters), which also accepts one plain input for every member.
    ``num_members == 1`` returns ``layer`` itself.
    """
    if num_members == 1:
        return layer
    wide = _widened_shell(layer, num_members, 1, input_members=num_members)
    members = _member_weights(layer, num_members)
    wide.weight.copy_(torch.cat([m.weight.to(wide.weight) for m in members], dim=1))
    if layer.bias is not None:
        assert wide.bias is not None  # the shell is built with bias=has_bias
        wide.bias.copy_(layer.bias)
    return wide


@torch.no_grad()
def widen_output_layer(layer: WidenableLayer, num_members: int) -> WidenableLayer:
    """Output layer giving ``num_members`` heads side by side (output units ``m*K:(m+1)*K``).

    Head 0 keeps ``layer``'s weights and bias; heads 1.. are drawn from the layer's own default
    initialiser. ``num_members == 1`` returns ``layer`` itself.
    """
    if num_members == 1:
        return layer
    wide = _widened_shell(layer, 1, num_members)
    members = _member_weights(layer, num_members)
    wide.weight.copy_(torch.cat([m.weight.to(wide.weight) for m in members], dim=0))
    if layer.bias is not None:
        wide.bias.copy_(torch.cat([m.bias.to(wide.bias) for m in members], dim=0))  # type: ignore[union-attr]
    return wide


def widen_model(
    model: nn.Module, num_members: int, input_layer: str | None = None, output_layer: str | None = None
) -> nn.Module:
    """Turn ``model`` into a MIMO model of ``num_members`` members, in place; returns ``model``.

    Idempotent: a model already widened to ``num_members`` is returned unchanged (the core replays
    surgery before loading a checkpoint). Deterministic given the global seed (see
    :func:`widen_input_layer`). ``num_members == 1`` leaves every layer as it is.
    """
    done = getattr(model, MIMO_MEMBERS_ATTR, None)
    if done is not None:
        if done != num_members:
            raise MIMOSurgeryError(
                "num_members",
                f"the model was already widened to {done} members, cannot make it {num_members}",
            )
        return model
    input_path, output_path = resolve_layer_paths(model, input_layer, output_layer)
    set_layer(model, input_path, widen_input_layer(get_layer(model, input_path), num_members))  # type: ignore[arg-type]
    set_layer(model, output_path, widen_output_layer(get_layer(model, output_path), num_members))  # type: ignore[arg-type]
    setattr(model, MIMO_MEMBERS_ATTR, num_members)
    return model


# -------------------------------------------------------------------------------------------------
# Batches
# -------------------------------------------------------------------------------------------------


def member_indices(
    batch_size: int, num_members: int, input_repetition: float = 0.0, batch_repetitions: int = 1
) -> Tensor:
    """Row indices ``[M, batch_size * batch_repetitions]`` of each member's training batch.

    The paper's scheme (uncertainty-baselines ``cifar/mimo.py``): the ``batch_size`` unique indices
    are tiled ``batch_repetitions`` times and shuffled once (the main shuffle); each member then
    shuffles the first ``floor(n * (1 - input_repetition))`` positions on its own and keeps the rest,
    so a fraction ``input_repetition`` of the rows shows the same example to every member. Draws
    from the global torch RNG (checkpointed by litplug, so resumed runs draw the same batches).
    """
    main = torch.arange(batch_size).repeat(batch_repetitions)
    main = main[torch.randperm(main.numel())]
    to_shuffle = int(main.numel() * (1.0 - input_repetition))
    rows = []
    for _ in range(num_members):
        head = main[:to_shuffle][torch.randperm(to_shuffle)]
        rows.append(torch.cat([head, main[to_shuffle:]]))
    return torch.stack(rows)


def stack_member_inputs(inputs: Tensor, indices: Tensor) -> Tensor:
    """Member inputs ``[N, M * S0, *S[1:]]`` from inputs ``[B, *S]`` and indices ``[M, N]``."""
    if inputs.dim() < 2:
        raise ValueError(
            f"MIMO needs inputs with a feature/channel dim [B, S0, ...], got {tuple(inputs.shape)}"
        )
    gathered = inputs[indices.to(inputs.device)]  # [M, N, *S]
    members, rows = indices.shape
    gathered = gathered.transpose(0, 1)  # [N, M, *S]
    return gathered.reshape(rows, members * inputs.shape[1], *inputs.shape[2:])


def repeat_inputs(inputs: Tensor, num_members: int) -> Tensor:
    """The same input for every member: ``[B, *S] -> [B, M * S0, *S[1:]]`` (evaluation)."""
    if num_members == 1:
        return inputs
    if inputs.dim() < 2:
        raise ValueError(
            f"MIMO needs inputs with a feature/channel dim [B, S0, ...], got {tuple(inputs.shape)}"
        )
    repeats = [1] * inputs.dim()
    repeats[1] = num_members
    return inputs.repeat(*repeats)


# -------------------------------------------------------------------------------------------------
# Loss and prediction
# -------------------------------------------------------------------------------------------------


def split_heads(outputs: Tensor, num_members: int) -> Tensor:
    """``[B, M * K] -> [B, M, K]`` (head ``m`` is block ``m`` of the last dim)."""
    if outputs.shape[-1] % num_members != 0:
        raise ValueError(
            f"MIMO outputs must have M * K units in the last dim (M={num_members}), got {tuple(outputs.shape)}"
        )
    return outputs.reshape(*outputs.shape[:-1], num_members, outputs.shape[-1] // num_members)


def _member_targets(targets: Tensor, num_members: int) -> Tensor:
    """``[B, M]`` targets: training targets as they are, evaluation targets ``[B]`` repeated."""
    if targets.dim() == 1:
        return targets.unsqueeze(1).expand(-1, num_members)
    return targets


def mimo_loss(outputs: Tensor, targets: Tensor, num_members: int) -> Tensor:
    """SUM over heads of each head's mean cross-entropy (averaging would shrink each member's step).

    ``targets`` is ``[B, M]`` (each head its own) or ``[B]`` (the same for every head).
    """
    heads = split_heads(outputs, num_members)
    member_targets = _member_targets(targets, num_members)
    # Python's sum starts at int 0, so M=1 is bit-identical to the plain cross-entropy.
    return sum(F.cross_entropy(heads[:, m], member_targets[:, m]) for m in range(num_members))  # type: ignore[return-value]


def member_log_probs(outputs: Tensor, num_members: int) -> Tensor:
    """Each head's log-probabilities ``[B, M, K]``."""
    return F.log_softmax(split_heads(outputs, num_members), dim=-1)


def ensemble_log_probs(outputs: Tensor, num_members: int) -> Tensor:
    """Log of the heads' mean probability ``[B, K]`` (logsumexp over heads minus log M).

    Without autograd this takes a shorter path (softmax, mean over heads, log: 3 kernels and a
    check instead of about 8; on a CPU each small kernel costs 5-10 us right after a forward pass,
    so this halves the averaging's cost for a small CNN at batch 64). It agrees
    with the logsumexp form to float rounding (a few ulps: relative 1e-6 in float32). When any mean probability falls below the
    smallest normal float (log-probability under about -87, where it would lose precision or
    underflow to 0), the whole batch is recomputed in the logsumexp form, which stays finite.
    """
    if num_members == 1:
        return F.log_softmax(outputs, dim=-1)
    # The short path branches on the values, which a traced or exported graph cannot follow.
    graph_capture = torch.compiler.is_compiling() or torch.jit.is_tracing()
    short_path_applies = not (torch.is_grad_enabled() and outputs.requires_grad) and not graph_capture
    if short_path_applies and outputs.shape[-1] % num_members == 0:
        heads = outputs.view(*outputs.shape[:-1], num_members, outputs.shape[-1] // num_members)
        log_mean = F.softmax(heads, dim=-1).mean(-2).log_()
        if log_mean.numel() == 0 or log_mean.amin().item() >= _log_tiny(log_mean.dtype):
            return log_mean
    return torch.logsumexp(member_log_probs(outputs, num_members), dim=-2) - math.log(num_members)


@functools.cache
def _log_tiny(dtype: torch.dtype) -> float:
    """log of the smallest normal number of ``dtype``: below it a probability has lost precision."""
    return math.log(torch.finfo(dtype).tiny)


@torch.no_grad()
def member_metrics(outputs: Tensor, targets: Tensor, num_members: int) -> dict[str, Tensor]:
    """Per-head NLL and accuracy, their means, and the heads' pairwise disagreement rate.

    ``targets`` is ``[B]`` (evaluation). Keys: ``member{m}_nll``, ``member{m}_acc``,
    ``member_nll``, ``member_acc`` (means over heads) and ``disagreement`` (fraction of example and
    head pairs whose argmax differs; 0 for M=1).
    """
    log_probs = member_log_probs(outputs, num_members).float()  # [B, M, K]
    member_targets = _member_targets(targets, num_members)
    nll = -log_probs.gather(-1, member_targets.unsqueeze(-1)).squeeze(-1).mean(0)  # [M]
    predictions = log_probs.argmax(-1)  # [B, M]
    acc = (predictions == member_targets).float().mean(0)  # [M]
    result: dict[str, Tensor] = {}
    for m in range(num_members):
        result[f"member{m}_nll"] = nll[m]
        result[f"member{m}_acc"] = acc[m]
    result["member_nll"] = nll.mean()
    result["member_acc"] = acc.mean()
    result["disagreement"] = _pairwise_disagreement(predictions)
    return result


def _pairwise_disagreement(predictions: Tensor) -> Tensor:
    """Mean over examples and unordered head pairs of ``argmax_i != argmax_j``."""
    members = predictions.shape[1]
    if members < 2:
        return predictions.new_zeros((), dtype=torch.float32)
    differs = predictions.unsqueeze(2) != predictions.unsqueeze(1)  # [B, M, M]
    pairs = members * (members - 1)
    return differs.float().sum((1, 2)).mean() / pairs


@torch.no_grad()
def mimo_predict(model: nn.Module, inputs: Tensor, num_members: int) -> Tensor:
    """Mean of the heads' probabilities ``[B, K]`` for plain inputs ``[B, *S]``: one forward pass."""
    return ensemble_log_probs(model(repeat_inputs(inputs, num_members)), num_members).exp()
