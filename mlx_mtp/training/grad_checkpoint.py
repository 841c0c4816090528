"""Gradient checkpointing of an MTP model's transformer blocks, per instance."""

from typing import Dict

import mlx.core as mx

from ..model.cache import SpecCache
from ..model.mtp_model import MTPModel

_CHECKPOINTED: Dict[type, type] = {}


def enable_grad_checkpoint(mtp: MTPModel):
    """Recompute each transformer block's activations in the backward pass.

    mlx-lm's ``grad_checkpoint`` cannot be used as is: the recomputation runs
    after the forward has returned, when the LoRA gate, the per-token
    positions and the attention mask of the step are no longer set. Here they
    are passed to the checkpointed function as arguments and set again inside
    it. Blocks keep their class's parameters and names (the instance's class
    becomes a subclass with a checkpointed ``__call__``).
    """
    gate = mtp._gate
    for block in mtp.layers:
        cls = type(block)
        if getattr(cls, "_mtp_checkpointed", False):
            continue
        sub = _CHECKPOINTED.get(cls)
        if sub is None:
            base_call = cls.__call__

            def __call__(self, x, mask=None, cache=None, *args, _base=base_call, **kwargs):
                g = self._mtp_gate.value
                if g is None or cache is None or not isinstance(cache, SpecCache):
                    return _base(self, x, mask, cache, *args, **kwargs)
                keys0, values0, committed = cache.keys, cache.values, cache.committed
                pos0, cmask0 = cache.positions, cache.mask

                def inner(params, x, g, pos, cmask, mask):
                    saved = (self._mtp_gate.value, cache.positions, cache.mask)
                    self.update(params)
                    self._mtp_gate.value = g
                    cache.keys, cache.values, cache.committed = keys0, values0, committed
                    cache.set_step(pos, cmask)
                    try:
                        return _base(self, x, mask, cache, *args, **kwargs)
                    finally:
                        self._mtp_gate.value = saved[0]
                        cache.set_step(saved[1], saved[2])

                return mx.checkpoint(inner)(self.trainable_parameters(), x, g, pos0, cmask0, mask)

            sub = type(cls.__name__, (cls,), {"__call__": __call__, "_mtp_checkpointed": True})
            _CHECKPOINTED[cls] = sub
        block.__class__ = sub
        block._mtp_gate = gate
