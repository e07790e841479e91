"""MIMO (Havasi et al. 2021): M subnetworks in one network, one forward pass for an ensemble."""

from .functional import (
    MIMOInputConv2d,
    MIMOInputLinear,
    MIMOSurgeryError,
    ensemble_log_probs,
    member_indices,
    member_log_probs,
    member_metrics,
    mimo_loss,
    mimo_predict,
    repeat_inputs,
    resolve_layer_paths,
    split_heads,
    stack_member_inputs,
    sum_member_blocks,
    widen_input_layer,
    widen_model,
    widen_output_layer,
)
from .plugin import MIMO

__all__ = [
    "MIMO",
    "MIMOInputConv2d",
    "MIMOInputLinear",
    "MIMOSurgeryError",
    "ensemble_log_probs",
    "member_indices",
    "member_log_probs",
    "member_metrics",
    "mimo_loss",
    "mimo_predict",
    "repeat_inputs",
    "resolve_layer_paths",
    "split_heads",
    "stack_member_inputs",
    "sum_member_blocks",
    "widen_input_layer",
    "widen_model",
    "widen_output_layer",
]
