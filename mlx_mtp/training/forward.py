"""The two forward passes of a training step: the regular tokens once
(plain causal, no LoRA, detached) into a cache, then the masks over it in
chunks, each chunk's loss terms."""

from typing import Dict, List, Optional

import mlx.core as mx

from ..model.cache import SpecCache, commit
from ..model.mtp_model import MTPModel
from .batching import Chunk
from .losses import TERMS, Vocab, mask_losses


def regular_forward(mtp: MTPModel, tokens: mx.array):
    """Last hidden states of the regular tokens (plain causal, no LoRA) and
    the committed, detached cache holding their keys and values."""
    cache = mtp.make_cache()
    h = mx.stop_gradient(mtp(tokens, cache))
    commit(cache)
    for c in cache:
        c.detach()
    mx.eval(h, [(c.keys, c.values) for c in cache])
    return h, cache


def fork_cache(cache: List[SpecCache]) -> List[SpecCache]:
    """Fresh caches over the same committed entries (arrays are immutable,
    so each chunk writes its masks after them without touching the others)."""
    out = []
    for c in cache:
        f = SpecCache()
        f.keys, f.values, f.committed = c.keys, c.values, c.committed
        out.append(f)
    return out


def chunk_terms(
    mtp: MTPModel,
    chunk: Chunk,
    h_reg: mx.array,
    cache: List[SpecCache],
    ce_scale: float,
    lcm_scale: float,
    distill: bool,
    terms=TERMS,
    logits_out: Optional[dict] = None,
    vocab: Optional[Vocab] = None,
) -> Dict[str, mx.array]:
    """Weighted loss sums of one chunk of masks (over ``vocab`` if given)."""
    C = cache[0].committed
    z = mtp(chunk.tokens, fork_cache(cache), chunk.positions - C, chunk.mask, chunk.gate)
    d = z.shape[-1]
    zv = z.reshape(-1, d)[chunk.valid]
    target = h_reg.reshape(-1, d)[chunk.anchor]
    n = zv.shape[0]
    ce_w = mx.full((n,), ce_scale, dtype=mx.float32)
    lcm_w = mx.array(chunk.lcm_factor * lcm_scale, dtype=mx.float32)
    return mask_losses(mtp, zv, target, chunk.labels, chunk.prev, ce_w, lcm_w, distill, terms, logits_out, vocab)
