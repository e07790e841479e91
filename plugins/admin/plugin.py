"""The Admin plugin: trainable residual scales on post-LN sub-layers, initialised by profiling or closed form."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from litplug.core.errors import PluginSetupError
from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin

from .functional import (
    AdminModelError,
    add_residual_scales,
    closed_form_omega,
    fill_residual_scales,
    post_ln_sublayers,
    profile_omegas,
)

__all__ = ["Admin"]

AdminInit = Literal["profile", "closed_form"]
INITS: tuple[AdminInit, ...] = ("profile", "closed_form")


class Admin(Plugin):
    """Admin (Liu et al. 2020): x_i = LN(omega_i * x_{i-1} + f_i(x_{i-1})) with profiled or closed-form omegas.

    Surgery gives every post-LN residual sub-layer of the model (``model.residual_sublayers()``, see
    :class:`litplug.core.models.transformer.ResidualSublayer`) a trainable omega vector of the model
    width in its ``residual_scale`` slot. Pre-LN sub-layers are left untouched; a model without any
    post-LN sub-layer is an error.

    Args:
        init: ``"profile"`` (the paper): at fit start one forward in training mode on the first
            training batch (under DDP: each rank's shard, variances pooled over the global batch) sets ``omega_i = r``, ``r <- sqrt(Var[omega_i x_{i-1}] + Var[f_i(x_{i-1})])``
            from ``r = 1``; ``"closed_form"`` (admin-torch): every omega is
            ``sqrt((N + 1) / ln(N + 1) - 1)`` for ``N`` post-LN sub-layers, set at surgery, no
            profiling: the choice for very large batches.

    The omegas are model parameters (saved with the weights); whether profiling ran and the profiled
    scalars are this plugin's state, so a resumed run never profiles again.
    """

    name = "admin"
    requires = ("residual_sublayers",)
    supports_ddp = True  # profiling pools its variances across ranks (see functional.profile_omegas)

    def __init__(self, init: AdminInit = "profile") -> None:
        self.check_choice("init", init, INITS)
        self.init: AdminInit = init
        self.profiled = False
        self.omegas: list[float] = []  # scalar omega per post-LN sub-layer, in forward order
        self.input_variances: list[float] = []
        self.branch_variances: list[float] = []

    # -- setup ------------------------------------------------------------------------------------

    def _post_ln_sublayers(self, model: nn.Module) -> list[nn.Module]:
        try:
            return post_ln_sublayers(model)
        except AdminModelError as error:
            raise PluginSetupError(f"plugin '{self.name}': {error}") from error

    @hookimpl
    def litplug_check_setup(self, module: Any) -> None:
        self._post_ln_sublayers(module.model)

    @hookimpl
    def litplug_configure_model(self, model: nn.Module) -> None:
        sublayers = self._post_ln_sublayers(model)
        value = closed_form_omega(len(sublayers)) if self.init == "closed_form" else 1.0
        # Already-present omegas are kept: the surgery is replayed before a checkpoint's weights load.
        add_residual_scales(model, value)
        if self.init == "closed_form" and not self.omegas:
            self.omegas = [value] * len(sublayers)

    # -- fit start --------------------------------------------------------------------------------

    @hookimpl
    def litplug_on_fit_start(self, module: Any, sample_batch: Any) -> None:
        if self.init != "profile" or self.profiled:
            return  # closed form needs no data; a resumed run keeps its (trained) omegas
        inputs, _ = module.split_batch(sample_batch)
        result = profile_omegas(module.model, inputs)
        self.omegas = result.omegas
        self.input_variances = result.input_variances
        self.branch_variances = result.branch_variances
        self.profiled = True

    def reset_omegas(self, model: nn.Module) -> None:
        """Write the stored scalars back into the model's omegas (e.g. to restart with the same init)."""
        fill_residual_scales(model, self.omegas)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "profiled": self.profiled,
            "omegas": list(self.omegas),
            "input_variances": list(self.input_variances),
            "branch_variances": list(self.branch_variances),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.profiled = bool(state["profiled"])
        self.omegas = [float(v) for v in state["omegas"]]
        self.input_variances = [float(v) for v in state["input_variances"]]
        self.branch_variances = [float(v) for v in state["branch_variances"]]
