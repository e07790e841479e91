"""Exactly-resumable training order and the base data module every litplug data module extends.

The training order is a pure function of ``(seed, epoch, rank, num_replicas)``: each epoch's
permutation comes from a private ``torch.Generator`` seeded with ``seed + epoch``, so creating or
iterating loaders never touches the global RNG, and a run restarted from a checkpoint can skip
exactly the batches it already trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["LitplugDataModule", "ResumableBatchSampler"]


def _require_int(name: str, value: int, minimum: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices in an order fixed by ``seed`` and the epoch.

    Args:
        dataset_size: number of examples in the dataset.
        batch_size: examples per batch on each rank (per device).
        seed: base seed; epoch ``e`` is shuffled by a private generator seeded with ``seed + e``.
        shuffle: draw a fresh permutation each epoch; otherwise use ``0..dataset_size-1``.
        drop_last: drop each rank's final incomplete batch.
        num_replicas: number of ranks sharing the data (DDP world size).
        rank: this process's rank in ``[0, num_replicas)``.

    Sharding: every rank computes the same global permutation (the seed is shared) and cuts it into
    global batches of ``num_replicas * batch_size``; rank ``r`` takes the ``r``-th contiguous slice of
    ``batch_size`` rows of each. So a run on R devices with per-device batch b sees, step by step,
    exactly the examples a one-device run with batch ``R * b`` sees, in the same order when the
    ranks' batches are concatenated, which is what makes multi-process runs comparable with
    single-process ones. Contiguous slices also match ghost batch norm's default contiguous ghost
    batches: when the ghost size divides b, the ranks' ghost batches are exactly the one-device
    run's. When ``dataset_size`` is not divisible by
    ``num_replicas`` the permutation is padded by repeating its first indices (as
    ``DistributedSampler`` does), so every rank gets the same number of examples and batches and
    collective ops never hang; those few padded examples are seen twice per epoch. Because this
    sampler shards itself, the Trainer must not add a ``DistributedSampler``
    (``use_distributed_sampler=False``).

    Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (not on the batch
    sampler itself), so :attr:`sampler` returns this object.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _require_int("dataset_size", dataset_size, 0)
        _require_int("batch_size", batch_size, 1)
        _require_int("seed", seed, 0)
        _require_int("num_replicas", num_replicas, 1)
        _require_int("rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"rank must be < num_replicas ({num_replicas}), got {rank}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    @property
    def sampler(self) -> ResumableBatchSampler:
        """This object, so Lightning's ``batch_sampler.sampler.set_epoch`` reaches it."""
        return self

    @property
    def samples_per_rank(self) -> int:
        """Examples each rank sees per epoch, padding included."""
        return math.ceil(self.dataset_size / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        _require_int("epoch", epoch, 0)
        self.epoch = epoch

    def skip_batches(self, num_batches: int) -> None:
        """Make the next iteration (only that one) start after its first ``num_batches`` batches."""
        _require_int("num_batches", num_batches, 0)
        self._skip = num_batches

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's padded share of the global order for ``epoch``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        total = self.samples_per_rank * self.num_replicas
        if total > self.dataset_size:
            # Repeat the head of the order (several times if the dataset is tiny) to pad evenly.
            reps = math.ceil(total / self.dataset_size)
            order = order.repeat(reps)[:total]
        global_batch = self.batch_size * self.num_replicas
        share: list[int] = []
        for start in range(0, total, global_batch):
            chunk = order[start : start + global_batch]
            per_rank = len(chunk) // self.num_replicas  # the last chunk is smaller, still divisible
            share.extend(chunk[self.rank * per_rank : (self.rank + 1) * per_rank].tolist())
        return share

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the epoch and skip are read at the first next(), i.e. after Lightning's
        # set_epoch even though the DataLoader iterator may be created before it.
        skip, self._skip = self._skip, 0
        indices = self.epoch_indices(self.epoch)
        for batch_index in range(skip, len(self)):
            start = batch_index * self.batch_size
            yield indices[start : start + self.batch_size]

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)


