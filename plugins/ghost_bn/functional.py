"""Ghost batch normalisation (Hoffer et al. 2017) in torch plus a small C kernel: no Lightning import.

During training a batch of ``B`` examples is split into *ghost batches* of ``g`` examples and each is
normalised with its own mean and variance, which restores the noise of small-batch BatchNorm inside a
large batch. Evaluation uses running statistics exactly like ``BatchNorm``.

Speed: float32 CPU activations go through a small compiled C kernel (``kernel.c``, built on first
use by ``compiled.py``) that normalises each ghost batch while it is in cache: 0.4-0.9x the time of
plain BatchNorm on conv activations, 0.95-1.3x on ``[512, 256]`` with its input in cache
(``benchmarks/ghost_bn``). Everything else (other dtypes, GPUs,
uneven batches, torch.compile / torch.func, no C compiler) takes the torch-ops path below, with the
same results to float32 rounding. In the torch-ops path the ghost dimension is folded into the
channel dimension so ONE fused batch-norm call normalises every ghost batch (no Python loop over
chunks).

Which examples share a ghost batch (``partition``): by default ghost batch ``k`` of ``m`` equal ones
is the ``k``-th contiguous chunk of ``g`` examples, rows ``k * g .. k * g + g - 1`` (``torch.chunk``,
as in Composer), so the layer's output equals a chunk loop's. ``"strided"``
puts the examples ``k, k + m, k + 2m, ...`` together instead. They cost differently: the compiled
kernel reads each contiguous ghost batch as one block of memory, 0.74-0.80x the time of the
strided layout on ``[512, 32, 8, 8]`` and 0.92-0.95x on ``[512, 256]`` and ``[512, 64, 4, 4]``
(forward + backward, benchmarks/ghost_bn), while the torch-ops path folds a strided partition
with a free ``view`` (``[m * g, C, *S] -> [g, m * C, *S]``) but needs a transpose copy forwards
and backwards for contiguous chunks (1.4-2.2x its strided time on CPU). So on GPUs, which use the
torch-ops path, ``"strided"`` is the faster choice. The default also matches
:class:`~litplug.core.data.sampling.ResumableBatchSampler`'s contiguous per-rank shards, so a
multi-device run normalises exactly the ghost batches of a one-device run (when ``g`` divides the
per-device batch). Which examples share a ghost batch is irrelevant for shuffled batches; for
sorted data a strided partition mixes classes better.
The affine parameters are fed to the same fused call as
``weight`` tiled ``m`` times (their gradient is summed back over the ``m`` copies by autograd): applying them
afterwards with a broadcast multiply-add costs an extra pass forwards and a slow broadcast reduction
backwards.

Uneven batches (``B % g = r != 0``): ``B // g`` equal ghost batches are normalised in the folded
call and the last examples form one tail ghost batch normalised by a second call. A remainder larger
than ``g / 2`` is its own ghost batch; a remainder of at most ``g / 2`` joins the last full ghost
batch (tail of ``g + r`` examples), so every ghost batch has between ``g / 2`` and ``1.5 g`` examples
and at least 2 (a single example has no variance; BatchNorm1d would raise).

Running statistics: ONE update per forward pass, like BatchNorm, with the layer's momentum applied
to the pooled ghost statistics::

    running_mean <- (1 - momentum) * running_mean + momentum * mean_over_ghosts(mean_k)
    running_var  <- (1 - momentum) * running_var  + momentum * pooled_over_ghosts(var_k)

``mean_k`` weighted by each ghost batch's size (so it equals the whole batch's mean) and ``var_k``
the unbiased per-ghost variance, pooled with weights ``n_k - 1`` (``n_k`` values per channel), i.e.
the unbiased within-ghost variance; equal ghost batches make both plain averages. For equal ghost
batches the fused call itself does the update: it gets ``m`` scaled copies of the running buffers,
applies BatchNorm's update to each ghost's copy, and the sum of the copies is the rule above (no
separate statistics buffers, no extra pass; see :func:`_fused_equal`). Why not
Composer's ``momentum / num_ghost_batches`` applied once per ghost batch: that makes the running
statistics' time constant depend on ``g`` only approximately and needs one sequential update per
ghost batch; the rule above keeps BatchNorm's time constant in steps for every ``g``, is one
vectorised update, and reduces exactly to BatchNorm when ``g >= B``. The running variance estimates
the variance *within* a ghost batch, which is what the layer divides by during training.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compiled import kernel_applies, kernel_ghost_batch_norm, load_kernel

__all__ = ["PARTITIONS", "GhostBatchNorm", "Partition", "ghost_batch_norm", "ghost_batch_sizes"]

#: Which examples form ghost batch ``k`` of ``m`` equal ones (``g`` examples each): ``"strided"``,
#: rows ``k, k + m, k + 2m, ...``; ``"contiguous"``, rows ``k * g .. k * g + g - 1`` (``torch.chunk``,
#: as in Composer).
Partition = Literal["strided", "contiguous"]
PARTITIONS: tuple[str, ...] = get_args(Partition)


def check_partition(partition: object, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``partition`` is one of :data:`PARTITIONS`."""
    if partition not in PARTITIONS:
        raise ValueError(f"{where}: partition must be one of {PARTITIONS}, got {partition!r}")


