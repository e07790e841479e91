"""Exporting a trained module's prediction: ``export_predictor`` and ``litplug export``.

Parametrised over the registry: every plugin's predict path must survive ``torch.export`` with a
free batch size and give what ``predict_step`` gives, under the same evaluation weights.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import example_run, quiet_trainer
from torch import nn

from litplug.core import export as export_module
from litplug.core.cli import main
from litplug.core.data import DigitsDataModule
from litplug.core.discovery import available_plugins
from litplug.core.errors import ExportError
from litplug.core.export import (
    describe_program,
    evaluation_weights,
    export_predictor,
    input_sizes,
    require_onnx,
    save_onnx,
    save_predictor,
)
from litplug.core.models import LSTMLanguageModel, TransformerLanguageModel
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin
from litplug.plugins.ema import EMA

PLUGINS = sorted(available_plugins().values(), key=lambda info: info.name)
CASES = [pytest.param(None, id="no-plugin")] + [pytest.param(info.cls, id=info.name) for info in PLUGINS]


def _trained(plugin: Plugin | None, steps: int = 3) -> tuple[LitplugModule, torch.Tensor, torch.Tensor]:
    """A module trained a few steps, and one test batch (inputs, targets) of its data."""
    L.seed_everything(0)
    model, data = example_run(plugin)
    module = LitplugModule(
        model, plugins=[plugin] if plugin else [], optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05)
    )
    quiet_trainer(max_steps=steps, limit_val_batches=0, enable_checkpointing=False).fit(
        module, datamodule=data
    )
    data.setup("test")
    inputs, targets = next(iter(data.test_dataloader()))
    return module, inputs, targets


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


@pytest.mark.parametrize("plugin_cls", CASES)
def test_every_plugins_prediction_exports_with_a_free_batch_size(plugin_cls: type[Plugin] | None) -> None:
    module, inputs, targets = _trained(plugin_cls.example() if plugin_cls else None)
    before = _weights(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = export_predictor(module, inputs[:8])
    assert [str(w.message) for w in caught] == []  # e.g. a module attribute set as a side effect
    assert {
        name: torch.equal(value, before[name]) for name, value in _weights(module).items()
    } == dict.fromkeys(before, True)  # the module is left as it was: training weights back, nothing updated
    assert module.training
    with evaluation_weights(module), torch.no_grad():
        expected = module.predict_step((inputs[:13], targets[:13]), 0)
    got = program.module()(inputs[:13])  # another batch size than the example's (text batches: 8)
    assert got.shape[0] == min(13, len(inputs))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))


def test_the_program_keeps_emas_average_and_owns_its_weights() -> None:
    module, inputs, _ = _trained(EMA(decay=0.5), steps=5)
    program = export_predictor(module, inputs[:8]).module()
    exported = program(inputs[:8])
    with torch.no_grad():
        raw = module.model.eval()(inputs[:8]).softmax(-1)  # the live (training) weights
        module.train()
    assert not torch.allclose(exported, raw, atol=1e-4)  # it is the average, not the live weights
    with evaluation_weights(module), torch.no_grad():
        torch.testing.assert_close(exported, module.predict_probs(inputs[:8]))
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1.0)  # the module moves on; the program must not
    torch.testing.assert_close(program(inputs[:8]), exported, rtol=0, atol=0)


def test_evaluation_weights_restores_the_training_weights_on_an_exception() -> None:
    module, inputs, _ = _trained(EMA(decay=0.5), steps=5)
    before = _weights(module)
    with pytest.raises(ZeroDivisionError), evaluation_weights(module):
        assert any(not torch.equal(v, before[k]) for k, v in _weights(module).items())  # average swapped in
        raise ZeroDivisionError
    assert all(torch.equal(v, before[k]) for k, v in _weights(module).items())
    assert module.training


def test_a_fixed_batch_program_and_the_argument_errors() -> None:
    module, inputs, _ = _trained(None, steps=1)
    with pytest.raises(ExportError, match="at least 2 examples"):
        export_predictor(module, inputs[:1])
    with pytest.raises(TypeError, match="tensor of raw inputs"):
        export_predictor(module, (inputs[:4],))  # type: ignore[arg-type]
    program = export_predictor(module, inputs[:1], dynamic_batch=False).module()
    assert program(inputs[:1]).shape == (1, 10)
    with pytest.raises(AssertionError, match=r"size\(\)\[0\] == 1"):  # the size is fixed
        program(inputs[:4])


def test_a_predict_path_export_cannot_capture_is_refused() -> None:
    class CountsCalls(nn.Module):  # predicts from a Python counter: export bakes in one value
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.linear(x) * self.calls

    module = LitplugModule(CountsCalls())
    with pytest.raises(RuntimeError, match="differ from the module's"):
        export_predictor(module, torch.randn(4, 64))


PROGRAMS_WITHOUT_LITPLUG = """
import sys
sys.modules["litplug"] = None  # importing litplug (or anything of it) now fails
import torch
inputs = torch.load(sys.argv[1])
for path in sys.argv[2:]:
    expected = torch.load(path + ".expected")
    torch.testing.assert_close(torch.export.load(path).module()(inputs), expected)
