"""Per-plugin W&B diagnostics: short offline runs, checked against what the run wrote to disk.

Each test trains a few steps with a ``WandbLogger`` in offline mode (``WANDB_MODE=offline``, run
directory under the test's ``tmp_path``, never the network), closes the run, then reads the offline
run's ``.wandb`` log with wandb's own protobuf records (:mod:`wandb.proto.wandb_internal_pb2`) and its
``files/media`` folder. It asserts that the diagnostics and images each plugin promises are there,
and that the run config holds the resolved plugin order and every plugin's hyperparameters.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from google.protobuf.message import DecodeError
from lightning.pytorch.loggers import WandbLogger

from litplug.core.data import DigitsDataModule
from litplug.core.models import MLP, LSTMClassifier
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin

# -- reading an offline run --------------------------------------------------------------------------

# The .wandb file is a LevelDB-style log (wandb's former ``sdk/internal/datastore.py``): a 7-byte file
# header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of records, each a 7-byte header
# (crc32, length, type) and a payload; a protobuf ``Record`` may be split over FIRST/MIDDLE/LAST parts.
_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _raw_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"not a W&B offline log: {path}"
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # block trailer padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if kind == 0 and length == 0:
            break
        payload = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload


def _assign(target: dict[str, Any], item: Any) -> None:
    """Store a proto config/summary/history item (``key`` or ``nested_key`` path) in a nested dict."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """What an offline W&B run wrote: config, history rows, summary and media files."""

    directory: Path
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, directory: Path, timeout_s: float = 60.0) -> OfflineRun:
        """Parse the run's log once it is complete: wandb's service process may still be writing
        after ``finish()`` returns, so wait (bounded) for the final ``exit`` record."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                records = cls._records(directory)
            except DecodeError:  # a record still being written
                records = []
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                break
            assert time.monotonic() < deadline, f"the offline run in {directory} never wrote its exit record"
            time.sleep(0.2)
        run = cls(directory)
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "config":
                for item in record.config.update:
                    _assign(run.config, item)
            elif kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    _assign(row, item)
                run.history.append(row)
            elif kind == "summary":
                for item in record.summary.update:
                    _assign(run.summary, item)
        return run

    @staticmethod
    def _records(directory: Path) -> list[Any]:
        from wandb.proto import wandb_internal_pb2

        logs = list(directory.glob("*.wandb"))
        assert len(logs) == 1, f"expected one .wandb log in {directory}, found {logs}"
        records = []
        for raw in _raw_records(logs[0]):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            records.append(record)
        return records

    def logged_keys(self) -> set[str]:
        return {key for row in self.history for key in row}

    def values(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]

    def images(self, key: str) -> list[Path]:
        """The image files logged under ``key`` (each must exist in the run's files folder)."""
        paths = []
        for value in self.values(key):
            assert isinstance(value, dict) and value.get("_type", "").startswith("image"), value
            for name in value["filenames"]:
                path = self.directory / "files" / name
                assert path.is_file() and path.stat().st_size > 0, f"{key}: {path} missing or empty"
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{key}: {path} is not a PNG"
                paths.append(path)
        return paths