def ghost_batch_sizes(batch_size: int, ghost_batch_size: int) -> tuple[int, int, int]:
    """How a batch splits: ``(num_equal, ghost_batch_size, tail_size)`` (see the module docstring).

    ``num_equal`` ghost batches of exactly ``ghost_batch_size`` examples come first; ``tail_size``
    (possibly 0) examples at the end form one more ghost batch. A batch of at most
    ``ghost_batch_size`` examples (or up to 1.5x that) is a single ghost batch: ``(0, g, B)``.
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")
    num_equal, rest = divmod(batch_size, ghost_batch_size)
    if (
        num_equal and rest and 2 * rest <= ghost_batch_size
    ):  # a small remainder joins the last full ghost batch
        num_equal -= 1
        rest += ghost_batch_size
    return num_equal, ghost_batch_size, rest


def _fold(x: Tensor, num_ghosts: int, partition: Partition) -> Tensor:
    """``[m * g, C, *S] -> [g, m * C, *S]``: ghost ``k`` becomes channels ``k*C:(k+1)*C``.

    Strided (ghost ``k`` = rows ``k, k+m, ...``): a free view for contiguous inputs (``reshape``
    copies only for other layouts, e.g. channels_last). Contiguous (rows ``k*g .. k*g+g-1``): a
    transpose, so a copy.
    """
    ghost, channels, spatial = x.shape[0] // num_ghosts, x.shape[1], x.shape[2:]
    if partition == "strided":
        return x.reshape(ghost, num_ghosts * channels, *spatial)
    return x.reshape(num_ghosts, ghost, channels, *spatial).transpose(0, 1).reshape(ghost, -1, *spatial)


def _unfold(out: Tensor, shape: torch.Size, num_ghosts: int, partition: Partition) -> Tensor:
    """The inverse of :func:`_fold`: ``[g, m * C, *S] -> [m * g, C, *S]`` (``shape``)."""
    if partition == "strided":
        return out.reshape(shape)
    ghost, channels, spatial = shape[0] // num_ghosts, shape[1], shape[2:]
    return out.reshape(ghost, num_ghosts, channels, *spatial).transpose(0, 1).reshape(shape)


def _tile(param: Tensor | None, times: int) -> Tensor | None:
    """``param`` repeated ``times`` times along its only dim (expand + reshape: cheaper than repeat)."""
    if param is None or times == 1:
        return param
    return param.expand(times, param.shape[0]).reshape(-1)


def _normalise(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_ghosts: int,
    partition: Partition,
    eps: float,
    stats_like: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Normalise ``num_ghosts`` equal ghost batches of ``x`` in one fused call.

    Returns the output (shape of ``x``) and, when ``stats_like`` is given, the per-ghost mean and
    unbiased variance as ``[num_ghosts, C]``: the fused kernel writes them into zero "running" buffers
    updated with momentum 1, which costs nothing extra (no second pass over the activations).
    """
    channels = x.shape[1]
    folded = _fold(x, num_ghosts, partition) if num_ghosts > 1 else x
    w = _tile(weight, num_ghosts)
    b = _tile(bias, num_ghosts)
    mean = var = None
    if stats_like is not None:
        mean = stats_like.new_zeros(num_ghosts * channels)
        var = stats_like.new_zeros(num_ghosts * channels)
    out = F.batch_norm(folded, mean, var, w, b, True, 1.0, eps)
    out = _unfold(out, x.shape, num_ghosts, partition) if num_ghosts > 1 else out
    if mean is None or var is None:
        return out, None, None
    return out, mean.view(num_ghosts, channels), var.view(num_ghosts, channels)


