"""Binarised LSTM gates (G2-LSTM): the gate function, GumbelGateLSTM against nn.LSTM, compression,
gate statistics and the plugin."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.loggers import Logger
from torch import nn

from litplug.core.data import DigitsDataModule
from litplug.core.errors import PluginConfigError, PluginSetupError
from litplug.core.models import LSTMClassifier
from litplug.core.module import LitplugModule
from litplug.plugins.binary_gates import (
    BinaryGatesPlugin,
    GateStatistics,
    GumbelGateLSTM,
    collect_gate_values,
    compress_gates_low_precision,
    compress_gates_low_rank,
    gate_histogram,
    gate_rows,
    gumbel_sigmoid,
    logistic_noise,
    low_rank_approximation,
    masked_logistic_noise,
    quantize_to_bits,
    replace_lstms,
    round_to_grid,
    saturation_fraction,
)

LSTM_SHAPES = [
    pytest.param({"batch_first": True}, id="batch_first"),
    pytest.param({"num_layers": 2, "bidirectional": True}, id="2-layer-bidirectional"),
    pytest.param({"num_layers": 2, "batch_first": True, "bias": False}, id="2-layer-no-bias"),
]


def _pair(**kwargs: Any) -> tuple[nn.LSTM, GumbelGateLSTM]:
    """A double-precision nn.LSTM and a GumbelGateLSTM copy of it (extra kwargs: gate settings)."""
    lstm_kwargs = {
        k: v for k, v in kwargs.items() if k not in ("p", "tau", "gates", "tau_at_eval", "implementation")
    }
    gate_kwargs = {k: v for k, v in kwargs.items() if k not in lstm_kwargs}
    torch.manual_seed(0)
    reference = nn.LSTM(5, 7, **lstm_kwargs).double()
    return reference, GumbelGateLSTM.from_lstm(reference, **gate_kwargs)


def _inputs(
    lstm: nn.LSTM, batch: int = 3, steps: int = 6
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    shape = (batch, steps, 5) if lstm.batch_first else (steps, batch, 5)
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    h0 = torch.randn(layers, batch, 7, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(layers, batch, 7, dtype=torch.double, requires_grad=True)
    return x, (h0, c0)


def _outputs_and_grads(
    lstm: nn.LSTM, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor]
) -> list[torch.Tensor]:
    output, (h_n, c_n) = lstm(x, hx)
    loss = output.square().sum() + h_n.sum() + c_n.square().sum()
    grads = torch.autograd.grad(loss, [x, *hx, *lstm.parameters()])
    return [output.detach(), h_n.detach(), c_n.detach(), *grads]


# ---------------------------------------------------------------------------------------------------
# The gate function and its noise
# ---------------------------------------------------------------------------------------------------


def test_logistic_noise_has_the_logistic_moments() -> None:
    torch.manual_seed(0)
    noise = logistic_noise((200_000,), dtype=torch.double)
    assert abs(float(noise.mean())) < 0.02
    assert float(noise.var()) == pytest.approx(math.pi**2 / 3, rel=0.03)  # Var of Logistic(0, 1)
    assert bool(torch.isfinite(noise).all())


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_noise_mask_keeps_a_fraction_p_of_elements(p: float) -> None:
    torch.manual_seed(0)
    noise = masked_logistic_noise((100_000,), p)
    if p == 0.0:
        assert noise is None
    else:
        assert noise is not None
        assert float((noise != 0).double().mean()) == pytest.approx(p, abs=0.01)


def test_gumbel_sigmoid_is_stochastic_in_training_and_deterministic_at_eval() -> None:
    logits = torch.linspace(-3, 3, 1000)
    torch.manual_seed(0)
    first = gumbel_sigmoid(logits, p=0.5, tau=0.5, training=True)
    second = gumbel_sigmoid(logits, p=0.5, tau=0.5, training=True)
    assert not torch.equal(first, second)
    assert torch.equal(gumbel_sigmoid(logits, p=0.5, tau=0.5, training=False), torch.sigmoid(logits / 0.5))
    assert torch.equal(gumbel_sigmoid(logits, p=0.0, tau=0.5, training=True), torch.sigmoid(logits / 0.5))
    # tau -> 0: the deterministic gate is the step function 1[a > 0] (away from a = 0).
    away = logits[logits.abs() > 0.05]
    torch.testing.assert_close(
        gumbel_sigmoid(away, p=0.0, tau=1e-3, training=False), (away > 0).float(), atol=1e-12, rtol=0
    )


# ---------------------------------------------------------------------------------------------------
# GumbelGateLSTM against nn.LSTM
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", LSTM_SHAPES)
def test_copy_with_p0_tau1_equals_nn_lstm_in_training_and_eval(shape: dict[str, Any]) -> None:
    reference, gated = _pair(p=0.0, tau=1.0, **shape)
    x, hx = _inputs(reference)
    expected = _outputs_and_grads(reference, x, hx)
    for mode in (True, False):  # training mode (no noise at p = 0) and eval mode
        gated.train(mode)
        got = _outputs_and_grads(gated, x, hx)
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", LSTM_SHAPES)
def test_eval_output_of_a_copy_with_noise_equals_nn_lstm_at_tau1(shape: dict[str, Any]) -> None:
    reference, gated = _pair(p=0.2, tau=1.0, **shape)
    x, hx = _inputs(reference)
    gated.eval()
    with torch.no_grad():
        torch.testing.assert_close(gated(x, hx)[0], reference(x, hx)[0], atol=1e-5, rtol=1e-5)


def test_eval_at_tau_below_one_is_nn_lstm_with_gate_rows_divided_by_tau() -> None:
    """What holds for tau != 1: tau_at_eval=True gives nn.LSTM with its i/f rows divided by tau
    (sharper gates, a step function as tau -> 0); tau_at_eval=False gives nn.LSTM itself."""
    reference, gated = _pair(p=0.2, tau=0.5, num_layers=2)
    x, hx = _inputs(reference)
    gated.eval()
    sharpened = _pair(num_layers=2)[0]
    with torch.no_grad():
        for param in sharpened.parameters():
            param[: 2 * 7] /= 0.5  # input and forget rows of weights and biases
        torch.testing.assert_close(gated(x, hx)[0], sharpened(x, hx)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(gated(x, hx)[0], reference(x, hx)[0], atol=1e-3)
        gated.tau_at_eval = False
        torch.testing.assert_close(gated(x, hx)[0], reference(x, hx)[0], atol=1e-5, rtol=1e-5)


def test_unbatched_input_matches_nn_lstm() -> None:
    reference, gated = _pair(p=0.2)
    gated.eval()
    x = torch.randn(6, 5, dtype=torch.double)
    with torch.no_grad():
        out_ref, (h_ref, _) = reference(x)
        out, (h, _) = gated(x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(h, h_ref)


def test_state_dict_is_interchangeable_with_nn_lstm() -> None:
    reference, gated = _pair(num_layers=2, bidirectional=True)
    assert list(gated.state_dict()) == list(reference.state_dict())
    fresh = GumbelGateLSTM(5, 7, num_layers=2, bidirectional=True).double()
    fresh.load_state_dict(reference.state_dict())  # strict: same names and shapes
    assert isinstance(fresh, nn.LSTM)


def test_training_is_stochastic_and_eval_deterministic() -> None:
    _, gated = _pair(p=0.2, batch_first=True)
    x, _ = _inputs(gated)
    with torch.no_grad():
        gated.train()
        assert not torch.equal(gated(x)[0], gated(x)[0])
        torch.manual_seed(5)
        first = gated(x)[0]
        torch.manual_seed(5)
        assert torch.equal(gated(x)[0], first)  # the noise comes from the global torch RNG
        gated.eval()
        assert torch.equal(gated(x)[0], gated(x)[0])


@pytest.mark.parametrize("gates", [("input", "forget"), ("forget",)])
def test_fused_backward_equals_the_autograd_loop_with_noise(gates: tuple[str, ...]) -> None:
    _, fused = _pair(p=0.5, tau=0.7, gates=gates, num_layers=2, bidirectional=True)
    reference = GumbelGateLSTM.from_lstm(fused, p=0.5, tau=0.7, gates=gates, implementation="autograd")
    x, hx = _inputs(fused)
    torch.manual_seed(3)
    expected = _outputs_and_grads(reference, x, hx)
    torch.manual_seed(3)
    got = _outputs_and_grads(fused, x, hx)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)


def test_fused_backward_passes_gradcheck() -> None:
    torch.manual_seed(0)
    lstm = GumbelGateLSTM(3, 4, p=0.5, tau=0.5, batch_first=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.double, requires_grad=True)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)  # the same noise at every evaluation
        return lstm(inputs)[0]

    assert torch.autograd.gradcheck(forward, (x,))


def test_noise_reaches_only_the_input_and_forget_rows() -> None:
    """One step from c0 = 0: h = o * tanh(i * g) does not depend on f, and i uses rows [0, H)."""
    reference, _ = _pair()
    x = torch.randn(1, 4, 5, dtype=torch.double)  # one step, batch 4
    with torch.no_grad():
        forget_only = GumbelGateLSTM.from_lstm(reference, p=1.0, gates=("forget",))
        torch.testing.assert_close(forget_only(x)[0], reference(x)[0])  # the noise hit f only
        input_only = GumbelGateLSTM.from_lstm(reference, p=1.0, gates=("input",))
        torch.manual_seed(7)
        got = input_only(x)[0]
        torch.manual_seed(7)
        noise = masked_logistic_noise((1, 4, 7), 1.0, dtype=torch.double)
        assert noise is not None
        pre = x[0] @ reference.weight_ih_l0.t() + reference.bias_ih_l0 + reference.bias_hh_l0
        i = torch.sigmoid(pre[:, gate_rows("input", 7)] + noise[0])
        g = torch.tanh(pre[:, gate_rows("cell", 7)])
        o = torch.sigmoid(pre[:, gate_rows("output", 7)])
        torch.testing.assert_close(got[0], o * torch.tanh(i * g))


def test_packed_sequences_and_projections_are_rejected() -> None:
    with pytest.raises(ValueError, match="proj_size"):
        GumbelGateLSTM(5, 7, proj_size=3)
    with pytest.raises(ValueError, match="proj_size"):
        GumbelGateLSTM.from_lstm(nn.LSTM(5, 7, proj_size=3))
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 5), torch.randn(2, 5)])
    with pytest.raises(TypeError, match="PackedSequence"):
        GumbelGateLSTM(5, 7)(packed)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": -0.1}, "p "),
        ({"p": 1.5}, "p "),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"gates": ("output",)}, "gates"),
        ({"implementation": "cuda"}, "implementation"),
    ],
)
def test_gumbel_gate_lstm_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GumbelGateLSTM(5, 7, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Compression
# ---------------------------------------------------------------------------------------------------


def _classifier() -> LSTMClassifier:
    torch.manual_seed(0)
    return LSTMClassifier(input_size=8, hidden_size=16, num_layers=2)


def test_compression_at_full_rank_or_precision_is_the_identity() -> None:
    model = _classifier()  # gate blocks [16, 8] (first layer's weight_ih) and [16, 16]
    for compressed in (compress_gates_low_rank(model, rank=16), compress_gates_low_precision(model, bits=32)):
        assert compressed is not model
        for name, value in compressed.state_dict().items():
            assert torch.equal(value, model.state_dict()[name]), name


def test_full_rank_on_the_smaller_blocks_only_leaves_them_untouched() -> None:
    model = _classifier()
    compressed = compress_gates_low_rank(model, rank=8)
    assert torch.equal(compressed.lstm.weight_ih_l0, model.lstm.weight_ih_l0)  # [16, 8] blocks: full rank
    assert not torch.equal(compressed.lstm.weight_hh_l0, model.lstm.weight_hh_l0)  # [16, 16] blocks: rank 8


def test_compression_touches_only_the_selected_gate_rows_and_copies_the_model() -> None:
    model = _classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for compressed in (
        compress_gates_low_rank(model, rank=2),
        compress_gates_low_precision(model, step=0.5),
        compress_gates_low_precision(model, bits=1),
    ):
        for name, value in compressed.state_dict().items():
            original = model.state_dict()[name]
            if name.startswith("lstm.weight_"):
                assert torch.equal(value[32:], original[32:]), name  # g and o rows
                assert not torch.equal(value[:16], original[:16]), name  # i rows
                assert not torch.equal(value[16:32], original[16:32]), name  # f rows
            else:
                assert torch.equal(value, original), name  # biases, head
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name}: the original model was modified"


def test_low_rank_and_low_precision_values() -> None:
    torch.manual_seed(0)
    matrix = torch.randn(12, 9, dtype=torch.double)
    approx = low_rank_approximation(matrix, 3)
    assert int(torch.linalg.matrix_rank(approx)) == 3
    u, s, vh = torch.linalg.svd(matrix)
    assert float(torch.linalg.matrix_norm(matrix - approx)) == pytest.approx(
        float(s[3:].square().sum().sqrt())
    )
    assert torch.equal(
        round_to_grid(torch.tensor([0.2, 0.3, -0.8, 1.1]), 0.5), torch.tensor([0.0, 0.5, -1.0, 1.0])
    )
    quantised = quantize_to_bits(matrix, 2)
    assert quantised.unique().numel() <= 4
    assert float(quantised.min()) == pytest.approx(float(matrix.min()))
    assert float(quantised.max()) == pytest.approx(float(matrix.max()))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: compress_gates_low_rank(m, rank=0), "rank"),
        (lambda m: compress_gates_low_rank(m, rank=1.5), "rank"),
        (lambda m: compress_gates_low_precision(m, bits=0), "bits"),
        (lambda m: compress_gates_low_precision(m, step=0.0), "step"),
        (lambda m: compress_gates_low_precision(m), "exactly one"),
        (lambda m: compress_gates_low_precision(m, step=0.5, bits=4), "exactly one"),
        (lambda m: compress_gates_low_rank(m, rank=2, gates=("update",)), "gates"),
        (lambda m: compress_gates_low_rank(nn.Linear(3, 3), rank=2), "no nn.LSTM"),
    ],
)
def test_compression_rejects_bad_arguments(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_classifier())


# ---------------------------------------------------------------------------------------------------
# Gate statistics
# ---------------------------------------------------------------------------------------------------


def test_saturation_and_histogram_on_a_hand_example() -> None:
    values = torch.tensor([0.05, 0.5, 0.95, 0.1, 0.9, 0.0, 1.0, 0.3])
    # strictly below 0.1: 0.05, 0.0; strictly above 0.9: 0.95, 1.0 -> 4 of 8
    assert saturation_fraction(values) == 0.5
    assert gate_histogram(values, bins=4).tolist() == [3, 1, 1, 3]  # [0,.25) [.25,.5) [.5,.75) [.75,1]
    stats = GateStatistics()
    stats.update("input", values)
    stats.update("forget", torch.tensor([0.5, 0.99]))
    summary = stats.summary()
    assert summary["saturation_input"] == 0.5
    assert summary["low_input"] == 0.25 and summary["high_input"] == 0.25
    assert summary["saturation_forget"] == 0.5
    assert summary["saturation"] == 5 / 10


def test_collected_gates_match_a_hand_computed_step_for_any_lstm() -> None:
    torch.manual_seed(0)
    model = LSTMClassifier(input_size=5, hidden_size=7)
    x = torch.randn(4, 1, 5)  # one step from zero state: gates = sigmoid(W_ih x + b)
    pre = x[:, 0] @ model.lstm.weight_ih_l0.t() + model.lstm.bias_ih_l0 + model.lstm.bias_hh_l0
    values = collect_gate_values(model, x)
    assert list(values) == ["lstm.l0"]
    torch.testing.assert_close(values["lstm.l0"]["input"][:, 0], torch.sigmoid(pre[:, :7]))
    torch.testing.assert_close(values["lstm.l0"]["forget"][:, 0], torch.sigmoid(pre[:, 7:14]))
    # A GumbelGateLSTM at tau 0.5 reports its own (sharper) eval gates.
    model.lstm = GumbelGateLSTM.from_lstm(model.lstm, tau=0.5)
    values = collect_gate_values(model, x)
    torch.testing.assert_close(values["lstm.l0"]["input"][:, 0], torch.sigmoid(pre[:, :7] / 0.5))


# ---------------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"p": -0.01}, "p"),
        ({"p": 1.01}, "p"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -2.0}, "tau"),
        ({"gates": []}, "gates"),
        ({"gates": ["input", "output"]}, "gates"),
        ({"gates": ["input", "input"]}, "gates"),
        ({"histogram_bins": 0}, "histogram_bins"),
    ],
)
def test_plugin_rejects_bad_arguments(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(PluginConfigError) as error:
        BinaryGatesPlugin(**kwargs)
    assert error.value.plugin == "binary_gates" and error.value.argument == argument


def test_surgery_copies_weights_keeps_eval_output_and_is_idempotent() -> None:
    model = _classifier()
    x = torch.rand(5, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    names = list(model.state_dict())
    plugin = BinaryGatesPlugin(p=0.2)
    assert plugin.litplug_configure_model(model) is model
    assert isinstance(model.lstm, GumbelGateLSTM) and model.lstm.p == 0.2
    assert list(model.state_dict()) == names
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    replaced = model.lstm
    plugin.litplug_configure_model(model)
    assert model.lstm is replaced  # idempotent


def test_surgery_keeps_shared_lstms_shared_and_replaces_a_bare_lstm() -> None:
    shared = nn.LSTM(3, 4)
    model = nn.ModuleDict({"a": shared, "b": shared})
    replace_lstms(model, p=0.1)
    assert isinstance(model["a"], GumbelGateLSTM) and model["a"] is model["b"]
    assert isinstance(replace_lstms(nn.LSTM(3, 4)), GumbelGateLSTM)


def test_plugin_rejects_projected_lstms_at_setup() -> None:
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 16, proj_size=4, batch_first=True)
            self.head = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0][:, -1])

    module = LitplugModule(Projected(), plugins=[BinaryGatesPlugin()])
    with pytest.raises(PluginSetupError, match="proj_size"):
        quiet_trainer(max_steps=1).fit(module, datamodule=DigitsDataModule(batch_size=64, form="rows"))


class _ImageLogger(Logger):
    """A logger that keeps the images it is given (stands in for W&B)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, Any, int | None]] = []

    @property
    def name(self) -> str:
        return "images"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_image(self, key: str, images: list[Any], step: int | None = None) -> None:
        self.images.append((key, images[0], step))


