"""Tests of the reference models: output shapes, pre/post-LN, residual sub-layers, causality."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from litplug.core.models import (
    MLP,
    LSTMClassifier,
    LSTMLanguageModel,
    ResidualSublayer,
    SmallCNN,
    TransformerLanguageModel,
)
from litplug.core.models import lstm as lstm_module


@pytest.mark.parametrize("shape", [(4, 64), (4, 1, 8, 8), (4, 8, 8), (4, 64, 1)])
def test_mlp_flattens_any_form(shape: tuple[int, ...]) -> None:
    model = MLP(input_dim=64, hidden_dims=[32, 16], num_classes=10, batch_norm=True, dropout=0.1)
    assert model(torch.rand(shape)).shape == (4, 10)


def test_mlp_without_hidden_layers_is_linear() -> None:
    model = MLP(input_dim=64, hidden_dims=[], num_classes=3)
    assert model(torch.rand(2, 64)).shape == (2, 3)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


@pytest.mark.parametrize("batch_norm", [True, False])
def test_small_cnn_shapes_and_names(batch_norm: bool) -> None:
    model = SmallCNN(in_channels=1, num_classes=10, width=8, batch_norm=batch_norm)
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert isinstance(model.stem, nn.Conv2d) and isinstance(model.head, nn.Linear)
    with pytest.raises(ValueError, match="B, C, H, W"):
        model(torch.rand(5, 64))


@pytest.mark.parametrize(("shape", "input_size"), [((3, 8, 8), 8), ((3, 64, 1), 1)])
def test_lstm_classifier_on_digit_sequences(shape: tuple[int, ...], input_size: int) -> None:
    model = LSTMClassifier(input_size=input_size, hidden_size=16, num_classes=10)
    assert isinstance(model.lstm, nn.LSTM) and model.lstm.batch_first
    assert model(torch.rand(shape)).shape == (3, 10)


def test_lstm_classifier_uses_last_step() -> None:
    torch.manual_seed(0)
    model = LSTMClassifier(input_size=2, hidden_size=8, num_classes=3).eval()
    x = torch.rand(1, 6, 2)
    out, _ = model.lstm(x)
    assert torch.allclose(model(x), model.head(out[:, -1]))


def test_lstm_language_model_shape() -> None:
    model = LSTMLanguageModel(vocab_size=30, embed_dim=8, hidden_size=16, num_layers=2)
    assert model(torch.randint(0, 30, (2, 7))).shape == (2, 7, 30)


def _transformer(norm_position: str, seed: int = 0, **kwargs: int) -> TransformerLanguageModel:
    torch.manual_seed(seed)
    args = {"d_model": 16, "num_heads": 2, "num_layers": 3, "dim_feedforward": 32, "max_len": 40, **kwargs}
    return TransformerLanguageModel(vocab_size=20, dropout=0.0, norm_position=norm_position, **args).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("build", ["classifier", "language_model"])
def test_lstm_models_train_under_cpu_autocast(dtype: torch.dtype, build: str) -> None:
    """Many CPUs (no AVX-512 BF16/FP16) have no low-precision oneDNN LSTM: torch raises there."""
    if build == "classifier":
        model: nn.Module = LSTMClassifier(input_size=8, hidden_size=16)
        inputs = torch.randn(4, 8, 8)
    else:
        model = LSTMLanguageModel(vocab_size=30, embed_dim=8, hidden_size=16)
        inputs = torch.randint(0, 30, (4, 8))
    with torch.autocast("cpu", dtype=dtype):
        model(inputs).float().sum().backward()
    assert model.lstm.weight_ih_l0.grad is not None


def test_the_low_precision_lstm_probe_leaves_the_random_stream_alone() -> None:
    lstm_module._cpu_has_low_precision_lstm.cache_clear()
    model = LSTMClassifier(input_size=8, hidden_size=16)
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.zeros(2, 8, 8))
    assert torch.equal(torch.get_rng_state(), state)


def test_lstm_falls_back_to_float32_where_the_cpu_lacks_a_low_precision_lstm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lstm_module, "_cpu_has_low_precision_lstm", lambda dtype: False)
    model = LSTMClassifier(input_size=8, hidden_size=16)
    inputs = torch.randn(4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = lstm_module.run_lstm(model.lstm, inputs)
        logits = model(inputs)
    assert features.dtype is torch.float32 and logits.dtype is torch.bfloat16  # the head still autocasts
    torch.testing.assert_close(features, model.lstm(inputs)[0], rtol=0, atol=0)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_transformer_shape_and_sublayers(norm_position: str) -> None:
    model = _transformer(norm_position)
    assert model(torch.randint(0, 20, (2, 11))).shape == (2, 11, 20)
    sublayers = model.residual_sublayers()
    assert len(sublayers) == 2 * 3
    assert all(isinstance(s, ResidualSublayer) and s.norm_position == norm_position for s in sublayers)
    assert all(s.residual_scale is None and isinstance(s.norm, nn.LayerNorm) for s in sublayers)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.randint(0, 20, (1, 41)))


def test_transformer_pre_and_post_differ() -> None:
    tokens = torch.randint(0, 20, (2, 9))
    post, pre = _transformer("post"), _transformer("pre")
    # Same initial weights except pre-LN's final norm, yet different functions.
    assert torch.equal(post.token_embedding.weight, pre.token_embedding.weight)
    assert not torch.allclose(post(tokens), pre(tokens))
    assert isinstance(pre.final_norm, nn.LayerNorm) and isinstance(post.final_norm, nn.Identity)


def test_residual_sublayer_formulas() -> None:
    torch.manual_seed(0)
    branch = nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)
    post = ResidualSublayer(branch, 4, "post")
    assert torch.allclose(post(x), post.norm(x + branch(x)))
    pre = ResidualSublayer(branch, 4, "pre")
    assert torch.allclose(pre(x), x + branch(pre.norm(x)))
    # The Admin protocol: a trainable per-feature scale on the skip path of post-LN sub-layers.
    post.residual_scale = nn.Parameter(torch.full((4,), 2.0))
    assert torch.allclose(post(x), post.norm(2.0 * x + branch(x)))
    assert "residual_scale" in post.state_dict()
    post(x).sum().backward()
    assert post.residual_scale.grad is not None


def test_transformer_residual_scale_reaches_forward() -> None:
    model = _transformer("post")
    tokens = torch.randint(0, 20, (1, 6))
    before = model(tokens)
    for sublayer in model.residual_sublayers():
        sublayer.residual_scale = nn.Parameter(torch.full((16,), 3.0))
    assert not torch.allclose(before, model(tokens))
    assert any("residual_scale" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_transformer_is_causal(norm_position: str) -> None:
    model = _transformer(norm_position)
    tokens = torch.randint(0, 20, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 20
    out, out_changed = model(tokens), model(changed)
    assert torch.allclose(out[:, :8], out_changed[:, :8], atol=1e-6)
    assert not torch.allclose(out[:, 8:], out_changed[:, 8:])


def test_transformer_causal_in_training_mode_and_trains() -> None:
    torch.manual_seed(0)
    model = TransformerLanguageModel(vocab_size=12, d_model=16, num_heads=2, num_layers=2, dim_feedforward=32)
    tokens = torch.randint(0, 12, (4, 10))
    logits = model(tokens)
    # The gradient of an early position's logits w.r.t. the embeddings of later tokens is zero.
    embedded = model.token_embedding(tokens).detach().requires_grad_(True)
    positions = model.position_embedding(torch.arange(10))
    x = embedded + positions
    for sublayer in model.residual_sublayers():
        x = sublayer(x)
    # A random projection: the plain sum of a LayerNorm output is constant, with zero gradient.
    (x[:, 3] * torch.randn(16)).sum().backward()
    assert embedded.grad is not None
    assert float(embedded.grad[:, 4:].abs().max()) == 0.0
    assert float(embedded.grad[:, :4].abs().max()) > 0.0
    loss = nn.functional.cross_entropy(logits.reshape(-1, 12), tokens.reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_transformer_validates_arguments() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        TransformerLanguageModel(vocab_size=10, d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="norm_position"):
        TransformerLanguageModel(vocab_size=10, norm_position="middle")  # type: ignore[arg-type]


def test_models_do_not_import_lightning() -> None:
    import ast
    from pathlib import Path

    import litplug.core.models as models

    for path in Path(models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), path


def test_models_build_from_yaml_class_path() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(nn.Module, "model")
    config = """
model:
  class_path: litplug.core.models.MLP
  init_args: {hidden_dims: [32, 16], batch_norm: true}
"""
    model = parser.instantiate_classes(parser.parse_string(config)).model
    assert isinstance(model, MLP) and model(torch.rand(2, 64)).shape == (2, 10)
    config = """
model:
  class_path: litplug.core.models.TransformerLanguageModel
  init_args: {vocab_size: 98, num_layers: 2, norm_position: pre}
"""
    model = parser.instantiate_classes(parser.parse_string(config)).model
    assert isinstance(model, TransformerLanguageModel) and len(model.residual_sublayers()) == 4
