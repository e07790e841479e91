"""The distillation plugin: a frozen teacher (an ensemble/MIMO/any litplug checkpoint) trains a student."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, ClassVar, cast

import lightning as L
import torch
from torch import Tensor, nn

from litplug.core.errors import CheckpointError, PluginConfigError
from litplug.core.hookspecs import hookimpl
from litplug.core.metrics import default_loss
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin

from .functional import distillation_loss, teacher_agreement

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding core/, plugins/, callbacks/
_EXAMPLE_TEACHER: Path | None = None


def resolve_checkpoint_path(path: str) -> Path:
    """``path`` as given (absolute or relative to the working directory), else relative to the
    litplug package root (so a config can name a checkpoint shipped with litplug from anywhere)."""
    for candidate in (Path(path), _PACKAGE_ROOT / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path} (also looked in {_PACKAGE_ROOT})")


def save_teacher_checkpoint(module: LitplugModule, path: str | Path) -> Path:
    """Write a weights-only checkpoint in litplug's layout (state_dict + plugin states): what
    ``ModelCheckpoint`` writes, minus optimizer and loop state. Loads with ``weights_only=True``."""
    module.apply_surgery()
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def load_teacher(path: str | Path, model: nn.Module, plugins: list[Plugin]) -> LitplugModule:
    """Rebuild a litplug checkpoint's module: surgery replayed, plugin states and weights restored.

    The teacher is frozen and put in its evaluation state once: every teacher plugin's
    ``on_eval_start`` runs (an ensemble fixes its evaluation path, EMA swaps its average in).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    teacher = LitplugModule(model, plugins=plugins)
    teacher.on_load_checkpoint(checkpoint)  # surgery, then plugin states (names must match)
    teacher.load_state_dict(checkpoint["state_dict"])
    teacher.eval()
    teacher.requires_grad_(False)
    teacher.hooks.on_eval_start(module=teacher, stage="test")
    return teacher


def teacher_fingerprint(teacher: nn.Module) -> float:
    """Sum of every parameter and floating buffer in float64 on the CPU: detects a changed teacher."""
    tensors = [*teacher.parameters(), *(b for b in teacher.buffers() if b.is_floating_point())]
    return float(sum(t.detach().double().cpu().sum() for t in tensors))


