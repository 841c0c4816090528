"""Which mlx-lm models the MTP adapter can serve, and why not where it cannot.

The adapter runs an unmodified mlx-lm model through seams
(:mod:`mlx_mtp.model.mtp_model`): a token embedding and a list of blocks
(``model.embed_tokens``, ``model.layers``, directly or under a vision-language
wrapper's ``language_model``), a RoPE module in every block (positions reach
the model only through ``cache.offset``), and a key/value cache per block that
can hold any subset of tokens. :func:`supports` checks those seams on a loaded
model and says what is missing; the decoder falls back to plain decoding for a
model without them (:mod:`mlx_mtp.decoding.fallback`), and attaching or
training an adapter raises :class:`UnsupportedModelError`.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

from ..errors import MTPError
from .rope import PositionalRoPE

# attention whose scores are laid out (B, kv heads, repeats, L, S): a mask
# with a batch axis > 1 would broadcast against the kv heads, so batched
# masked forwards run one row at a time (MTPModel)
ROW_BY_ROW_ATTENTION = ("mlx_lm.models.gemma2",)

# RoPE variants whose frequencies depend on the length of the forward, which
# per-token positions cannot reproduce
LENGTH_DEPENDENT_ROPE = ("DynamicNTKScalingRoPE",)


# blocks that read positions outside RoPE, where per-token positions would
# be taken for one offset per batch row: module -> what they do
POSITIONS_OUTSIDE_ROPE = {
    "mlx_lm.models.ministral3": "scales its queries by position (Llama 4 attention scaling) outside RoPE",
}


class UnsupportedModelError(MTPError):
    """The model's architecture cannot carry an MTP adapter (the reason says why)."""


@dataclass
class Support:
    """What :func:`supports` found.

    ``rollback``: whether mlx-lm's own cache of the model can drop tokens
    (what copied drafts would need where the adapter cannot serve).
    """

    model_type: str
    supported: bool
    reason: str = ""
    rollback: bool = False
    num_layers: int = 0
    sliding_layers: int = 0  # blocks with a sliding-window (rotating) cache
    rope_types: List[str] = field(default_factory=list)
    batched_masks: bool = True  # False: masked forwards with batch > 1 run row by row

    def require(self):
        """Raise :class:`UnsupportedModelError` unless supported."""
        if not self.supported:
            raise UnsupportedModelError(f"model type '{self.model_type}' cannot carry an MTP adapter: {self.reason}")


def model_type(model: nn.Module) -> str:
    args = getattr(model, "args", None)
    return str(getattr(model, "model_type", None) or getattr(args, "model_type", None) or type(model).__name__)


def _has_seams(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    return isinstance(inner, nn.Module) and hasattr(inner, "embed_tokens") and hasattr(inner, "layers")


def language_model(model: nn.Module) -> Optional[nn.Module]:
    """The text model the adapter wraps: ``model`` itself, or a
    vision-language wrapper's ``language_model``; None if neither has the
    embedding/blocks seams."""
    if _has_seams(model):
        return model
    lm = getattr(model, "language_model", None)
    if isinstance(lm, nn.Module) and _has_seams(lm):
        return lm
    return None


def _ropes(block: nn.Module) -> List[nn.Module]:
    return [m for name, m in block.named_modules() if name.split(".")[-1] == "rope"]


def _recurrent(cache) -> bool:
    """An mlx-lm cache holding a recurrent state (alone or in a CacheList)."""
    return isinstance(cache, ArraysCache) or any(_recurrent(c) for c in getattr(cache, "caches", ()))


def supports(model: nn.Module) -> Support:
    """Check the seams the adapter needs on a loaded mlx-lm model."""
    mtype = model_type(model)
    try:
        caches = make_prompt_cache(model)
    except Exception as e:  # a model whose cache cannot even be built
        return Support(mtype, False, f"its cache cannot be built ({type(e).__name__}: {e})")
    rollback = all(c.is_trimmable() for c in caches)
    lm = language_model(model)
    layers = list(getattr(lm.model, "layers", [])) if lm is not None else list(getattr(model, "layers", []) or [])
    support = Support(mtype, False, rollback=rollback, num_layers=len(layers))
    for i, c in enumerate(caches):
        if not isinstance(c, (KVCache, RotatingKVCache)):
            kind = " (recurrent or state-space state)" if _recurrent(c) else ""
            support.reason = (
                f"layer {i} keeps an mlx-lm {type(c).__name__}{kind}, not a plain key/value cache that can "
                "hold speculated tokens beside accepted ones and drop the rejected ones"
            )
            return support
    if lm is None:
        support.reason = (
            "it has no token embedding and block list (model.embed_tokens, model.layers) to run masks through"
        )
        return support
    if len(caches) != len(layers):
        support.reason = f"its {len(layers)} blocks share {len(caches)} caches"
        return support
    support.sliding_layers = sum(isinstance(c, RotatingKVCache) for c in caches)
    rope_types = set()
    for i, block in enumerate(layers):
        outside = POSITIONS_OUTSIDE_ROPE.get(type(block).__module__)
        if outside is not None:
            support.reason = f"block {i} {outside}"
            return support
        ropes = _ropes(block)
        if not ropes:
            support.reason = f"block {i} has no 'rope' module: its positions do not come from RoPE"
            return support
        for r in ropes:
            r = r.rope if isinstance(r, PositionalRoPE) else r
            name = type(r).__name__
            if name in LENGTH_DEPENDENT_ROPE:
                support.reason = f"block {i} uses {name}, whose frequencies depend on the forward's length"
                return support
            rope_types.add(name)
        attn = getattr(block, "self_attn", None)
        if attn is not None and type(attn).__module__ in ROW_BY_ROW_ATTENTION:
            support.batched_masks = False
    support.rope_types = sorted(rope_types)
    support.supported = True
    return support


def require_supported(model: nn.Module) -> Support:
    """:func:`supports`, raising :class:`UnsupportedModelError` where not."""
    support = supports(model)
    support.require()
    return support
