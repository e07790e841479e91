"""Small torch.distributed helpers that are no-ops in a single process (no Lightning import).

Plugins use these to keep state that must agree across ranks in agreement (average a Fisher,
broadcast profiled values); the core uses them to broadcast state computed at fit start and the
DDP callback to check that plugin state agrees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks in place (floating tensors only) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value, in place."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small, rare payloads such as plugin state)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (pickled; small payloads only); ``[obj]`` in one process.

    Tensors should be on the CPU: a pickled CUDA tensor would come back on the sender's device.
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def to_cpu(state: Any) -> Any:
    """``state`` with every tensor inside nested dicts/lists/tuples moved to the CPU."""
    if isinstance(state, Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: to_cpu(value) for key, value in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a namedtuple takes fields, not an iterable
        return type(state)(*(to_cpu(value) for value in state))
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(value) for value in state)
    return state


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Make every parameter and buffer of ``module`` equal to rank ``src``'s."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            broadcast_(tensor.data, src=src)


def iter_tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside nested dicts/lists/tuples, with a dotted path."""
    if isinstance(state, Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from iter_tensors(value, f"{prefix}[{index}]")


def checksums(state: Any) -> dict[str, tuple[float, float]]:
    """Cheap fingerprints (sum, sum of squares in float64) of every tensor in ``state``."""
    sums = {}
    for path, tensor in iter_tensors(state):
        values = tensor.detach().to(torch.float64)
        sums[path] = (float(values.sum()), float(values.pow(2).sum()))
    return sums


def gather_object(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
