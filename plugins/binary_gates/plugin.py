"""``BinaryGatesPlugin``: replace every nn.LSTM by a :class:`GumbelGateLSTM` and log gate saturation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from lightning.pytorch import LightningModule
from torch import nn

from litplug.core.errors import PluginSetupError
from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin

from .functional import NOISY_GATES, GateStatistics, GumbelGateLSTM

__all__ = ["BinaryGatesPlugin", "gate_histogram_image", "replace_lstms"]


def _is_plain_lstm(module: nn.Module) -> bool:
    return isinstance(module, nn.LSTM) and not isinstance(module, GumbelGateLSTM)


def replace_lstms(model: nn.Module, **gate_kwargs: Any) -> nn.Module:
    """Replace every nn.LSTM in ``model`` by ``GumbelGateLSTM.from_lstm(lstm, **gate_kwargs)``, in place.

    Parameters are copied under the same names; an LSTM reachable under several names is replaced
    by one shared copy; existing GumbelGateLSTMs are left alone (idempotent). Returns ``model``, or
    the replacement when ``model`` itself is an nn.LSTM.
    """
    if _is_plain_lstm(model):
        return GumbelGateLSTM.from_lstm(model, **gate_kwargs)  # type: ignore[arg-type]
    replacements: dict[int, GumbelGateLSTM] = {}
    # Collect first: replacing while iterating named_modules would mutate what is iterated.
    targets = [
        (name, m) for name, m in model.named_modules(remove_duplicate=False) if name and _is_plain_lstm(m)
    ]
    for name, lstm in targets:
        if id(lstm) not in replacements:
            replacements[id(lstm)] = GumbelGateLSTM.from_lstm(lstm, **gate_kwargs)  # type: ignore[arg-type]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacements[id(lstm)])
    return model


def gate_histogram_image(histograms: dict[str, torch.Tensor], title: str = "") -> Any:
    """An RGB ``uint8`` numpy image [H, W, 3] of the gate-value histograms (matplotlib, Agg backend)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * max(len(histograms), 1), 2.6), dpi=80)
    for index, (gate, counts) in enumerate(histograms.items()):
        axis = figure.add_subplot(1, max(len(histograms), 1), index + 1)
        fractions = counts.double() / max(int(counts.sum()), 1)
        edges = torch.linspace(0.0, 1.0, len(counts) + 1)
        axis.bar(edges[:-1].numpy(), fractions.numpy(), width=1.0 / len(counts), align="edge")
        axis.set_title(f"{title} {gate} gate".strip(), fontsize=9)
        axis.set_xlim(0.0, 1.0)
        axis.set_xlabel("gate value", fontsize=8)
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)  # explicit Agg canvas: no GUI backend, no global pyplot state
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class BinaryGatesPlugin(Plugin):
    """Binarised LSTM gates (G2-LSTM, Li et al. 2018): Gumbel-sigmoid input/forget gates in training.

    Every ``nn.LSTM`` of the model becomes a :class:`GumbelGateLSTM` with the same parameters (same
    names and shapes, so checkpoints and optimizers are unaffected). In training the selected gates
    are ``sigmoid((a + m * eps) / tau)`` with logistic noise ``eps`` on a Bernoulli(``p``) mask of
    elements, redrawn every time step from the global torch RNG (so a resumed run draws the same
    noise); at evaluation there is no noise. Validation/test log the fraction of input/forget gate
    values below 0.1 or above 0.9 (``<stage>/gate_saturation*``) and, when a logger can show
    images (W&B, TensorBoard), a histogram image.

    Args:
        p: probability that a gate element gets noise (paper: 0.2; 1.0 saturates more).
        tau: temperature of the binarised gates (> 0; 1.0 keeps nn.LSTM's eval function exactly).
        gates: which gates to binarise: a non-empty subset of ``["input", "forget"]``.
        tau_at_eval: also divide by ``tau`` at evaluation (``False``: plain sigmoid at eval, as the
            authors' code does). Irrelevant when ``tau == 1``.
        log_gate_statistics: record gate values at validation/test and log saturation.
        histogram_bins: bins of the gate-value histograms over [0, 1].
    """

    name = "binary_gates"
    stochastic_training = True  # random noise / starts / shuffles while training (see core/plugin.py)
    requires = ("lstm",)

    def __init__(
        self,
        p: float = 0.2,
        tau: float = 1.0,
        gates: Sequence[str] = NOISY_GATES,
        tau_at_eval: bool = True,
        log_gate_statistics: bool = True,
        histogram_bins: int = 20,
    ) -> None:
        self.check(
            isinstance(p, (int, float)) and not isinstance(p, bool), "p", f"must be a number, got {p!r}"
        )
        self.check_range("p", p, low=0.0, high=1.0)
        self.check(
            isinstance(tau, (int, float)) and not isinstance(tau, bool),
            "tau",
            f"must be a number, got {tau!r}",
        )
        self.check_range("tau", tau, low=0.0, low_inclusive=False)
        gates = (gates,) if isinstance(gates, str) else tuple(gates)
        self.check(len(gates) > 0, "gates", "must name at least one of 'input', 'forget'")
        for gate in gates:
            self.check_choice("gates", gate, NOISY_GATES)
        self.check(len(set(gates)) == len(gates), "gates", f"must not repeat a gate, got {list(gates)!r}")
        self.check(
            isinstance(histogram_bins, int) and histogram_bins >= 1,
            "histogram_bins",
            f"must be an integer >= 1, got {histogram_bins!r}",
        )
        self.p = float(p)
        self.tau = float(tau)
        self.gates = list(gates)
        self.tau_at_eval = bool(tau_at_eval)
        self.log_gate_statistics = bool(log_gate_statistics)
        self.histogram_bins = histogram_bins
        self._statistics: GateStatistics | None = None
        #: Summary of the last validation/test epoch (``saturation``, ``saturation_input``, ...).
        self.last_gate_statistics: dict[str, float] = {}
        #: Histogram counts per gate of the last validation/test epoch.
        self.last_gate_histograms: dict[str, torch.Tensor] = {}

    # -- hooks ------------------------------------------------------------------------------------

    @hookimpl
    def litplug_check_setup(self, module: LightningModule) -> None:
        """Reject LSTMs the replacement cannot reproduce (projections) before any surgery."""
        model = cast(nn.Module, module.model)  # LitplugModule.model (mypy sees Tensor | Module)
        for name, layer in model.named_modules():
            if _is_plain_lstm(layer) and layer.proj_size:
                raise PluginSetupError(
                    f"plugin '{self.name}' cannot replace LSTM '{name or type(model).__name__}': "
                    f"proj_size={layer.proj_size} is not supported (use proj_size=0)"
                )

    @hookimpl
    def litplug_configure_model(self, model: nn.Module) -> nn.Module:
        return replace_lstms(
            model, p=self.p, tau=self.tau, gates=tuple(self.gates), tau_at_eval=self.tau_at_eval
        )

    @hookimpl
    def litplug_on_eval_start(self, module: LightningModule) -> None:
        if not self.log_gate_statistics:
            return
        self._statistics = GateStatistics(bins=self.histogram_bins)
        for layer in self._gate_layers(module):
            layer.record_gates = True
            layer.last_gate_values = {}

    @hookimpl
    def litplug_eval_step(self, module: LightningModule) -> None:
        if self._statistics is None:
            return
        for layer in self._gate_layers(module):
            self._statistics.update_from(layer.last_gate_values)
            layer.last_gate_values = {}

    @hookimpl
    def litplug_on_eval_end(self, module: LightningModule, stage: str) -> dict[str, float] | None:
        statistics = self._stop_recording(module)
        if statistics is None or statistics.empty:
            return None
        self.last_gate_statistics = statistics.summary()
        self.last_gate_histograms = dict(statistics.histograms)
        self._log_histogram_image(module, stage)
        return {f"gate_{name}": value for name, value in self.last_gate_statistics.items()}

    @hookimpl
    def litplug_on_eval_interrupted(self, module: LightningModule) -> None:
        self._stop_recording(module)  # the partial statistics are dropped

    def _stop_recording(self, module: LightningModule) -> GateStatistics | None:
        """Turn gate recording off; the statistics collected, ``None`` if none were being collected."""
        if self._statistics is None:
            return None
        for layer in self._gate_layers(module):
            layer.record_gates = False
            layer.last_gate_values = {}
        statistics, self._statistics = self._statistics, None
        return statistics

    # -- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _gate_layers(module: LightningModule) -> list[GumbelGateLSTM]:
        model = cast(nn.Module, module.model)  # LitplugModule.model (mypy sees Tensor | Module)
        return [m for m in model.modules() if isinstance(m, GumbelGateLSTM)]

    def _log_histogram_image(self, module: LightningModule, stage: str) -> None:
        """Send the histogram image to every logger that takes images (rank zero only)."""
        if module.global_rank != 0 or getattr(module, "_trainer", None) is None:
            return
        if module.trainer.sanity_checking:
            return
        targets = [logger for logger in module.loggers if _image_sink(logger) is not None]
        if not targets:
            return
        image = gate_histogram_image(self.last_gate_histograms, title=f"{stage} step {module.global_step}")
        for logger in targets:
            sink = _image_sink(logger)
            assert sink is not None
            sink(f"{stage}/gate_histogram", image, module.global_step)


def _image_sink(logger: Any) -> Any:
    """A ``(key, image, step)`` callable for loggers that can store images, else ``None``."""
    if type(logger).__name__ == "DummyLogger":  # fast_dev_run: answers every attribute, stores nothing
        return None
    log_image = getattr(logger, "log_image", None)
    if callable(log_image):  # WandbLogger, NeptuneLogger
        return lambda key, image, step: log_image(key=key, images=[image], step=step)
    experiment = getattr(logger, "experiment", None) if type(logger).__name__ == "TensorBoardLogger" else None
    if experiment is not None and hasattr(experiment, "add_image"):
        return lambda key, image, step: experiment.add_image(key, image, step, dataformats="HWC")
    return None
