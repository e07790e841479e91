"""Generated sequence tasks for controlled tests: the copy task and Hochreiter's adding problem.

Both are generated in memory from one seeded ``torch.Generator`` (train, then val, then test), so a
seed fixes every split and no global RNG state is touched.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .sampling import LitplugDataModule

__all__ = [
    "AddingTaskDataModule",
    "CopyTaskDataModule",
    "IGNORE_INDEX",
    "make_adding_task",
    "make_copy_task",
]

# Targets with this value contribute nothing to the loss (F.cross_entropy's default ignore_index).
IGNORE_INDEX = -100
BLANK = 0
DELIMITER = 1


def make_copy_task(
    num_examples: int, seq_len: int, num_symbols: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Copy-task examples: ``(inputs int64 [N, 2*seq_len+1], targets int64 [N, 2*seq_len+1])``.

    Tokens: 0 blank, 1 delimiter, ``2 .. num_symbols+1`` symbols. Inputs are ``seq_len`` random
    symbols, the delimiter, then ``seq_len`` blanks. Targets are :data:`IGNORE_INDEX` at the first
    ``seq_len + 1`` positions (nothing to predict) and the symbols, in order, at the blanks.
    """
    symbols = torch.randint(2, num_symbols + 2, (num_examples, seq_len), generator=generator)
    blanks = torch.full((num_examples, seq_len), BLANK, dtype=torch.int64)
    delimiter = torch.full((num_examples, 1), DELIMITER, dtype=torch.int64)
    inputs = torch.cat([symbols, delimiter, blanks], dim=1)
    ignore = torch.full((num_examples, seq_len + 1), IGNORE_INDEX, dtype=torch.int64)
    targets = torch.cat([ignore, symbols], dim=1)
    return inputs, targets


def make_adding_task(num_examples: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Adding-problem examples: ``(inputs float32 [N, seq_len, 2], targets float32 [N, 1])``.

    Channel 0 holds values uniform in [0, 1); channel 1 marks exactly two positions with 1, one in
    each half of the sequence. The target is the sum of the two marked values.
    """
    values = torch.rand((num_examples, seq_len), generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (num_examples,), generator=generator)
    second = torch.randint(half, seq_len, (num_examples,), generator=generator)
    markers = torch.zeros((num_examples, seq_len))
    rows = torch.arange(num_examples)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    inputs = torch.stack([values, markers], dim=-1)
    targets = (values * markers).sum(dim=1, keepdim=True)
    return inputs, targets


def _check_sizes(num_train: int, num_val: int, num_test: int) -> None:
    """Every split needs at least one example."""
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


class _GeneratedDataModule(LitplugDataModule):
    """Shared plumbing: datasets built once in ``setup`` from a seeded generator."""

    def __init__(
        self,
        num_train: int,
        num_val: int,
        num_test: int,
        seed: int,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, pin_memory, persistent_workers)
        _check_sizes(num_train, num_val, num_test)
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test

    def _generate(self, num_examples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Subclasses return ``num_examples`` (inputs, targets) drawn from ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _generate")

    def setup(self, stage: str | None = None) -> None:
        """Generate train, val and test (in that order) from one generator seeded with ``seed``."""
        if self.datasets:
            return
        generator = torch.Generator().manual_seed(self.seed)
        sizes = (("train", self.num_train), ("val", self.num_val), ("test", self.num_test))
        self.datasets = {name: TensorDataset(*self._generate(n, generator)) for name, n in sizes}


class CopyTaskDataModule(_GeneratedDataModule):
    """Copy a random symbol sequence after a delimiter (see :func:`make_copy_task`).

    Batches are ``(inputs int64 [B, 2*seq_len+1], targets int64 [B, 2*seq_len+1])``; targets are
    ``-100`` (:data:`IGNORE_INDEX`) wherever nothing is to be predicted, which
    ``F.cross_entropy`` ignores by default. ``num_classes == vocab_size == num_symbols + 2``.

    Args:
        num_train: training examples.
        num_val: validation examples.
        num_test: test examples.
        seq_len: symbols to copy (the example length is ``2 * seq_len + 1``).
        num_symbols: distinct symbols.
        seed: seed of the generated data and of the training order.
        batch_size: examples per batch per device.
        num_workers, pin_memory, persistent_workers: the DataLoaders' worker options, as for
            :class:`LitplugDataModule`.
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        seq_len: int = 10,
        num_symbols: int = 8,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(
            num_train, num_val, num_test, seed, batch_size, num_workers, pin_memory, persistent_workers
        )
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if num_symbols < 1:
            raise ValueError(f"num_symbols must be >= 1, got {num_symbols}")
        self.seq_len = seq_len
        self.num_symbols = num_symbols
        self.ignore_index = IGNORE_INDEX

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 2

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (2 * self.seq_len + 1,)

    def _generate(self, num_examples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return make_copy_task(num_examples, self.seq_len, self.num_symbols, generator)


class AddingTaskDataModule(_GeneratedDataModule):
    """Hochreiter & Schmidhuber's adding problem, a regression task (see :func:`make_adding_task`).

    Batches are ``(inputs float32 [B, seq_len, 2], targets float32 [B, 1])``. ``num_classes`` is
    0, litplug's convention for regression (the model outputs one value, trained with e.g. MSE).

    Args:
        num_train: training examples.
        num_val: validation examples.
        num_test: test examples.
        seq_len: sequence length T (>= 2, one marker per half).
        seed: seed of the generated data and of the training order.
        batch_size: examples per batch per device.
        num_workers, pin_memory, persistent_workers: the DataLoaders' worker options, as for
            :class:`LitplugDataModule`.
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        seq_len: int = 50,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(
            num_train, num_val, num_test, seed, batch_size, num_workers, pin_memory, persistent_workers
        )
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.seq_len = seq_len

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len, 2)

    def _generate(self, num_examples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return make_adding_task(num_examples, self.seq_len, generator)
