"""Binarised LSTM gates (Li et al., ICML 2018, "Towards Binary-Valued Gates for Robust LSTM Training").

Pure torch, no Lightning. Three parts:

- the Gumbel-sigmoid gate ``sigmoid((a + m * eps) / tau)`` (``eps`` logistic noise, ``m`` a
  Bernoulli(p) mask, both redrawn for every element and time step) and :class:`GumbelGateLSTM`, an
  ``nn.LSTM`` subclass (same constructor, same parameter names) whose input and forget gates use it
  in training and a deterministic sigmoid at evaluation;
- compression of any LSTM's gate weights without retraining: truncated SVD to rank ``r`` and
  rounding to a grid (step ``r``) or to ``k`` bits, on the input and forget rows of both weight
  matrices, returning a compressed copy;
- gate statistics: the fraction of gate values below 0.1 or above 0.9 (saturation) and histograms,
  collected from any model with ``nn.LSTM`` layers.

``nn.LSTM`` stacks its gate blocks in the order input, forget, cell (g), output: rows ``[0, H)``
are the input gate, ``[H, 2H)`` the forget gate (the authors' code uses f, i, o, g).

Speed: the recurrence runs in a custom autograd function with a hand-written backward through time
whose per-step loops are TorchScript functions; the weight gradient of the recurrent matrix is one
matrix product after the loop. On CPU this is about 1.5-2x ``nn.LSTM`` forward + backward, where a
Python time-step loop through autograd is 3.7-5x (see ``benchmarks/binary_gates``).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GATE_NAMES",
    "NOISY_GATES",
    "GateStatistics",
    "GumbelGateLSTM",
    "collect_gate_values",
    "compress_gates_low_precision",
    "compress_gates_low_rank",
    "gate_histogram",
    "gate_rows",
    "gumbel_sigmoid",
    "lstm_gate_parameters",
    "logistic_noise",
    "low_rank_approximation",
    "masked_logistic_noise",
    "quantize_to_bits",
    "round_to_grid",
    "saturation_fraction",
]

#: nn.LSTM's gate blocks, in the order their rows are stacked in ``weight_ih`` / ``weight_hh``.
GATE_NAMES: tuple[str, ...] = ("input", "forget", "cell", "output")
#: Gates that can be binarised (the paper binarises both).
NOISY_GATES: tuple[str, ...] = ("input", "forget")
#: Uniform samples are clamped to [eps, 1 - eps] so the logistic noise stays finite.
NOISE_EPS = 1e-6

Implementation = Literal["fused", "autograd"]


# ---------------------------------------------------------------------------------------------------
# Validation helpers (plain ValueErrors: the plugin re-raises them with its own name)
# ---------------------------------------------------------------------------------------------------


def _check_p(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"p (noise mask probability) must be in [0, 1], got {p!r}")


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and tau > 0.0 and math.isfinite(tau)):
        raise ValueError(f"tau (temperature) must be a finite number > 0, got {tau!r}")


def _check_gates(gates: Sequence[str], allowed: Sequence[str] = NOISY_GATES) -> tuple[str, ...]:
    if isinstance(gates, str):
        gates = (gates,)
    unknown = [g for g in gates if g not in allowed]
    if unknown or len(set(gates)) != len(gates):
        raise ValueError(f"gates must be distinct names from {tuple(allowed)}, got {tuple(gates)!r}")
    return tuple(gates)


def gate_rows(gate: str, hidden_size: int) -> slice:
    """Rows of ``weight_ih`` / ``weight_hh`` / biases that belong to ``gate`` (nn.LSTM order i, f, g, o)."""
    if gate not in GATE_NAMES:
        raise ValueError(f"gate must be one of {GATE_NAMES}, got {gate!r}")
    index = GATE_NAMES.index(gate)
    return slice(index * hidden_size, (index + 1) * hidden_size)


# ---------------------------------------------------------------------------------------------------
# The Gumbel-sigmoid gate
# ---------------------------------------------------------------------------------------------------


def logistic_noise(shape: Sequence[int], *, device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    """``log U - log(1 - U)`` with ``U ~ Uniform(0, 1)`` clamped to ``[1e-6, 1 - 1e-6]`` (global RNG)."""
    uniform = torch.rand(tuple(shape), device=device, dtype=dtype).clamp_(NOISE_EPS, 1.0 - NOISE_EPS)
    return uniform.log() - torch.log1p(-uniform)


def masked_logistic_noise(
    shape: Sequence[int], p: float, *, device: Any = None, dtype: torch.dtype | None = None
) -> Tensor | None:
    """``m * eps``: logistic noise kept where a Bernoulli(``p``) mask is 1; ``None`` when ``p == 0``.

    Draws from the global torch RNG (uniforms for the noise, then uniforms for the mask unless
    ``p == 1``), so a resumed run that restores the RNG draws the same noise.
    """
    _check_p(p)
    if p == 0.0:
        return None
    noise = logistic_noise(shape, device=device, dtype=dtype)
    if p < 1.0:
        noise = noise * (torch.rand(tuple(shape), device=device, dtype=dtype) < p).to(noise.dtype)
    return noise


def gumbel_sigmoid(logits: Tensor, p: float = 0.2, tau: float = 1.0, training: bool = True) -> Tensor:
    """The G2-LSTM gate: ``sigmoid((logits + m * eps) / tau)`` in training, ``sigmoid(logits / tau)`` at eval.

    ``eps`` is logistic noise and ``m ~ Bernoulli(p)`` per element. As ``tau -> 0`` the eval gate
    tends to the step function ``1[logits > 0]``.
    """
    _check_p(p)
    _check_tau(tau)
    noise = (
        masked_logistic_noise(logits.shape, p, device=logits.device, dtype=logits.dtype) if training else None
    )
    return torch.sigmoid((logits if noise is None else logits + noise) / tau)


# ---------------------------------------------------------------------------------------------------
# The recurrence: per-step loops (TorchScript when available) and a hand-written backward
# ---------------------------------------------------------------------------------------------------


def _forward_loop(
    xw: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, noise: Tensor, has_noise: bool, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs the LSTM over time. ``xw`` [T, B, 4H] holds the input projection plus both biases.

    ``noise`` [T, B, 2H] is added to the input/forget pre-activations, then every pre-activation is
    multiplied by ``scale`` [4H] (1/tau for binarised gates, 2 for the cell block, else 1) before
    one sigmoid over all gates; the cell candidate is ``tanh(z) = 2 * sigmoid(2z) - 1``.
    Returns hidden states [T, B, H], cell states [T, B, H] and sigmoid activations [T, B, 4H].
    """
    hidden = h0.size(1)
    w_t = w_hh.t()
    h = h0
    c = c0
    hs: list[Tensor] = []
    cs: list[Tensor] = []
    acts: list[Tensor] = []
    for t in range(xw.size(0)):
        pre = torch.addmm(xw[t], h, w_t)
        if has_noise:
            pre[:, : 2 * hidden] += noise[t]
        a = torch.sigmoid(pre * scale)
        g = a[:, 2 * hidden : 3 * hidden] * 2.0 - 1.0
        c = torch.addcmul(a[:, hidden : 2 * hidden] * c, a[:, :hidden], g)
        h = a[:, 3 * hidden :] * torch.tanh(c)
        hs.append(h)
        cs.append(c)
        acts.append(a)
    return torch.stack(hs), torch.stack(cs), torch.stack(acts)