class LitplugDataModule(L.LightningDataModule):
    """Base data module: seeded, exactly-resumable, self-sharding train loaders.

    Subclasses build datasets in ``setup`` and return ``self.train_loader(dataset)`` from
    ``train_dataloader`` and ``self.eval_loader(dataset)`` from the eval dataloaders. A user's own
    data module gets exact mid-epoch resume (the restarted run continues with exactly the batches
    not yet seen) and DDP sharding simply by building its train loader with :meth:`train_loader`.

    The train loader's :class:`ResumableBatchSampler` shards by rank itself, so the Trainer must run
    with ``use_distributed_sampler=False`` (litplug's trainer defaults set it); otherwise Lightning
    would try to wrap it in a ``DistributedSampler``.

    Subclasses expose ``num_classes`` (0 for regression) and ``input_shape`` (one example's shape).

    Args:
        batch_size: examples per batch per device.
        seed: seed of the training order (and of any seeded split a subclass makes).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        _require_int("batch_size", batch_size, 1)
        _require_int("seed", seed, 0)
        _require_int("num_workers", num_workers, 0)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset[Any]] = {}  # "train"/"val"/"test", filled by setup()
        self._saved_order: dict[str, Any] = {}  # the order's shape in a checkpoint being resumed

    def state_dict(self) -> dict[str, Any]:
        """The shape of the training order (Lightning keeps it in checkpoints): a run restarted
        mid-epoch can only skip exactly the batches already trained on if it is unchanged."""
        world_size, _ = self._world()
        return {"world_size": world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_order = dict(state_dict)

    def _dataset(self, name: str) -> Dataset[Any]:
        if not self.datasets:
            self.setup("fit")
        return self.datasets[name]

    def train_dataloader(self) -> DataLoader[Any]:
        return self.train_loader(self._dataset("train"))

    def val_dataloader(self) -> DataLoader[Any]:
        return self.eval_loader(self._dataset("val"))

    def test_dataloader(self) -> DataLoader[Any]:
        return self.eval_loader(self._dataset("test"))

    def predict_dataloader(self) -> Any:
        """The test data (``litplug predict`` scores it); subclasses with other test loaders inherit it."""
        return self.test_dataloader()

    @property
    def num_classes(self) -> int:
        """Number of output classes; 0 for regression."""
        raise NotImplementedError(f"{type(self).__name__} must define num_classes")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example (without the batch dimension)."""
        raise NotImplementedError(f"{type(self).__name__} must define input_shape")

    def _world(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` from the attached trainer, or ``(1, 0)``."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _batches_to_skip(self, sampler: ResumableBatchSampler) -> int:
        """Batches of the current epoch a restarted Lightning run has already trained on."""
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        epochs: Any = trainer.fit_loop.epoch_progress.current
        if epochs.completed >= epochs.started:
            # The interrupted epoch was closed (a run that stopped at max_steps): Lightning starts
            # the next epoch, so its first batch is the next epoch's first.
            return 0
        progress: Any = trainer.fit_loop.epoch_loop.batch_progress.current
        # A checkpoint saved in on_train_batch_end (ModelCheckpoint(every_n_train_steps=...)) has
        # `completed` one behind: that batch was processed but Lightning counts it completed only
        # after the save. `processed` counts every batch whose training step finished.
        done = int(progress.processed)
        limit = trainer.limit_train_batches
        epoch_len = len(sampler)
        if isinstance(limit, int):
            epoch_len = min(epoch_len, limit)
        elif limit is not None:
            epoch_len = int(epoch_len * float(limit))
        # A checkpoint taken after the epoch's last batch resumes at the next epoch: skip nothing.
        if done >= epoch_len:
            return 0
        self._warn_if_the_order_changed(done)
        return done

    def _warn_if_the_order_changed(self, done: int) -> None:
        saved, now = self._saved_order, self.state_dict()
        if not saved or all(saved.get(key) == value for key, value in now.items()):
            return
        rank_zero_warn(
            f"{type(self).__name__}: resuming mid-epoch (after {done} batches) with "
            f"{now['world_size']} process(es) x batch {now['batch_size']}, but the checkpoint was "
            f"saved with {saved.get('world_size')} x {saved.get('batch_size')}: the rest of this "
            "epoch is cut differently, so some of its examples are trained on twice or not at all. "
            "Resume with the same devices and batch size, or from an epoch-end checkpoint."
        )

    def _require_own_sharding(self, world_size: int) -> None:
        """The loader shards itself; Lightning's replacement sampler would fail deep inside it."""
        trainer = self.trainer
        if world_size > 1 and trainer is not None and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                f"{type(self).__name__} shards its training data across processes itself "
                "(ResumableBatchSampler): create the Trainer with use_distributed_sampler=False "
                "(litplug's CLI sets it)"
            )

    def _overfitting(self) -> bool:
        """Whether the attached trainer runs with ``overfit_batches`` (a debugging run)."""
        trainer = self.trainer
        # set in Trainer.__init__ (trainer/setup.py), not declared on the class
        return trainer is not None and float(getattr(trainer, "overfit_batches", 0)) > 0

    def _loader_generator(self) -> torch.Generator:
        # DataLoader draws its worker base seed from this generator; without one it would draw
        # from (and so advance) the global RNG every time a loader is iterated.
        return torch.Generator().manual_seed(self.seed)

    def train_loader(
        self, dataset: Dataset[Any], shuffle: bool = True, drop_last: bool = False, **kwargs: Any
    ) -> DataLoader[Any]:
        """A training DataLoader over ``dataset`` driven by a :class:`ResumableBatchSampler`.

        Rank and world size come from the attached trainer. When Lightning restarts mid-epoch from
        a checkpoint, the loader skips the batches of that epoch already trained on. Extra keyword
        arguments (e.g. ``collate_fn``) go to the DataLoader.
        """
        world_size, rank = self._world()
        self._require_own_sharding(world_size)
        if self._overfitting():
            # Lightning's overfit_batches trains on the same first batches every epoch: it turns off
            # shuffling, but only by replacing a loader's sampler, which misses a batch sampler.
            shuffle = False
        sampler = ResumableBatchSampler(
            dataset_size=len(dataset),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=shuffle,
            drop_last=drop_last,
            num_replicas=world_size,
            rank=rank,
        )
        if self.trainer is not None:
            # Worker processes prefetch at iterator creation, before Lightning's set_epoch.
            sampler.set_epoch(int(self.trainer.current_epoch))
            sampler.skip_batches(self._batches_to_skip(sampler))
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            generator=self._loader_generator(),
            **kwargs,
        )

    def eval_loader(self, dataset: Dataset[Any], **kwargs: Any) -> DataLoader[Any]:
        """A plain, unshuffled evaluation DataLoader that leaves the global RNG untouched.

        It is not sharded: under DDP every rank evaluates the whole dataset, so metrics need no
        cross-rank reduction to be exact.
        """
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            generator=self._loader_generator(),
            **kwargs,
        )
