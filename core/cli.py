"""The ``litplug`` command: LightningCLI with plugin discovery, a plugin listing and results files.

- ``litplug fit|validate|test|predict --config configs/x.yaml``: LightningCLI subcommands; fit,
  validate and test end by printing the final metrics and writing ``results.json`` in the run
  directory (and to ``--results_path`` when given). ``--test_after_fit true`` runs the test set
  after fitting: on the best checkpoint when a ``ModelCheckpoint`` monitors a metric, on the final
  weights otherwise.
  ``predict`` writes class probabilities to ``predictions.pt`` in the run directory (of the test
  data when the data module has no predict data). ``litplug export`` saves that prediction as a
  ``torch.export`` program (``predictor.pt2``; ``--format onnx``: ``predictor.onnx``) that runs without litplug.
  ``--ckpt_path last`` is the newest checkpoint
  of the config in any of its logger's run folders (:func:`resume_checkpoint`).
- ``litplug plugins [--config X.yaml ...]``: every available plugin (name, package, summary) and,
  given a config (with any overrides, as ``fit`` takes them), the resolved plugin order.
- ``--trace-hooks`` (or ``LITPLUG_TRACE_HOOKS=1``): log every hook call with the plugins it runs.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import platform
import re
import signal
import sys
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
    _get_short_description,
)
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from litplug.callbacks.preemption import PreemptionCheckpoint
from litplug.core.data import continual, shifted  # noqa: F401  (so --data=<any built-in> resolves)
from litplug.core.discovery import (
    DISABLE_AUTOLOAD_ENV,
    PluginInfo,
    autoload_disabled,
    available_plugins,
    builtin_callbacks,
    builtin_plugins,
)
from litplug.core.errors import CheckpointError, LitplugError, PluginLoadError, StrategyError
from litplug.core.export import (
    EXPORT_FILE,
    ONNX_EXPORT_FILE,
    capture_predictor,
    check_dynamic_dims,
    describe_program,
    require_onnx,
    save_onnx,
)
from litplug.core.manager import TRACE_ENV
from litplug.core.module import CHECKPOINT_KEY, LitplugModule
from litplug.core.parse_errors import summarize_parse_error
from litplug.core.run_dir import run_directory

TRACE_FLAG = "--trace-hooks"
SIGNAL_EXIT_BASE = 128  # a process ended by signal N exits with 128 + N in the shell
SIGTERM_EXIT_CODE = SIGNAL_EXIT_BASE + signal.SIGTERM  # 143
DESCRIPTION = (
    "litplug: published training methods as composable plugins for PyTorch Lightning. "
    "Subcommands fit, validate, test and predict are LightningCLI's; export saves a trained model's "
    "prediction as a torch.export program (--format onnx: as ONNX); "
    "'litplug plugins [--config X.yaml ...]' lists every available plugin and the order a config's "
    "plugins run in. --trace-hooks logs every hook call; --version prints the versions in use."
)
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.pt"


class SaveConfigToRunDirectory(SaveConfigCallback):
    """Lightning's SaveConfigCallback, writing ``config.yaml`` into the run directory.

    Lightning writes it to ``trainer.log_dir``, which for a ``WandbLogger`` is the directory
    every W&B run in it shares (``core/run_dir.py``): each run overwrote the last one's config.
    Here it goes beside the run's checkpoints folder, as with the CSV logger.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.to_run_directory = self.save_to_log_dir
        self.save_to_log_dir = False  # Lightning's own write; save_config below does it instead

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.to_run_directory:  # called on rank zero only
            return
        run_dir = run_directory(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / self.config_filename
        self.parser.save(
            self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile
        )


class LitplugArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; a bad plugin, callback or data argument ends in one line naming it.

    jsonargparse prints the whole usage (some 60 lines) and then a tree of every type it tried;
    here its tree is kept, the usage dropped, and the line that says what is wrong comes last,
    where the eye lands (``core/parse_errors.py``).
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # a caller that wants the exception gets it untouched
        parser = getattr(ex, "subcommand_parser", None) or self
        plugin_classes = [info.cls.__name__ for info in available_plugins().values()]
        summary = summarize_parse_error(message, {"model.plugins": plugin_classes})
        tree = message.strip().count("\n") > 1
        details = f"{message.rstrip()}\n\n" if tree else ""  # jsonargparse's tree above its one line
        if summary is None and message.startswith("unrecognized arguments:"):
            summary, details = _with_close_options(message, parser), ""
        if summary is None:
            super().error(message, ex)
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{details}{prog}: error: {summary}\n({prog} --help lists every option)\n")
        sys.exit(2)


def _with_close_options(message: str, parser: Any) -> str | None:
    """``unrecognized arguments: --trainer.max_stepz=3`` and the options it may have meant."""
    options = [o for action in parser._actions for o in action.option_strings if not o.endswith(".help")]
    given = [arg.split("=", 1)[0] for arg in message.split(":", 1)[1].split() if arg.startswith("--")]
    close = {arg: difflib.get_close_matches(arg, options, n=3, cutoff=0.8) for arg in given}
    meant = [f"{arg}: did you mean {' or '.join(found)}?" for arg, found in close.items() if found]
    return f"{message}; {'; '.join(meant)}" if meant else None


class LitplugCLI(LightningCLI):
    """LightningCLI for :class:`LitplugModule` with any LightningDataModule (digits by default)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LitplugModule)
        # Any LightningDataModule by class_path; the digits are only the default (set in the parser).
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", SaveConfigToRunDirectory)
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        kwargs.setdefault("parser_class", LitplugArgumentParser)
        kwargs.setdefault("auto_configure_optimizers", False)  # the module's optimizer argument does it
        # litplug's data modules shard their own batches per rank (exact resume needs their sampler).
        kwargs["trainer_defaults"] = {"use_distributed_sampler": False, **kwargs.get("trainer_defaults", {})}
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        """LightningCLI's subcommands plus ``export``, whose arguments come from :meth:`export`.

        LightningCLI builds a subcommand's parser from the Trainer method of its name; the Trainer
        has no ``export``.
        """
        self._subcommand_parsers: dict[str, Any] = {}
        parser_subcommands = parser.add_subcommands()
        trainer_class = self.trainer_class if isinstance(self.trainer_class, type) else L.Trainer
        for subcommand in self.subcommands():
            klass = type(self) if subcommand == "export" else trainer_class
            description = _get_short_description(getattr(klass, subcommand))
            subparser_kwargs = {"description": description, **kwargs.get(subcommand, {})}
            subcommand_parser = self._prepare_subcommand_parser(klass, subcommand, **subparser_kwargs)
            self._subcommand_parsers[subcommand] = subcommand_parser
            parser_subcommands.add_subcommand(subcommand, subcommand_parser, help=description)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != "export":  # LightningCLI looks for a Trainer method of the name first
            super()._run_subcommand(subcommand)
            return
        self.export(**self._prepare_subcommand_kwargs(subcommand))

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"data": {"class_path": "litplug.core.data.DigitsDataModule"}})
        _parse_batch_limits_as_int_first(parser)
        parser.add_argument(
            "--results_path", type=str | None, default=None, help="Also write results JSON here."
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="Run the test set after fit: on the best checkpoint when a ModelCheckpoint monitors "
            "a metric, on the final weights otherwise.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The configured trainer; for ``fit`` with checkpointing on, plus a :class:`PreemptionCheckpoint`.

        So a run stopped by SIGTERM (``kill``, a preemption) or Ctrl-C saves its state at the end of
        the batch, in ``default_root_dir``, unless the config has its own ``PreemptionCheckpoint``
        or ``OnExceptionCheckpoint``.
        """
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            add_preemption_checkpoint(trainer)
        return trainer

    def fit(self, **kwargs: Any) -> None:
        _refuse_a_spawned_fit(self.trainer)
        _require_checkpoint_file(kwargs.get("ckpt_path"))
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = resume_checkpoint(self.trainer)
            if self.trainer.is_global_zero:
                found = kwargs["ckpt_path"]
                print(
                    f"litplug fit: --ckpt_path last resumes from {found}"
                    if found
                    else "litplug fit: --ckpt_path last found no checkpoint of this config; training from the start"
                )
        if isinstance(kwargs.get("ckpt_path"), (str, os.PathLike)):
            continue_wandb_run(self.trainer, os.fspath(kwargs["ckpt_path"]))
        self.trainer.fit(**kwargs)

    def validate(self, **kwargs: Any) -> None:
        self.trainer.validate(**self._checkpoint_to_evaluate(kwargs))

    def test(self, **kwargs: Any) -> None:
        self.trainer.test(**self._checkpoint_to_evaluate(kwargs))

    def _checkpoint_to_evaluate(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The ``ckpt_path`` validate/test/predict load: a given file must exist, ``last`` is the
        newest checkpoint of this config (an error when there is none), none is said aloud.

        Lightning's own "last" finds nothing in a new logger version folder and then evaluates the
        model as initialised, silently (a test accuracy of chance, exit code 0).
        """
        _require_checkpoint_file(kwargs.get("ckpt_path"))
        # Restoring the fit's ModelCheckpoint into this run's new folder: nothing is saved here,
        # so Lightning's "The dirpath has changed ... won't be reloaded" is noise.
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
        if kwargs.get("ckpt_path") is None and self.trainer.is_global_zero:
            print(f"litplug {self.subcommand}: no --ckpt_path: the model as configured, no checkpoint loaded")
        if kwargs.get("ckpt_path") == "best" and _best_checkpoint(self.trainer) is None:
            best = saved_best_checkpoint(self.trainer)
            if self.trainer.is_global_zero:
                print(f"litplug {self.subcommand}: --ckpt_path best is {best}")
            return {**kwargs, "ckpt_path": best}
        if kwargs.get("ckpt_path") != "last":
            return kwargs
        found = resume_checkpoint(self.trainer)
        if found is None:
            raise CheckpointError(
                f"--ckpt_path last: no checkpoint of this config to {self.subcommand} (looked in its "
                "ModelCheckpoint folders and every run folder of its logger); give the checkpoint's path"
            )
        if self.trainer.is_global_zero:
            print(f"litplug {self.subcommand}: --ckpt_path last is {found}")
        return {**kwargs, "ckpt_path": found}

    def _parse_ckpt_path(self) -> None:
        """Keep the configuration the user gave when ``--ckpt_path`` is set.

        LightningCLI (2.3+) parses the checkpoint's saved hyperparameters *over* the config file and
        the command line. For litplug that silently drops what a user changed for this run: a
        ``RobustEvaluation`` added to test a trained model, a plugin hyperparameter or learning rate
        changed on resume. The config is the single source of truth; the checkpoint carries weights
        and plugin state, and the module refuses one that needs a plugin the config lacks. The run
        directory's ``config.yaml`` is the config that trained a checkpoint.
        """

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def after_fit(self) -> None:
        metrics = _scalars(self.trainer.callback_metrics)
        tested_checkpoint = None
        if self._subcommand_config().get("test_after_fit"):
            tested_checkpoint = _best_checkpoint(self.trainer)
            if self.trainer.is_global_zero:
                weights = (
                    f"the best checkpoint {tested_checkpoint}" if tested_checkpoint else "the final weights"
                )
                print(f"litplug fit: testing {weights}")
            tested = self.trainer.test(
                self.model, datamodule=self.datamodule, ckpt_path=tested_checkpoint, verbose=False
            )
            for result in tested:
                metrics.update(_scalars(result))
        self._report("fit", metrics, tested_checkpoint)

    def after_validate(self) -> None:
        self._report("validate", _scalars(self.trainer.callback_metrics), self._loaded_checkpoint())

    def after_test(self) -> None:
        self._report("test", _scalars(self.trainer.callback_metrics), self._loaded_checkpoint())

    def _loaded_checkpoint(self) -> str | None:
        loaded = self.trainer.ckpt_path  # what Lightning loaded, "last"/"best" resolved
        return None if loaded is None else os.fspath(loaded)

    def predict(self, **kwargs: Any) -> None:
        """``litplug predict``: class probabilities for the data module's predict (by default test) data.

        Written to ``predictions.pt`` in the run directory as ``{"probs": [N, ..., K], "predicted":
        [N, ...]}`` (one such dict per dataloader when there are several). Under DDP every rank
        predicts the whole, unsharded set and rank zero writes it; spawn strategies cannot return
        predictions (Lightning's limit), so nothing is written there.
        """
        kwargs = self._checkpoint_to_evaluate(kwargs)
        datamodule = kwargs.get("datamodule")
        if datamodule is not None and kwargs.get("dataloaders") is None:
            if _predict_test_split_if_no_predict_data(datamodule) and self.trainer.is_global_zero:
                name = type(datamodule).__name__
                print(f"litplug predict: {name} has no predict_dataloader; predicting its test data")
        predictions = self.trainer.predict(**kwargs)
        run_dir = _shared_run_directory(self.trainer)  # a collective under DDP
        if not self.trainer.is_global_zero:
            return
        if not predictions:
            print("litplug predict: no predictions returned (a spawn strategy cannot return them)")
            return
        per_loader = predictions if isinstance(predictions[0], list) else [predictions]
        saved = [_stack_predictions(batches) for batches in per_loader]
        path = Path(run_dir or ".") / PREDICTIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved[0] if len(saved) == 1 else saved, path)
        counts = ", ".join(str(len(p["predicted"])) for p in saved)
        print(f"litplug predict: {counts} predictions written to {path}")

    def export(
        self,
        model: LitplugModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        export_path: str | None = None,
        dynamic_batch: bool = True,
        dynamic_dims: list[int] | None = None,
        format: Literal["pt2", "onnx"] = "pt2",
    ) -> None:
        """Save a trained model's prediction as a torch.export program (.pt2) or ONNX, to run without litplug.

        The prediction of ``litplug predict``: the checkpoint is loaded as ``predict`` loads it and
        one batch of the predict (by default test) data is predicted; its inputs are the example
        ``torch.export`` captures, under the same evaluation weights (EMA's average, an ensemble's
        averaged probabilities). Rank zero writes the program, checked to predict what the module
        predicts on that batch (and, as ONNX, onnxruntime to predict what the program predicts).

        Args:
            model: the configured module.
            datamodule: its data.
            ckpt_path: the checkpoint to export: a path, "last" or "best" as for test; without
                one, the model as configured.
            export_path: where to write the program (default: predictor.pt2, or predictor.onnx,
                in the run directory).
            dynamic_batch: let the program take any batch size (else only the example's).
            dynamic_dims: further input dimensions to leave free, e.g. [1] for a text model's
                sequence length (up to a transformer's max_len); refused where the model fixes one.
            format: "pt2" (torch.export.save) or "onnx" (the program converted with
                torch.onnx.export; needs the onnx extra: pip install 'litplug[onnx]').
        """
        if not isinstance(model, LitplugModule):
            raise TypeError(f"litplug export needs a LitplugModule, got {type(model).__name__}")
        dims = check_dynamic_dims(dynamic_dims or [])
        if format == "onnx":
            require_onnx()
        kwargs = self._checkpoint_to_evaluate({"ckpt_path": ckpt_path})
        if datamodule is not None and _predict_test_split_if_no_predict_data(datamodule):
            if self.trainer.is_global_zero:
                print(
                    f"litplug export: {type(datamodule).__name__} has no predict_dataloader; using its test data"
                )
        export = ExportPrediction(export_path, dynamic_batch, dims, onnx=format == "onnx")
        self.trainer.callbacks.append(export)  # type: ignore[attr-defined]
        self.trainer.limit_predict_batches = 1  # one batch gives the example inputs
        self.trainer.predict(model, datamodule=datamodule, return_predictions=False, **kwargs)

    def _report(self, stage: str, metrics: dict[str, float], tested_checkpoint: str | None = None) -> None:
        run_dir = _shared_run_directory(self.trainer)  # a collective under DDP: all ranks
        if self.trainer.is_global_zero:
            self._write_results(stage, metrics, run_dir, tested_checkpoint)

    def _write_results(
        self, stage: str, metrics: dict[str, float], run_dir: str | None, tested_checkpoint: str | None
    ) -> None:
        print_metrics_table(f"litplug {stage}: final metrics", metrics)
        model: LitplugModule = self.model
        results = {
            "stage": stage,
            "metrics": metrics,
            "plugins": model.hooks.order(),
            "global_step": self.trainer.global_step,
            "epochs": self.trainer.current_epoch,
        }
        progress = model.loaded_checkpoint_progress
        if stage != "fit" and tested_checkpoint and progress is not None:
            # an evaluation's trainer has not trained: report the evaluated checkpoint's progress
            results["global_step"], results["epochs"] = progress
        if tested_checkpoint or (stage == "fit" and self._subcommand_config().get("test_after_fit")):
            results["tested_checkpoint"] = tested_checkpoint  # None: the final weights were tested
        paths = []
        if run_dir:
            paths.append(Path(run_dir) / RESULTS_FILE)
        extra = self._subcommand_config().get("results_path")
        if extra:
            paths.append(Path(extra))
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            print(f"results written to {path}")


class ExportPrediction(Callback):
    """Saves the module's prediction as a ``torch.export`` program on the first predict batch.

    The predict loop has the checkpoint loaded and the plugins' evaluation weights in place then.
    Rank zero captures, checks and writes it from inside the loop, so spawn strategies (whose
    workers' results never come back to the launching process) write it too.
    """

    def __init__(
        self,
        export_path: str | None,
        dynamic_batch: bool = True,
        dynamic_dims: Sequence[int] = (),
        onnx: bool = False,
    ) -> None:
        self.export_path = export_path
        self.dynamic_batch = dynamic_batch
        self.dynamic_dims = list(dynamic_dims)
        self.onnx = onnx
        self.path: Path | None = None
        self.written = False

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = _shared_run_directory(trainer)  # a collective under DDP: every rank
        default = ONNX_EXPORT_FILE if self.onnx else EXPORT_FILE
        self.path = Path(self.export_path) if self.export_path else Path(run_dir or ".") / default

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.written or not trainer.is_global_zero:
            return
        assert isinstance(pl_module, LitplugModule) and self.path is not None
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        program = capture_predictor(pl_module, inputs, self.dynamic_batch, self.dynamic_dims)
        if self.onnx:
            save_onnx(program, inputs, self.path)
            load = f"onnxruntime.InferenceSession({str(self.path)!r}).run(None, {{'inputs': array}})[0]"
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.export.save(program, self.path)
            load = f"torch alone: torch.export.load({str(self.path)!r}).module()(inputs)"
        self.written = True
        sizes = "B: any batch size" if self.dynamic_batch else f"batches of {inputs.shape[0]}"
        takes, gives = describe_program(program)
        print(
            f"litplug export: inputs {takes} -> class probabilities {gives} ({sizes}); "
            f"written to {self.path}\n  load it with {load}"
        )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not self.written:
            raise RuntimeError("litplug export: the predict data gave no batch to export with")


#: Trainer arguments where an int counts batches and a float is a fraction of them.
BATCH_LIMITS = tuple(f"trainer.limit_{stage}_batches" for stage in ("train", "val", "test", "predict"))


def _parse_batch_limits_as_int_first(parser: Any) -> None:
    """``limit_val_batches: 1`` means one batch, as Lightning documents, not 1.0 (all of them).

    Lightning 2.6 annotates these ``Union[float, int, None]``; jsonargparse tries the types in that
    order, so an integer parses as a float, and only 1 changes meaning (1.0 = 100%). Reordering the
    type hint keeps ``0.25`` a fraction and makes ``1`` one batch.
    """
    for action in parser._actions:
        if action.dest in BATCH_LIMITS and hasattr(action, "_typehint"):
            action._typehint = int | float | None


def add_preemption_checkpoint(trainer: L.Trainer) -> None:
    """Add a :class:`PreemptionCheckpoint` in ``default_root_dir`` unless checkpointing is off or the
    trainer already saves on exceptions (a ``PreemptionCheckpoint`` or an ``OnExceptionCheckpoint``)."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    savers = (PreemptionCheckpoint, OnExceptionCheckpoint)
    if trainer.checkpoint_callback is None or any(isinstance(c, savers) for c in callbacks):
        return
    callbacks.append(PreemptionCheckpoint(dirpath=trainer.default_root_dir))


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")  # ckpt_path values Lightning resolves itself


def _require_checkpoint_file(ckpt_path: object) -> None:
    """A local ``--ckpt_path`` that does not exist fails here, not in Lightning's restore after setup."""
    if not isinstance(ckpt_path, (str, os.PathLike)):
        return
    path = os.fspath(ckpt_path)
    if path in LIGHTNING_CKPT_NAMES or path.startswith("registry") or "://" in path:
        return
    if not os.path.exists(path):  # a folder is a checkpoint too (FSDP/DeepSpeed sharded ones)
        raise CheckpointError(f"--ckpt_path {path}: no such checkpoint file")


def resume_checkpoint(trainer: L.Trainer) -> str | None:
    """What ``--ckpt_path last`` resumes from: the newest checkpoint this config has saved.

    Lightning's own ``"last"`` looks only for ``last.ckpt`` in the *current* run's checkpoint folder.
    A logger gives each run a new folder (CSV and TensorBoard ``version_N``, a W&B run id), so a
    run killed without a preemption checkpoint (SIGKILL, a lost node) and started again with
    ``--ckpt_path last`` silently trained from scratch. The candidates here are the preemption
    checkpoints and every checkpoint in each ``ModelCheckpoint``'s folders (every run folder of the
    logger's experiment when the folder comes from the logger); the most recently written wins.
    ``None`` (train from the start) when there is none.
    """
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    candidates = {c.checkpoint_path(trainer) for c in callbacks if isinstance(c, PreemptionCheckpoint)}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates |= callback._find_last_checkpoints(trainer)  # Lightning's "last": any filesystem
            for folder in _checkpoint_folders(trainer, callback):
                candidates |= {str(path) for path in folder.glob(f"*{callback.FILE_EXTENSION}")}
    existing = [path for path in candidates if get_filesystem(path).exists(path)]
    if not existing:
        return None
    # ties (coarse file-system clocks) are files saved at the same step; the name makes it stable
    return max(existing, key=lambda path: (get_filesystem(path).modified(path), path))


def continue_wandb_run(trainer: L.Trainer, ckpt_path: str) -> None:
    """Make a resumed fit log into the W&B run of the checkpoint, not into a new one.

    Lightning's ``WandbLogger`` starts a new run unless it is given an ``id``, so every requeue of a
    preempted job would split its curves over several runs. The checkpoint records the run id
    (``LitplugModule`` saves its loggers' versions); a ``WandbLogger`` configured without an ``id``
    or ``version``, whose run has not started yet, takes it (Lightning's default ``resume="allow"``
    continues it). An ``id`` in the config wins, so giving one starts or continues that run instead.
    """
    wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    unset = [lg for lg in wandb_loggers if lg._id is None and lg._experiment is None]
    if not unset or ckpt_path in LIGHTNING_CKPT_NAMES:
        return
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    run_ids = [
        entry["version"]
        for entry in (saved.get(CHECKPOINT_KEY) or {}).get("loggers", [])
        if entry.get("class") == WandbLogger.__name__ and entry.get("version")
    ]
    for logger, run_id in zip(unset, run_ids, strict=False):
        logger._wandb_init["id"] = logger._id = run_id  # read when the run starts (wandb.init)
        if trainer.is_global_zero:
            print(f"litplug fit: continuing W&B run {run_id}, the checkpoint's")


def saved_best_checkpoint(trainer: L.Trainer) -> str:
    """What ``--ckpt_path best`` evaluates in a run of its own (``litplug test`` after ``fit``).

    Lightning's ``"best"`` is the best path of a ``ModelCheckpoint`` *in this process*, which a
    new process does not have. The fit recorded it in its checkpoints (the callback's state): read
    it from the newest checkpoint of this config (:func:`resume_checkpoint`).
    """
    newest = resume_checkpoint(trainer)
    if newest is None:
        raise CheckpointError(
            "--ckpt_path best: this config has saved no checkpoint (looked in its ModelCheckpoint "
            "folders and every run folder of its logger); give the checkpoint's path"
        )
    saved = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
    bests = sorted(
        {
            state["best_model_path"]
            for key, state in (saved.get("callbacks") or {}).items()
            if key.startswith("ModelCheckpoint") and state.get("monitor") and state.get("best_model_path")
        }
    )
    if not bests:
        raise CheckpointError(
            f"--ckpt_path best: the newest checkpoint, {newest}, records no best checkpoint: no "
            "ModelCheckpoint of the fit monitored a metric (monitor: ...). Give the checkpoint's path"
        )
    if len(bests) > 1:
        raise CheckpointError(
            f"--ckpt_path best: the newest checkpoint, {newest}, records {len(bests)} best "
            f"checkpoints, one per monitoring ModelCheckpoint ({', '.join(bests)}). Give the path"
        )
    _require_checkpoint_file(bests[0])
    return bests[0]


def _checkpoint_folders(trainer: L.Trainer, callback: ModelCheckpoint) -> list[Path]:
    """The local folders ``callback`` saves to in runs of this config, as Lightning derives them."""
    if callback.dirpath is not None:
        return [] if "://" in str(callback.dirpath) else [Path(callback.dirpath)]
    if not trainer.loggers:
        root = str(trainer.default_root_dir)
        return [] if "://" in root else [Path(root) / "checkpoints"]
    logger = trainer.loggers[0]
    save_dir = str(logger.save_dir or trainer.default_root_dir)
    if "://" in save_dir:  # remote: Lightning's own "last" lookup covers it (Path would mangle it)
        return []
    experiment = Path(save_dir) / str(logger.name)
    if isinstance(logger.version, str):  # a version the user fixed: that folder only
        return [experiment / logger.version / "checkpoints"]
    # a new folder per run (CSV/TensorBoard version_N, a W&B run id): every run's folder
    return sorted(experiment.glob("*/checkpoints"))


def _predict_test_split_if_no_predict_data(datamodule: L.LightningDataModule) -> bool:
    """Let a data module without ``predict_dataloader`` but with a ``test_dataloader`` be predicted.

    litplug's data modules predict their test split; a user's module often defines train, val and
    test only, and Lightning would refuse it. Its own instance gets ``predict_dataloader`` as its
    ``test_dataloader``, and ``setup("predict")`` runs as ``setup("test")`` (a ``setup`` that
    builds the test set only for that stage still builds it). Returns whether it did so.
    """
    base = L.LightningDataModule
    if is_overridden("predict_dataloader", datamodule, base) or not is_overridden(
        "test_dataloader", datamodule, base
    ):
        return False
    setup = datamodule.setup
    datamodule.setup = lambda stage: setup("test" if stage == "predict" else stage)  # type: ignore[method-assign]
    datamodule.predict_dataloader = datamodule.test_dataloader  # type: ignore[method-assign]
    return True


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint of the first ``ModelCheckpoint`` that monitors a metric, if it saved one.

    Without a monitor, "best" is only the latest save, which may predate the final weights (when
    validation, and so saving, does not run in the last epoch): test those weights instead.
    """
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            return callback.best_model_path
    return None


def _stack_predictions(batches: list[Any]) -> dict[str, torch.Tensor]:
    probs = torch.cat([torch.as_tensor(b) for b in batches])
    return {"probs": probs, "predicted": probs.argmax(-1)}


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return dict(sorted(out.items()))


def _refuse_a_spawned_fit(trainer: L.Trainer) -> None:
    """``litplug fit`` under ``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook``: refused before training.

    Those strategies train in child processes and hand this one back only the model's weights:
    plugin state (EMA's average, the members an ensemble's surgery built), the step count, the run
    folder and the preemption checkpoint stay in the children. ``--test_after_fit`` then tested
    other weights than the fit trained and ``results.json`` said step 0. ``ddp`` (what ``auto``
    picks) runs this command in every process and has none of that. Evaluation subcommands
    and ``export`` run wholly inside the children, and are allowed.
    """
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        strategy = type(trainer.strategy).__name__
        method = trainer.strategy.launcher._start_method
        raise StrategyError(
            f"fit with strategy {strategy} (start method '{method}') trains in child processes "
            "that return only the weights to this one, so plugin state, --test_after_fit, results.json "
            "and the preemption checkpoint would be wrong here; use --trainer.strategy=ddp (what "
            "'auto' picks for several devices) from the command line. From Python, ddp_spawn works: "
            "evaluate inside the same trainer.fit's processes or from its checkpoint"
        )


def _shared_run_directory(trainer: L.Trainer) -> str:
    """Rank zero's run directory on every rank (``core/run_dir.py``); every rank must call it."""
    return str(trainer.strategy.broadcast(str(run_directory(trainer))))


def print_metrics_table(title: str, metrics: dict[str, float]) -> None:
    width = max((len(k) for k in metrics), default=10)
    rule = "-" * (width + 15)
    print(f"\n{title}\n{rule}")
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:>12.4f}")
    print(rule)


def list_plugins(cli_args: list[str]) -> int:
    """Print every available plugin and, given a config (with any overrides, as ``fit`` takes
    them: ``--config X.yaml --model.plugins+=EMA``), the order its plugins resolve to."""
    try:
        registry = available_plugins()
    except PluginLoadError as err:  # a broken third-party package: still show what litplug has
        _print_plugin_table(builtin_plugins())
        print(f"\nlitplug: error: {err}", file=sys.stderr)
        return 2
    _print_plugin_table(list(registry.values()))
    if cli_args:
        with warnings.catch_warnings():  # sys.argv is `litplug plugins ...`, not these args: intended
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            cli = LitplugCLI(run=False, args=[*cli_args, "--trainer.logger=false"])
        order = " -> ".join(cli.model.hooks.order()) or "(none)"
        print(f"\nresolved plugin order for {' '.join(cli_args)}: {order}")
    return 0


def _print_plugin_table(infos: list[PluginInfo]) -> None:
    rows = [(info.name, info.package, info.cls.__name__, info.summary) for info in infos]
    headers = ("name", "package", "class (YAML short name)", "summary")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(3)]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    print("\ncallbacks: " + ", ".join(f"{c.__module__}.{c.__name__}" for c in builtin_callbacks()))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None:  # the command line; a Python caller of main() keeps its own sys.path
        _import_from_the_working_directory()
    if args == ["--version"]:
        print(versions())
        return 0
    if TRACE_FLAG in args:
        args.remove(TRACE_FLAG)
        os.environ[TRACE_ENV] = "1"
    try:
        if args[:1] != ["plugins"]:  # that command reports a broken third-party package itself
            _import_plugins(asking_for_help=bool({"-h", "--help"} & set(args)))
        try:
            if args and args[0] == "plugins":
                return list_plugins(args[1:])
            if argv is None:  # LightningCLI reads sys.argv itself (it warns when given args as well)
                sys.argv[1:] = args  # without --trace-hooks; DDP's launcher reruns this command line
                LitplugCLI()
            else:
                LitplugCLI(args=args)
            _destroy_process_group()
        except SIGTERMException:  # Lightning stopped at a batch end; a SystemExit with code None (0)
            _destroy_process_group()  # every rank stopped at the same batch (PreemptionCheckpoint)
            stopped_by = PreemptionCheckpoint.stop_signal or signal.SIGTERM
            code = SIGNAL_EXIT_BASE + stopped_by  # the shell's code for a process ended by it
            if _process_rank() == 0:  # every rank stops; one line says so
                print(f"litplug: stopped by {stopped_by.name} (exit code {code})", file=sys.stderr)
            return code
        except SystemExit as exit_info:  # jsonargparse has printed its parse error
            if exit_info.code == 2:
                for hint in _plugin_name_hints(args):
                    print(f"litplug: hint: {hint}", file=sys.stderr)
            raise
    except Exception as err:
        cause = _litplug_cause(err) or _spawned_litplug_error(err)
        if cause is None:
            raise
        print(f"litplug: error{_rank_label()}: {cause}", file=sys.stderr)
        return 2
    return 0


def _import_plugins(asking_for_help: bool) -> None:
    """Import every plugin and callback, so that YAML can name them by class name. A broken
    third-party package stops every command but ``--help``, which goes on without it."""
    builtin_callbacks()
    try:
        available_plugins()
    except PluginLoadError as err:
        if not asking_for_help:
            raise
        print(f"litplug: warning: {err}; the help below leaves it out", file=sys.stderr)


def _process_rank() -> int:
    """This process's global rank under a DDP launcher (Lightning's or torchrun's), else 0."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def _rank_label() -> str:
    """`` (rank N)`` in a multi-process run, so that each rank's copy of an error says whose it is."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f" (rank {_process_rank()})" if world > 1 else ""


def versions() -> str:
    """litplug's version and those of what it runs on, for a bug report."""
    stack = ", ".join(f"{name} {version(name)}" for name in ("lightning", "torch", "pluggy", "jsonargparse"))
    return f"litplug {version('litplug')} ({stack}, Python {platform.python_version()})"


def _import_from_the_working_directory() -> None:
    """Let a config name a class in the directory the command runs in (``class_path: my_model.Net``).

    ``python -m`` and ``python script.py`` put a directory on ``sys.path``; the ``litplug`` console
    script only puts its own ``bin/`` there. Appended, not prepended: a local file never shadows an
    installed package (a stray ``torch.py``), it only adds modules nothing else provides.
    """
    cwd = os.getcwd()
    if not any(entry in ("", cwd) for entry in sys.path):
        sys.path.append(cwd)


def _destroy_process_group() -> None:
    """End the DDP process group, if any, before the interpreter exits.

    Lightning leaves it alive; a gloo group still alive at interpreter shutdown can abort the
    process ("terminate called without an active exception", exit -6) after a run that
    succeeded. Seen once in CI on a two-process `litplug fit`. Only on the way out of a run
    that ended the same way on every rank: after an error, a rank may be inside a collective.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _config_paths(args: list[str]) -> list[str]:
    """The values of ``--config``/``-c`` (``--config X`` or ``--config=X``), in order."""
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _plugin_name_hints(args: list[str]) -> list[str]:
    """Hints for plugins named by their registry name (``ghost_bn``) where YAML needs a class.

    ``litplug plugins`` lists both; jsonargparse only resolves classes, and its error does not say
    which class was meant. Looks at the command line and at the text of the ``--config`` files.
    """
    texts = list(args)
    texts += [Path(config).read_text() for config in _config_paths(args) if Path(config).is_file()]
    used = set()
    for text in texts:
        used.update(re.findall(r"(?:class_path:|plugins\+?=)\s*['\"]?([\w.]+)", text))
    registry = available_plugins()
    hints = [
        f"'{name}' is a plugin name; YAML and the command line name its class: "
        f"{registry[name].cls.__name__} (or {registry[name].cls.__module__}.{registry[name].cls.__name__})"
        for name in sorted(used)
        if name in registry and name != registry[name].cls.__name__
    ]
    if autoload_disabled():
        known = {info.cls.__name__ for info in registry.values()}
        hints += [
            f"if '{name}' is a third-party plugin class, it is not loaded: {DISABLE_AUTOLOAD_ENV} is set, "
            f"so only an import path finds it (class_path: your_package.module.{name}), or unset it"
            for name in sorted(used)
            if "." not in name and name not in known and name not in registry
        ]
    return hints


def _litplug_cause(err: BaseException | None) -> LitplugError | None:
    """The LitplugError behind ``err``; jsonargparse wraps errors raised while instantiating."""
    while err is not None:
        if isinstance(err, LitplugError):
            return err
        err = err.__cause__ or err.__context__
    return None


#: The last line of a LitplugError's traceback, as a spawned worker's failure reports it.
_SPAWNED_ERROR = re.compile(r"^litplug\.core\.errors\.\w+: (.*)", re.MULTILINE | re.DOTALL)


def _spawned_litplug_error(err: BaseException) -> str | None:
    """The message of a LitplugError raised in a ``ddp_spawn`` worker (rank zero's export checks).

    torch.multiprocessing sends the parent only the worker's formatted traceback, as the text of
    a ``ProcessRaisedException``; the error's message is its last line(s).
    """
    if not isinstance(err, torch.multiprocessing.ProcessRaisedException):
        return None
    found = _SPAWNED_ERROR.search(str(err))
    return found.group(1).strip() if found else None


if __name__ == "__main__":
    sys.exit(main())