def _backward_loop(
    d_out: Tensor,
    d_c_last: Tensor,
    hs: Tensor,
    cs: Tensor,
    acts: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    scale: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backpropagation through time for :func:`_forward_loop`.

    Every factor that does not depend on the incoming gradient is computed for all steps at once
    before the loop; the loop itself is five small element-wise ops and one matrix product.
    Returns the gradients of the pre-activations (= of ``xw``) [T, B, 4H], of h0, of c0 and of
    ``w_hh``.
    """
    steps = acts.size(0)
    batch = acts.size(1)
    hidden = h0.size(1)
    i = acts[:, :, :hidden]
    f = acts[:, :, hidden : 2 * hidden]
    g = acts[:, :, 2 * hidden : 3 * hidden] * 2.0 - 1.0
    o = acts[:, :, 3 * hidden :]
    tanh_c = torch.tanh(cs)
    c_prev = torch.cat([c0.unsqueeze(0), cs[:-1]], 0)
    h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]], 0)
    dc_from_h = o * (1.0 - tanh_c * tanh_c)
    dpre_o_from_h = tanh_c * o * (1.0 - o) * scale[3 * hidden :]
    dpre_ifg_from_c = torch.cat(
        [
            g * i * (1.0 - i) * scale[:hidden],
            c_prev * f * (1.0 - f) * scale[hidden : 2 * hidden],
            i * (1.0 - g * g),
        ],
        -1,
    ).view(steps, batch, 3, hidden)
    d_pre = torch.empty_like(acts)
    dh = torch.zeros_like(h0)
    dc = d_c_last
    for t in range(steps - 1, -1, -1):
        dh = dh + d_out[t]
        dc = torch.addcmul(dc, dh, dc_from_h[t])
        d_pre_t = d_pre[t]
        torch.mul(dpre_ifg_from_c[t], dc.unsqueeze(1), out=d_pre_t[:, : 3 * hidden].view(batch, 3, hidden))
        torch.mul(dh, dpre_o_from_h[t], out=d_pre_t[:, 3 * hidden :])
        dc = dc * f[t]
        dh = torch.mm(d_pre_t, w_hh)
    d_w_hh = torch.mm(d_pre.view(steps * batch, 4 * hidden).t(), h_prev.reshape(steps * batch, hidden))
    return d_pre, dh, dc, d_w_hh


def _script(fn: Callable[..., Any]) -> Callable[..., Any]:
    """TorchScript ``fn`` (removes Python overhead per op); fall back to Python if scripting fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 - any scripting failure: the Python function is equivalent
        return fn


_FORWARD_LOOP = _script(_forward_loop)
_BACKWARD_LOOP = _script(_backward_loop)


class _FusedLSTMLayer(torch.autograd.Function):
    """One LSTM layer and direction with a hand-written backward (no autograd graph per step)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        xw: Tensor,
        h0: Tensor,
        c0: Tensor,
        w_hh: Tensor,
        noise: Tensor,
        has_noise: bool,
        scale: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        hs, cs, acts = _FORWARD_LOOP(xw, h0, c0, w_hh, noise, has_noise, scale)
        ctx.save_for_backward(hs, cs, acts, h0, c0, w_hh, scale)
        ctx.mark_non_differentiable(acts)
        return hs, cs[-1], acts

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, d_hs: Tensor | None, d_c_last: Tensor | None, _d_acts: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hs, cs, acts, h0, c0, w_hh, scale = ctx.saved_tensors
        d_hs = torch.zeros_like(hs) if d_hs is None else d_hs.contiguous()
        d_c_last = torch.zeros_like(c0) if d_c_last is None else d_c_last.contiguous()
        d_pre, d_h0, d_c0, d_w_hh = _BACKWARD_LOOP(d_hs, d_c_last, hs, cs, acts, h0, c0, w_hh, scale)
        return d_pre, d_h0, d_c0, d_w_hh, None, None, None


def _autograd_layer(
    xw: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, noise: Tensor | None, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference implementation: a plain Python time-step loop through autograd (slow, obviously right)."""
    hidden = h0.size(1)
    h, c = h0, c0
    hs: list[Tensor] = []
    acts: list[Tensor] = []
    for t in range(xw.size(0)):
        pre = xw[t] + h @ w_hh.t()
        if noise is not None:
            pre = torch.cat([pre[:, : 2 * hidden] + noise[t], pre[:, 2 * hidden :]], 1)
        z = pre * scale
        i = torch.sigmoid(z[:, :hidden])
        f = torch.sigmoid(z[:, hidden : 2 * hidden])
        g = torch.tanh(z[:, 2 * hidden : 3 * hidden] / 2.0)  # scale holds 2 for the cell block
        o = torch.sigmoid(z[:, 3 * hidden :])
        c = f * c + i * g
        h = o * torch.tanh(c)
        hs.append(h)
        acts.append(torch.cat([i, f, (g + 1.0) / 2.0, o], 1).detach())
    return torch.stack(hs), c, torch.stack(acts)


def _gate_scale(hidden: int, tau_input: float, tau_forget: float, like: Tensor) -> Tensor:
    """Per-row multiplier of the pre-activations: 1/tau (i), 1/tau (f), 2 (g, see the tanh identity), 1 (o)."""
    return torch.cat(
        [
            like.new_full((hidden,), 1.0 / tau_input),
            like.new_full((hidden,), 1.0 / tau_forget),
            like.new_full((hidden,), 2.0),
            like.new_ones(hidden),
        ]
    )


def _gate_noise(
    steps: int, batch: int, hidden: int, p: float, gates: tuple[str, ...], like: Tensor
) -> Tensor | None:
    """Masked logistic noise [T, B, 2H] for the input/forget blocks (zero for unselected gates)."""
    if p == 0.0 or not gates:
        return None
    if len(gates) == 2:
        return masked_logistic_noise((steps, batch, 2 * hidden), p, device=like.device, dtype=like.dtype)
    block = masked_logistic_noise((steps, batch, hidden), p, device=like.device, dtype=like.dtype)
    assert block is not None
    zeros = torch.zeros_like(block)
    return torch.cat([block, zeros] if gates == ("input",) else [zeros, block], -1)


# ---------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GateConfig:
    """How the input/forget gates behave in one forward call."""

    p: float = 0.0
    tau: float = 1.0
    gates: tuple[str, ...] = NOISY_GATES
    tau_at_eval: bool = True


def _lstm_forward(
    lstm: nn.LSTM,
    input: Tensor,
    hx: tuple[Tensor, Tensor] | None,
    config: _GateConfig,
    training: bool,
    implementation: Implementation,
    record: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, dict[str, Tensor]]]:
    """Forward of any ``nn.LSTM`` (its parameters) with Gumbel input/forget gates per ``config``.

    Noise only when ``training``; the temperature applies to the selected gates in training and,
    with ``tau_at_eval``, at evaluation too. Returns nn.LSTM's ``(output, (h_n, c_n))`` and, when
    ``record``, the detached input/forget gate values per layer/direction (``[B, T, H]`` each).
    """
    if isinstance(input, nn.utils.rnn.PackedSequence):
        raise TypeError("GumbelGateLSTM does not support PackedSequence inputs; pad the sequences instead")
    if lstm.proj_size:
        raise ValueError("GumbelGateLSTM does not support nn.LSTM(proj_size > 0)")
    unbatched = input.dim() == 2
    if input.dim() not in (2, 3):
        raise ValueError(f"LSTM input must be [T, F], [B, T, F] or [T, B, F], got shape {tuple(input.shape)}")
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if lstm.batch_first else input)
    steps, batch = x.size(0), x.size(1)
    hidden = lstm.hidden_size
    directions = 2 if lstm.bidirectional else 1
    if hx is None:
        zeros = x.new_zeros(lstm.num_layers * directions, batch, hidden)
        h0_all, c0_all = zeros, zeros
    else:
        h0_all, c0_all = (s.unsqueeze(1) for s in hx) if unbatched else hx
    use_tau = training or config.tau_at_eval
    tau_i = config.tau if (use_tau and "input" in config.gates) else 1.0
    tau_f = config.tau if (use_tau and "forget" in config.gates) else 1.0
    scale = _gate_scale(hidden, tau_i, tau_f, x)
    gate_values: dict[str, dict[str, Tensor]] = {}
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    layer_input = x
    for layer in range(lstm.num_layers):
        outputs: list[Tensor] = []
        for direction in range(directions):
            suffix = f"l{layer}" + ("_reverse" if direction else "")
            w_ih = getattr(lstm, f"weight_ih_{suffix}")
            w_hh = getattr(lstm, f"weight_hh_{suffix}")
            bias = (
                getattr(lstm, f"bias_ih_{suffix}") + getattr(lstm, f"bias_hh_{suffix}") if lstm.bias else None
            )
            seq = layer_input.flip(0) if direction else layer_input
            xw = F.linear(seq, w_ih, bias)
            noise = _gate_noise(steps, batch, hidden, config.p, config.gates, x) if training else None
            index = layer * directions + direction
            h0, c0 = h0_all[index], c0_all[index]
            if implementation == "fused":
                empty = noise if noise is not None else x.new_empty(0)
                hs, c_last, acts = _FusedLSTMLayer.apply(xw, h0, c0, w_hh, empty, noise is not None, scale)
            else:
                hs, c_last, acts = _autograd_layer(xw, h0, c0, w_hh, noise, scale)
            h_n.append(hs[-1])
            c_n.append(c_last)
            outputs.append(hs.flip(0) if direction else hs)
            if record:
                acts = acts.flip(0) if direction else acts
                gate_values[suffix] = {
                    gate: acts[:, :, gate_rows(gate, hidden)].transpose(0, 1).detach() for gate in NOISY_GATES
                }
        layer_output = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        last_layer = layer == lstm.num_layers - 1
        if lstm.dropout and training and not last_layer:
            layer_output = F.dropout(layer_output, lstm.dropout, training=True)
        layer_input = layer_output
    output = layer_input
    h_stack, c_stack = torch.stack(h_n), torch.stack(c_n)
    if unbatched:
        return output.squeeze(1), (h_stack.squeeze(1), c_stack.squeeze(1)), gate_values
    if lstm.batch_first:
        output = output.transpose(0, 1)
    return output, (h_stack, c_stack), gate_values