def test_plugin_logs_the_saturation_it_measures_and_a_histogram_image() -> None:
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64, form="rows")
    plugin = BinaryGatesPlugin(p=0.2)
    module = LitplugModule(LSTMClassifier(input_size=8, hidden_size=16), plugins=[plugin])
    logger = _ImageLogger()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=2, val_check_interval=3, logger=logger)
    trainer.fit(module, datamodule=data)
    logged = trainer.callback_metrics
    for key in ("gate_saturation", "gate_saturation_input", "gate_saturation_forget", "gate_low_forget"):
        assert f"val/{key}" in logged, sorted(logged)
    # The same saturation, measured independently on the same two validation batches.
    stats = GateStatistics()
    module.model.eval()
    for index, (x, _) in enumerate(data.val_dataloader()):
        if index == 2:
            break
        stats.update_from(collect_gate_values(module.model, x))
    assert float(logged["val/gate_saturation"]) == pytest.approx(stats.summary()["saturation"], abs=1e-6)
    assert plugin.last_gate_statistics["saturation"] == pytest.approx(stats.summary()["saturation"], abs=1e-9)
    assert [key for key, _, _ in logger.images] == ["val/gate_histogram"]
    image = logger.images[0][1]
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert not any(m.record_gates for m in module.model.modules() if isinstance(m, GumbelGateLSTM))


def test_noisy_gates_saturate_more_on_a_fixed_seed() -> None:
    """The paper's effect in miniature: p = 1 training pushes input/forget gates toward 0 or 1."""
    saturation: dict[str, float] = {}
    for label, plugins in (("baseline", []), ("g2", [BinaryGatesPlugin(p=1.0, log_gate_statistics=False)])):
        L.seed_everything(0, verbose=False)
        data = DigitsDataModule(batch_size=64, form="rows")
        module = LitplugModule(
            LSTMClassifier(input_size=8, hidden_size=32),
            plugins=plugins,
            optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        )
        quiet_trainer(max_steps=80, limit_val_batches=0).fit(module, datamodule=data)
        stats = GateStatistics()
        module.model.eval()
        for x, _ in data.val_dataloader():
            stats.update_from(collect_gate_values(module.model, x))
        saturation[label] = stats.summary()["saturation"]
    assert saturation["g2"] > saturation["baseline"] + 0.05, saturation
