"""Several sequences in one forward: rows packed along the token axis.

Continuous batching (:mod:`mlx_mtp.decoding.batch`) verifies the drafts of
several generations in one forward. Their caches hold different numbers of
tokens and their steps feed different numbers of tokens under different
layouts, so instead of a padded batch axis the rows are laid end to end on
the token axis: ``(1, L_1 + ... + L_B)``. Every per-token part of the model
(embedding, norms, the MLP, gated LoRA, the output head) runs once over all
of them; attention runs row by row, each row over its own
:class:`~mlx_mtp.model.cache.SpecCache` with its own positions and mask,
through the model's own attention module, exactly as that row alone.

The seams: :class:`RowsCache` stands in for one layer's cache (what the
model's inner forward hands to each block), and :func:`install_row_attention`
makes every block's attention module split a packed input into its rows when
it gets a :class:`RowsCache` (the instance's class becomes a subclass, so
names and parameters are unchanged). A block whose attention cannot be found
(no module owns its ``rope``) cannot take packed rows.
"""

from typing import List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from .cache import SpecCache
from .gated_lora import Gate

__all__ = ["Feed", "RowMasks", "RowsCache", "install_row_attention"]


class Feed(NamedTuple):
    """One row's tokens for a forward (as :meth:`MTPModel.__call__
    <mlx_mtp.model.mtp_model.MTPModel.__call__>` takes them): positions and
    mask None for the model's own causal forward."""

    tokens: mx.array  # (L,) int32, masks as -j
    positions: Optional[mx.array] = None  # (L,) relative to the first new token
    mask: Optional[mx.array] = None  # (L, L): which new tokens each new token sees
    gate: Optional[mx.array] = None  # (L,) bool: where LoRA is on


class RowMasks(NamedTuple):
    """What a packed forward's blocks get as their attention mask: how the
    inner model asked for it, for each row to make its own from its cache."""

    return_array: bool = False
    window_size: Optional[int] = None


class RowsCache:
    """One layer's caches of the rows packed in a forward (see the module docstring)."""

    def __init__(self, caches: List[SpecCache], lengths: List[int], gates: List[Optional[mx.array]], gate: Gate):
        self.caches, self.lengths, self.gates, self.gate = caches, lengths, gates, gate

    def make_mask(self, N: int, return_array: bool = False, window_size=None) -> RowMasks:
        return RowMasks(return_array, window_size)

    def attend(self, call, x: mx.array, mask, *args, **kwargs) -> mx.array:
        """``call(x_r, mask_r, cache_r, ...)`` for each row's slice of ``x``
        (1, sum L, d), with its own mask and LoRA gate; the outputs packed again."""
        packed_gate = self.gate.value
        outs, start = [], 0
        try:
            for cache, length, gate in zip(self.caches, self.lengths, self.gates):
                xr = x[:, start : start + length]
                start += length
                mr = mask
                if isinstance(mask, RowMasks):
                    mr = create_attention_mask(xr, cache, window_size=mask.window_size, return_array=mask.return_array)
                self.gate.value = gate
                outs.append(call(xr, mr, cache, *args, **kwargs))
        finally:
            self.gate.value = packed_gate
        return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


_ROW_AWARE = {}


def _attention_modules(block: nn.Module) -> List[nn.Module]:
    """The modules of ``block`` that own a ``rope`` (its attention)."""
    modules = dict(block.named_modules())
    found = []
    for name in modules:
        parts = name.split(".")
        if parts[-1] == "rope" and len(parts) > 1 and parts[-2] != "rope":
            found.append(modules[".".join(parts[:-1])])
    return found


def install_row_attention(layers: List[nn.Module]) -> bool:
    """Make the attention of every block in ``layers`` take packed rows
    (once); False where some block's attention cannot be found."""
    attentions = [_attention_modules(block) for block in layers]
    if not all(len(a) == 1 for a in attentions):
        return False
    for (attn,) in attentions:
        cls = type(attn)
        if getattr(cls, "_mtp_row_aware", False):
            continue
        sub = _ROW_AWARE.get(cls)
        if sub is None:
            base_call = cls.__call__

            def __call__(self, x, mask=None, cache=None, *args, _base=base_call, **kwargs):
                if isinstance(cache, RowsCache):
                    return cache.attend(lambda *a, **k: _base(self, *a, **k), x, mask, *args, **kwargs)
                return _base(self, x, mask, cache, *args, **kwargs)

            sub = _ROW_AWARE[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_mtp_row_aware": True})
        attn.__class__ = sub
    return True
