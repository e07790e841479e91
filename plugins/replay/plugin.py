"""The replay plugin: a reservoir memory of past samples mixed into every training batch."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin

from .functional import ReservoirMemory

FILL_MODES = ("stream", "task_end")


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class Replay(Plugin):
    """Experience replay with a reservoir-sampled memory (Chaudhry et al. 2019, "tiny episodic memories").

    Every training batch is extended with ``replay_batch_size`` samples drawn uniformly from the
    memory (one cross-entropy over the combined batch). The memory holds ``memory_size`` samples in
    total, or per class with ``per_class=True``, filled by reservoir sampling either from the
    training stream (``fill="stream"``: every batch is offered right after its replay samples are
    drawn, draws from the global RNG) or from each task's training data at its end (``fill="task_end"``, a private generator
    seeded with ``seed + task``). With a task-incremental model (``TaskHeads``) the replayed samples
    are scored with their own task's head. The memory is part of the checkpoint.

    Under DDP each rank keeps a memory of its own shard (``rank_local_state``: not averaged and not
    in the agreement check): ``memory_size`` and ``replay_batch_size`` are per rank, so the global
    batch carries ``world_size * replay_batch_size`` replayed samples. Checkpoints hold every rank's
    memory (the core gathers rank-local state), so each rank resumes from its own.

    Args:
        memory_size: samples kept in total (or per class), >= 1.
        per_class: one reservoir of ``memory_size`` per class (class-balanced) instead of one in total.
        replay_batch_size: memory samples added to each training batch, >= 1.
        fill: ``"stream"`` or ``"task_end"``.
        seed: seed of the ``task_end`` fill.
    """

    name: ClassVar[str] = "replay"
    stochastic_training = True  # reservoir sampling and replayed draws use the training RNG
    rank_local_state = True  # under DDP each rank keeps a memory of its own shard (intended)
    supports_ddp: ClassVar[bool] = True

    def __init__(
        self,
        memory_size: int = 200,
        per_class: bool = False,
        replay_batch_size: int = 32,
        fill: str = "stream",
        seed: int = 0,
    ) -> None:
        self.check(_is_int(memory_size, 1), "memory_size", f"must be an integer >= 1, got {memory_size!r}")
        self.check(
            _is_int(replay_batch_size, 1),
            "replay_batch_size",
            f"must be an integer >= 1, got {replay_batch_size!r}",
        )
        self.check_choice("fill", fill, FILL_MODES)
        self.check(_is_int(seed, 0), "seed", f"must be an integer >= 0, got {seed!r}")
        self.memory_size = memory_size
        self.per_class = per_class
        self.replay_batch_size = replay_batch_size
        self.fill = fill
        self.seed = seed
        self.memory: ReservoirMemory | None = None
        self.current_task = 0

    @classmethod
    def example(cls) -> Replay:
        return cls(memory_size=64, replay_batch_size=16)

    def _memory(self, module: Any) -> ReservoirMemory:
        if self.memory is None:
            num_classes = None
            if self.per_class:
                num_classes = getattr(module, "num_classes", None)
                self.check(bool(num_classes), "per_class", "needs the number of classes (module.num_classes)")
            self.memory = ReservoirMemory(self.memory_size, num_classes)
        return self.memory

    @hookimpl
    def litplug_on_task_start(self, task_id: int) -> None:
        self.current_task = task_id

    @hookimpl
    def litplug_on_fit_start(self, sample_batch: Any) -> None:
        self.check_batch(sample_batch, class_targets=True)

    @hookimpl
    def litplug_transform_batch(self, module: Any, batch: Any, stage: str) -> Any:
        if stage != "train":
            return None
        inputs, targets = batch[0], batch[1]
        memory = self._memory(module)
        if len(memory) == 0:
            self._offer(memory, inputs, targets)
            return None
        memory.to(inputs.device)
        old_x, old_y, old_tasks = memory.sample(self.replay_batch_size)
        # Offered right after drawing, so a batch never replays itself; the raw (untransformed)
        # batch is at hand only here. A checkpoint saved at this step holds the offer (the core
        # fires plugin batch-end hooks before ModelCheckpoint, so either place would be safe).
        self._offer(memory, inputs, targets)
        heads = _task_heads(module)
        if heads is not None and heads.task_classes is not None:
            current = torch.full_like(targets, self.current_task)
            heads.set_sample_tasks(torch.cat([current, old_tasks.to(targets.device)]))
        return (torch.cat([inputs, old_x.to(inputs.dtype)]), torch.cat([targets, old_y]))

    def _offer(self, memory: ReservoirMemory, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.fill == "stream":
            memory.add(inputs, targets, self.current_task)

    @hookimpl
    def litplug_on_task_end(self, module: Any, task_id: int, dataloader: Any) -> None:
        if self.fill != "task_end":
            return
        generator = torch.Generator().manual_seed(self.seed + task_id)
        memory = self._memory(module)
        for batch in dataloader:
            memory.add(batch[0].to(module.device), batch[1].to(module.device), task_id, generator)

    def state_dict(self) -> dict[str, Any]:
        return {
            "current_task": self.current_task,
            "memory": None if self.memory is None else self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current_task = int(state["current_task"])
        self.memory = None if state["memory"] is None else ReservoirMemory.from_state(state["memory"])


def _task_heads(module: Any) -> Any:
    from litplug.core.continual import find_task_heads

    model = getattr(module, "model", None)
    return find_task_heads(model) if model is not None else None
