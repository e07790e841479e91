"""Deep ensembles in pure torch: member construction, vectorised and sequential forward, the maths.

A :class:`MemberStack` holds ``M`` copies of a model as an ``nn.ModuleList`` (each member keeps its
own parameters, buffers and gradients, so any optimizer, checkpoint or weight-averaging code treats
it like a normal module) and returns the members' outputs stacked as ``[M, B, ...]``.

Two forward paths give the same numbers:

- ``"sequential"``: a Python loop over the members.
- ``"vmap"``: one vectorised call, ``torch.func.vmap`` over ``functional_call`` with the members'
  parameters and buffers stacked along a new leading dimension (the layout
  ``torch.func.stack_module_state`` builds). In training the stack is built with ``torch.stack`` so
  gradients flow back to every member (``stack_module_state`` detaches its result); in evaluation the
  stack is built once under ``no_grad`` and cached until a parameter changes. BatchNorm buffers are
  stacked copies: vmap updates the copies in place (batched running statistics are supported), and
  the updated statistics are copied back into the members after a training forward. Dropout draws
  a different mask per member (``randomness="different"``), from the global RNG.

On a CPU vectorisation rarely pays for small members (METHODS.md measured 1.05-1.13x the sequential
time for 4 MLPs); on a GPU small kernels are launch-bound and it does. :func:`time_forward_paths`
measures both paths so a caller can pick the faster one.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

__all__ = [
    "ForwardPath",
    "MemberStack",
    "disagreement",
    "ensemble_log_probs",
    "ensemble_nll",
    "faster_path",
    "make_members",
    "member_seed",
    "reinitialize",
    "sequential_forward",
    "sum_of_member_losses",
    "time_forward_paths",
    "vectorised_forward",
]

ForwardPath = Literal["vmap", "sequential"]
FORWARD_PATHS: tuple[ForwardPath, ...] = ("vmap", "sequential")
_SEED_STRIDE = 1_000_003  # a prime: member seeds of nearby base seeds do not collide


# ---------------------------------------------------------------------------------------------------
# Members
# ---------------------------------------------------------------------------------------------------


def member_seed(base_seed: int, member: int) -> int:
    """Seed of member ``member``'s initialisation, a deterministic function of ``base_seed``."""
    return (base_seed * _SEED_STRIDE + member) % (2**63 - 1)


def reinitialize(model: nn.Module) -> list[str]:
    """Call ``reset_parameters()`` on every submodule that has one (draws from the global RNG).

    Returns the names of parameters no ``reset_parameters`` reaches (they keep their values), so the
    caller can warn that members share them.
    """
    reached: set[int] = set()
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            reached.update(id(p) for p in module.parameters(recurse=False))
    return [name for name, p in model.named_parameters() if id(p) not in reached]


@contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Fork the CPU RNG (and the CUDA RNG of ``device``) so drawing inside leaves no trace."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def make_members(model: nn.Module, num_members: int, base_seed: int) -> list[nn.Module]:
    """``model`` itself as member 0 plus ``num_members - 1`` deep copies, each re-initialised.

    Member ``k >= 1`` is re-initialised under its own seed (:func:`member_seed`) inside a forked RNG,
    so building the members is deterministic (model surgery is replayed before weights load) and
    never moves the training random stream. Member 0 keeps the user's initialisation, so an ensemble
    of one is exactly the plain model.
    """
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
    members = [model]
    device = next(iter(model.parameters()), torch.empty(0)).device
    shared: list[str] = []
    for k in range(1, num_members):
        member = copy.deepcopy(model)
        with _isolated_rng(device):
            torch.manual_seed(member_seed(base_seed, k))
            shared = reinitialize(member)
        members.append(member)
    if shared:
        warnings.warn(
            f"ensemble: parameters {shared} belong to modules without reset_parameters(); every member "
            "starts from the same values for them (only the other parameters make members differ)",
            stacklevel=2,
        )
    return members


# ---------------------------------------------------------------------------------------------------
# Forward paths
# ---------------------------------------------------------------------------------------------------


def sequential_forward(members: nn.ModuleList, inputs: Any) -> Tensor:
    """Members one after the other; outputs stacked to ``[M, B, ...]``."""
    return torch.stack([member(inputs) for member in members])


def _stack_named(tensors_per_member: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    names = tensors_per_member[0].keys()
    return {name: torch.stack([tensors[name] for tensors in tensors_per_member]) for name in names}


def vectorised_forward(
    members: nn.ModuleList,
    inputs: Any,
    stacked_params: dict[str, Tensor] | None = None,
) -> Tensor:
    """All members in one ``vmap``-ed ``functional_call``; outputs ``[M, B, ...]``.

    ``stacked_params`` (``[M, ...]`` per name) may be passed in (an evaluation cache); otherwise they
    are stacked here with ``torch.stack`` so gradients reach each member's own parameters. Buffers
    are stacked copies; in training mode they are written back after the call (BatchNorm running
    statistics change during a training forward).
    """
    skeleton = members[0]
    if stacked_params is None:
        stacked_params = _stack_named([dict(m.named_parameters()) for m in members])
    buffers_per_member = [dict(m.named_buffers()) for m in members]
    stacked_buffers = _stack_named(buffers_per_member) if buffers_per_member[0] else {}

    def one_member(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Any) -> Tensor:
        return functional_call(skeleton, (params, buffers), (x,))

    outputs = vmap(one_member, in_dims=(0, 0, None), randomness="different")(
        stacked_params, stacked_buffers, inputs
    )
    if skeleton.training and stacked_buffers:
        with torch.no_grad():
            for name, stacked in stacked_buffers.items():
                for k, buffers in enumerate(buffers_per_member):
                    buffers[name].copy_(stacked[k])
    return outputs


class MemberStack(nn.Module):
    """``M`` members of one architecture; ``forward`` returns their outputs stacked ``[M, B, ...]``.

    Args:
        members: the members (same architecture, e.g. from :func:`make_members`).
        train_path: forward path in training mode, ``"vmap"`` or ``"sequential"``.
        eval_path: forward path in evaluation mode.
    """

    def __init__(
        self,
        members: list[nn.Module],
        train_path: ForwardPath = "sequential",
        eval_path: ForwardPath = "sequential",
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("MemberStack needs at least one member")
        self.members = nn.ModuleList(members)
        self.train_path: ForwardPath = train_path
        self.eval_path: ForwardPath = eval_path
        self._eval_cache: tuple[tuple[Any, ...], dict[str, Tensor]] | None = None

    @property
    def num_members(self) -> int:
        return len(self.members)

    def forward(self, inputs: Any) -> Tensor:
        """Stacked member outputs ``[M, B, ...]`` through the path of the current mode."""
        path = self.train_path if self.training else self.eval_path
        return self.forward_with(path, inputs)

    def forward_with(self, path: ForwardPath, inputs: Any) -> Tensor:
        """Stacked member outputs through an explicit ``path``."""
        # jit.trace cannot record functional_call (the stateless API); the members one by one give
        # the same outputs and trace.
        if path == "sequential" or torch.jit.is_tracing():
            return sequential_forward(self.members, inputs)
        if path == "vmap":
            # The cache is keyed on data pointers, which export's fake tensors do not have.
            uncached = self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
            cached = None if uncached else self._cached_eval_params()
            try:
                return vectorised_forward(self.members, inputs, cached)
            except RuntimeError as err:
                raise RuntimeError(
                    f"ensemble: the vmap path failed on {type(self.members[0]).__name__} ({err}); layers "
                    "without a vmap batching rule (e.g. nn.LSTM) need path='sequential' "
                    "(path='auto' falls back to it by itself)"
                ) from err
        raise ValueError(f"unknown forward path {path!r}; expected one of {FORWARD_PATHS}")

    def _parameter_key(self) -> tuple[Any, ...]:
        # `_version` moves on every in-place change (optimizer steps, copy_, load_state_dict).
        return tuple((p.data_ptr(), p._version) for p in self.members.parameters())

    def _cached_eval_params(self) -> dict[str, Tensor]:
        """Parameters stacked once per evaluation (no grad), rebuilt when any of them changes."""
        key = self._parameter_key()
        if self._eval_cache is None or self._eval_cache[0] != key:
            params, _ = stack_module_state(list(self.members))  # type: ignore[arg-type]
            self._eval_cache = (key, {name: p.detach() for name, p in params.items()})
        return self._eval_cache[1]

    def train(self, mode: bool = True) -> MemberStack:
        self._eval_cache = None
        return super().train(mode)


# ---------------------------------------------------------------------------------------------------
# Maths on stacked outputs [M, B, ..., C]
# ---------------------------------------------------------------------------------------------------


def ensemble_log_probs(member_outputs: Tensor) -> Tensor:
    """log of the mean of member probabilities: ``logsumexp_m log_softmax(z_m) - log M``.

    Averaging probabilities (not logits) is the deep-ensemble prediction; doing it in log space
    keeps tiny probabilities exact.
    """
    num_members = member_outputs.shape[0]
    return torch.logsumexp(F.log_softmax(member_outputs, dim=-1), dim=0) - math.log(num_members)


def ensemble_nll(member_outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of the ensemble: ``-log mean_m p_m(y)``."""
    log_probs = ensemble_log_probs(member_outputs)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()


def sum_of_member_losses(
    member_outputs: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
) -> Tensor:
    """Sum over members of each member's mean loss.

    A sum (not a mean) gives each member the gradient it would get training alone, so the learning
    rate means what it means for one model. With the default cross-entropy every member has the same
    number of counted positions, so one fused call over ``[M*B, C]`` times ``M`` is the same sum.
    """
    if loss_fn is None:
        num_members, classes = member_outputs.shape[0], member_outputs.shape[-1]
        repeated = targets.unsqueeze(0).expand(num_members, *targets.shape).reshape(-1)
        return num_members * F.cross_entropy(member_outputs.reshape(-1, classes), repeated, ignore_index=-100)
    return torch.stack([loss_fn(output, targets) for output in member_outputs]).sum()


def disagreement(member_outputs: Tensor) -> Tensor:
    """Mean pairwise disagreement: the fraction of examples on which two members' argmax differ,
    averaged over all pairs (0 when every member predicts the same class; needs ``M >= 2``)."""
    predictions = member_outputs.argmax(-1).reshape(member_outputs.shape[0], -1)
    num_members = predictions.shape[0]
    if num_members < 2:
        return predictions.new_zeros((), dtype=torch.float32)
    differ = predictions.unsqueeze(0) != predictions.unsqueeze(1)  # [M, M, N]
    pairs = num_members * (num_members - 1)  # ordered pairs; the diagonal never differs
    return differ.float().mean(-1).sum() / pairs


# ---------------------------------------------------------------------------------------------------
# Choosing the faster path
# ---------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def time_forward_paths(
    stack: MemberStack,
    inputs: Any,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    repeats: int = 5,
) -> dict[str, float | str]:
    """Median seconds of a training step (forward + backward) and an evaluation forward per path.

    Repeats are interleaved (vmap, sequential, vmap, ...) after one warm-up call each, so a busy
    machine slows both alike. The stack is left as it was: the RNG is forked, buffers and gradients
    are restored, the training mode is reset. A path that fails (an architecture ``vmap`` cannot
    run) gets time ``inf`` and its error under ``"<path>_error"``.

    Returns keys ``train_vmap``, ``train_sequential``, ``eval_vmap``, ``eval_sequential`` (seconds).
    """
    device = targets.device
    was_training = stack.training
    saved_buffers = [b.detach().clone() for b in stack.buffers()]
    saved_grads = [p.grad for p in stack.parameters()]
    params = [p for p in stack.parameters() if p.requires_grad]

    def train_step(path: ForwardPath) -> None:
        stack.train()
        loss = sum_of_member_losses(stack.forward_with(path, inputs), targets, loss_fn)
        torch.autograd.grad(loss, params)  # gradients are returned, never accumulated into .grad

    def eval_forward(path: ForwardPath) -> None:
        stack.eval()
        with torch.no_grad():
            stack.forward_with(path, inputs)

    result: dict[str, float | str] = {}
    samples: dict[str, list[float]] = {
        f"{kind}_{path}": [] for kind in ("train", "eval") for path in FORWARD_PATHS
    }
    try:
        with _isolated_rng(device):
            working = list(FORWARD_PATHS)
            for path in FORWARD_PATHS:  # warm-up, and find out whether the path runs at all
                try:
                    train_step(path)
                    eval_forward(path)
                except Exception as err:  # noqa: BLE001 - any failure means "this path cannot run"
                    if path == "sequential":
                        raise
                    working.remove(path)
                    result[f"{path}_error"] = f"{type(err).__name__}: {err}"
            for _ in range(repeats):
                for path in working:
                    samples[f"train_{path}"].append(_timed(functools.partial(train_step, path), device))
                    samples[f"eval_{path}"].append(_timed(functools.partial(eval_forward, path), device))
    finally:
        with torch.no_grad():
            for buffer, saved in zip(stack.buffers(), saved_buffers, strict=True):
                buffer.copy_(saved)
        for param, grad in zip(stack.parameters(), saved_grads, strict=True):
            param.grad = grad
        stack.train(was_training)
    for key, values in samples.items():
        result[key] = statistics.median(values) if values else math.inf
    return result


def faster_path(
    timings: dict[str, float | str],
    kind: Literal["train", "eval"],
    prefer: ForwardPath = "sequential",
    margin: float = 0.0,
) -> ForwardPath:
    """The path with the smaller median time for ``kind``.

    ``prefer`` wins ties, and the other path must be faster by more than ``margin`` (a fraction of
    ``prefer``'s time) to be chosen: a few timing repeats on a busy machine differ by 10-30% between
    identical calls, and the expected winner (sequential on a CPU, vmap on a GPU) should not lose to
    noise. ``margin=0`` is the plain comparison.
    """
    other: ForwardPath = "vmap" if prefer == "sequential" else "sequential"
    preferred_time = float(timings[f"{kind}_{prefer}"])
    other_time = float(timings[f"{kind}_{other}"])
    return other if other_time < preferred_time * (1.0 - margin) else prefer