class GumbelGateLSTM(nn.LSTM):
    """``nn.LSTM`` whose input and forget gates are Gumbel-sigmoid in training (G2-LSTM).

    Training: ``gate = sigmoid((a + m * eps) / tau)`` for the gates in ``gates`` (``eps`` logistic
    noise, ``m ~ Bernoulli(p)``, fresh per element and time step, global torch RNG); the cell and
    output gates are plain. Evaluation: no noise; ``sigmoid(a / tau)`` when ``tau_at_eval`` (the
    default: the noise-free version of the trained function), ``sigmoid(a)`` otherwise (what the
    authors' code does). With ``tau = 1`` both are nn.LSTM's gates exactly.

    Same constructor, parameter names and shapes as ``nn.LSTM`` (``proj_size`` unsupported;
    ``PackedSequence`` inputs unsupported), so state dicts are interchangeable.

    Args:
        *args, **kwargs: nn.LSTM's arguments.
        p: probability that an element of a binarised gate gets noise (paper: 0.2).
        tau: temperature of the binarised gates (> 0).
        gates: which gates to binarise, a subset of ``("input", "forget")``.
        tau_at_eval: divide by ``tau`` at evaluation as well.
        implementation: ``"fused"`` (hand-written backward, fast) or ``"autograd"`` (reference loop).
    """

    def __init__(
        self,
        *args: Any,
        p: float = 0.2,
        tau: float = 1.0,
        gates: Sequence[str] = NOISY_GATES,
        tau_at_eval: bool = True,
        implementation: Implementation = "fused",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.proj_size:
            raise ValueError("GumbelGateLSTM does not support proj_size > 0")
        _check_p(p)
        _check_tau(tau)
        if implementation not in ("fused", "autograd"):
            raise ValueError(f"implementation must be 'fused' or 'autograd', got {implementation!r}")
        self.p = float(p)
        self.tau = float(tau)
        self.gates = _check_gates(gates)
        self.tau_at_eval = bool(tau_at_eval)
        self.implementation: Implementation = implementation
        #: When True, every forward stores the input/forget gate values in ``last_gate_values``.
        self.record_gates = False
        self.last_gate_values: dict[str, dict[str, Tensor]] = {}

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, **gate_kwargs: Any) -> GumbelGateLSTM:
        """A GumbelGateLSTM with ``lstm``'s configuration and a copy of its parameters (same names).

        The copy's eval output equals ``lstm``'s when ``tau == 1`` or ``tau_at_eval=False`` (any ``p``);
        in training mode with ``p == 0`` it equals ``lstm``'s when ``tau == 1`` (see README).
        """
        if lstm.proj_size:
            raise ValueError("GumbelGateLSTM cannot replace an nn.LSTM with proj_size > 0")
        weight = lstm.weight_ih_l0
        new = cls(
            lstm.input_size,
            lstm.hidden_size,
            num_layers=lstm.num_layers,
            bias=lstm.bias,
            batch_first=lstm.batch_first,
            dropout=float(lstm.dropout),
            bidirectional=lstm.bidirectional,
            device=weight.device,
            dtype=weight.dtype,
            **gate_kwargs,
        )
        new.load_state_dict(lstm.state_dict())
        new.train(lstm.training)
        return new

    def forward(  # type: ignore[override]
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        config = _GateConfig(self.p, self.tau, self.gates, self.tau_at_eval)
        # A captured graph (torch.export, compile) cannot store tensors on the module as a side effect.
        record = self.record_gates and not torch.compiler.is_compiling()
        output, state, gate_values = _lstm_forward(
            self, input, hx, config, self.training, self.implementation, record
        )
        if record:
            self.last_gate_values = gate_values
        return output, state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, tau={self.tau}, gates={self.gates}, tau_at_eval={self.tau_at_eval}"


# ---------------------------------------------------------------------------------------------------
# Compression of the gate weights (any nn.LSTM, GumbelGateLSTM included)
# ---------------------------------------------------------------------------------------------------


def lstm_gate_parameters(model: nn.Module) -> Iterator[tuple[str, nn.LSTM, str]]:
    """``(module name, lstm, parameter name)`` for every ``weight_ih_*`` / ``weight_hh_*`` of every nn.LSTM."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LSTM):
            for param_name, _ in module.named_parameters(recurse=False):
                if param_name.startswith(("weight_ih_", "weight_hh_")):
                    yield module_name, module, param_name


def low_rank_approximation(matrix: Tensor, rank: int) -> Tensor:
    """Best rank-``rank`` approximation (truncated SVD); the matrix itself when ``rank >= min(shape)``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if rank >= min(matrix.shape):
        return matrix.clone()
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(matrix.dtype)


def round_to_grid(tensor: Tensor, step: float) -> Tensor:
    """``round(w / step) * step`` (the paper's low-precision test, e.g. step 0.5 or 1.0)."""
    if not (isinstance(step, (int, float)) and step > 0.0 and math.isfinite(step)):
        raise ValueError(f"step must be a finite number > 0, got {step!r}")
    return torch.round(tensor / step) * step


def quantize_to_bits(tensor: Tensor, bits: int) -> Tensor:
    """Uniform ``2**bits``-level quantisation over ``[min, max]`` of ``tensor``.

    ``bits`` at or above the dtype's width (32 for float32) is full precision: the tensor unchanged.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
        raise ValueError(f"bits must be an integer >= 1, got {bits!r}")
    if bits >= torch.finfo(tensor.dtype).bits:
        return tensor.clone()
    low, high = tensor.min(), tensor.max()
    levels = 2**bits - 1
    step = (high - low) / levels
    if step == 0:
        return tensor.clone()
    return low + torch.round((tensor - low) / step) * step


def _compress_gates(
    model: nn.Module, transform: Callable[[Tensor], Tensor], gates: Sequence[str]
) -> nn.Module:
    """A deep copy of ``model`` with ``transform`` applied to each selected gate block of each weight."""
    selected = _check_gates(gates, GATE_NAMES)
    compressed = copy.deepcopy(model)
    found = False
    with torch.no_grad():
        for _, lstm, param_name in lstm_gate_parameters(compressed):
            found = True
            weight = getattr(lstm, param_name)
            for gate in selected:
                rows = gate_rows(gate, lstm.hidden_size)
                weight[rows] = transform(weight[rows])
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.LSTM layer to compress")
    return compressed


def compress_gates_low_rank(model: nn.Module, rank: int, gates: Sequence[str] = NOISY_GATES) -> nn.Module:
    """Copy of ``model`` whose LSTM gate blocks (``gates`` rows of ``weight_ih`` and ``weight_hh``,
    every layer and direction) are replaced by their rank-``rank`` truncated SVD. Biases untouched;
    ``rank >= min(block shape)`` leaves a block exactly unchanged."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    return _compress_gates(model, lambda w: low_rank_approximation(w, rank), gates)


def compress_gates_low_precision(
    model: nn.Module,
    *,
    step: float | None = None,
    bits: int | None = None,
    gates: Sequence[str] = NOISY_GATES,
) -> nn.Module:
    """Copy of ``model`` whose LSTM gate blocks are rounded: to multiples of ``step`` (the paper's
    ``round(w / r) * r``) or to ``2**bits`` uniform levels per block. Give exactly one of the two."""
    if (step is None) == (bits is None):
        raise ValueError("give exactly one of step (grid spacing) and bits")
    if step is not None:
        round_to_grid(torch.zeros(1), step)  # validate before copying
        return _compress_gates(model, lambda w: round_to_grid(w, step), gates)
    assert bits is not None
    quantize_to_bits(torch.zeros(1), bits)
    return _compress_gates(model, lambda w: quantize_to_bits(w, bits), gates)


# ---------------------------------------------------------------------------------------------------
# Gate statistics
# ---------------------------------------------------------------------------------------------------


def saturation_fraction(values: Tensor, low: float = 0.1, high: float = 0.9) -> float:
    """Fraction of gate values ``< low`` or ``> high`` (the paper's measure of binarisation)."""
    if values.numel() == 0:
        raise ValueError("saturation_fraction of an empty tensor")
    return float(((values < low) | (values > high)).double().mean())


def gate_histogram(values: Tensor, bins: int = 20) -> Tensor:
    """Counts of gate values in ``bins`` equal bins over [0, 1] (int64)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return torch.histc(values.detach().double().flatten(), bins=bins, min=0.0, max=1.0).long()


@dataclass
class GateStatistics:
    """Running counts of gate values per gate: saturation and histogram over many batches."""

    low: float = 0.1
    high: float = 0.9
    bins: int = 20
    totals: dict[str, int] = field(default_factory=dict)
    below: dict[str, int] = field(default_factory=dict)
    above: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)

    def update(self, gate: str, values: Tensor) -> None:
        values = values.detach()
        self.totals[gate] = self.totals.get(gate, 0) + values.numel()
        self.below[gate] = self.below.get(gate, 0) + int((values < self.low).sum())
        self.above[gate] = self.above.get(gate, 0) + int((values > self.high).sum())
        hist = gate_histogram(values, self.bins).cpu()
        self.histograms[gate] = self.histograms[gate] + hist if gate in self.histograms else hist

    def update_from(self, gate_values: dict[str, dict[str, Tensor]]) -> None:
        """Add the values of a ``{layer: {gate: values}}`` mapping (as recorded by GumbelGateLSTM)."""
        for per_gate in gate_values.values():
            for gate, values in per_gate.items():
                self.update(gate, values)

    @property
    def empty(self) -> bool:
        return not self.totals

    def summary(self) -> dict[str, float]:
        """``saturation`` overall and ``saturation_<gate>``, ``low_<gate>``, ``high_<gate>`` per gate."""
        if self.empty:
            return {}
        total = sum(self.totals.values())
        result = {"saturation": (sum(self.below.values()) + sum(self.above.values())) / total}
        for gate, count in self.totals.items():
            result[f"saturation_{gate}"] = (self.below[gate] + self.above[gate]) / count
            result[f"low_{gate}"] = self.below[gate] / count
            result[f"high_{gate}"] = self.above[gate] / count
        return result


def collect_gate_values(
    model: nn.Module, inputs: Any, forward: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, dict[str, Tensor]]:
    """Input and forget gate values of every nn.LSTM in ``model`` on ``inputs`` (eval-mode gates).

    Works on plain ``nn.LSTM`` layers and on :class:`GumbelGateLSTM` (its eval gate, so its ``tau``
    when ``tau_at_eval``). Runs ``forward(model, inputs)`` (default ``model(inputs)``) under
    ``torch.no_grad`` with forward hooks that recompute each LSTM's gates from its input; the
    model's training/eval mode is not changed, but no noise is used for the recomputation.
    Returns ``{"<module name>.l<k>[_reverse]": {"input": [B, T, H], "forget": [B, T, H]}}``.
    """
    found: dict[str, dict[str, Tensor]] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.LSTM, args: tuple[Any, ...], _output: Any) -> None:
            hx = args[1] if len(args) > 1 else None
            if isinstance(module, GumbelGateLSTM):
                config = _GateConfig(0.0, module.tau, module.gates, module.tau_at_eval)
            else:
                config = _GateConfig()
            _, _, values = _lstm_forward(module, args[0], hx, config, False, "fused", True)
            for layer_key, per_gate in values.items():
                found[f"{name}.{layer_key}" if name else layer_key] = per_gate

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.LSTM):
            handles.append(module.register_forward_hook(hook_for(name)))
    if not handles:
        raise ValueError(f"{type(model).__name__} has no nn.LSTM layer")
    try:
        with torch.no_grad():
            (forward or (lambda m, x: m(x)))(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found