class Distill(Plugin):
    """Knowledge distillation: train the model on (1-a) CE + a T^2 KL(teacher_T || student_T) from a frozen teacher.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015. The teacher is a
    litplug checkpoint (a deep ensemble, MIMO, EMA or plain run) rebuilt from its architecture and
    plugins; its prediction is the checkpoint's own (ensemble: mean of member probabilities).

    Args:
        teacher_checkpoint: path of the teacher's checkpoint (absolute, relative to the working
            directory, or relative to the litplug package root).
        teacher_model: the teacher's base architecture (before its plugins' surgery); ``None`` uses
            a copy of the student's architecture.
        teacher_plugins: the plugins the teacher was trained with, e.g. ``[DeepEnsemble(num_members=4)]``
            (their names must match the checkpoint's; their states are restored from it).
        temperature: T > 0 (Hinton et al. used 20 on MNIST; 2-5 is common).
        alpha: weight of the soft term in [0, 1] (the hard term gets 1 - alpha).
    """

    name = "distill"
    conflicts_with = ("ensemble", "mimo")
    conflict_reasons: ClassVar[dict[str, str]] = {
        "ensemble": "the student is a single model (the teacher may be an ensemble checkpoint)",
        "mimo": "the student is a single model (the teacher may be a MIMO checkpoint)",
    }

    def __init__(
        self,
        teacher_checkpoint: str = "",
        teacher_model: nn.Module | None = None,
        teacher_plugins: list[Plugin] | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
    ) -> None:
        self.check(bool(teacher_checkpoint), "teacher_checkpoint", "must name the teacher's checkpoint file")
        self.check_range("temperature", temperature, low=0.0, low_inclusive=False)
        self.check_range("alpha", alpha, low=0.0, high=1.0)
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_model = teacher_model
        self.teacher_plugins = list(teacher_plugins or [])
        self.temperature = temperature
        self.alpha = alpha
        self.teacher: LitplugModule | None = None
        self.fingerprint: float | None = None

    # -- the teacher (plugin-owned: not registered in the student's LightningModule) ---------------

    def build_teacher(self, student: nn.Module) -> LitplugModule:
        """Load the teacher once; its architecture defaults to a copy of the student's."""
        if self.teacher is None:
            try:
                path = resolve_checkpoint_path(self.teacher_checkpoint)
            except FileNotFoundError as err:
                raise PluginConfigError(self.name, "teacher_checkpoint", f"file not found: {err}") from err
            architecture = self.teacher_model if self.teacher_model is not None else copy.deepcopy(student)
            try:
                teacher = load_teacher(path, copy.deepcopy(architecture), self.teacher_plugins)
            except (CheckpointError, RuntimeError, KeyError) as err:
                raise PluginConfigError(
                    self.name,
                    "teacher_checkpoint",
                    f"{path} does not load into teacher_model={type(architecture).__name__} with "
                    f"teacher_plugins={[p.name for p in self.teacher_plugins]}: {err}",
                ) from err
            fingerprint = teacher_fingerprint(teacher)
            if self.fingerprint is not None and abs(fingerprint - self.fingerprint) > 1e-6 * max(
                1.0, abs(fingerprint)
            ):
                raise CheckpointError(
                    f"plugin 'distill': the teacher at {path} differs from the one this run started with "
                    f"(fingerprint {fingerprint} vs {self.fingerprint}); resume with the original teacher"
                )
            self.fingerprint = fingerprint
            self.teacher = teacher
        return self.teacher

    @torch.no_grad()
    def teacher_logits(self, module: L.LightningModule, inputs: Any) -> Tensor:
        """The teacher's log-probabilities (used as its logits) for ``inputs``, on the student's device."""
        # The hooks get the LitplugModule, whose ``model`` is an nn.Module; read through LightningModule's
        # ``__getattr__`` mypy only sees ``Tensor | Module``, hence the casts (no runtime effect).
        teacher = self.build_teacher(cast(nn.Module, module.model))
        teacher.to(module.device)
        batch = teacher.hooks.transform_batch(module=teacher, batch=(inputs, None), stage="predict")
        teacher_inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return teacher.log_probs(teacher(teacher_inputs), "predict")

    @hookimpl
    def litplug_check_setup(self, module: L.LightningModule) -> None:
        # a bad path or architecture fails before the first step
        self.build_teacher(cast(nn.Module, module.model))

    @hookimpl
    def litplug_on_fit_start(self, module: L.LightningModule) -> None:
        self.build_teacher(cast(nn.Module, module.model)).to(module.device)

    # -- loss -------------------------------------------------------------------------------------

    @hookimpl
    def litplug_compute_loss(
        self, module: L.LightningModule, outputs: Tensor, targets: Tensor, stage: str
    ) -> Tensor | None:
        if stage != "train":
            return None  # validation/test loss stays the plain task loss, comparable across runs
        loss_fn = getattr(module, "loss_fn", None) or default_loss
        return (1.0 - self.alpha) * loss_fn(outputs, targets)

    @hookimpl
    def litplug_extra_losses(
        self, module: L.LightningModule, outputs: Tensor, targets: Tensor, batch: Any
    ) -> dict[str, Tensor]:
        inputs = cast(LitplugModule, module).split_batch(batch)[0]
        teacher = self.teacher_logits(module, inputs)
        _, soft = distillation_loss(outputs, teacher, targets, self.temperature, self.alpha)
        return {"distill": soft}

    @hookimpl
    def litplug_eval_step(
        self, module: L.LightningModule, batch: Any, outputs: Tensor, targets: Tensor
    ) -> dict[str, Tensor]:
        if targets.is_floating_point():
            return {}
        teacher = self.teacher_logits(module, cast(LitplugModule, module).split_batch(batch)[0])
        return {"teacher_agreement": teacher_agreement(outputs, teacher, targets)}

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_fingerprint": self.fingerprint if self.fingerprint is not None else float("nan")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        value = float(state["teacher_fingerprint"])
        if value == value:  # not NaN: a teacher was loaded in the saved run
            if self.teacher is not None and abs(teacher_fingerprint(self.teacher) - value) > 1e-6 * max(
                1.0, abs(value)
            ):
                raise CheckpointError(
                    "plugin 'distill': the configured teacher differs from the checkpoint's"
                )
            self.fingerprint = value

    # -- registry-wide tests ----------------------------------------------------------------------

    @classmethod
    def example(cls) -> Distill:
        """A tiny (untrained, seeded) two-member ensemble teacher written to a temporary directory."""
        from litplug.core.models import MLP
        from litplug.plugins.ensemble import DeepEnsemble

        global _EXAMPLE_TEACHER
        if _EXAMPLE_TEACHER is None or not _EXAMPLE_TEACHER.exists():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                teacher = LitplugModule(
                    MLP(64, [16]), plugins=[DeepEnsemble(num_members=2, path="sequential")]
                )
                path = Path(tempfile.mkdtemp(prefix="litplug-distill-")) / "teacher.ckpt"
                _EXAMPLE_TEACHER = save_teacher_checkpoint(teacher, path)
        return cls(
            teacher_checkpoint=str(_EXAMPLE_TEACHER),
            teacher_model=MLP(64, [16]),
            teacher_plugins=[DeepEnsemble(num_members=2, path="sequential")],
            temperature=2.0,
            alpha=0.5,
        )
