"""A KV cache that commits only accepted tokens.

A forward over new tokens (regular tokens, speculated tokens, masks) attends to
the committed entries plus the new ones under an arbitrary boolean mask, at
arbitrary per-token positions. Afterwards :meth:`SpecCache.commit` keeps a
chosen subset of the new entries (the accepted regular tokens) and drops the
rest, so the cache always equals the base model's cache over the accepted text.

The cache speaks mlx-lm's cache protocol (``offset``, ``update_and_fetch``,
``make_mask``, ``state`` get and set, ``meta_state``, ``trim``, ``from_state``),
so mlx-lm's ``save_prompt_cache`` / ``load_prompt_cache`` /
``trim_prompt_cache`` work on a list of them: while a step is set, ``offset`` is the (B, L) array of
positions, which :class:`mlx_mtp.model.rope.PositionalRoPE` applies per token.
"""

from typing import List, Optional, Sequence, Union

import mlx.core as mx
import mlx_lm.models.cache as _lm_cache
from mlx_lm.models.cache import KVCache, create_attention_mask

from .gated_lora import model_layers


class SpecCache:
    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.committed = 0
        self.pending = 0
        self.positions: Optional[mx.array] = None
        self.mask: Optional[mx.array] = None

    # --- mlx-lm cache protocol -------------------------------------------
    @property
    def offset(self) -> Union[int, mx.array]:
        return self.committed if self.positions is None else self.positions

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        if self.mask is not None:
            if window_size is None:
                return self.mask
            # a sliding-window layer: keys within the window by position
            C = self.committed
            keys = mx.concatenate([mx.broadcast_to(mx.arange(C), (self.positions.shape[0], C)), self.positions], axis=1)
            return self.mask & (self.positions[:, None, :, None] - keys[:, None, None, :] < window_size)
        return create_attention_mask(N, offset=self.committed, return_array=return_array, window_size=window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Write the new entries after the committed ones (as pending) and
        return committed + new."""
        C, L = self.committed, keys.shape[2]
        if self.keys is None or C + L > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            size = ((C + L + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, size, Dk), keys.dtype)
            new_v = mx.zeros((B, H, size, values.shape[3]), values.dtype)
            if self.keys is not None and C:
                new_k[..., :C, :] = self.keys[..., :C, :]
                new_v[..., :C, :] = self.values[..., :C, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., C : C + L, :] = keys
        self.values[..., C : C + L, :] = values
        self.pending = L
        return self.keys[..., : C + L, :], self.values[..., : C + L, :]

    def size(self) -> int:
        return self.committed

    @property
    def state(self):
        """The committed entries: (keys, values), each (B, H, committed, D);
        (None, None) while empty."""
        if self.keys is None:
            return None, None
        return self.keys[..., : self.committed, :], self.values[..., : self.committed, :]

    @state.setter
    def state(self, v):
        keys, values = v
        self.keys, self.values = keys, values
        self.committed = 0 if keys is None else keys.shape[2]
        self._drop_pending()

    @property
    def meta_state(self):
        """Nothing beyond ``state`` (for mlx-lm versions that save it)."""
        return ""

    @meta_state.setter
    def meta_state(self, v):
        if v not in ("", None, [], ()):
            raise ValueError(f"SpecCache has no meta state, got {v!r}")

    @classmethod
    def from_state(cls, state, meta_state=""):
        """A cache holding ``state`` (what :func:`mlx_lm.models.cache.load_prompt_cache` calls)."""
        cache = cls()
        cache.state = state
        cache.meta_state = meta_state
        return cache

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` committed entries (and any pending ones, which
        lie after them); returns how many committed entries were dropped."""
        n = max(0, min(self.committed, n))
        self.committed -= n
        self._drop_pending()
        return n

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    # --- selective commit --------------------------------------------------
    def set_step(self, positions: Optional[mx.array], mask: Optional[mx.array]):
        """Per-token positions (B, L) and full mask (B or 1, 1, L, C + L) of
        the next forward; None for the model's own causal behaviour."""
        self.positions = positions
        self.mask = mask

    def commit(self, keep: Optional[Union[Sequence[int], mx.array]] = None):
        """Keep the pending entries at indices ``keep`` (relative to the first
        new token, in order; None keeps all) and drop the others."""
        C = self.committed
        if keep is None:
            n = self.pending
        else:
            n = len(keep)
            if n > self.pending:
                raise ValueError(f"cannot commit {n} entries, {self.pending} are pending")
            if not isinstance(keep, mx.array) and any(not 0 <= i < self.pending for i in keep):
                raise ValueError(f"commit indices {list(keep)} out of range: {self.pending} entries are pending")
            is_prefix = not isinstance(keep, mx.array) and list(keep) == list(range(n))
            if n and not is_prefix:
                idx = C + mx.array(keep, dtype=mx.int32)
                self.keys[..., C : C + n, :] = self.keys[..., idx, :]
                self.values[..., C : C + n, :] = self.values[..., idx, :]
        self.committed = C + n
        self._drop_pending()

    def _drop_pending(self):
        self.pending = 0
        self.positions = None
        self.mask = None

    def detach(self):
        """Stop gradients through the stored entries (training)."""
        if self.keys is not None:
            self.keys = mx.stop_gradient(self.keys)
            self.values = mx.stop_gradient(self.values)


# mlx-lm's load_prompt_cache finds a saved cache's class by name in its cache
# module: make SpecCache one of them, so saved SpecCaches load back
setattr(_lm_cache, SpecCache.__name__, SpecCache)


def make_spec_cache(model) -> List[SpecCache]:
    """One :class:`SpecCache` per transformer block of an mlx-lm model."""
    return [SpecCache() for _ in model_layers(model)]


def commit(cache: List[SpecCache], keep: Optional[Union[Sequence[int], mx.array]] = None):
    for c in cache:
        c.commit(keep)


def set_step(cache: List[SpecCache], positions: Optional[mx.array], mask: Optional[mx.array]):
    for c in cache:
        c.set_step(positions, mask)


def as_spec_cache(cache: Sequence, num_layers: int) -> List[SpecCache]:
    """The SpecCaches to decode with over a prompt cache of ``num_layers``
    layers: SpecCaches as they are; mlx-lm ``KVCache``s adopted (their arrays,
    no copy; :func:`write_back` hands the result back). Other caches
    (rotating, quantized, ...) cannot drop rejected speculations exactly and
    are refused."""
    if not isinstance(cache, (list, tuple)):
        kind = type(cache).__name__
        raise TypeError(f"prompt_cache must be a list of per-layer caches (make_prompt_cache), got {kind}")
    if len(cache) != num_layers:
        raise ValueError(f"prompt_cache has {len(cache)} layers, the model {num_layers}")
    out = []
    for c in cache:
        if isinstance(c, SpecCache):
            out.append(c)
        elif type(c) is KVCache:
            spec = SpecCache()
            if c.keys is not None and c.offset:
                spec.keys, spec.values, spec.committed = c.keys, c.values, c.offset
            out.append(spec)
        else:
            raise TypeError(
                f"prompt_cache holds a {type(c).__name__}: speculative decoding needs caches that drop "
                "rejected entries exactly (mlx_mtp.make_prompt_cache, or mlx-lm's KVCache)"
            )
    if len({c.committed for c in out}) > 1:
        raise ValueError("prompt_cache's layers hold different numbers of tokens")
    return out


def write_back(cache: Sequence, spec: Sequence[SpecCache]):
    """Hand the entries of adopted caches (:func:`as_spec_cache`) back to mlx-lm's KVCaches."""
    for c, s in zip(cache, spec):
        if c is not s:
            c.keys, c.values, c.offset = s.keys, s.values, s.committed
