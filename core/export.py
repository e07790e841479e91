"""A trained ``LitplugModule``'s prediction as one plain, deployable module: no plugins, no Lightning.

``LitplugModule.forward`` is the bare network with its live training weights. What ``litplug predict``
returns can need more: EMA's averaged weights, an ensemble's or MIMO's averaged probabilities, MIMO's
tiled input. :class:`Predictor` is that prediction (raw inputs -> class probabilities ``[B, K]``),
and :func:`export_predictor` captures it with ``torch.export`` under the evaluation weights, so the
saved program (``torch.export.save``, a ``.pt2`` file) loads and runs with torch alone
(``torch.export.load(path).module()(inputs)``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from litplug.core.errors import ExportError

if TYPE_CHECKING:
    from litplug.core.module import LitplugModule

__all__ = [
    "EXPORT_FILE",
    "ONNX_EXPORT_FILE",
    "Predictor",
    "capture_predictor",
    "check_dynamic_dims",
    "evaluation_weights",
    "export_predictor",
    "describe_program",
    "input_sizes",
    "require_onnx",
    "save_onnx",
    "save_predictor",
]

#: The file ``litplug export`` writes in the run directory.
EXPORT_FILE = "predictor.pt2"
#: The same with ``--format onnx``.
ONNX_EXPORT_FILE = "predictor.onnx"
#: What ONNX conversion needs beyond litplug's dependencies: the ``onnx`` extra.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


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
    module: LitplugModule,
    example_inputs: Tensor,
    dynamic_batch: bool = True,
    dynamic_dims: Sequence[int] = (),
) -> ExportedProgram:
    """The module's prediction (:class:`Predictor`) captured by ``torch.export`` under its eval weights.

    Args:
        module: a trained (or checkpoint-loaded) module; it is left as it was.
        example_inputs: a batch of raw inputs as the data module gives them (at least 2 examples
            when ``dynamic_batch``: export fixes a batch dimension of size 1).
        dynamic_batch: keep the batch size free, so the program takes any number of examples.
        dynamic_dims: further input dimensions to keep free, e.g. ``(1,)`` for a text model's
            sequence length. Each gets the range the model's code allows (a transformer's
            ``max_len`` bounds it); :func:`input_sizes` tells the range. A dimension the model's
            code (or a torch op it calls) fixes is refused with an :class:`ExportError`.

    The program's weights are copies, independent of the module's. Raises ``RuntimeError`` when
    the program does not predict what the module predicts on ``example_inputs`` (and, for each
    free dimension, on the example cut one shorter along it).
    """
    with evaluation_weights(module):
        return capture_predictor(module, example_inputs, dynamic_batch, dynamic_dims)


def capture_predictor(
    module: LitplugModule,
    example_inputs: Tensor,
    dynamic_batch: bool = True,
    dynamic_dims: Sequence[int] = (),
) -> ExportedProgram:
    """:func:`export_predictor` for a module already under its evaluation weights (a predict loop)."""
    if not isinstance(example_inputs, Tensor):
        raise TypeError(
            f"export_predictor: example_inputs must be a tensor of raw inputs, got {type(example_inputs).__name__}"
        )
    if dynamic_batch and example_inputs.dim() > 0 and example_inputs.shape[0] < 2:
        raise ExportError(
            "export_predictor: with dynamic_batch, example_inputs needs at least 2 examples "
            f"(got a batch of {example_inputs.shape[0]}; torch.export fixes a dimension of size 1)"
        )
    free_dims = _checked_dynamic_dims(dynamic_dims, example_inputs)
    spec: dict[int, Any] = {0: Dim("batch")} if dynamic_batch else {}
    spec.update(dict.fromkeys(free_dims, Dim.AUTO))  # the range is whatever the model's code allows
    predictor = Predictor(module)
    with torch.inference_mode(False), torch.no_grad():
        example_inputs = example_inputs.clone()  # a predict loop's batch is an inference tensor
        # One eager call first: plugins settle what they decide on the first evaluation batch by
        # looking at values (MIMO's eval_input="auto"), which a captured graph cannot do.
        expected = predictor(example_inputs)
        program = _owned_tensors(
            torch.export.export(predictor, (example_inputs,), dynamic_shapes=(spec,) if spec else None)
        )
        run = program.module()
        _check_same_predictions(run(example_inputs), expected)
        for dim in free_dims:  # the program must run, and be right, at another size of a free dimension
            shorter = example_inputs.narrow(dim, 0, example_inputs.shape[dim] - 1)
            _check_same_predictions(_run_free(program, run, example_inputs, dim, shorter), predictor(shorter))
    return program


def _check_same_predictions(got: Tensor, expected: Tensor, what: str = "") -> None:
    """The captured program (or ``what``: its conversion) must predict what the module (the program)
    predicts on the example inputs."""
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-6):
        worst = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        differs = (
            f"the {what} program's predictions differ from the torch.export program's"
            if what
            else "the exported program's predictions differ from the module's"
        )
        cause = (
            f"{what} runs an operation differently"
            if what
            else "a plugin's predict path depends on something torch.export does not capture"
        )
        raise RuntimeError(
            f"export_predictor: {differs} on the example inputs (shapes {tuple(got.shape)} vs "
            f"{tuple(expected.shape)}, largest difference {worst:.3g}); {cause}"
        )


def check_dynamic_dims(dynamic_dims: Sequence[int]) -> list[int]:
    """``dynamic_dims`` sorted, or an :class:`ExportError` unless they are distinct dimensions >= 1."""
    dims = list(dynamic_dims)
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ExportError(
                f"export_predictor: dynamic_dims must name input dimensions 1, 2, ... (the batch "
                f"dimension 0 is dynamic_batch's), got {dim!r}"
            )
    if len(set(dims)) != len(dims):
        raise ExportError(f"export_predictor: dynamic_dims names a dimension twice: {dims}")
    return sorted(dims)


def _checked_dynamic_dims(dynamic_dims: Sequence[int], example_inputs: Tensor) -> list[int]:
    dims = check_dynamic_dims(dynamic_dims)
    for dim in dims:
        if dim >= example_inputs.dim():
            raise ExportError(
                f"export_predictor: dynamic_dims names dimension {dim}, but the inputs "
                f"{describe_inputs(example_inputs)} have dimensions 0..{example_inputs.dim() - 1}"
            )
        if example_inputs.shape[dim] < 3:
            raise ExportError(
                f"export_predictor: to keep input dimension {dim} free, the example needs a size of at "
                f"least 3 there (got {example_inputs.shape[dim]}; torch.export fixes sizes 0 and 1, and "
                "the program is checked one shorter too)"
            )
    return dims


def _run_free(
    program: ExportedProgram, run: nn.Module, example_inputs: Tensor, dim: int, shorter: Tensor
) -> Tensor:
    """``run(shorter)``, the program one shorter along free dimension ``dim``.

    ``Dim.AUTO`` quietly fixes a dimension the model's code specializes (in the input's shape or
    as a size check in the graph); refuse that instead of writing a program that takes one size.
    """
    if isinstance(input_sizes(program)[dim], int):
        reason = "the traced input has a fixed size there"
    else:
        try:
            return run(shorter)  # type: ignore[no-any-return]
        except Exception as error:  # a size check in the graph (AssertionError "Guard failed: ...")
            reason = f"the program refuses size {shorter.shape[dim]}: {error}"
    raise ExportError(
        f"export_predictor: input dimension {dim} cannot be kept free: the model fixes it at "
        f"{example_inputs.shape[dim]} when torch.export traces it ({reason}). Its code branches on "
        "that size, or a layer needs it fixed (a Linear layer's input features; nn.LSTM's sequence "
        "length in torch 2.13). Leave it out of dynamic_dims and export one program per size"
    )


Sizes = list[int | tuple[int, int | None]]


def input_sizes(program: ExportedProgram) -> Sizes:
    """The sizes the program's input takes, per dimension: an int where fixed, else ``(low, high)``
    (``high`` None: unbounded)."""
    return _sizes(program, _input_value(program).shape)


def describe_program(program: ExportedProgram) -> tuple[str, str]:
    """``("int64 [B, 2..64]", "float32 [B, 2..64, 98]")``: what a program takes and returns, for messages.

    ``B`` is the free batch size, ``low..high`` a free dimension's range (``low..`` unbounded).
    """
    inputs = _input_value(program)
    batch = inputs.shape[0] if inputs.dim() else None
    batch_expr = None if batch is None or isinstance(batch, int) else batch.node.expr
    outputs = program.graph.output_node().args[0]
    output = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return _describe(program, inputs, batch_expr), _describe(program, output.meta["val"], batch_expr)


def _input_value(program: ExportedProgram) -> Tensor:
    user_inputs = set(program.graph_signature.user_inputs)
    input_node = next(
        node for node in program.graph.nodes if node.op == "placeholder" and node.name in user_inputs
    )
    return input_node.meta["val"]  # a fake tensor: dtype, and a shape of ints and SymInts


def _sizes(program: ExportedProgram, shape: Sequence[Any]) -> Sizes:
    sizes: Sizes = []
    for size in shape:
        if isinstance(size, int):
            sizes.append(size)
            continue
        bounds = program.range_constraints.get(size.node.expr)
        # sympy Integers; torch's unbounded ``int_oo`` is not one (and claims ``is_finite``)
        low = int(bounds.lower) if bounds is not None and bounds.lower.is_Integer else 0
        high = int(bounds.upper) if bounds is not None and bounds.upper.is_Integer else None
        sizes.append((low, high))
    return sizes


def _describe(program: ExportedProgram, value: Tensor, batch_expr: Any) -> str:
    dims = []
    shape: Sequence[Any] = value.shape  # ints and SymInts
    for size, bounds in zip(shape, _sizes(program, shape), strict=True):
        if isinstance(bounds, int):
            dims.append(str(bounds))
        elif batch_expr is not None and size.node.expr == batch_expr:
            dims.append("B")
        else:
            dims.append(f"{bounds[0]}..{'' if bounds[1] is None else bounds[1]}")
    return f"{str(value.dtype).removeprefix('torch.')} [{', '.join(dims)}]"


def save_predictor(
    module: LitplugModule,
    example_inputs: Tensor,
    path: str | Path,
    dynamic_batch: bool = True,
    dynamic_dims: Sequence[int] = (),
) -> Path:
    """:func:`export_predictor`, saved with ``torch.export.save`` to ``path`` (a ``.pt2`` file)."""
    program = export_predictor(module, example_inputs, dynamic_batch, dynamic_dims)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def require_onnx() -> None:
    """An :class:`ExportError` naming the missing packages unless ONNX conversion can run."""
    missing = [name for name in ONNX_PACKAGES if find_spec(name) is None]
    if missing:
        raise ExportError(
            f"export to ONNX needs {', '.join(missing)} (not litplug dependencies): "
            "pip install 'litplug[onnx]', or pip install onnx onnxscript onnxruntime"
        )


def save_onnx(program: ExportedProgram, example_inputs: Tensor, path: str | Path) -> Path:
    """The program converted to ONNX (``torch.onnx.export(program, dynamo=True)``), written to
    ``path`` and checked: onnxruntime must predict what the program predicts on ``example_inputs``.

    The free dimensions stay free, named ``batch`` and ``dim1``, ``dim2``, ... by their place in the
    input (torch's exporter calls them ``s85``-style); the output is named ``probabilities``. Needs
    the ``onnx`` extra (:func:`require_onnx`).
    """
    require_onnx()
    import onnxruntime  # optional (the onnx extra): imported only here

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example_inputs = example_inputs.detach().clone()
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" x4
    try:
        onnx_program = torch.onnx.export(program, (example_inputs,), dynamo=True, verbose=False)
    finally:
        registration.setLevel(level)
    assert onnx_program is not None  # None only for the legacy (dynamo=False) exporter
    _name_onnx_graph(onnx_program.model.graph)
    onnx_program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example_inputs.cpu().numpy()})[0]
    _check_same_predictions(
        torch.from_numpy(got), program.module()(example_inputs).cpu(), "ONNX (onnxruntime)"
    )
    return path


def _name_onnx_graph(graph: Any) -> None:
    """Name an exported ONNX graph's free dimensions after their place in the input, everywhere they
    appear (shapes such as ``2*s85`` too), and its output ``probabilities``.

    ``graph`` is an ``onnx_ir.Graph`` (what ``torch.onnx.export`` returns holds one).
    """
    import onnx_ir  # optional (comes with onnxscript, in the onnx extra)

    names: dict[str, str] = {}
    for place, size in enumerate(graph.inputs[0].shape):
        if isinstance(size, onnx_ir.SymbolicDim) and size.value is not None:
            names.setdefault(size.value, "batch" if place == 0 else f"dim{place}")
    graph.outputs[0].name = "probabilities"
    if not names:
        return
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    values = [*graph.inputs, *(value for node in graph.all_nodes() for value in node.outputs)]
    for value in values:
        if value.shape is None:
            continue
        value.shape = onnx_ir.Shape(
            [
                onnx_ir.SymbolicDim(symbol.sub(lambda found: names[found.group(1)], size.value))
                if isinstance(size, onnx_ir.SymbolicDim) and size.value is not None
                else size
                for size in value.shape
            ]
        )


def describe_inputs(inputs: Any) -> str:
    """``float32 [B, 64]``-style description of an input tensor, for messages."""
    if not isinstance(inputs, Tensor):
        return type(inputs).__name__
    return f"{str(inputs.dtype).removeprefix('torch.')} [B, {', '.join(map(str, inputs.shape[1:]))}]"
