"""Reference models: plain ``torch.nn.Module``s (no Lightning) whose forward returns logits."""

from .cnn import SmallCNN
from .lstm import LSTMClassifier, LSTMLanguageModel
from .mlp import MLP
from .transformer import CausalSelfAttention, FeedForward, ResidualSublayer, TransformerLanguageModel

__all__ = [
    "MLP",
    "CausalSelfAttention",
    "FeedForward",
    "LSTMClassifier",
    "LSTMLanguageModel",
    "ResidualSublayer",
    "SmallCNN",
    "TransformerLanguageModel",
]