print("loaded", len(sys.argv) - 2)
"""


def test_saved_programs_run_with_torch_alone(tmp_path: Path) -> None:
    """GBN, the vectorised ensemble and MIMO use litplug code in training; the programs do not."""
    paths = []
    for name in ("ghost_bn", "ensemble", "mimo", "ema"):
        module, inputs, _ = _trained(available_plugins()[name].cls.example())
        path = save_predictor(module, inputs[:8], tmp_path / f"{name}.pt2")
        with evaluation_weights(module), torch.no_grad():
            torch.save(module.predict_probs(inputs[:11]), f"{path}.expected")
        paths.append(str(path))
    torch.save(inputs[:11], tmp_path / "inputs.pt")
    done = subprocess.run(
        [sys.executable, "-c", PROGRAMS_WITHOUT_LITPLUG, str(tmp_path / "inputs.pt"), *paths],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded 4" in done.stdout


CONFIG = """
model:
  model:
    class_path: litplug.core.models.MLP
    init_args: {hidden_dims: [16]}
  plugins:
    - class_path: EMA
      init_args: {decay: 0.5}
trainer:
  max_epochs: 1
  enable_progress_bar: false
  default_root_dir: runs
"""


def _fitted(config_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``litplug fit`` run on the config in ``tmp_path`` (its checkpoints under ``runs/``); the config."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    assert main(["fit", "--config", str(config)]) == 0
    return config


def test_litplug_export_writes_the_prediction_of_litplug_predict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _fitted(CONFIG, tmp_path, monkeypatch)
    assert main(["predict", "--config", str(config), "--ckpt_path", "last"]) == 0
    capsys.readouterr()
    target = tmp_path / "deploy" / "model.pt2"
    assert main(["export", "--config", str(config), "--ckpt_path", "last", "--export_path", str(target)]) == 0
    out = capsys.readouterr().out
    assert "litplug export: --ckpt_path last is" in out
    assert (
        "inputs float32 [B, 64] -> class probabilities float32 [B, 10] (B: any batch size); "
        f"written to {target}" in out
    )
    [predictions] = tmp_path.glob("runs/lightning_logs/version_*/predictions.pt")
    probs = torch.load(predictions, weights_only=True)["probs"]
    data = DigitsDataModule()
    data.setup("test")
    test_inputs = data.datasets["test"].tensors[0]
    torch.testing.assert_close(torch.export.load(target).module()(test_inputs), probs)
    # Without --export_path it lands in the run directory.
    assert main(["export", "--config", str(config), "--ckpt_path", "last"]) == 0
    assert len(list(tmp_path.glob("runs/lightning_logs/version_*/predictor.pt2"))) == 1


def test_a_compiled_network_exports_its_prediction() -> None:
    """``compile_model`` compiles the network in place; torch.export still captures it."""
    L.seed_everything(0)
    plugin = available_plugins()["ghost_bn"].cls.example()
    model, data = example_run(plugin)
    module = LitplugModule(
        model, plugins=[plugin], compile_model=True, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05)
    )
    quiet_trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=False).fit(module, datamodule=data)
    data.setup("test")
    inputs = next(iter(data.test_dataloader()))[0]
    program = export_predictor(module, inputs[:8]).module()
    with evaluation_weights(module), torch.no_grad():
        torch.testing.assert_close(program(inputs[:13]), module.predict_probs(inputs[:13]))


def _language_model(model: nn.Module) -> LitplugModule:
    L.seed_everything(0)
    return LitplugModule(model)


def test_a_transformers_sequence_length_can_be_left_free_up_to_max_len() -> None:
    module = _language_model(
        TransformerLanguageModel(vocab_size=20, d_model=16, num_heads=2, num_layers=2, max_len=24)
    )
    tokens = torch.randint(0, 20, (4, 24), generator=torch.Generator().manual_seed(0))
    program = export_predictor(module, tokens[:, :16], dynamic_dims=[1])
    assert input_sizes(program) == [(0, None), (2, 24)]
    assert describe_program(program) == ("int64 [B, 2..24]", "float32 [B, 2..24, 20]")
    with evaluation_weights(module), torch.no_grad():
        for batch, length in ((3, 5), (1, 24), (4, 16)):
            inputs = tokens[:batch, :length]
            torch.testing.assert_close(program.module()(inputs), module.predict_probs(inputs))
    with pytest.raises(AssertionError, match="<= 24"):  # the positional table has 24 rows
        program.module()(torch.zeros(1, 25, dtype=torch.long))
    fixed = export_predictor(module, tokens[:, :16])  # without dynamic_dims, the example's length
    assert describe_program(fixed) == ("int64 [B, 16]", "float32 [B, 16, 20]")


def test_a_dimension_the_model_fixes_is_refused_not_quietly_fixed() -> None:
    module = _language_model(LSTMLanguageModel(vocab_size=20, embed_dim=8, hidden_size=8))
    tokens = torch.randint(0, 20, (4, 16))
    with pytest.raises(ExportError, match=r"input dimension 1 cannot be kept free: the model fixes it at 16"):
        export_predictor(module, tokens, dynamic_dims=[1])


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        ([0], r"input dimensions 1, 2, ... \(the batch dimension 0 is dynamic_batch's\), got 0"),
        ([True], "got True"),
        ([1, 1], "names a dimension twice: \\[1, 1\\]"),
        ([2], r"names dimension 2, but the inputs int64 \[B, 16\] have dimensions 0..1"),
    ],
)
def test_dynamic_dims_errors(dims: list[int], message: str) -> None:
    module = _language_model(TransformerLanguageModel(vocab_size=20, d_model=8, num_heads=2, num_layers=1))
    with pytest.raises(ExportError, match=message):
        export_predictor(module, torch.zeros(4, 16, dtype=torch.long), dynamic_dims=dims)
    with pytest.raises(ExportError, match="needs a size of at least 3 there"):
        export_predictor(module, torch.zeros(4, 2, dtype=torch.long), dynamic_dims=[1])


TEXT_CONFIG = """
model:
  model:
    class_path: litplug.core.models.TransformerLanguageModel
    init_args: {vocab_size: 98, d_model: 16, num_heads: 2, num_layers: 1, dim_feedforward: 32, max_len: 32}
