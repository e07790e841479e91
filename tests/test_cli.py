"""The `litplug` command: results files, plugin listing, hook tracing and bad configs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from litplug.core.cli import LitplugCLI, main

MLP = "    class_path: litplug.core.models.MLP\n    init_args: {hidden_dims: [16]}\n"
TRAINER = "trainer:\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # runs without a logger write results.json to the working directory


def _exit_code(args: list[str]) -> int | str | None:
    """``main``'s return value, or the code of the SystemExit a parse error raises."""
    try:
        return main(args)
    except SystemExit as exit_info:
        return exit_info.code


def _config(tmp_path: Path, plugins: str = "[]", extra: str = "") -> str:
    path = tmp_path / "config.yaml"
    path.write_text(f"model:\n  model:\n{MLP}  plugins: {plugins}\n{TRAINER}{extra}")
    return str(path)


def test_fit_prints_metrics_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "out" / "results.json"
    config = _config(
        tmp_path, extra=f"  default_root_dir: {tmp_path}\n  max_steps: 3\n  limit_val_batches: 2\n"
    )
    code = main(["fit", "--config", config, "--results_path", str(results), "--test_after_fit", "true"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "litplug fit: final metrics" in printed and "test/acc" in printed
    assert "litplug fit: testing the final weights" in printed  # no monitored checkpoint: no "best"
    saved = json.loads(results.read_text())
    assert saved["global_step"] == 3
    assert saved["tested_checkpoint"] is None
    assert 0.0 <= saved["metrics"]["test/acc"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == saved["metrics"]


def test_help_names_the_plugins_command_and_version_prints_the_versions(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "litplug plugins [--config X.yaml ...]" in " ".join(capsys.readouterr().out.split())
    assert main(["--version"]) == 0
    printed = capsys.readouterr().out
    assert (
        printed.startswith(f"litplug {version('litplug')} (lightning ")
        and f"torch {torch.__version__}" in printed
    )


def test_plugins_command_lists_plugins_and_resolved_order(tmp_path: Path, capsys) -> None:
    plugins = "\n    - class_path: helpers.CountingPlugin\n"
    assert main(["plugins", "--config", _config(tmp_path, plugins)]) == 0
    out = capsys.readouterr().out
    assert "name" in out and "summary" in out and "litplug.callbacks.warmup" in out
    assert "resolved plugin order" in out and ": counter" in out


def test_plugins_command_applies_the_command_lines_overrides_to_the_config(tmp_path: Path, capsys) -> None:
    """The order shown is the order `fit` with the same arguments would run: a plugin appended on
    the command line, and a second config, count."""
    config = _config(tmp_path, "\n    - class_path: helpers.CountingPlugin\n")
    assert main(["plugins", "--config", config, "--model.plugins+=EMA"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": counter -> ema")
    second = tmp_path / "ema_only.yaml"
    second.write_text("model:\n  plugins: [{class_path: EMA}]\n")
    assert main(["plugins", "--config", config, "--config", str(second)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": ema")


def test_plugins_command_from_the_command_line_takes_config_equals_and_does_not_warn(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, "\n    - class_path: helpers.CountingPlugin\n")
    monkeypatch.setattr(sys, "argv", ["litplug", "plugins", f"--config={config}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main() == 0
    assert ": counter" in capsys.readouterr().out
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_trace_hooks_flag_logs_hook_calls_with_plugins(tmp_path: Path, capfd, monkeypatch) -> None:
    monkeypatch.setenv("LITPLUG_TRACE_HOOKS", "0")  # main() turns it on; monkeypatch restores it
    plugins = "\n    - class_path: helpers.CountingPlugin\n"
    config = _config(tmp_path, plugins, extra="  fast_dev_run: true\n")
    assert main(["fit", "--trace-hooks", "--config", config]) == 0
    err = capfd.readouterr().err
    assert "[litplug.hooks] litplug_extra_losses -> counter" in err
    assert "[litplug.hooks] litplug_configure_model -> (no plugin)" in err


@pytest.mark.parametrize(
    ("plugins", "expected"),
    [
        ("\n    - class_path: NoSuchPlugin\n", "NoSuchPlugin"),
        ("\n    - class_path: helpers.CountingPlugin\n      init_args: {weight: abc}\n", 'key "weight"'),
        (
            "\n    - class_path: helpers.CountingPlugin\n      init_args: {weight: -1.0}\n",
            "plugin 'counter': argument 'weight' must be in [0, inf], got -1.0",
        ),
        ("\n    - class_path: helpers.CountingPlugin\n      init_args: {wieght: 1.0}\n", "wieght"),
    ],
    ids=["unknown-plugin", "wrong-type", "out-of-range", "misspelled-argument"],
)
def test_bad_configs_fail_before_training_with_a_clear_message(
    tmp_path: Path, capfd, plugins, expected
) -> None:
    config = _config(tmp_path, plugins, extra="  fast_dev_run: true\n")
    assert _exit_code(["fit", "--config", config]) != 0
    captured = capfd.readouterr()
    assert expected in captured.err
    assert "Epoch 0" not in captured.out + captured.err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--data.batch_size=0", "data module DigitsDataModule: batch_size must be an integer >= 1, got 0"),
        ("--data.val_fraction=1.5", "data module DigitsDataModule: val_fraction must be in [0, 1), got 1.5"),
        (
            "--data=SplitDigitsDataModule --data.classes_per_task=3",
            "data module SplitDigitsDataModule: classes_per_task must divide 10, got 3",
        ),
        ("--model.model.init_args.dropout=1.5", "model MLP: dropout must be in [0, 1), got 1.5"),
    ],
    ids=["batch-size", "fraction", "subclass", "reference-model"],
)
def test_a_bad_data_or_model_argument_fails_in_one_line_naming_the_class(
    tmp_path: Path, capfd, override: str, expected: str
) -> None:
    """Not the long jsonargparse union error a bare ValueError from an __init__ gives."""
    config = _config(tmp_path, "[]", extra="  fast_dev_run: true\n")
    assert main(["fit", "--config", config, *override.split()]) == 2
    err = capfd.readouterr().err
    assert f"litplug: error: {expected}" in err and "Traceback" not in err


def test_conflicting_plugins_fail_before_training(tmp_path: Path, capfd) -> None:
    plugins = (
        "\n    - class_path: helpers.Named\n      init_args: {label: a, conflicts: [b]}"
        "\n    - class_path: helpers.Named\n      init_args: {label: b}\n"
    )
    assert main(["fit", "--config", _config(tmp_path, plugins, extra="  fast_dev_run: true\n")]) == 2
    assert "plugin 'a' conflicts with plugin 'b'" in capfd.readouterr().err


def _fit_checkpoint(tmp_path: Path, plugins: str = "[]") -> Path:
    """A 2-step CLI fit that saves its checkpoint under ``tmp_path/fit``; the checkpoint's path."""
    run_dir = tmp_path / "fit"
    trainer = f"trainer:\n  logger: false\n  enable_progress_bar: false\n  default_root_dir: {run_dir}\n"
    config = tmp_path / "fit.yaml"
    config.write_text(f"model:\n  model:\n{MLP}  plugins: {plugins}\n{trainer}  max_steps: 2\n")
    assert main(["fit", "--config", str(config)]) == 0
    (checkpoint,) = run_dir.glob("**/*.ckpt")
    return checkpoint


def test_test_from_a_checkpoint_uses_the_plugins_of_the_config_not_of_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _fit_checkpoint(tmp_path)
    robust = "[{class_path: RobustEvaluation, init_args: {epsilons: [0.1], attacks: [fgsm]}}]"
    extra = "  inference_mode: false\n  limit_test_batches: 1\n"
    code = main(["test", "--config", _config(tmp_path, robust, extra), "--ckpt_path", str(checkpoint)])
    assert code == 0
    # LightningCLI alone would have parsed the checkpoint's empty plugin list over the config.
    assert "test/robust_acc_fgsm_eps0.1" in json.loads((tmp_path / "results.json").read_text())["metrics"]


def test_a_checkpoint_whose_plugin_the_config_lacks_is_refused_by_name(tmp_path: Path, capfd) -> None:
    checkpoint = _fit_checkpoint(tmp_path, "[{class_path: EMA}]")
    extra = "  limit_test_batches: 1\n"
    assert main(["test", "--config", _config(tmp_path, "[]", extra), "--ckpt_path", str(checkpoint)]) == 2
    assert "checkpoint needs plugin(s) 'ema'" in capfd.readouterr().err


def test_predict_writes_the_class_probabilities_of_the_test_set(tmp_path: Path, capsys) -> None:
    checkpoint = _fit_checkpoint(tmp_path, "[{class_path: EMA}]")
    ema = "[{class_path: EMA}]"
    assert main(["predict", "--config", _config(tmp_path, ema), "--ckpt_path", str(checkpoint)]) == 0
    assert "270 predictions written to" in capsys.readouterr().out
    saved = torch.load(tmp_path / "predictions.pt", weights_only=True)
    assert saved["probs"].shape == (270, 10)
    torch.testing.assert_close(saved["probs"].sum(-1), torch.ones(270))
    assert torch.equal(saved["predicted"], saved["probs"].argmax(-1))


def test_predict_takes_the_test_data_of_a_data_module_without_predict_data(tmp_path: Path, capsys) -> None:
    model = "    class_path: litplug.core.models.MLP\n    init_args: {input_dim: 8, hidden_dims: [8], num_classes: 3}\n"
    config = tmp_path / "user.yaml"
    config.write_text(
        f"model:\n  model:\n{model}  num_classes: 3\n{TRAINER}data:\n  class_path: helpers.TrainValTestData\n"
    )
    assert main(["predict", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "TrainValTestData has no predict_dataloader; predicting its test data" in out
    assert "litplug predict: no --ckpt_path: the model as configured, no checkpoint loaded" in out
    assert "24 predictions written to" in out
    assert torch.load(tmp_path / "predictions.pt", weights_only=True)["probs"].shape == (24, 3)


def test_test_after_fit_tests_the_best_checkpoint_of_a_monitoring_model_checkpoint(tmp_path: Path) -> None:
    # mode "max" on val/loss makes the first epoch the best while the loss falls: best != final.
    run_dir = tmp_path / "fit"
    checkpoint = (  # an unmonitored checkpoint first: the monitored one is still found
        f"  callbacks:\n    - class_path: ModelCheckpoint\n      init_args: {{dirpath: {tmp_path / 'latest'}}}\n"
        "    - class_path: ModelCheckpoint\n      init_args:\n"
        f"        dirpath: {run_dir}\n        monitor: val/loss\n        mode: max\n        save_top_k: -1\n"
    )
    trainer = f"trainer:\n  logger: false\n  enable_progress_bar: false\n  max_epochs: 3\n{checkpoint}"
    config = tmp_path / "fit.yaml"
    config.write_text(f"model:\n  model:\n{MLP}  plugins: [{{class_path: EMA}}]\n{trainer}")
    assert main(["fit", "--config", str(config), "--test_after_fit", "true"]) == 0
    fitted = json.loads((tmp_path / "results.json").read_text())
    assert Path(fitted["tested_checkpoint"]).name == "epoch=0-step=20.ckpt"

    def test_loss(ckpt: Path) -> float:
        assert main(["test", "--config", str(config), "--ckpt_path", str(ckpt)]) == 0
        return json.loads((tmp_path / "results.json").read_text())["metrics"]["test/loss"]

    assert fitted["metrics"]["test/loss"] == test_loss(run_dir / "epoch=0-step=20.ckpt")
    assert fitted["metrics"]["test/loss"] != test_loss(run_dir / "epoch=2-step=60.ckpt")
    # a test run of its own: "best" is what the fit's monitored ModelCheckpoint recorded
    assert main(["test", "--config", str(config), "--ckpt_path", "best"]) == 0
    tested = json.loads((tmp_path / "results.json").read_text())
    assert Path(tested["tested_checkpoint"]).name == "epoch=0-step=20.ckpt"
    assert tested["metrics"]["test/loss"] == fitted["metrics"]["test/loss"]


def test_ckpt_path_best_without_a_monitored_checkpoint_is_refused(tmp_path: Path, capfd) -> None:
    checkpoint = _fit_checkpoint(tmp_path)  # the default, unmonitored ModelCheckpoint
    config = f"model:\n  model:\n{MLP}trainer:\n  logger: false\n  default_root_dir: {tmp_path / 'fit'}\n"
    (tmp_path / "test.yaml").write_text(config)
    assert main(["test", "--config", str(tmp_path / "test.yaml"), "--ckpt_path", "best"]) == 2
    refusal = f"--ckpt_path best: the newest checkpoint, {checkpoint}, records no best checkpoint"
    assert refusal in capfd.readouterr().err


def test_validate_prints_and_writes_its_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = _fit_checkpoint(tmp_path)
    # a ModelCheckpoint of its own in another folder: Lightning would warn that the dirpath changed
    config = tmp_path / "validate.yaml"
    config.write_text(
        f"model:\n  model:\n{MLP}trainer:\n  logger: false\n  enable_progress_bar: false\n"
        f"  default_root_dir: {tmp_path / 'eval'}\n  limit_val_batches: 2\n"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["validate", "--config", str(config), "--ckpt_path", str(checkpoint)]) == 0
    assert not [w for w in caught if "dirpath has changed" in str(w.message)], "noise for an evaluation"
    assert "litplug validate: final metrics" in capsys.readouterr().out
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["stage"] == "validate" and 0.0 <= saved["metrics"]["val/acc"] <= 1.0
    assert saved["tested_checkpoint"] == str(checkpoint)  # which weights the numbers are of
    trained = torch.load(checkpoint, weights_only=True)
    assert (saved["global_step"], saved["epochs"]) == (trained["global_step"], trained["epoch"]) != (0, 0)


def test_a_plugin_named_by_its_registry_name_gets_a_hint_with_its_class(tmp_path: Path, capfd) -> None:
    in_yaml = _config(tmp_path, "[{class_path: ema}]", extra="  fast_dev_run: true\n")
    assert _exit_code(["fit", "--config", in_yaml]) == 2
    assert (
        "hint: 'ema' is a plugin name; YAML and the command line name its class: EMA"
        in capfd.readouterr().err
    )
    on_command_line = _config(tmp_path, extra="  fast_dev_run: true\n")
    assert _exit_code(["fit", f"--config={on_command_line}", "--model.plugins+=ghost_bn"]) == 2
    assert "its class: GhostBatchNormPlugin" in capfd.readouterr().err


def test_litplugs_callbacks_are_named_by_class_on_the_command_line(tmp_path: Path) -> None:
    """`--trainer.callbacks+=LinearWarmup` resolves like EarlyStopping does: jsonargparse finds a
    short class name only among imported classes, so the CLI imports litplug's callbacks first.
    A fresh process, because this test session has imported them already."""
    args = [
        *("fit", "--config", _config(tmp_path), "--print_config"),
        *("--trainer.callbacks+=LinearWarmup", "--trainer.callbacks.warmup_steps=7"),
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "litplug.core.cli", *args], cwd=tmp_path, capture_output=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = completed.stdout.decode()
    assert "class_path: litplug.callbacks.warmup.LinearWarmup" in printed
    assert "warmup_steps: 7" in printed


def test_the_console_script_imports_a_model_from_the_directory_it_runs_in(tmp_path: Path) -> None:
    """`class_path: my_model.Net` with my_model.py beside the config, run as the README runs litplug:
    the `litplug` console script, whose sys.path holds its bin/ folder, not the working directory."""
    console_script = Path(sys.executable).with_name("litplug")
    assert console_script.is_file(), "the package's console script is not installed"
    (tmp_path / "my_model.py").write_text(
        "import torch.nn as nn\n\n\nclass Net(nn.Sequential):\n"
        "    def __init__(self, hidden: int = 8) -> None:\n"
        "        super().__init__(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))\n"
    )
    config = tmp_path / "mine.yaml"
    config.write_text(
        "model:\n  model: {class_path: my_model.Net, init_args: {hidden: 5}}\n"
        "trainer: {max_steps: 2, logger: false, enable_checkpointing: false, enable_progress_bar: false}\n"
    )
    completed = subprocess.run(
        [str(console_script), "fit", "--config", str(config)], cwd=tmp_path, capture_output=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["train/loss"] > 0


def test_a_batch_limit_of_1_is_one_batch_and_a_float_a_fraction(tmp_path: Path) -> None:
    """Lightning annotates limit_*_batches Union[float, int]: jsonargparse made `1` into 1.0, which
    Lightning reads as 100% of the batches."""
    args = [
        *("--config", _config(tmp_path)),
        *("--trainer.limit_val_batches=1", "--trainer.limit_train_batches=0.25"),
        *("--trainer.limit_test_batches=1.0", "--trainer.limit_predict_batches=3"),
    ]
    trainer = LitplugCLI(run=False, args=args).trainer
    limits = [trainer.limit_val_batches, trainer.limit_train_batches, trainer.limit_test_batches]
    assert [(type(limit), limit) for limit in limits] == [(int, 1), (float, 0.25), (float, 1.0)]
    assert trainer.limit_predict_batches == 3


def test_evaluating_ckpt_path_last_takes_the_newest_checkpoint_of_the_config_or_refuses(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    logger = f"  logger:\n    class_path: CSVLogger\n    init_args: {{save_dir: {tmp_path}, name: run}}\n"
    config = tmp_path / "versioned.yaml"
    config.write_text(
        f"model:\n  model:\n{MLP}  plugins: [{{class_path: EMA}}]\n"
        f"trainer:\n{logger}  enable_progress_bar: false\n  max_steps: 2\n  limit_test_batches: 2\n"
    )
    for stage in ("test", "predict"):  # nothing trained yet: refused, not run on untrained weights
        assert main([stage, "--config", str(config), "--ckpt_path", "last"]) == 2
        assert f"--ckpt_path last: no checkpoint of this config to {stage}" in capfd.readouterr().err
    assert main(["fit", "--config", str(config)]) == 0
    (checkpoint,) = (tmp_path / "run").glob("version_*/checkpoints/*.ckpt")
    capfd.readouterr()

    def tested(ckpt_path: str) -> dict[str, float]:
        assert main(["test", "--config", str(config), "--ckpt_path", ckpt_path]) == 0
        (newest,) = sorted(
            (tmp_path / "run").glob("version_*/results.json"), key=lambda p: p.stat().st_mtime
        )[-1:]
        return json.loads(newest.read_text())["metrics"]

    # each command logs to a new version_N; the checkpoint is found in the fit's
    assert tested("last") == tested(str(checkpoint))
    assert f"litplug test: --ckpt_path last is {checkpoint}" in capfd.readouterr().out


def test_a_missing_checkpoint_file_fails_before_the_model_is_set_up(tmp_path: Path, capfd) -> None:
    for stage in ("fit", "validate", "test", "predict"):
        assert main([stage, "--config", _config(tmp_path), "--ckpt_path", "missing.ckpt"]) == 2
        err = capfd.readouterr().err
        assert "--ckpt_path missing.ckpt: no such checkpoint file" in err and "Traceback" not in err, stage


@pytest.mark.parametrize(
    ("args", "last_line"),
    [
        (
            ["--model.plugins+=EMA", "--model.plugins.decay=abc"],
            "fit: error: plugin EMA (model.plugins), argument 'decay': Expected a <class 'float'>. Got value: abc",
        ),
        (["--model.plugins+=NoSuchPlugin"], "'NoSuchPlugin' is not a known plugin class name or import path"),
        (["--model.optimiser=x"], "did you mean --model.optimizer?"),
        (["--trainer.max_steps=abc"], "fit: error: trainer.max_steps: Expected a <class 'int'>"),
    ],
)
def test_a_bad_argument_ends_in_one_line_naming_it_without_the_usage(
    tmp_path: Path, args: list[str], last_line: str, capfd
) -> None:
    assert _exit_code(["fit", "--config", _config(tmp_path), *args]) == 2
    err = capfd.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and last_line in error_lines[0], err
    assert "usage:" not in err, "the 60 lines of usage are left out"


def test_each_wandb_run_writes_its_results_and_config_in_its_own_folder(tmp_path: Path, monkeypatch) -> None:
    """Lightning's log_dir is the W&B save_dir itself: two runs there overwrote each other's files."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    save_dir = tmp_path / "wb"
    logger = (
        "  logger:\n    class_path: lightning.pytorch.loggers.WandbLogger\n"
        f"    init_args: {{save_dir: {save_dir}, project: proj, offline: true}}\n"
    )
    config = tmp_path / "wandb.yaml"
    config.write_text(
        f"model:\n  model:\n{MLP}trainer:\n  max_steps: 2\n  limit_val_batches: 1\n"
        f"  enable_progress_bar: false\n{logger}"
    )
    for _ in range(2):
        wandb.finish()
        assert main(["fit", "--config", str(config)]) == 0
    wandb.finish()
    run_dirs = sorted(p.parent for p in (save_dir / "proj").glob("*/checkpoints"))
    assert len(run_dirs) == 2, sorted(save_dir.rglob("*"))
    for run_dir in run_dirs:
        assert json.loads((run_dir / "results.json").read_text())["global_step"] == 2
        assert (run_dir / "config.yaml").is_file()
    assert not (save_dir / "results.json").exists() and not (save_dir / "config.yaml").exists()


def test_fit_under_a_spawn_strategy_is_refused_before_training(tmp_path: Path, capfd) -> None:
    """ddp_spawn hands back only the weights: test_after_fit tested other weights (DDP audit)."""
    spawn = ["--trainer.strategy=ddp_spawn", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    assert main(["fit", "--config", _config(tmp_path), *spawn]) == 2
    err = capfd.readouterr().err
    assert "litplug: error: fit with strategy DDPStrategy (start method 'spawn')" in err
    assert "use --trainer.strategy=ddp" in err
    assert not list(tmp_path.rglob("*.ckpt")), "refused before any training"
