"""A trained ``LitplugModule``'s prediction as one plain, deployable module: no plugins, no Lightning.

``LitplugModule.forward`` is the bare network with its live training weights. What ``litplug predict``
returns can need more: EMA's averaged weights, an ensemble's or MIMO's averaged probabilities, MIMO's
tiled input. :class:`Predictor` is that prediction (raw inputs -> class probabilities ``[B, K]``),
and :func:`export_predictor` captures it with ``torch.export`` under the evaluation weights, so the
saved program (``torch.export.save``, a ``.pt2`` file) loads and runs with torch alone
(``torch.export.load(path).module()(inputs)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

if TYPE_CHECKING:
    from litplug.core.module import LitplugModule

__all__ = [
    "EXPORT_FILE",
    "Predictor",
    "capture_predictor",
    "evaluation_weights",
    "export_predictor",
    "save_predictor",
]

#: The file ``litplug export`` writes in the run directory.
EXPORT_FILE = "predictor.pt2"


class Predictor(nn.Module):
    """Class probabilities ``[B, K]`` of raw inputs, as ``litplug predict`` computes them.

    The predict path of the configured plugins (:meth:`LitplugModule.predict_probs`). It holds the
    module, so run it inside :func:`evaluation_weights` for the weights ``predict`` uses.
    """

    def __init__(self, module: LitplugModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: Tensor) -> Tensor:
        return self.module.predict_probs(inputs)


@contextmanager
def evaluation_weights(module: LitplugModule) -> Iterator[LitplugModule]:
    """``module`` in eval mode with the weights and paths its plugins predict with, then restored.

    The plugins' ``predict`` evaluation start and end (EMA swaps its average in and out again);
    on an exception their interrupted-evaluation hook restores the training weights instead.
    """
    was_training = module.training
    module.eval()
    module.hooks.on_eval_start(module=module, stage="predict")
    try:
        yield module
    except BaseException:
        module.hooks.on_eval_interrupted(module=module, stage="predict")
        raise
    else:
        module.hooks.on_eval_end(module=module, stage="predict")
    finally:
        module.train(was_training)


def _owned_tensors(program: ExportedProgram) -> ExportedProgram:
    """Give the program its own copies of the weights it captured.

    ``torch.export`` keeps references to the module's tensors; leaving :func:`evaluation_weights`
    copies the training weights back into them (EMA), which would change the program too.
    """
    for name, tensor in list(program.state_dict.items()):
        program.state_dict[name] = (
            nn.Parameter(tensor.detach().clone(), requires_grad=False)
            if isinstance(tensor, nn.Parameter)
            else tensor.detach().clone()
        )
    for name, constant in list(program.constants.items()):
        if isinstance(constant, Tensor):
            program.constants[name] = constant.detach().clone()
    return program


def export_predictor(
    module: LitplugModule, example_inputs: Tensor, dynamic_batch: bool = True
) -> ExportedProgram:
    """The module's prediction (:class:`Predictor`) captured by ``torch.export`` under its eval weights.

    Args:
        module: a trained (or checkpoint-loaded) module; it is left as it was.
        example_inputs: a batch of raw inputs as the data module gives them (at least 2 examples
            when ``dynamic_batch``: export fixes a batch dimension of size 1).
        dynamic_batch: keep the batch size free, so the program takes any number of examples.

    The program's weights are copies, independent of the module's. Raises ``RuntimeError`` when
    the program does not predict what the module predicts on ``example_inputs``.
    """
    with evaluation_weights(module):
        return capture_predictor(module, example_inputs, dynamic_batch)


def capture_predictor(
    module: LitplugModule, example_inputs: Tensor, dynamic_batch: bool = True
) -> ExportedProgram:
    """:func:`export_predictor` for a module already under its evaluation weights (a predict loop)."""
    if not isinstance(example_inputs, Tensor):
        raise TypeError(
            f"export_predictor: example_inputs must be a tensor of raw inputs, got {type(example_inputs).__name__}"
        )
    if dynamic_batch and example_inputs.dim() > 0 and example_inputs.shape[0] < 2:
        raise ValueError(
            "export_predictor: with dynamic_batch, example_inputs needs at least 2 examples "
            f"(got a batch of {example_inputs.shape[0]}; torch.export fixes a dimension of size 1)"
        )
    dynamic_shapes = ({0: Dim("batch")},) if dynamic_batch else None
    predictor = Predictor(module)
    with torch.inference_mode(False), torch.no_grad():
        example_inputs = example_inputs.clone()  # a predict loop's batch is an inference tensor
        # One eager call first: plugins settle what they decide on the first evaluation batch by
        # looking at values (MIMO's eval_input="auto"), which a captured graph cannot do.
        expected = predictor(example_inputs)
        program = _owned_tensors(
            torch.export.export(predictor, (example_inputs,), dynamic_shapes=dynamic_shapes)
        )
        _check_same_predictions(program, example_inputs, expected)
    return program


def _check_same_predictions(program: ExportedProgram, inputs: Tensor, expected: Tensor) -> None:
    """The captured program must predict what the module predicts on the example inputs."""
    got = program.module()(inputs)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-6):
        worst = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        raise RuntimeError(
            "export_predictor: the exported program's predictions differ from the module's on the "
            f"example inputs (shapes {tuple(got.shape)} vs {tuple(expected.shape)}, largest difference "
            f"{worst:.3g}); a plugin's predict path depends on something torch.export does not capture"
        )


def save_predictor(
    module: LitplugModule, example_inputs: Tensor, path: str | Path, dynamic_batch: bool = True
) -> Path:
    """:func:`export_predictor`, saved with ``torch.export.save`` to ``path`` (a ``.pt2`` file)."""
    program = export_predictor(module, example_inputs, dynamic_batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def describe_inputs(inputs: Any) -> str:
    """``float32 [B, 64]``-style description of an input tensor, for messages."""
    if not isinstance(inputs, Tensor):
        return type(inputs).__name__
    return f"{str(inputs.dtype).removeprefix('torch.')} [B, {', '.join(map(str, inputs.shape[1:]))}]"
