"""Mask tokens through a model's own embedding: :func:`install_mask_embedding`.

Masks are negative token ids. The embedding instance's class becomes a
subclass whose ``__call__`` embeds them from the adapter's mask table (in the
:class:`MaskSlot` it shares with every :class:`~mlx_mtp.model.mtp_model.MTPModel`
over it) and regular tokens through the model's own embedding, so whatever
the model does after embedding (Gemma's and Granite's scaling) applies to both.
"""

from typing import Dict, Optional

import mlx.nn as nn

from .masks import MaskEmbeddings

__all__ = ["MaskSlot", "install_mask_embedding"]


class MaskSlot:
    """The mask table of the forward in flight (None: none), shared by a base
    model's embedding and every :class:`MTPModel` over it (a plain object, so
    not part of the module tree)."""

    def __init__(self):
        self.masks: Optional[MaskEmbeddings] = None


_MASK_AWARE: Dict[type, type] = {}


def install_mask_embedding(embed: nn.Module) -> MaskSlot:
    """Make ``embed`` embed masks (negative ids) from its slot's mask table.

    The instance's class becomes a subclass with that ``__call__`` (names,
    parameters, ``as_linear`` and quantization unchanged), so the model's own
    forward, scaling included, runs on masks as on regular tokens."""
    cls = type(embed)
    if not getattr(cls, "_mtp_mask_aware", False):
        sub = _MASK_AWARE.get(cls)
        if sub is None:
            base_call = cls.__call__

            def __call__(self, x, _base=base_call):
                masks = self._mtp_slot.masks
                if masks is None:
                    return _base(self, x)
                return masks(x, lambda ids: _base(self, ids))

            sub = _MASK_AWARE[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_mtp_mask_aware": True})
        embed.__class__ = sub
        embed._mtp_slot = MaskSlot()
    return embed._mtp_slot
