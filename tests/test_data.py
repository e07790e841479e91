"""Tests of the offline data modules and the exactly-resumable batch sampler."""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import BatchRecorder, IndexData
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from litplug.core.data import (
    AddingTaskDataModule,
    CopyTaskDataModule,
    DigitsDataModule,
    LitplugDataModule,
    ResumableBatchSampler,
    StdlibTextDataModule,
    load_digits_tensors,
)
from litplug.core.data.digits import _raw_digits
from litplug.core.data.text import VOCAB_SIZE, decode, encode, stdlib_python_files
from litplug.core.errors import DataConfigError

# ---------------------------------------------------------------- sampler


def _epoch(sampler: ResumableBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_same_seed_and_epoch_same_order() -> None:
    a = ResumableBatchSampler(50, 8, seed=3)
    b = ResumableBatchSampler(50, 8, seed=3)
    assert _epoch(a, 2) == _epoch(b, 2)
    assert _epoch(a, 2) != _epoch(a, 3)
    assert _epoch(a, 2) != _epoch(ResumableBatchSampler(50, 8, seed=4), 2)
    # Every epoch is a permutation of the data.
    assert sorted(i for batch in _epoch(a, 5) for i in batch) == list(range(50))


def test_sampler_len_and_drop_last() -> None:
    sampler = ResumableBatchSampler(50, 8, seed=0)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 7
    assert [len(b) for b in batches] == [8] * 6 + [2]
    dropped = ResumableBatchSampler(50, 8, seed=0, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 6


def test_sampler_no_shuffle_is_sequential() -> None:
    sampler = ResumableBatchSampler(10, 4, seed=0, shuffle=False)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("skip", [0, 1, 4, 6, 7, 9])
def test_skip_batches_continues_exactly(skip: int) -> None:
    sampler = ResumableBatchSampler(50, 8, seed=1)
    full = _epoch(sampler, 3)
    sampler.skip_batches(skip)
    assert _epoch(sampler, 3) == full[skip:]
    # Only the next iteration skips.
    assert _epoch(sampler, 3) == full


@pytest.mark.parametrize(("size", "replicas"), [(50, 3), (48, 4), (5, 4), (2, 3)])
def test_rank_shards_are_disjoint_and_cover(size: int, replicas: int) -> None:
    shards = []
    for rank in range(replicas):
        sampler = ResumableBatchSampler(size, 4, seed=0, num_replicas=replicas, rank=rank)
        sampler.set_epoch(1)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        shards.append([i for batch in batches for i in batch])
    # Equal share per rank (padding), so every rank runs the same number of steps.
    assert len({len(s) for s in shards}) == 1
    assert (
        len({len(ResumableBatchSampler(size, 4, 0, num_replicas=replicas, rank=r)) for r in range(replicas)})
        == 1
    )
    everything = [i for s in shards for i in s]
    assert set(everything) == set(range(size))
    # Only the padding may repeat an index.
    assert len(everything) - len(set(everything)) == len(shards[0]) * replicas - size
    if size % replicas == 0:
        assert len(everything) == len(set(everything))


def _global_steps(size: int, batch: int, replicas: int, start: int = 0, **kw: Any) -> list[list[int]]:
    """Each step's global batch (the ranks' batches concatenated) of epoch 2 after ``start``."""
    per_rank = []
    for rank in range(replicas):
        sampler = ResumableBatchSampler(size, batch, seed=4, num_replicas=replicas, rank=rank, **kw)
        sampler.set_epoch(2)
        sampler.start_after_examples(start)
        batches = list(sampler)
        assert len(batches) == sampler.batches_after(start)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1, "every rank must run the same number of steps"
    return [sum((batches[step] for batches in per_rank), []) for step in range(len(per_rank[0]))]


@pytest.mark.parametrize(
    ("size", "old", "new", "done"),
    [
        (50, (1, 8), (2, 4), 3),  # same global batch on more devices
        (50, (1, 8), (3, 4), 2),  # padding after the re-cut
        (50, (2, 4), (1, 16), 4),  # fewer devices, bigger batch
        (47, (3, 5), (2, 2), 1),
        (47, (3, 5), (4, 8), 2),  # the rest is one padded partial batch
        (10, (1, 4), (3, 4), 2),  # 2 examples left for 3 ranks
    ],
)
def test_start_after_examples_recuts_the_rest_of_the_epoch_on_another_shape(
    size: int, old: tuple[int, int], new: tuple[int, int], done: int
) -> None:
    """Resuming on another shape: the old shape's first `done` steps and the new shape's steps after
    them are, concatenated, the epoch's global order once through, plus only the new padding."""
    (old_world, old_batch), (new_world, new_batch) = old, new
    trained = _global_steps(size, old_batch, old_world)[:done]
    consumed = sum(len(b) for b in trained)
    assert consumed == done * old_world * old_batch
    rest = _global_steps(size, new_batch, new_world, start=consumed)
    order = sum(_global_steps(size, size, 1), [])  # the epoch's global order, unpadded
    pad = -(size - consumed) % new_world
    assert sum(trained + rest, []) == order + (order * new_world)[:pad]
    # With the old shape the re-cut is exactly the plain skip.
    assert (
        _global_steps(size, old_batch, old_world, start=consumed)
        == _global_steps(size, old_batch, old_world)[done:]
    )


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_recut_epoch_cut_again_later_continues_the_first_recut(drop_last: bool) -> None:
    """Killed twice in one epoch with the new shape: starting after what the first re-cut's first
    k steps trained on equals that re-cut's steps after the k-th, padding included."""
    first = _global_steps(47, 4, 3, start=10, drop_last=drop_last)
    for steps in range(len(first)):
        again = _global_steps(47, 4, 3, start=10 + steps * 12, drop_last=drop_last)
        assert again == first[steps:], steps


def test_start_after_examples_validates_and_applies_to_one_iteration() -> None:
    sampler = ResumableBatchSampler(10, 4, seed=0, shuffle=False)
    with pytest.raises(ValueError, match="num_examples must be <= dataset_size \\(10\\)"):
        sampler.start_after_examples(11)
    sampler.start_after_examples(3)
    assert list(sampler) == [[3, 4, 5, 6], [7, 8, 9]]
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    sampler.start_after_examples(10)
    assert list(sampler) == [] and sampler.batches_after(10) == 0


def test_sampler_does_not_touch_global_rng() -> None:
    state = torch.get_rng_state()
    sampler = ResumableBatchSampler(100, 10, seed=0)
    for epoch in range(3):
        _epoch(sampler, epoch)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"dataset_size": 10, "batch_size": 0, "seed": 0}, "batch_size"),
        ({"dataset_size": -1, "batch_size": 2, "seed": 0}, "dataset_size"),
        ({"dataset_size": 10, "batch_size": 2, "seed": 0, "num_replicas": 0}, "num_replicas"),
        ({"dataset_size": 10, "batch_size": 2, "seed": 0, "num_replicas": 2, "rank": 2}, "rank"),
    ],
)
def test_sampler_validates_arguments(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ResumableBatchSampler(**kwargs)


def test_datamodule_validates_arguments() -> None:
    with pytest.raises(DataConfigError, match="^data module DigitsDataModule: batch_size must be"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="form"):
        DigitsDataModule(form="cube")  # type: ignore[arg-type]


# ------------------------------------------------- Lightning mid-epoch resume


def _fit(
    tmp_path: Path,
    callbacks: list[L.Callback],
    ckpt_path: str | None = None,
    batch_size: int = 8,
    **trainer_kwargs: Any,
) -> list[list[int]]:
    return _fit_recorder(tmp_path, callbacks, ckpt_path, batch_size, **trainer_kwargs).seen


def _fit_recorder(
    tmp_path: Path,
    callbacks: list[L.Callback],
    ckpt_path: str | None = None,
    batch_size: int = 8,
    data: IndexData | None = None,
    **trainer_kwargs: Any,
) -> BatchRecorder:
    model = BatchRecorder()
    trainer = L.Trainer(
        **{"max_epochs": 2, **trainer_kwargs},
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data or IndexData(batch_size=batch_size, seed=5), ckpt_path=ckpt_path)
    return model


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
@pytest.mark.filterwarnings("ignore:.*exists and is not empty.*")
def test_lightning_resume_mid_epoch_continues_exactly(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    full = _fit(tmp_path, [checkpoint])
    assert len(full) == 10  # 5 batches x 2 epochs
    # Lightning's set_epoch reached the batch sampler: epoch 1 uses its own permutation.
    expected = ResumableBatchSampler(40, 8, seed=5)
    assert full[:5] == _epoch(expected, 0) and full[5:] == _epoch(expected, 1)
    # Mid-epoch 0, end of epoch 0, and mid-epoch 1.
    for step in (3, 5, 6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = _fit(tmp_path, [], ckpt_path=str(ckpt_dir / f"step={step}.ckpt"))
        assert resumed == full[step:], f"resume from step {step}"
        # Lightning cannot see that the batch sampler resumes itself; the data module silences its
        # warning that the loader is not resumable, since the test proves it is.
        assert not [w for w in caught if "dataloader is not resumable" in str(w.message)], step


def _every_step(ckpt_dir: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, filename="{step}")


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
@pytest.mark.filterwarnings("ignore:.*exists and is not empty.*")
@pytest.mark.parametrize(
    ("batch_size", "batches_left", "next_batch_idx"), [(4, 4, 6), (16, 1, 2), (12, 2, 2)]
)
def test_resuming_mid_epoch_with_another_batch_size_trains_on_the_rest_of_the_epoch_once(
    tmp_path: Path, batch_size: int, batches_left: int, next_batch_idx: int
) -> None:
    """Killed after 3 batches of 8 and resumed with another batch size: the other 16 examples of the
    epoch, cut into the new batches, and Lightning's batch_idx moved on so that the epoch ends when
    they run out; the next epoch is whole."""
    ckpt_dir = tmp_path / "ckpt"
    full = _fit(tmp_path, [_every_step(ckpt_dir)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit_recorder(tmp_path, [], ckpt_path=str(ckpt_dir / "step=3.ckpt"), batch_size=batch_size)
    assert not [w for w in caught if "cut differently" in str(w.message)]
    assert _flat(resumed.seen[:batches_left]) == _flat(full[3:5])
    assert [len(b) for b in resumed.seen[:batches_left]] == [
        min(batch_size, 16 - k * batch_size) for k in range(batches_left)
    ]
    epoch_len = -(-40 // batch_size)
    assert resumed.batch_indices[:batches_left] == [(0, next_batch_idx + k) for k in range(batches_left)]
    assert next_batch_idx + batches_left == epoch_len
    assert resumed.batch_indices[batches_left:] == [(1, k) for k in range(epoch_len)]
    assert resumed.seen[batches_left:] == _epoch(ResumableBatchSampler(40, batch_size, seed=5), 1)


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
@pytest.mark.filterwarnings("ignore:.*exists and is not empty.*")
def test_a_recut_epoch_killed_again_resumes_where_it_stopped(tmp_path: Path) -> None:
    """The re-cut is kept in the next checkpoints: killed again in that epoch, the run continues it
    exactly on the same shape, and re-cuts it once more on yet another. Batches of 5 after 24
    examples do not line up with batches of 5 from the start, so a plain skip would be wrong."""
    first, second = tmp_path / "first", tmp_path / "second"
    _fit(tmp_path, [_every_step(first)])
    recut = _fit(tmp_path, [_every_step(second)], ckpt_path=str(first / "step=3.ckpt"), batch_size=5)
    assert [len(b) for b in recut[:4]] == [5, 5, 5, 1]
    # step 5: 3 batches of 8 then 2 of 5, so 34 of the epoch's 40 examples are done
    assert _fit(tmp_path, [], ckpt_path=str(second / "step=5.ckpt"), batch_size=5) == recut[2:]
    again = _fit_recorder(tmp_path, [], ckpt_path=str(second / "step=5.ckpt"), batch_size=8)
    assert again.seen[0] == _flat(recut[2:4]) and again.batch_indices[0] == (0, 4)
    assert again.seen[1:] == _epoch(ResumableBatchSampler(40, 8, seed=5), 1)


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
@pytest.mark.filterwarnings("ignore:.*exists and is not empty.*")
def test_a_recut_does_not_outlive_its_run(tmp_path: Path) -> None:
    """A data module that resumed a re-cut epoch and is then fitted afresh (a new task, a new trial)
    saves plain cuts: resuming those checkpoints skips exactly."""
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    _fit(tmp_path, [_every_step(first)])
    data = IndexData(batch_size=5, seed=5)
    _fit_recorder(tmp_path, [], ckpt_path=str(first / "step=3.ckpt"), data=data, max_epochs=1)
    uninterrupted = _fit_recorder(tmp_path, [_every_step(fresh)], data=data).seen
    assert _fit(tmp_path, [], ckpt_path=str(fresh / "step=2.ckpt"), batch_size=5) == uninterrupted[2:]


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
def test_resuming_mid_epoch_on_another_shape_with_a_batch_limit_warns_that_the_order_is_cut_differently(
    tmp_path: Path,
) -> None:
    ckpt_dir = tmp_path / "ckpt"
    _fit(tmp_path, [_every_step(ckpt_dir)], limit_train_batches=4)
    changed = (
        "resuming mid-epoch \\(after 3 batches\\) with 1 process\\(es\\) x batch 4, but the checkpoint was "
        "saved with 1 x 8 and limit_train_batches cuts the epoch short"
    )
    with pytest.warns(UserWarning, match=changed):
        _fit(tmp_path, [], ckpt_path=str(ckpt_dir / "step=3.ckpt"), batch_size=4, limit_train_batches=4)
    # with the same shape the skip is exact, mid-epoch or after an epoch's last batch: no warning
    for step in (3, 4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(tmp_path, [], ckpt_path=str(ckpt_dir / f"step={step}.ckpt"), limit_train_batches=4)
        assert not [w for w in caught if "cut differently" in str(w.message)], step


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
@pytest.mark.filterwarnings("ignore:.*exists and is not empty.*")
def test_persistent_workers_keep_the_epoch_order_and_the_exact_resume(tmp_path: Path) -> None:
    """Kept between epochs, workers still get each epoch's own order (the batch sampler runs in
    the main process), and a resumed run still skips exactly."""
    ckpt_dir = tmp_path / "ckpt"

    def workers() -> IndexData:
        return IndexData(batch_size=8, seed=5, num_workers=2, persistent_workers=True)

    full = _fit_recorder(tmp_path, [_every_step(ckpt_dir)], data=workers()).seen
    expected = ResumableBatchSampler(40, 8, seed=5)
    assert full == _epoch(expected, 0) + _epoch(expected, 1)
    resumed = _fit_recorder(tmp_path, [], ckpt_path=str(ckpt_dir / "step=3.ckpt"), data=workers()).seen
    assert resumed == full[3:]


def test_loader_worker_options_reach_every_loader() -> None:
    data = DigitsDataModule(num_workers=1, pin_memory=True, persistent_workers=True)
    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
        assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (1, True, True)
    with pytest.raises(ValueError, match="persistent_workers=True needs num_workers > 0"):
        DigitsDataModule(persistent_workers=True)


def test_overfit_batches_trains_on_the_same_first_batches_every_epoch(tmp_path: Path) -> None:
    """Lightning's overfit_batches turns shuffling off by swapping a loader's sampler, which does not
    reach a batch sampler; the loader itself keeps the order fixed, as Lightning would."""
    seen = _fit(tmp_path, [], max_epochs=3, overfit_batches=2, enable_checkpointing=False)
    first_two = [list(range(0, 8)), list(range(8, 16))]
    assert seen == first_two * 3


# ---------------------------------------------------------------- digits


def test_a_data_module_of_yours_names_itself_in_its_argument_errors() -> None:
    """Any LitplugDataModule subclass: a ValueError from its __init__, or from a base class's,
    becomes a DataConfigError naming the class configured."""

    class MyData(IndexData):
        def __init__(self, window: int = 3, batch_size: int = 8) -> None:
            super().__init__(batch_size=batch_size)
            if window < 1:
                raise ValueError(f"window must be >= 1, got {window}")

    with pytest.raises(DataConfigError, match="^data module MyData: window must be >= 1, got 0$"):
        MyData(window=0)
    with pytest.raises(DataConfigError, match="^data module MyData: batch_size must be an integer >= 1"):
        MyData(batch_size=0)
    assert list(inspect.signature(MyData).parameters) == ["window", "batch_size"]  # what the CLI reads


def test_digits_split_disjoint_stratified_deterministic() -> None:
    splits = load_digits_tensors(seed=0, val_fraction=0.15, test_fraction=0.15)
    x_all, y_all = _raw_digits()
    assert sum(len(y) for _, y in splits.values()) == len(y_all) == 1797

    # The three splits partition the dataset: as multisets of (pixels, label) rows they add up to it.
    def rows(x: Tensor, y: Tensor) -> Counter[bytes]:
        return Counter(x[i].numpy().tobytes() + bytes([int(y[i])]) for i in range(len(y)))

    union = sum((rows(x, y) for x, y in splits.values()), Counter())
    assert union == rows(torch.from_numpy(x_all.copy()), torch.from_numpy(y_all.copy()))
    assert abs(len(splits["test"][1]) - 0.15 * 1797) <= 1
    assert abs(len(splits["val"][1]) - 0.15 * 1797) <= 1
    overall = torch.bincount(torch.from_numpy(y_all.copy()), minlength=10).double() / len(y_all)
    for _, y in splits.values():
        share = torch.bincount(y, minlength=10).double() / len(y)
        assert (share - overall).abs().max() < 0.01
    again = load_digits_tensors(seed=0, val_fraction=0.15, test_fraction=0.15)
    other = load_digits_tensors(seed=1, val_fraction=0.15, test_fraction=0.15)
    for name in splits:
        assert torch.equal(splits[name][0], again[name][0]) and torch.equal(splits[name][1], again[name][1])
    assert not torch.equal(splits["test"][1], other["test"][1])
    assert splits["train"][0].dtype == torch.float32 and splits["train"][1].dtype == torch.int64


@pytest.mark.parametrize(
    ("form", "shape"), [("flat", (64,)), ("image", (1, 8, 8)), ("sequence", (64, 1)), ("rows", (8, 8))]
)
def test_digits_forms(form: str, shape: tuple[int, ...]) -> None:
    dm = DigitsDataModule(batch_size=16, form=form)  # type: ignore[arg-type]
    assert dm.input_shape == shape and dm.num_classes == 10
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert tuple(x.shape) == (16, *shape) and x.dtype == torch.float32
    assert tuple(y.shape) == (16,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    vx, _ = next(iter(dm.val_dataloader()))
    assert tuple(vx.shape[1:]) == shape


def test_digits_forms_are_the_same_pixels() -> None:
    flat = DigitsDataModule(form="flat")
    rows = DigitsDataModule(form="rows")
    flat.setup()
    rows.setup()
    x_flat = flat.datasets["test"].tensors[0]
    x_rows = rows.datasets["test"].tensors[0]
    assert torch.equal(x_rows.reshape(len(x_rows), 64), x_flat)
    # Row r of the image is time step r.
    assert torch.equal(x_rows[:, 2], x_flat[:, 16:24])


def test_digits_standard_uses_train_statistics_only() -> None:
    dm = DigitsDataModule(normalize="standard")
    dm.setup()
    train_x = dm.datasets["train"].tensors[0]
    raw = load_digits_tensors(0, 0.15, 0.15)
    mean = raw["train"][0].mean(0)
    std = raw["train"][0].std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    expected_test = (raw["test"][0] - mean) / std
    assert torch.allclose(dm.datasets["test"].tensors[0], expected_test, atol=1e-5)
    varying = raw["train"][0].std(0) > 1e-6
    assert torch.allclose(train_x.mean(0), torch.zeros(64), atol=1e-4)
    assert torch.allclose(train_x.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-4)
    # Test statistics differ, so they were not used.
    assert not torch.allclose(dm.datasets["test"].tensors[0].mean(0), torch.zeros(64), atol=1e-3)


def test_train_loader_keeps_global_rng_and_is_seeded() -> None:
    dm = DigitsDataModule(batch_size=32, seed=7)
    dm.setup()
    state = torch.get_rng_state()
    first = [y for _, y in dm.train_dataloader()]
    for _ in dm.val_dataloader():
        pass
    assert torch.equal(state, torch.get_rng_state())
    second = [y for _, y in DigitsDataModule(batch_size=32, seed=7).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# ---------------------------------------------------------------- text


@pytest.fixture(scope="module")
def text_module() -> StdlibTextDataModule:
    dm = StdlibTextDataModule(seq_len=32, num_files=8, max_chars=60_000, batch_size=4)
    dm.setup()
    return dm


def test_text_decodes_to_stdlib_source(text_module: StdlibTextDataModule) -> None:
    assert text_module.num_classes == text_module.vocab_size == VOCAB_SIZE
    assert text_module.input_shape == (32,)
    x, y = text_module.datasets["train"][0]
    assert x.dtype == torch.int64 and x.shape == (32,)
    snippet = decode(x)
    # The decoded window is literally in the text, and that text comes from a stdlib file.
    assert snippet in text_module.text
    assert any(text_module.text.startswith(head) for head in _stdlib_heads())
    assert decode(encode("def f(x):\n\treturn x\n")) == "def f(x):\n\treturn x\n"
    assert decode(encode("é")) == "\ufffd"


def _stdlib_heads() -> list[str]:
    """The first 300 characters of every UTF-8 stdlib file the module may use."""
    heads = []
    for path in stdlib_python_files():
        try:
            heads.append(path.read_text(encoding="utf-8")[:300])
        except UnicodeDecodeError:
            continue
    return [h for h in heads if len(h) == 300]


def test_text_windows_shift_by_one(text_module: StdlibTextDataModule) -> None:
    inputs, targets = text_module.datasets["train"].tensors
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    # Consecutive windows are contiguous, non-overlapping chunks of seq_len + 1 characters.
    first = decode(torch.cat([inputs[0], targets[0, -1:]]))
    second = decode(torch.cat([inputs[1], targets[1, -1:]]))
    assert first + second == text_module.text[:66]
    batch_x, batch_y = next(iter(text_module.train_dataloader()))
    assert batch_x.shape == batch_y.shape == (4, 32)


def test_text_selection_is_reproducible() -> None:
    a = StdlibTextDataModule(seq_len=16, num_files=3, max_chars=20_000, seed=2)
    b = StdlibTextDataModule(seq_len=16, num_files=3, max_chars=20_000, seed=2)
    c = StdlibTextDataModule(seq_len=16, num_files=3, max_chars=20_000, seed=3)
    for dm in (a, b, c):
        dm.setup()
    assert a.text == b.text and a.text != c.text
    assert len(a.text) <= 20_000
    splits = [len(a.datasets[n]) for n in ("train", "val", "test")]
    assert splits[0] > splits[1] > 0 and splits[2] > 0
    assert not any("/test/" in p.as_posix() or "idlelib" in p.as_posix() for p in stdlib_python_files())


# ---------------------------------------------------------------- generated tasks


def test_copy_task_targets() -> None:
    dm = CopyTaskDataModule(num_train=50, num_val=10, num_test=10, seq_len=5, num_symbols=4, batch_size=8)
    dm.setup()
    assert dm.input_shape == (11,) and dm.num_classes == dm.vocab_size == 6
    x, y = dm.datasets["train"].tensors
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (50, 11)
    assert torch.equal(y[:, 6:], x[:, :5])  # the symbols, copied after the delimiter
    assert bool((y[:, :6] == -100).all())
    assert bool((x[:, 5] == 1).all()) and bool((x[:, 6:] == 0).all())
    assert bool((x[:, :5] >= 2).all()) and bool((x[:, :5] < 6).all())
    again = CopyTaskDataModule(num_train=50, num_val=10, num_test=10, seq_len=5, num_symbols=4)
    again.setup()
    assert torch.equal(again.datasets["test"].tensors[0], dm.datasets["test"].tensors[0])
    assert not torch.equal(dm.datasets["val"].tensors[0], dm.datasets["test"].tensors[0])


def test_adding_task_targets() -> None:
    dm = AddingTaskDataModule(num_train=64, num_val=8, num_test=8, seq_len=20, batch_size=16)
    assert dm.num_classes == 0 and dm.input_shape == (20, 2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 20, 2) and y.shape == (16, 1) and y.dtype == torch.float32
    markers = x[..., 1]
    assert torch.equal(markers.sum(1), torch.full((16,), 2.0))
    assert bool((markers[:, :10].sum(1) == 1).all()) and bool((markers[:, 10:].sum(1) == 1).all())
    assert torch.allclose((x[..., 0] * markers).sum(1, keepdim=True), y)


@pytest.mark.parametrize("dataset_size", [100, 101, 37])
def test_ranks_together_see_the_single_device_batches(dataset_size: int) -> None:
    """Step k on R ranks with batch b covers exactly step k of one device with batch R * b."""
    single = list(ResumableBatchSampler(dataset_size, batch_size=10, seed=3))
    ranks = [
        list(ResumableBatchSampler(dataset_size, batch_size=5, seed=3, num_replicas=2, rank=r))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1])
    for step, (first, second) in enumerate(zip(*ranks, strict=True)):
        if dataset_size % 2 == 0 or step < len(single) - 1:  # odd sizes pad the final batch
            assert first + second == single[step]  # contiguous slices, rank order


def test_the_train_loader_under_ddp_needs_lightnings_distributed_sampler_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a Python script Lightning's default would wrap the self-sharding sampler and fail inside
    Lightning (a TypeError about ResumableBatchSampler's arguments); the loader says what to set."""
    monkeypatch.setattr(LitplugDataModule, "_world", lambda self: (2, 0))  # rank 0 of 2 processes
    for use_distributed_sampler in (True, False):
        data = DigitsDataModule(batch_size=64, form="flat")
        data.trainer = L.Trainer(
            accelerator="cpu", logger=False, use_distributed_sampler=use_distributed_sampler
        )
        if use_distributed_sampler:
            with pytest.raises(ValueError, match="create the Trainer with use_distributed_sampler=False"):
                data.train_dataloader()
        else:
            sampler = data.train_dataloader().batch_sampler
            assert isinstance(sampler, ResumableBatchSampler) and sampler.num_replicas == 2
