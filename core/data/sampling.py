"""Exactly-resumable training order and the base data module every litplug data module extends.

The training order is a pure function of ``(seed, epoch, rank, num_replicas)``: each epoch's
permutation comes from a private ``torch.Generator`` seeded with ``seed + epoch``, so creating or
iterating loaders never touches the global RNG, and a run restarted from a checkpoint can skip
exactly the batches it already trained on. The global order does not depend on the number of
ranks or the batch size, so a run restarted on another shape can train on exactly the examples
of the epoch it had not reached, in new batches.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, Sampler

from litplug.core.errors import DataConfigError

__all__ = ["LitplugDataModule", "ResumableBatchSampler"]

# Lightning's warning on a mid-epoch resume with a loader that has no state_dict (the start of it).
_LIGHTNING_NOT_RESUMABLE = (
    "You're resuming from a checkpoint that ended before the epoch ended and your dataloader"
)


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
        self._start = 0

    @property
    def sampler(self) -> ResumableBatchSampler:
        """This object, so Lightning's ``batch_sampler.sampler.set_epoch`` reaches it."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        _require_int("epoch", epoch, 0)
        self.epoch = epoch

    def skip_batches(self, num_batches: int) -> None:
        """Make the next iteration (only that one) start after its first ``num_batches`` batches."""
        _require_int("num_batches", num_batches, 0)
        self._skip = num_batches

    def start_after_examples(self, num_examples: int) -> None:
        """Make the next iteration (only that one) cover the epoch's global order after its first
        ``num_examples`` examples, cut into this sampler's batches.

        This is how a run resumes mid-epoch on another number of devices or batch size: the global
        order does not depend on either, so the examples already trained on are its first
        ``num_examples`` whatever shape trained on them.
        """
        _require_int("num_examples", num_examples, 0)
        if num_examples > self.dataset_size:
            raise ValueError(
                f"num_examples must be <= dataset_size ({self.dataset_size}), got {num_examples}"
            )
        self._start = num_examples

    def batches_after(self, num_examples: int) -> int:
        """Batches per rank in an iteration that starts after the epoch's first ``num_examples``."""
        samples_per_rank = math.ceil((self.dataset_size - num_examples) / self.num_replicas)
        if self.drop_last:
            return samples_per_rank // self.batch_size
        return math.ceil(samples_per_rank / self.batch_size)

    def epoch_indices(self, epoch: int, start: int = 0) -> list[int]:
        """This rank's padded share of the global order for ``epoch`` after its first ``start``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        rest = order[start:]
        total = math.ceil(len(rest) / self.num_replicas) * self.num_replicas
        if total > len(rest):
            # Pad with the head of the whole epoch's order (several times over if the dataset is
            # tiny), so the padding of a resumed iteration is the uninterrupted one's.
            pad = total - len(rest)
            rest = torch.cat([rest, order.repeat(math.ceil(pad / self.dataset_size))[:pad]])
        global_batch = self.batch_size * self.num_replicas
        share: list[int] = []
        for first in range(0, total, global_batch):
            chunk = rest[first : first + global_batch]
            per_rank = len(chunk) // self.num_replicas  # the last chunk is smaller, still divisible
            share.extend(chunk[self.rank * per_rank : (self.rank + 1) * per_rank].tolist())
        return share

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the epoch and skip are read at the first next(), i.e. after Lightning's
        # set_epoch even though the DataLoader iterator may be created before it.
        skip, self._skip = self._skip, 0
        start, self._start = self._start, 0
        indices = self.epoch_indices(self.epoch, start)
        for batch_index in range(skip, self.batches_after(start)):
            first = batch_index * self.batch_size
            yield indices[first : first + self.batch_size]

    def __len__(self) -> int:
        return self.batches_after(0)


def _naming_the_data_module(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` raising a DataConfigError that names the class configured (``type(self)``) in place
    of a ValueError: through the CLI a bare ValueError surfaces inside a long jsonargparse error,
    a LitplugError as one line. Every argument check in a data module's ``__init__`` raises a
    ValueError that names the argument; a user's own subclass gets the same for free."""

    @functools.wraps(init)
    def checked_init(self: LitplugDataModule, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except DataConfigError:
            raise  # from a base class's __init__: already named
        except ValueError as err:
            raise DataConfigError(type(self).__name__, str(err)) from err

    return checked_init


class LitplugDataModule(L.LightningDataModule):
    """Base data module: seeded, exactly-resumable, self-sharding train loaders.

    Subclasses build datasets in ``setup`` and return ``self.train_loader(dataset)`` from
    ``train_dataloader`` and ``self.eval_loader(dataset)`` from the eval dataloaders. A user's own
    data module gets exact mid-epoch resume (the restarted run continues with exactly the batches
    not yet seen; on other devices or another batch size, with the examples not yet seen cut into
    the new batches) and DDP sharding simply by building its train loader with :meth:`train_loader`.

    The train loader's :class:`ResumableBatchSampler` shards by rank itself, so the Trainer must run
    with ``use_distributed_sampler=False`` (litplug's trainer defaults set it); otherwise Lightning
    would try to wrap it in a ``DistributedSampler``.

    Subclasses expose ``num_classes`` (0 for regression) and ``input_shape`` (one example's shape).

    Args:
        batch_size: examples per batch per device.
        seed: seed of the training order (and of any seeded split a subclass makes).
        num_workers: DataLoader worker processes.
        pin_memory: DataLoader's ``pin_memory`` (page-locked batches: faster, asynchronous copies
            to a GPU; no use on CPU).
        persistent_workers: keep the worker processes between epochs instead of starting them
            again for every loader pass; needs ``num_workers`` > 0. It pays when epochs are short.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _naming_the_data_module(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        _require_int("batch_size", batch_size, 1)
        _require_int("seed", seed, 0)
        _require_int("num_workers", num_workers, 0)
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0 (there are no workers to keep)")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.datasets: dict[str, Dataset[Any]] = {}  # "train"/"val"/"test", filled by setup()
        self._saved_order: dict[str, Any] = {}  # the order's cut in a checkpoint being resumed
        # Set when a run resumed mid-epoch on another shape: {"epoch", "examples", "batches"}.
        self._resumed_cut: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """How the current epoch's order is cut into batches (Lightning keeps it in checkpoints),
        so that a run restarted mid-epoch, on these devices or others, trains on exactly the
        examples of the epoch not yet trained on."""
        world_size, _ = self._world()
        state: dict[str, Any] = {"world_size": world_size, "batch_size": self.batch_size}
        cut = self._resumed_cut
        if cut is not None and self.trainer is not None and cut["epoch"] == self.trainer.current_epoch:
            state["epoch_cut"] = dict(cut)
        return state

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

    def _resume_mid_epoch(self, sampler: ResumableBatchSampler) -> None:
        """Point a restarted Lightning run's sampler at the examples of the interrupted epoch not
        yet trained on.

        The global order of an epoch does not depend on the shape (devices x batch size), so the
        examples already trained on are its first ``consumed``, whatever shape cut them. With the
        checkpoint's shape the sampler simply skips the batches done. With another shape it re-cuts
        the rest of the order into this run's batches, and Lightning's batch count in this epoch
        is moved on so that it reaches the epoch's end (``len(sampler)``) exactly when they run
        out: Lightning ends an epoch by that count, not when the loader is exhausted.
        """
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return
        epochs: Any = trainer.fit_loop.epoch_progress.current
        if epochs.completed >= epochs.started:
            # The checkpoint's epoch was closed (saved at its end, or cut short by max_time or
            # early stopping; core/loop_state.py): Lightning starts the next epoch from its first batch.
            return
        progress: Any = trainer.fit_loop.epoch_loop.batch_progress.current
        # A checkpoint saved in on_train_batch_end (ModelCheckpoint(every_n_train_steps=...)) has
        # `completed` one behind: that batch was processed but Lightning counts it completed only
        # after the save. `processed` counts every batch whose training step finished.
        done = int(progress.processed)
        saved = self._saved_cut(sampler)
        saved_sampler = ResumableBatchSampler(
            sampler.dataset_size,
            saved["batch_size"],
            sampler.seed,
            drop_last=sampler.drop_last,
            num_replicas=saved["world_size"],
        )
        saved_len = saved["batches"] + saved_sampler.batches_after(saved["examples"])
        # A checkpoint taken after the epoch's last batch resumes at the next epoch: skip nothing.
        if done >= self._limited(saved_len):
            return
        unchanged = saved == {
            "world_size": sampler.num_replicas,
            "batch_size": sampler.batch_size,
            "examples": 0,
            "batches": 0,
        }
        if unchanged:
            sampler.skip_batches(done)
            self._resumes_exactly(
                f"resuming epoch {sampler.epoch} after {done} of its {self._limited(len(sampler))} batches"
            )
            return
        if self._limited(saved_len) < saved_len or self._limited(len(sampler)) < len(sampler):
            self._warn_that_the_order_is_cut_differently(done, saved)
            sampler.skip_batches(done)
            return
        global_batch = saved["world_size"] * saved["batch_size"]
        consumed = saved["examples"] + (done - saved["batches"]) * global_batch
        sampler.start_after_examples(consumed)
        batches = len(sampler) - sampler.batches_after(consumed)
        progress.increment_by(batches - done)  # ready, started, processed and completed alike
        self._resumed_cut = {"epoch": sampler.epoch, "examples": consumed, "batches": batches}
        self._resumes_exactly(
            f"resuming epoch {sampler.epoch} after {consumed} of its {sampler.dataset_size} examples, "
            f"trained on by {saved['world_size']} process(es) x batch {saved['batch_size']}; the other "
            f"{sampler.dataset_size - consumed} are cut into {sampler.batches_after(consumed)} batches "
            f"of {sampler.num_replicas} x {sampler.batch_size} (batch_idx continues at {batches})"
        )

    def _resumes_exactly(self, how: str) -> None:
        """Say how the interrupted epoch continues, and silence Lightning's warning that it cannot:
        Lightning sees only that the DataLoader has no ``state_dict``, not that the batch sampler
        resumes from the trainer's own batch count."""
        warnings.filterwarnings("ignore", message=_LIGHTNING_NOT_RESUMABLE, category=PossibleUserWarning)
        rank_zero_info(f"{type(self).__name__}: {how}; no example is skipped or repeated")

    def _saved_cut(self, sampler: ResumableBatchSampler) -> dict[str, int]:
        """The checkpoint's cut of the current epoch; this run's shape for older checkpoints."""
        saved = self._saved_order
        cut = saved.get("epoch_cut") or {}
        same_epoch = cut.get("epoch") == sampler.epoch
        return {
            "world_size": int(saved.get("world_size", sampler.num_replicas)),
            "batch_size": int(saved.get("batch_size", sampler.batch_size)),
            "examples": int(cut["examples"]) if same_epoch else 0,
            "batches": int(cut["batches"]) if same_epoch else 0,
        }

    def _limited(self, epoch_len: int) -> int:
        """The batches of an epoch of ``epoch_len`` that ``limit_train_batches`` lets Lightning run."""
        limit = self.trainer.limit_train_batches if self.trainer is not None else None
        if isinstance(limit, int):
            return min(epoch_len, limit)
        if limit is not None:
            return int(epoch_len * float(limit))
        return epoch_len

    def _warn_that_the_order_is_cut_differently(self, done: int, saved: dict[str, int]) -> None:
        world_size, _ = self._world()
        rank_zero_warn(
            f"{type(self).__name__}: resuming mid-epoch (after {done} batches) with "
            f"{world_size} process(es) x batch {self.batch_size}, but the checkpoint was saved with "
            f"{saved['world_size']} x {saved['batch_size']} and limit_train_batches cuts the epoch "
            "short, so the rest of it cannot be re-cut exactly: some of its examples are trained on "
            "twice or not at all. Resume with the same devices and batch size, or from an epoch-end "
            "checkpoint."
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
        self._resumed_cut = None  # a new loader: a re-cut epoch, if any, is over
        if self.trainer is not None:
            # Worker processes prefetch at iterator creation, before Lightning's set_epoch.
            sampler.set_epoch(int(self.trainer.current_epoch))
            self._resume_mid_epoch(sampler)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            generator=self._loader_generator(),
            **self._worker_options(),
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
            generator=self._loader_generator(),
            **self._worker_options(),
            **kwargs,
        )

    def _worker_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }
