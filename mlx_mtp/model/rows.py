"""Several sequences in one forward: rows packed along the token axis.

Continuous batching (:mod:`mlx_mtp.decoding.batch`) verifies the drafts of
several generations in one forward. Their caches hold different numbers of
tokens and their steps feed different numbers of tokens under different
layouts, so instead of a padded batch axis the rows are laid end to end on
the token axis: ``(1, L_1 + ... + L_B)``. Every per-token part of the model
(embedding, norms, the projections and the MLP, gated LoRA, RoPE at each
token's own position, the output head) runs once over all of them; the
attention proper (each row's queries against its own cache's keys and
values, under its own mask) runs row by row, each row over its own
:class:`~mlx_mtp.model.cache.SpecCache`, with the shapes of that row alone.

The seams: :class:`RowsCache` stands in for one layer's cache (what the
model's inner forward hands to each block): its ``offset`` is every token's
position (:class:`~mlx_mtp.model.rope.PositionalRoPE` applies it per token),
``update_and_fetch`` writes each row's keys and values into its own cache,
and the model's ``scaled_dot_product_attention`` (mlx-lm's, which each model
module imports; :func:`install_row_attention` wraps the module's name) runs
each row's attention where it gets a :class:`RowsCache`. A model whose
attention does not go through that function (gemma2 computes its own scores)
gets its whole attention module run row by row instead (the instance's class
becomes a subclass, so names and parameters are unchanged): slower, as each
row then reads the projections' weights again. A block whose attention
cannot be found (no module owns its ``rope``) cannot take packed rows.
"""

import sys
from typing import List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.base import scaled_dot_product_attention as _base_sdpa

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
    """One layer's caches of the rows packed in a forward (see the module docstring).

    Args:
        caches: each row's cache of this layer.
        lengths: each row's tokens.
        positions: (1, sum L) every token's absolute position.
        gates: each row's LoRA gate (for attention run row by row).
        gate: the model's gate.
    """

    def __init__(
        self,
        caches: List[SpecCache],
        lengths: List[int],
        positions: mx.array,
        gates: List[Optional[mx.array]],
        gate: Gate,
    ):
        self.caches, self.lengths, self.positions, self.gates, self.gate = caches, lengths, positions, gates, gate
        self.fetched: Optional[list] = None  # each row's keys and values, until its attention runs

    def make_mask(self, N: int, return_array: bool = False, window_size=None) -> RowMasks:
        return RowMasks(return_array, window_size)

    @property
    def offset(self) -> mx.array:
        return self.positions

    def _rows(self, x: mx.array, axis: int) -> List[mx.array]:
        bounds = [sum(self.lengths[: r + 1]) for r in range(len(self.lengths) - 1)]
        return mx.split(x, bounds, axis=axis) if bounds else [x]

    def _mask(self, mask, x: mx.array, cache: SpecCache):
        if not isinstance(mask, RowMasks):
            return mask
        return create_attention_mask(x, cache, window_size=mask.window_size, return_array=mask.return_array)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Write each row's new keys and values (1, heads, L_r, D) into its own cache."""
        rows = zip(self.caches, self._rows(keys, 2), self._rows(values, 2))
        self.fetched = [cache.update_and_fetch(k, v) for cache, k, v in rows]
        return keys, values

    def attention(self, sdpa, queries: mx.array, mask, **kwargs) -> mx.array:
        """``sdpa`` (mlx-lm's scaled_dot_product_attention) row by row:
        each row's queries (1, heads, L_r, D) against its own cache."""
        if self.fetched is None:
            raise RuntimeError("packed rows: the attention ran before the keys were written")
        outs = []
        for cache, q, (k, v) in zip(self.caches, self._rows(queries, 2), self.fetched):
            outs.append(sdpa(q, k, v, cache=cache, mask=self._mask(mask, q.swapaxes(1, 2), cache), **kwargs))
        self.fetched = None
        return mx.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]

    def attend(self, call, x: mx.array, mask, *args, **kwargs) -> mx.array:
        """``call(x_r, mask_r, cache_r, ...)`` for each row's slice of ``x``
        (1, sum L, d), with its own mask and LoRA gate; the outputs packed again."""
        packed_gate = self.gate.value
        outs, start = [], 0
        try:
            for cache, length, gate in zip(self.caches, self.lengths, self.gates):
                xr = x[:, start : start + length]
                start += length
                self.gate.value = gate
                outs.append(call(xr, self._mask(mask, xr, cache), cache, *args, **kwargs))
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


# attention modules that compute scores themselves (not only through mlx-lm's
# scaled_dot_product_attention: soft-capping, latent attention's positional
# scores): run row by row whole
OWN_ATTENTION = ("mlx_lm.models.gemma2", "mlx_lm.models.deepseek_v3", "mlx_lm.models.glm4_moe_lite")


def _row_sdpa(module) -> bool:
    """Wrap ``module``'s ``scaled_dot_product_attention`` (once), mlx-lm's
    own, so that a :class:`RowsCache` runs it row by row; False where the
    module has another or none."""
    sdpa = getattr(module, "scaled_dot_product_attention", None)
    if getattr(sdpa, "_mtp_rows", False):
        return True
    if sdpa is not _base_sdpa or module.__name__ in OWN_ATTENTION:
        return False

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, RowsCache):
            return cache.attention(_base_sdpa, queries, mask, scale=scale, sinks=sinks)
        return _base_sdpa(queries, keys, values, cache, scale, mask, sinks)

    scaled_dot_product_attention._mtp_rows = True
    module.scaled_dot_product_attention = scaled_dot_product_attention
    return True


def install_row_attention(layers: List[nn.Module], whole: bool = False) -> bool:
    """Make the attention of every block in ``layers`` take packed rows
    (once): through the model module's scaled_dot_product_attention where
    it has one (``whole``: never), else the whole attention module row by
    row. False where some block's attention cannot be found."""
    attentions = [_attention_modules(block) for block in layers]
    if not all(len(a) == 1 for a in attentions):
        return False
    for (attn,) in attentions:
        cls = type(attn)
        if getattr(cls, "_mtp_row_aware", False) or (not whole and _row_sdpa(sys.modules[cls.__module__])):
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
