"""Causal character-level transformer language model built from explicit residual sub-layers."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from litplug.core.errors import ModelConfigError

__all__ = ["CausalSelfAttention", "FeedForward", "ResidualSublayer", "TransformerLanguageModel"]

NormPosition = Literal["post", "pre"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention that never attends to later positions, then dropout.

    The causal mask lives here (not in the caller) so a residual sub-layer's ``branch`` is a plain
    ``x -> f(x)`` function that profiling plugins can call on its own.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self._mask: Tensor | None = None

    def causal_mask(self, length: int, device: torch.device) -> Tensor:
        """Boolean ``[T, T]`` mask, True above the diagonal (future positions are blocked); cached."""
        if torch.compiler.is_compiling():  # a cache keyed on T would fix T in a traced graph
            return torch.ones(length, length, dtype=torch.bool, device=device).triu(diagonal=1)
        mask = self._mask
        if mask is None or mask.shape[0] != length or mask.device != device:
            mask = torch.ones(length, length, dtype=torch.bool, device=device).triu(diagonal=1)
            self._mask = mask
        return mask

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``."""
        mask = self.causal_mask(x.shape[1], x.device)
        out, _ = self.attention(x, x, x, attn_mask=mask, need_weights=False)
        return self.dropout(out)


class FeedForward(nn.Module):
    """Position-wise ``Linear -> ReLU -> Dropout -> Linear -> Dropout``."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, dim_feedforward),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``."""
        return self.net(x)


class ResidualSublayer(nn.Module):
    """One residual sub-layer ``x -> x'`` around a branch ``f`` (attention or feed-forward).

    * post-LN: ``x' = norm(x * residual_scale + branch(x))`` (``x * residual_scale`` is ``x`` while
      ``residual_scale`` is None);
    * pre-LN: ``x' = x + branch(norm(x))`` (``residual_scale`` is not used).

    ``residual_scale`` is a registered parameter slot that starts as None; a plugin may assign an
    ``nn.Parameter`` of shape ``[d_model]`` (or a scalar) to it, which then trains and is saved in
    the state dict like any parameter.
    """

    residual_scale: nn.Parameter | None

    def __init__(self, branch: nn.Module, d_model: int, norm_position: NormPosition = "post") -> None:
        super().__init__()
        if norm_position not in ("post", "pre"):
            raise ModelConfigError(
                type(self).__name__, f"norm_position must be 'post' or 'pre', got {norm_position!r}"
            )
        self.branch = branch
        self.norm = nn.LayerNorm(d_model)
        self.norm_position: NormPosition = norm_position
        # Registered (as None) so that assigning an nn.Parameter later just works.
        self.register_parameter("residual_scale", None)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the sub-layer; shape is preserved."""
        if self.norm_position == "pre":
            return x + self.branch(self.norm(x))
        skip = x if self.residual_scale is None else x * self.residual_scale
        return self.norm(skip + self.branch(x))


class TransformerLanguageModel(nn.Module):
    """Causal character language model: token + learned position embeddings, residual sub-layers,
    linear decoder. ``forward(tokens [B, T]) -> logits [B, T, vocab_size]``.

    Residual sub-layer protocol (what plugins such as Admin rely on, and what user models follow
    to support them): the model exposes ``residual_sublayers()``, the ordered list of its
    :class:`ResidualSublayer` modules (per layer: attention, then feed-forward). Each has
    ``branch`` (the function ``f_i`` including its dropout, callable on ``[B, T, d]`` alone),
    ``norm`` (its LayerNorm), ``norm_position`` (``"post"`` or ``"pre"``) and ``residual_scale``,
    None by default. Admin sets ``residual_scale`` on every post-LN sub-layer to a trainable
    vector of size ``d_model``, turning ``norm(x + f(x))`` into ``norm(w * x + f(x))``.

    Args:
        vocab_size: tokens in the vocabulary.
        d_model: model width.
        num_heads: attention heads (must divide ``d_model``).
        num_layers: transformer layers (two residual sub-layers each).
        dim_feedforward: hidden width of the feed-forward branch.
        dropout: dropout on embeddings, attention weights and branch outputs.
        max_len: longest sequence supported by the positional embedding.
        norm_position: ``"post"`` (original transformer) or ``"pre"`` LayerNorm; pre-LN adds a
            final LayerNorm before the decoder.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 6,
        dim_feedforward: int = 256,
        dropout: float = 0.1,
        max_len: int = 512,
        norm_position: NormPosition = "post",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if d_model % num_heads != 0:
            raise ModelConfigError(name, f"num_heads ({num_heads}) must divide d_model ({d_model})")
        if num_layers < 1:
            raise ModelConfigError(name, f"num_layers must be >= 1, got {num_layers}")
        if norm_position not in ("post", "pre"):
            raise ModelConfigError(name, f"norm_position must be 'post' or 'pre', got {norm_position!r}")
        self.max_len = max_len
        self.norm_position: NormPosition = norm_position
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.embedding_dropout = nn.Dropout(dropout)
        sublayers: list[ResidualSublayer] = []
        for _ in range(num_layers):
            attention = CausalSelfAttention(d_model, num_heads, dropout)
            ffn = FeedForward(d_model, dim_feedforward, dropout)
            sublayers.append(ResidualSublayer(attention, d_model, norm_position))
            sublayers.append(ResidualSublayer(ffn, d_model, norm_position))
        self.sublayers = nn.ModuleList(sublayers)
        # Pre-LN leaves the residual stream unnormalised, so normalise once before decoding.
        self.final_norm: nn.Module = nn.LayerNorm(d_model) if norm_position == "pre" else nn.Identity()
        self.decoder = nn.Linear(d_model, vocab_size)

    def residual_sublayers(self) -> list[ResidualSublayer]:
        """The residual sub-layers in forward order (2 per layer: attention, feed-forward)."""
        return [m for m in self.sublayers if isinstance(m, ResidualSublayer)]

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, T, vocab_size]``; position t only sees tokens ``<= t``."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        positions = torch.arange(length, device=tokens.device)
        x = self.embedding_dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for sublayer in self.sublayers:
            x = sublayer(x)
        return self.decoder(self.final_norm(x))
