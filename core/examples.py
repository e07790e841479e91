"""Small model + data pairs that satisfy a plugin's declared needs, for quick runs of any plugin.

Used by the registry-wide tests (resume, DDP), the GPU check script and anyone who wants to try a
plugin in a few CPU steps. A plugin that needs something particular overrides
``Plugin.example_setup``.
"""

from __future__ import annotations

import lightning as L
from torch import nn

from litplug.core.data import DigitsDataModule, StdlibTextDataModule
from litplug.core.models import MLP, LSTMClassifier, TransformerLanguageModel
from litplug.core.plugin import Plugin


def example_run(
    plugin: Plugin | None, batch_size: int = 256, dropout: float = 0.2
) -> tuple[nn.Module, L.LightningDataModule]:
    """A tiny model and datamodule that satisfy ``plugin.requires`` (registry-wide tests)."""
    custom = type(plugin).example_setup() if plugin is not None else None
    if custom is not None:
        return custom
    features = set(plugin.requires) if plugin is not None else set()
    if "residual_sublayers" in features:
        data = StdlibTextDataModule(seq_len=16, batch_size=8, num_files=2, max_chars=20_000)
        return TransformerLanguageModel(
            data.vocab_size, d_model=16, num_heads=2, num_layers=2, dim_feedforward=32, dropout=dropout
        ), data
    if "lstm" in features:
        return LSTMClassifier(input_size=8, hidden_size=16), DigitsDataModule(
            batch_size=batch_size, form="rows"
        )
    model = MLP(input_dim=64, hidden_dims=[32], batch_norm="batchnorm" in features, dropout=dropout)
    return model, DigitsDataModule(batch_size=batch_size, form="flat")