data:
  class_path: litplug.core.data.StdlibTextDataModule
  init_args: {seq_len: 32, batch_size: 8, num_files: 2, max_chars: 20000}
trainer:
  max_steps: 2
  limit_val_batches: 1
  enable_progress_bar: false
  default_root_dir: runs
"""


def test_litplug_export_leaves_a_text_models_sequence_length_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _fitted(TEXT_CONFIG, tmp_path, monkeypatch)
    capsys.readouterr()
    target = tmp_path / "lm.pt2"
    export = ["export", "--config", str(config), "--ckpt_path", "last", "--export_path", str(target)]
    assert main([*export, "--dynamic_dims", "[1]"]) == 0
    out = capsys.readouterr().out
    assert "inputs int64 [B, 2..32] -> class probabilities float32 [B, 2..32, 98] (B: any batch size)" in out
    assert torch.export.load(target).module()(torch.zeros(2, 7, dtype=torch.long)).shape == (2, 7, 98)
    # A bad value is a one-line error before anything is predicted.
    assert main([*export, "--dynamic_dims", "[0]"]) == 2
    captured = capsys.readouterr()
    assert (
        "litplug: error: export_predictor: dynamic_dims must name input dimensions 1, 2, ..." in captured.err
    )
    assert "Predicting" not in captured.out + captured.err


BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "export" / "run.py"


@pytest.mark.slow
def test_the_export_benchmarks_smoke_run_checks_every_program() -> None:
    """Agreement is checked (it must hold); timings are not. ONNX columns as installed."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert not [row for row in rows if "DIFFERENT" in row]
    assert len([row for row in rows if "same classes" in row]) == 6  # 2 plugins, 4 sequence lengths
    assert any(row.startswith("| ema | float32 [B, 64] -> float32 [B, 10] | 270 |") for row in rows)
    assert any(row.startswith("| [16, 64] |") for row in rows)  # the free sequence length
    assert len([row for row in rows if "example MLP" in row]) == 4  # 2 plugins x 2 batch sizes