def _fused_equal(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    num_ghosts: int,
    partition: Partition,
    momentum: float,
    eps: float,
) -> Tensor:
    """Equal ghost batches, any shape: one fused ``torch.batch_norm`` on the folded input.

    The running statistics go to the kernel as ``num_ghosts`` scaled copies, so it applies
    BatchNorm's update to every ghost's copy and the sum of the copies is the documented rule
    (``(1 - momentum) * running + momentum * mean_k(stat_k)``): four small ops, no extra pass.
    """
    # torch.batch_norm, not F.batch_norm: the latter's Python-side checks (a product over the input's
    # sizes to reject 1 value per channel, impossible here: g >= 2) cost time that matters on small
    # activations (an A/B on [512, 256], g = 128, 2 loaded CPU cores: ~20 us less per forward +
    # backward step, about 8% of a plain BatchNorm1d step).
    folded = _fold(x, num_ghosts, partition)
    weight, bias = _tile(weight, num_ghosts), _tile(bias, num_ghosts)
    cudnn = torch.backends.cudnn.enabled
    if running_mean is None or running_var is None:
        out = torch.batch_norm(folded, weight, bias, None, None, True, momentum, eps, cudnn)
        return _unfold(out, x.shape, num_ghosts, partition)
    # Copy k of the buffers gets BatchNorm's update with momentum mu = momentum / m from the start
    # value t0 = (1 - momentum) / (m - momentum) * running (so that m * (1 - mu) * t0 is
    # (1 - momentum) * running); the SUM of the m copies is then the rule's update. Building the
    # copies and summing them are one op each (a mean would cost a division more).
    shape = (num_ghosts, x.shape[1])
    start = (1.0 - momentum) / (num_ghosts - momentum)
    tiled_mean = torch.mul(running_mean.expand(shape), start)
    tiled_var = torch.mul(running_var.expand(shape), start)
    mu = momentum / num_ghosts
    out = torch.batch_norm(
        folded, weight, bias, tiled_mean.view(-1), tiled_var.view(-1), True, mu, eps, cudnn
    )
    # copy_, not sum(out=...): torch.func.vmap (a vmapped deep ensemble) has no batching rule for
    # out= reductions, and copy_ costs the same on C values.
    running_mean.copy_(tiled_mean.sum(0))
    running_var.copy_(tiled_var.sum(0))
    return _unfold(out, x.shape, num_ghosts, partition)


