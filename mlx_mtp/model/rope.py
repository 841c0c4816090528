"""Per-token positions through a model's own RoPE: :class:`PositionalRoPE`.

A decoding layout gives every token its own position (masks share their
block's, a tree's branches restart after the pending token);
:class:`~mlx_mtp.model.cache.SpecCache` hands them to attention as an
``offset`` of shape (B, L). mlx's RoPE takes one offset per batch row, so
the wrapper folds the sequence axis into the batch axis and applies the
model's own RoPE variant (its scaling, its frequencies) token by token.
"""

from typing import Union

import mlx.core as mx
import mlx.nn as nn

__all__ = ["PositionalRoPE", "install_positional_rope"]


class PositionalRoPE(nn.Module):
    """Applies a model's own RoPE module at per-token positions.

    An ``offset`` of shape (B, L) gives the position of every token; any other
    offset (int, or (B,) per row) goes to the wrapped module unchanged.
    """

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope

    def __call__(self, x: mx.array, offset: Union[int, mx.array] = 0) -> mx.array:
        if isinstance(offset, mx.array) and offset.ndim == 2:
            B, H, L, D = x.shape
            y = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
            y = self.rope(y, offset=offset.reshape(-1))
            return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)
        return self.rope(x, offset=offset)


def install_positional_rope(model: nn.Module):
    """Wrap every attention's ``rope`` (once)."""
    for _, module in model.named_modules():
        rope = getattr(module, "rope", None)
        if isinstance(rope, nn.Module) and not isinstance(module, PositionalRoPE):
            if not isinstance(rope, PositionalRoPE):
                module.rope = PositionalRoPE(rope)