def test_litplug_export_format_onnx_writes_a_checked_onnx_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")  # the dev extra has it: CI runs this test
    config = _fitted(TEXT_CONFIG, tmp_path, monkeypatch)
    capsys.readouterr()
    export = ["export", "--config", str(config), "--ckpt_path", "last", "--dynamic_dims", "[1]"]
    assert main([*export, "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    [written] = tmp_path.glob("runs/lightning_logs/version_*/predictor.onnx")  # the default name
    assert f"written to {written.relative_to(tmp_path)}\n  load it with onnxruntime.InferenceSession(" in out
    assert main([*export, "--export_path", str(tmp_path / "lm.pt2")]) == 0
    program = torch.export.load(tmp_path / "lm.pt2").module()
    session = onnxruntime.InferenceSession(str(written))
    # free dimensions named by their place in the input, not by torch's symbols (s85)
    assert [(arg.name, arg.shape) for arg in session.get_inputs()] == [("inputs", ["batch", "dim1"])]
    assert [(arg.name, arg.shape) for arg in session.get_outputs()] == [
        ("probabilities", ["batch", "dim1", 98])
    ]
    for shape in ((1, 32), (3, 5)):  # other batch sizes and lengths than the example's [8, 32]
        tokens = torch.randint(0, 98, shape)
        got = torch.from_numpy(session.run(None, {"inputs": tokens.numpy()})[0])
        torch.testing.assert_close(got, program(tokens), rtol=1e-4, atol=1e-6)


def test_onnx_conversion_is_checked_against_the_program(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    module, inputs, _ = _trained(None, steps=1)
    program = export_predictor(module, inputs[:8])
    session_class = onnxruntime.InferenceSession

    class Perturbed(session_class):  # type: ignore[misc, valid-type]
        def run(self, *args: object, **kwargs: object) -> list[object]:
            return [out + 1e-3 for out in super().run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Perturbed)
    with pytest.raises(RuntimeError, match="ONNX \\(onnxruntime\\) program's predictions differ"):
        save_onnx(program, inputs[:8], tmp_path / "p.onnx")


def test_onnx_without_its_packages_is_a_one_line_error_before_predicting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = export_module.find_spec
    monkeypatch.setattr(
        export_module, "find_spec", lambda name: None if name == "onnxruntime" else real_find_spec(name)
    )
    with pytest.raises(ExportError, match=r"needs onnxruntime \(not litplug dependencies\): pip install"):
        require_onnx()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(CONFIG)
    assert main(["export", "--config", "config.yaml", "--format", "onnx"]) == 2
    captured = capsys.readouterr()
    assert "litplug: error: export to ONNX needs onnxruntime" in captured.err
    assert "Predicting" not in captured.out + captured.err
