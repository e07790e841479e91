"""Several validation / test / predict dataloaders: each accumulates its own metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader

from litplug.core.data import DigitsDataModule
from litplug.core.hookspecs import hookimpl
from litplug.core.metrics import ClassificationMetrics
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin


class _LoaderIndex(Plugin):
    """Logs the dataloader index its eval hook was given, and the batch size it saw."""

    name = "loader_index"

    @hookimpl
    def litplug_eval_step(self, targets: Tensor, dataloader_idx: int) -> dict[str, Tensor]:
        return {"loader": torch.tensor(float(dataloader_idx)), "rows": torch.tensor(float(len(targets)))}


class _TwoEvalSets(DigitsDataModule):
    """Validation and test on the validation split and, second, the test split."""

    def val_dataloader(self) -> list[DataLoader[Any]]:  # type: ignore[override]
        return [self.eval_loader(self._dataset("val")), self.eval_loader(self._dataset("test"))]

    test_dataloader = val_dataloader  # type: ignore[assignment]


def _module() -> LitplugModule:
    L.seed_everything(0)
    return LitplugModule(MLP(64, [32], 10), plugins=[_LoaderIndex()])


def _one_set(split: str) -> DigitsDataModule:
    data = DigitsDataModule(form="flat", batch_size=50)
    data.setup("fit")
    data.val_dataloader = lambda: data.eval_loader(data.datasets[split])  # type: ignore[method-assign]
    return data


def test_each_validation_and_test_loader_has_its_own_metrics(tmp_path: Path) -> None:
    module = _module()
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    trainer = quiet_trainer(max_steps=6, callbacks=[saver], enable_checkpointing=True)
    trainer.fit(module, _TwoEvalSets(form="flat", batch_size=50))
    two = trainer.validate(module, _TwoEvalSets(form="flat", batch_size=50), verbose=False)
    # each loader's metrics equal those of a run validating on that split alone
    for index, split in enumerate(("val", "test")):
        (alone,) = quiet_trainer().validate(module, _one_set(split), verbose=False)
        for name in ("acc", "nll", "ece", "brier", "loss", "rows"):
            assert two[index][f"val/{name}/dataloader_idx_{index}"] == alone[f"val/{name}"], (split, name)
        assert two[index][f"val/loader/dataloader_idx_{index}"] == index  # the plugin was told
    tested = quiet_trainer().test(module, _TwoEvalSets(form="flat", batch_size=50), verbose=False)
    assert tested[1]["test/acc/dataloader_idx_1"] == two[1]["val/acc/dataloader_idx_1"]
    # the extra loaders' metric objects hold no weights: the checkpoint loads into a fresh module
    checkpoint = next(tmp_path.glob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert state.keys() == _module().state_dict().keys()


def test_predict_takes_several_loaders() -> None:
    module = _module()
    data = _TwoEvalSets(form="flat", batch_size=50)
    data.setup("fit")
    loaders = [data.eval_loader(data.datasets["val"]), data.eval_loader(data.datasets["test"])]
    per_loader = quiet_trainer().predict(module, loaders)
    assert [sum(len(batch) for batch in batches) for batches in per_loader] == [
        len(data.datasets["val"]),  # type: ignore[arg-type]
        len(data.datasets["test"]),  # type: ignore[arg-type]
    ]


def test_the_metric_attribute_paths_name_the_logged_metric_objects() -> None:
    """The core names each logged metric's attribute to Lightning; a wrong path fails at log time."""
    metrics = ClassificationMetrics(num_classes=10)
    for name, metric in metrics.metrics().items():
        assert metrics.get_submodule(metrics.attribute_of(name)) is metric, name
