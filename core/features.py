"""Named model features that plugins can require (``Plugin.requires``).

A feature is a predicate over an ``nn.Module`` plus a sentence telling the user what is missing.
Third-party plugins register their own with :func:`register_model_feature`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelFeature:
    name: str
    present: Callable[[nn.Module], bool]
    description: str


_FEATURES: dict[str, ModelFeature] = {}


def register_model_feature(name: str, present: Callable[[nn.Module], bool], description: str) -> None:
    """Register (or replace) a named model feature."""
    _FEATURES[name] = ModelFeature(name, present, description)


def get_model_feature(name: str) -> ModelFeature:
    try:
        return _FEATURES[name]
    except KeyError:
        known = ", ".join(sorted(_FEATURES))
        raise KeyError(f"unknown model feature '{name}'; known features: {known}") from None


def _has(module_type: type[nn.Module] | tuple[type[nn.Module], ...]) -> Callable[[nn.Module], bool]:
    return lambda model: any(isinstance(m, module_type) for m in model.modules())


register_model_feature(
    "batchnorm",
    _has(nn.modules.batchnorm._BatchNorm),
    "at least one BatchNorm1d/2d/3d layer",
)
register_model_feature("lstm", _has(nn.LSTM), "at least one torch.nn.LSTM layer")


def _has_residual_sublayers(model: nn.Module) -> bool:
    sublayers = getattr(model, "residual_sublayers", None)
    return callable(sublayers) and len(sublayers()) > 0


register_model_feature(
    "residual_sublayers",
    _has_residual_sublayers,
    "a `residual_sublayers()` method returning the model's post-LN residual sub-layers "
    "(see litplug.core.models.transformer.ResidualSublayer)",
)