def _reference_equal(
    num_ghosts: int, partition: Partition, eps: float, x: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """The compiled kernel's output through torch ops (running statistics untouched): its double backward."""
    return _fused_equal(x, None, None, weight, bias, num_ghosts, partition, 0.0, eps)


@torch.no_grad()
def _update_running(
    running_mean: Tensor,
    running_var: Tensor,
    means: Tensor,
    variances: Tensor,
    sizes: list[int],
    values_per_example: int,
    momentum: float,
) -> None:
    """Fold pooled statistics of unequal ghost batches into the running ones (module docstring).

    Only uneven batches come here; equal ghost batches update inside :func:`_fused_equal`.
    """
    counts = torch.tensor(sizes, dtype=means.dtype, device=means.device)
    mean = (counts[:, None] * means).sum(0) / counts.sum()
    dof = counts * values_per_example - 1
    var = (dof[:, None] * variances).sum(0) / dof.sum()
    # mul_ + add_, not lerp_: lerp_ has no vmap batching rule (a vmapped deep ensemble warns).
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    ghost_batch_size: int,
    momentum: float = 0.1,
    eps: float = 1e-5,
    training: bool = True,
    *,
    partition: Partition = "contiguous",
    use_kernel: bool = True,
) -> Tensor:
    """Ghost batch norm of ``x`` ``[B, C, *S]``; the arguments mirror ``F.batch_norm``.

    ``training=False`` is ``F.batch_norm`` with the running statistics. ``training=True`` normalises
    each ghost batch with its own statistics and, when running buffers are given, updates them once
    (see the module docstring). ``B <= ghost_batch_size`` is exactly ``F.batch_norm``. ``momentum``
    is the update factor (``BatchNorm``'s cumulative ``momentum=None`` is handled by
    :class:`GhostBatchNorm`, which passes ``1 / num_batches_tracked``). ``partition`` says which
    examples share a ghost batch (:data:`Partition`); an uneven batch's tail is its last examples
    either way.

    Equal ghost batches of float32 CPU activations go through the compiled kernel (compiled.py)
    unless ``use_kernel=False`` or ``LITPLUG_GHOST_BN_KERNEL=0``; the torch-ops path gives the
    same results to float32 rounding.
    """
    if momentum is None:
        raise ValueError(
            "ghost_batch_norm: momentum must be a float; for BatchNorm's cumulative average "
            "(momentum=None) use the GhostBatchNorm module or pass 1 / num_batches_tracked"
        )
    if ghost_batch_size < 2:
        raise ValueError(f"ghost_batch_norm: ghost_batch_size must be >= 2, got {ghost_batch_size}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("ghost_batch_norm: pass both running_mean and running_var, or neither")
    check_partition(partition, "ghost_batch_norm")
    # Eval is BatchNorm, decided before any arithmetic on the batch size: jit.trace, ONNX and
    # torch.export with a dynamic batch see the size as a tensor / symbol, and eval must not depend on it.
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    num_equal, ghost, tail = ghost_batch_sizes(x.shape[0], ghost_batch_size)
    if num_equal == 0 or (num_equal == 1 and tail == 0):  # one ghost batch = the batch: BatchNorm
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)

    if not tail:  # the common case: equal ghost batches, one call, one running-statistics update
        # applies first: GPU or float64 users never build (or warn about) the CPU kernel
        applies = use_kernel and kernel_applies(x, weight, bias, running_mean, running_var)
        lib = load_kernel() if applies else None
        if lib is not None:
            reference = partial(_reference_equal, num_equal, partition, eps)
            contiguous = partition == "contiguous"
            return kernel_ghost_batch_norm(
                x,
                running_mean,
                running_var,
                weight,
                bias,
                num_equal,
                contiguous,
                momentum,
                eps,
                reference,
                lib,
            )
        return _fused_equal(x, running_mean, running_var, weight, bias, num_equal, partition, momentum, eps)

    # Uneven batch (e.g. an epoch's last): equal head + one tail ghost batch, pooled statistics.
    head_len = num_equal * ghost
    out, means, variances = _normalise(x[:head_len], weight, bias, num_equal, partition, eps, running_mean)
    tail_out, tail_mean, tail_var = _normalise(x[head_len:], weight, bias, 1, partition, eps, running_mean)
    out = torch.cat([out, tail_out])
    if running_mean is not None and running_var is not None:
        assert means is not None and variances is not None and tail_mean is not None and tail_var is not None
        means, variances = torch.cat([means, tail_mean]), torch.cat([variances, tail_var])
        values_per_example = math.prod(x.shape[2:])
        _update_running(
            running_mean,
            running_var,
            means,
            variances,
            [ghost] * num_equal + [tail],
            values_per_example,
            momentum,
        )
    return out


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over ghost batches of ``ghost_batch_size`` examples in training; plain BN in eval.

    Works for 1d, 2d and 3d inputs (one implementation); build it from an existing layer with
    :meth:`from_batchnorm`. It subclasses ``torch.nn.modules.batchnorm._BatchNorm``, so parameters
    and buffers have BatchNorm's names (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``), state_dicts load either way, and BatchNorm-aware tools (e.g.
    ``torch.optim.swa_utils.update_bn``, "no weight decay on norm layers" filters) treat it as BN.

    Args:
        num_features: channels ``C``.
        ghost_batch_size: examples per ghost batch (>= 2).
        eps, momentum, affine, track_running_stats: as in ``torch.nn.BatchNorm2d``
            (``momentum=None`` is the cumulative average). Without running statistics the layer
            normalises with ghost statistics in eval too, as BatchNorm uses batch statistics then.
        input_dims: accepted ``x.dim()`` values (BatchNorm1d: (2, 3), 2d: (4,), 3d: (5,)).
        partition: which examples share a ghost batch, ``"strided"`` or ``"contiguous"``
            (:data:`Partition`).
        use_kernel: use the compiled kernel where it applies (see :func:`ghost_batch_norm`).
    """

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        input_dims: tuple[int, ...] = (2, 3, 4, 5),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_kernel: bool = True,
        partition: Partition = "contiguous",
    ) -> None:
        if ghost_batch_size < 2:
            raise ValueError(f"GhostBatchNorm: ghost_batch_size must be >= 2, got {ghost_batch_size}")
        check_partition(partition, "GhostBatchNorm")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.ghost_batch_size = ghost_batch_size
        self.input_dims = input_dims
        self.use_kernel = use_kernel
        self.partition: Partition = partition

    @classmethod
    def from_batchnorm(
        cls,
        bn: nn.modules.batchnorm._BatchNorm,
        ghost_batch_size: int,
        use_kernel: bool = True,
        partition: Partition = "contiguous",
    ) -> GhostBatchNorm:
        """A ghost layer with ``bn``'s hyperparameters, sharing its parameter and buffer tensors.

        The tensors are shared, not copied, so an optimizer built before the swap (or a caller
        holding references) keeps seeing the live affine parameters.
        """
        input_dims = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}.get(
            type(bn), (2, 3, 4, 5)
        )
        ref = bn.weight if bn.weight is not None else bn.running_mean
        ghost = cls(
            bn.num_features,
            ghost_batch_size,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            input_dims=input_dims,
            device=ref.device if ref is not None else None,
            dtype=ref.dtype if ref is not None else None,
            use_kernel=use_kernel,
            partition=partition,
        )
        # Reuse the very Parameter / buffer objects: same names, same values, same identities.
        for name, param in bn.named_parameters(recurse=False):
            setattr(ghost, name, param)
        for name, buf in bn.named_buffers(recurse=False):
            ghost.register_buffer(name, buf)
        ghost.train(bn.training)
        return ghost

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self.input_dims:
            raise ValueError(f"GhostBatchNorm: expected {self.input_dims}-D input, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        """Mirror of ``_BatchNorm.forward`` with the normalisation swapped for :func:`ghost_batch_norm`."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return ghost_batch_norm(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            self.ghost_batch_size,
            factor,
            self.eps,
            use_batch_stats,
            partition=self.partition,
            use_kernel=self.use_kernel,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}, partition={self.partition!r}"
        )