# -- running ----------------------------------------------------------------------------------------


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Offline mode, run files under ``tmp_path``, and no run left open by (or for) another test."""
    import wandb

    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # teardown, not just finish: an earlier in-process run (e.g. a disabled-mode one) leaves
    # wandb's process-wide settings behind, and the next offline run then ignores `dir` and
    # writes under /tmp/wandb (seen when tests/test_ensemble.py's reliability test ran first).
    wandb.finish()
    wandb.teardown()
    yield tmp_path
    wandb.finish()
    wandb.teardown()


def offline_run(
    directory: Path,
    module: LitplugModule,
    data: L.LightningDataModule,
    *,
    test: bool = False,
    callbacks: list[L.Callback] | None = None,
    **trainer_kwargs: Any,
) -> OfflineRun:
    """Fit (and optionally test) ``module`` with an offline WandbLogger, close the run and read it."""
    logger = WandbLogger(save_dir=str(directory), offline=True, project="litplug-test")
    settings: dict[str, Any] = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    settings.update(trainer_kwargs)
    trainer = L.Trainer(logger=logger, callbacks=callbacks or [], default_root_dir=directory, **settings)
    run_directory = Path(logger.experiment.dir).parent  # files/ lives inside the run directory
    assert directory in run_directory.parents, "the offline run must be written under the test's tmp dir"
    trainer.fit(module, datamodule=data)
    if test:
        trainer.test(module, datamodule=data)
    logger.experiment.finish()
    return OfflineRun.read(run_directory)


def assert_config_has_plugins(run: OfflineRun, plugins: list[Plugin], order: list[str]) -> None:
    """The run config holds the resolved order and, per plugin, its hyperparameters as logged."""
    assert run.config["litplug/plugin_order"] == order
    logged = run.config["litplug/plugins"]
    assert sorted(logged) == sorted(p.name for p in plugins)
    for plugin in plugins:
        expected = json.loads(json.dumps(plugin.hyperparameters(), default=repr))
        assert logged[plugin.name] == expected, plugin.name


def digits(batch_size: int = 32, form: str = "flat") -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, form=form)


# -- tests ------------------------------------------------------------------------------------------


def test_offline_log_reader_finds_config_metrics_and_images(wandb_offline: Path) -> None:
    """The reader itself, on a run with a plain module: metrics by name, no plugins in the config."""
    torch.manual_seed(0)
    module = LitplugModule(MLP(64, [16]))
    run = offline_run(wandb_offline, module, digits())
    assert run.config["litplug/plugin_order"] == [] and run.config["litplug/plugins"] == {}
    assert {"train/loss", "val/loss", "val/acc", "val/nll", "val/ece"} <= run.logged_keys()
    assert len(run.values("train/loss")) == 2  # log_every_n_steps=1, two steps
    assert all(v > 0 for v in run.values("train/loss"))
    assert run.summary["val/acc"] == run.values("val/acc")[-1]


def test_binary_gates_logs_gate_statistics_and_histogram_image(wandb_offline: Path) -> None:
    from litplug.plugins.binary_gates import BinaryGatesPlugin

    torch.manual_seed(0)
    plugin = BinaryGatesPlugin.example()
    module = LitplugModule(LSTMClassifier(input_size=8, hidden_size=16), plugins=[plugin])
    run = offline_run(wandb_offline, module, digits(form="rows"))
    assert_config_has_plugins(run, [plugin], ["binary_gates"])
    gate_metrics = {k for k in run.logged_keys() if k.startswith("val/gate_")}
    assert gate_metrics, f"no gate statistics among {sorted(run.logged_keys())}"
    assert "val/gate_saturation" in gate_metrics, gate_metrics
    assert len(run.images("val/gate_histogram")) == 1


@pytest.mark.parametrize("method", ["ensemble", "mimo"])
def test_ensembles_log_member_metrics_diversity_and_a_reliability_diagram(
    wandb_offline: Path, method: str
) -> None:
    torch.manual_seed(0)
    plugin: Plugin
    if method == "ensemble":
        from litplug.plugins.ensemble import DeepEnsemble

        plugin = DeepEnsemble(num_members=2, path="vmap", reliability_diagram=True)
        diversity = "test/diversity"
    else:
        from litplug.plugins.mimo import MIMO

        plugin = MIMO(num_members=2, reliability_diagram=True)
        diversity = "test/disagreement"
    module = LitplugModule(MLP(64, [16]), plugins=[plugin])
    run = offline_run(wandb_offline, module, digits(), test=True)
    assert_config_has_plugins(run, [plugin], [method])
    keys = run.logged_keys()
    assert {"test/member0_acc", "test/member1_acc", diversity, "test/ece"} <= keys, sorted(keys)
    assert 0.0 <= run.values(diversity)[-1] <= 1.0
    assert len(run.images(f"reliability/{method}_test")) == 1


def test_adversarial_training_logs_its_loss_term_and_robust_accuracy(wandb_offline: Path) -> None:
    from litplug.plugins.adt import AdversarialDistributionalTraining
    from litplug.plugins.attacks import RobustEvaluation

    torch.manual_seed(0)
    plugins: list[Plugin] = [RobustEvaluation.example(), AdversarialDistributionalTraining.example()]
    module = LitplugModule(MLP(64, [16]), plugins=plugins)
    data = digits()  # pixels in [0, 1]: the attacks clip there
    run = offline_run(wandb_offline, module, data, inference_mode=False)
    assert_config_has_plugins(run, plugins, module.hooks.order())
    keys = run.logged_keys()
    assert {"train/loss_main", "train/loss_adt_generator"} <= keys, sorted(keys)
    robust = {k for k in keys if k.startswith("val/robust_acc_")}
    assert robust >= {"val/robust_acc_fgsm_eps0.1", "val/robust_acc_pgd_eps0.1"}, sorted(keys)
    assert all(0.0 <= run.values(k)[-1] <= 1.0 for k in robust)


def test_pgd_training_with_center_loss_logs_both_and_the_resolved_order(wandb_offline: Path) -> None:
    from litplug.plugins.attacks import RobustEvaluation
    from litplug.plugins.center_loss import CenterLoss
    from litplug.plugins.pgd_at import PGDAdversarialTraining

    torch.manual_seed(0)
    plugins: list[Plugin] = [
        CenterLoss.example(),
        PGDAdversarialTraining.example(),
        RobustEvaluation.example(),
    ]
    module = LitplugModule(MLP(64, [16]), plugins=plugins)
    data = digits()  # pixels in [0, 1]: the attacks clip there
    run = offline_run(wandb_offline, module, data, inference_mode=False)
    assert_config_has_plugins(run, plugins, module.hooks.order())
    keys = run.logged_keys()
    assert {"train/loss_main", "train/loss_center"} <= keys, sorted(keys)
    assert any(k.startswith("val/robust_acc_pgd") for k in keys), sorted(keys)


def test_continual_driver_logs_accuracy_matrix_forgetting_ewc_penalty_and_fisher(wandb_offline: Path) -> None:
    from litplug.core.continual import ContinualLearning
    from litplug.core.data.continual import SplitDigitsDataModule
    from litplug.plugins.ewc import EWC

    torch.manual_seed(0)
    plugin = EWC.example()
    module = LitplugModule(MLP(64, [16]), plugins=[plugin])
    data = SplitDigitsDataModule(classes_per_task=5, scenario="class", batch_size=32)
    run = offline_run(
        wandb_offline,
        module,
        data,
        callbacks=[ContinualLearning(verbose=False)],
        max_epochs=None,
        limit_val_batches=0,
    )
    assert_config_has_plugins(run, [plugin], ["ewc"])
    keys = run.logged_keys()
    expected = {"continual/acc_task_0", "continual/acc_task_1", "continual/forgetting", "continual/bwt"}
    assert expected <= keys, sorted(keys)
    assert "train/loss_ewc" in keys  # the penalty is on from the second task
    assert len(run.images("continual/accuracy_matrix")) == 1
    # EWC's own diagnostics: the Fisher magnitude at every task end
    expected = {f"ewc/fisher{part}_{stat}" for part in ("", "_penalty") for stat in ("mean", "max", "sum")}
    assert expected <= keys, sorted(keys)
    assert run.values("ewc/task") == [0.0, 1.0]  # one row per task end
    task_sums, penalty_sums = run.values("ewc/fisher_sum"), run.values("ewc/fisher_penalty_sum")
    assert all(v > 0 for v in task_sums)
    # separate mode: the penalty's Fisher is the sum of every ended task's Fisher
    assert penalty_sums == pytest.approx([task_sums[0], task_sums[0] + task_sums[1]], rel=1e-5)
    assert all(
        0 < m <= x for m, x in zip(run.values("ewc/fisher_mean"), run.values("ewc/fisher_max"), strict=True)
    )
