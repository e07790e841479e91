"""LSTM sequence classifier and character language model."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

__all__ = ["LSTMClassifier", "LSTMLanguageModel", "run_lstm"]


@functools.cache
def _cpu_has_low_precision_lstm(dtype: torch.dtype) -> bool:
    """Whether torch's CPU LSTM (oneDNN) runs in ``dtype``; CPUs without AVX-512 BF16/FP16 lack it."""
    try:  # fork_rng: building the probe must not draw from the run's random stream (exact resume)
        with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            nn.LSTM(1, 1)(torch.zeros(1, 1, 1))
    except RuntimeError:
        return False
    return True


def run_lstm(lstm: nn.Module, inputs: Tensor) -> Tensor:
    """``lstm(inputs)``'s output sequence; an ``nn.LSTM`` under CPU autocast runs in float32 where
    the CPU has no low-precision LSTM (torch would raise "could not create a primitive descriptor").
    """
    if isinstance(lstm, nn.LSTM) and inputs.is_cpu and torch.is_autocast_enabled("cpu"):
        if not _cpu_has_low_precision_lstm(torch.get_autocast_dtype("cpu")):
            with torch.autocast("cpu", enabled=False):
                return lstm(inputs.float())[0]
    return lstm(inputs)[0]


class LSTMClassifier(nn.Module):
    """Classifies a sequence ``[B, T, input_size]`` from the LSTM output at its last time step.

    Fits the digits ``"rows"`` form (``input_size=8``, 8 steps) and ``"sequence"`` form
    (``input_size=1``, 64 steps). The LSTM is the attribute ``lstm`` (``batch_first=True``) so
    gate plugins can find it.

    Args:
        input_size: features per time step.
        hidden_size: LSTM hidden units.
        num_layers: stacked LSTM layers.
        num_classes: output logits.
    """

    def __init__(
        self, input_size: int = 8, hidden_size: int = 128, num_layers: int = 1, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        if x.dim() != 3:
            raise ValueError(f"LSTMClassifier expects [B, T, features], got shape {tuple(x.shape)}")
        return self.head(run_lstm(self.lstm, x)[:, -1])


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM (attribute ``lstm``) -> linear decoder; next-token logits ``[B, T, V]``.

    Args:
        vocab_size: tokens in the vocabulary.
        embed_dim: embedding width.
        hidden_size: LSTM hidden units.
        num_layers: stacked LSTM layers.
    """

    def __init__(
        self, vocab_size: int, embed_dim: int = 64, hidden_size: int = 128, num_layers: int = 1
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, T, vocab_size]`` from int64 tokens ``[B, T]``."""
        return self.decoder(run_lstm(self.lstm, self.embedding(tokens)))
