"""The MTP model adapter: an unmodified mlx-lm model run with mask tokens.

:class:`MTPModel` wraps a loaded mlx-lm model (llama, qwen2/3, mistral,
gemma2/3, phi3, granite, olmo2, ...: see ``docs/architectures.md``) through
the seams it offers, the same for every family:

- the token embedding: its instance becomes a subclass whose ``__call__``
  embeds masks (negative ids) from the adapter's mask table and regular tokens
  through the model's own embedding, so whatever the model does after
  embedding (Gemma's and Granite's scaling) applies to both
  (:mod:`mlx_mtp.model.embedding`);
- the linear layers: gated LoRA, switched on per token by a shared gate;
- each attention's ``rope``: wrapped so that per-token positions (an array
  ``offset`` of shape (B, L), supplied by :class:`~mlx_mtp.cache.SpecCache`)
  go through the model's own RoPE variant, by folding the sequence axis into
  the batch axis (mlx RoPE takes one offset per batch row); a layer without
  RoPE (SmolLM3's, Cohere2's global layers) ignores it (:mod:`mlx_mtp.model.rope`);
- the cache: :class:`~mlx_mtp.cache.SpecCache` supplies the attention mask
  (restricted to the window on sliding-window layers) and commits only
  accepted tokens;
- the output: the model's own ``__call__`` after its inner model, run on
  given hidden states (tied or not, scaled, soft-capped: whatever it does).

Which models have these seams is decided in :mod:`mlx_mtp.model.architectures`.
Without an adapter it also runs plain decoding through the same path; a model
without the seams can be wrapped only without an adapter (plain decoding).
"""

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .architectures import UnsupportedModelError, language_model, model_type, supports
from .cache import SpecCache, make_spec_cache, set_step
from .embedding import install_mask_embedding
from .gated_lora import Gate, LoRAConfig, apply_gated_lora, model_layers, resolve_keys
from .layouts import Layout
from .masks import MaskEmbeddings
from .rope import PositionalRoPE, install_positional_rope  # noqa: F401  (PositionalRoPE: re-exported)
from .rows import Feed, RowsCache, install_row_attention
from .sampler import SamplerConfig, SamplerHead


class _Returns:
    """Stands in for a model's inner model: returns given hidden states,
    forwards every attribute (``embed_tokens``, ``args``) to the real one."""

    def __init__(self, inner: nn.Module, h: mx.array):
        self._inner, self._h = inner, h

    def __call__(self, *args, **kwargs) -> mx.array:
        return self._h

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _HeadView:
    """A model seen with its inner model replaced by :class:`_Returns`."""

    def __init__(self, model: nn.Module, h: mx.array):
        self._model = model
        self.model = _Returns(model.model, h)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


@dataclass
class MTPConfig:
    """What an adapter adds to a base model."""

    num_masks: int = 8
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # k to decode with by default, per device type ("cpu", "gpu"), where it was
    # measured to beat the trained k (verification costs more per token on CPUs)
    decode_num_masks: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for device, k in self.decode_num_masks.items():
            if device not in ("cpu", "gpu") or not 0 <= int(k) <= self.num_masks:
                raise ValueError(
                    f"decode_num_masks: '{device}': {k} (devices cpu/gpu, 0 <= k <= num_masks={self.num_masks})"
                )

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        # the sampler head's shape is written only when it is not the default,
        # so an adapter of the default shape keeps the config earlier versions read
        for key in ("hidden_dims", "num_layers"):
            if d["sampler"][key] == getattr(SamplerConfig, key):
                del d["sampler"][key]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MTPConfig":
        return cls(
            num_masks=int(d["num_masks"]),
            lora=LoRAConfig(**d.get("lora", {})),
            sampler=SamplerConfig(**d.get("sampler", {})),
            decode_num_masks={str(k): int(v) for k, v in d.get("decode_num_masks", {}).items()},
        )


def base_model_identity(model: nn.Module) -> Dict[str, Any]:
    """What an adapter must agree with: model type and the shapes it touches
    (None where a model without the adapter's seams has no such thing)."""
    lm = language_model(model)
    if lm is None:
        return {"model_type": model_type(model), "hidden_size": None, "num_layers": None, "vocab_size": None}
    vocab, dims = embedding_shape(lm.model.embed_tokens)
    return {
        "model_type": getattr(lm, "model_type", getattr(getattr(lm, "args", None), "model_type", None)),
        "hidden_size": dims,
        "num_layers": len(model_layers(lm)),
        "vocab_size": vocab,
    }


def embedding_shape(embed: nn.Module):
    """(vocabulary, width) of an embedding, plain or quantized."""
    vocab, dims = embed.weight.shape
    if isinstance(embed, nn.QuantizedEmbedding):
        dims = dims * 32 // embed.bits
    return vocab, dims


class _Rows(NamedTuple):
    """Rows packed along the token axis, for one forward (:meth:`MTPModel.forward_rows`)."""

    tokens: mx.array  # (1, sum L)
    caches: List[List[SpecCache]]
    lengths: List[int]
    positions: mx.array  # (1, sum L): every token's absolute position
    gates: List[Optional[mx.array]]  # each row's LoRA gate (1, L, 1), or None
    steps: List[Optional[tuple]]  # each row's (positions, mask) of a masked forward, or None


class MTPModel(nn.Module):
    """An mlx-lm model with (optionally) mask embeddings, gated LoRA and a
    sampler head. Only the adapter parts are trainable."""

    def __init__(self, model: nn.Module, config: Optional[MTPConfig] = None):
        super().__init__()
        support = supports(model)
        if config is not None:
            support.require()
        # not part of the module tree: a plain attribute
        object.__setattr__(self, "support", support)
        # whether several sequences can share a forward (forward_rows)
        self.packs_rows = False
        if support.supported:
            model = language_model(model)
            install_positional_rope(model)
            self._slot = install_mask_embedding(model.model.embed_tokens)
            self.packs_rows = install_row_attention(model_layers(model))
        self.model = model
        self.model.freeze()
        self._gate = Gate()
        self._draft_vocab: Optional[mx.array] = None
        self._draft_head = None
        self.config = config
        self.masks: Optional[MaskEmbeddings] = None
        self.sampler: Optional[SamplerHead] = None
        if config is not None:
            dims = self.hidden_size
            config = self.config = replace(
                config, lora=replace(config.lora, keys=resolve_keys(model, config.lora.keys))
            )
            apply_gated_lora(model, self._gate, config.lora)
            self.masks = MaskEmbeddings(config.num_masks, dims)
            self.sampler = SamplerHead(dims, config.sampler)

    def init_masks_like_tokens(self, num_samples: int = 4096):
        """Draw the mask rows at the scale of the model's token embeddings
        (:meth:`MaskEmbeddings.init_like`), from ``num_samples`` token ids
        drawn uniformly (with replacement) from the vocabulary."""
        ids = mx.random.randint(0, self.vocab_size, (num_samples,))
        self.masks.init_like(self.model.model.embed_tokens(ids))

    # --- properties ------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return embedding_shape(self.model.model.embed_tokens)[1]

    @property
    def vocab_size(self) -> int:
        return embedding_shape(self.model.model.embed_tokens)[0]

    @property
    def num_masks(self) -> int:
        return 0 if self.masks is None else self.masks.num_masks

    @property
    def default_num_masks(self) -> int:
        """The k to decode with when none is asked for: the adapter's
        ``decode_num_masks`` for the default device's type, else the trained k."""
        if self.config is None:
            return 0
        device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
        return self.config.decode_num_masks.get(device, self.num_masks)

    @property
    def layers(self) -> List[nn.Module]:
        return model_layers(self.model)

    def make_cache(self) -> List[SpecCache]:
        self._require_seams()
        return make_spec_cache(self.model)

    def _require_seams(self):
        if not self.support.supported:
            raise UnsupportedModelError(
                f"model type '{self.support.model_type}' decodes only plainly "
                f"(mlx_mtp.decoding.fallback): {self.support.reason}"
            )

    def adapter_parameters(self) -> Dict[str, mx.array]:
        """Flat {name: array} of everything the adapter adds."""
        return dict(tree_flatten(self.trainable_parameters()))

    # --- forward ---------------------------------------------------------------
    def embed(self, tokens: mx.array) -> mx.array:
        """Embedding-table rows of ``tokens``; masks (negative ids) from the
        mask table (before any scaling the model applies in its forward)."""
        self._slot.masks = self.masks
        try:
            return self.model.model.embed_tokens(tokens)
        finally:
            self._slot.masks = None

    def lm_head(self, h: mx.array) -> mx.array:
        """The model's own output (tied or not, quantized or not, scaled or
        soft-capped) from final hidden states ``h`` (..., d): its ``__call__``
        with the inner model returning ``h``."""
        view = _HeadView(self.model, h)
        return type(self.model).__call__(view, mx.zeros(h.shape[:-1], dtype=mx.int32))

    def __call__(
        self,
        tokens: mx.array,
        cache: Optional[List[SpecCache]] = None,
        positions: Optional[mx.array] = None,
        mask: Optional[mx.array] = None,
        gate: Optional[mx.array] = None,
    ) -> mx.array:
        """Last hidden states (after the final norm) of new ``tokens`` (B, L).

        ``positions`` (L,) or (B, L) are relative to the first new token;
        ``mask`` (L, L) or (B, L, L) says which new tokens each new token sees
        (all committed tokens are visible), or (L, C + L) / (B, L, C + L) with
        C committed tokens says which committed and new tokens each new token
        sees (training hides the regular tokens after a block's anchor this
        way); both None: the model's own causal
        forward. ``gate`` (L,) or (B, L), true on masks: where LoRA is on.
        """
        if cache is None:
            cache = self.make_cache()
        self._require_seams()
        if tokens.ndim == 1:
            tokens = tokens[None]
        B, L = tokens.shape
        C = cache[0].committed
        if positions is not None or mask is not None:
            positions, mask = self._step_arrays(B, L, C, positions, mask)
            if mask.shape[0] > 1 and not self.support.batched_masks:
                return self._row_by_row(tokens, cache, positions, mask, gate)
            set_step(cache, positions, mask[:, None])
        self._gate.value = self._gate_value(gate)
        return self._inner(tokens, cache, [cache])

    @staticmethod
    def _step_arrays(B: int, L: int, C: int, positions: Optional[mx.array], mask: Optional[mx.array]):
        """Absolute positions (B, L) and the mask over committed + new
        tokens (B or 1, L, C + L) of a masked forward (see :meth:`__call__`)."""
        if positions is None:
            positions = mx.arange(L, dtype=mx.int32)
        positions = mx.broadcast_to(positions.astype(mx.int32) + C, (B, L))
        if mask is None:
            mask = mx.tril(mx.ones((L, L), dtype=mx.bool_))
        if mask.ndim == 2:
            mask = mask[None]
        if C and mask.shape[-1] == L:
            seen = mx.ones((mask.shape[0], L, C), dtype=mx.bool_)
            mask = mx.concatenate([seen, mask], axis=-1)
        elif mask.shape[-1] != C + L:
            raise ValueError(
                f"mask has {mask.shape[-1]} columns: expected {L} (new tokens) or {C + L} (committed + new)"
            )
        return positions, mask

    def _gate_value(self, gate: Optional[mx.array]) -> Optional[mx.array]:
        """The LoRA gate of a forward, (B, L, 1) float32 (None: LoRA off)."""
        if gate is None or self.masks is None:
            return None
        g = gate if gate.ndim == 2 else gate[None]
        return g[..., None].astype(mx.float32)

    def _inner(self, tokens: mx.array, layer_caches: list, row_caches: List[List[SpecCache]]) -> mx.array:
        """The inner model over ``tokens`` with the gate set; every row's
        step (positions, mask) and the gate cleared afterwards."""
        self._slot.masks = self.masks
        try:
            return self.model.model(tokens, layer_caches)
        finally:
            self._gate.value = None
            self._slot.masks = None
            for cache in row_caches:
                set_step(cache, None, None)

    def forward_rows(self, feeds: List[Feed], caches: List[List[SpecCache]]) -> List[mx.array]:
        """Hidden states (L_r, d) of several rows in one forward, each row
        ``feeds[r]`` over its own cache ``caches[r]``, packed along the token
        axis with attention row by row (:mod:`mlx_mtp.model.rows`): each
        row's attention is exactly its own forward's."""
        self._require_seams()
        if not self.packs_rows:
            raise ValueError(f"model type '{self.support.model_type}' cannot pack rows: no attention module found")
        lengths, gates, positions, steps = [], [], [], []
        for feed, cache in zip(feeds, caches):
            L, C = feed.tokens.shape[0], cache[0].committed
            lengths.append(L)
            step = None
            if feed.positions is not None or feed.mask is not None:
                step = self._step_arrays(1, L, C, feed.positions, feed.mask)
            positions.append(mx.arange(C, C + L, dtype=mx.int32) if step is None else step[0][0])
            steps.append(step)
            gates.append(self._gate_value(feed.gate))
        tokens = mx.concatenate([feed.tokens.astype(mx.int32) for feed in feeds])[None]
        rows = _Rows(tokens, caches, lengths, mx.concatenate(positions)[None], gates, steps)
        try:
            h = self._packed(rows)
        except (ValueError, TypeError, RuntimeError):
            # an attention that uses the mask or the keys itself: run it whole, row by row, from now on
            install_row_attention(model_layers(self.model), whole=True)
            h = self._packed(rows)
        bounds = [sum(lengths[: r + 1]) for r in range(len(lengths) - 1)]
        return mx.split(h, bounds, axis=0) if bounds else [h]

    def _packed(self, rows: "_Rows") -> mx.array:
        """The inner model over rows packed along the token axis (:meth:`forward_rows`)."""
        for cache, step in zip(rows.caches, rows.steps):
            if step is not None:
                set_step(cache, step[0], step[1][:, None])
        self._gate.value = None
        if any(g is not None for g in rows.gates):
            # rows without masks: a zero gate adds exact zeros (gated_lora)
            gates = [
                mx.zeros((1, L, 1), dtype=mx.float32) if g is None else g for g, L in zip(rows.gates, rows.lengths)
            ]
            self._gate.value = mx.concatenate(gates, axis=1)
        layers = [
            RowsCache([c[i] for c in rows.caches], rows.lengths, rows.positions, rows.gates, self._gate)
            for i in range(len(rows.caches[0]))
        ]
        h = self._inner(rows.tokens, layers, rows.caches)[0]
        if any(layer.fetched is not None for layer in layers):  # keys written, but no attention read them
            raise RuntimeError(
                f"model type '{self.support.model_type}': its attention does not go through mlx-lm's "
                "scaled_dot_product_attention"
            )
        return h

    def _row_by_row(self, tokens, cache, positions, mask, gate) -> mx.array:
        """A masked forward one batch row at a time (attention that cannot
        take a mask per row, :data:`architectures.ROW_BY_ROW_ATTENTION`);
        the caches end as after the batched forward."""
        B = tokens.shape[0]
        C = cache[0].committed
        rows, hs = [], []
        for b in range(B):
            views = []
            for c in cache:
                v = SpecCache()
                if c.keys is not None:
                    v.keys, v.values = c.keys[b : b + 1], c.values[b : b + 1]
                v.committed = C
                views.append(v)
            g = None
            if gate is not None:
                g = gate if gate.ndim == 2 else gate[None]
                g = g[b : b + 1] if g.shape[0] > 1 else g
            m = mask[b : b + 1] if mask.shape[0] > 1 else mask
            hs.append(self(tokens[b : b + 1], views, positions[b : b + 1] - C, m, g))
            rows.append(views)
        for i, c in enumerate(cache):
            c.keys = mx.concatenate([r[i].keys for r in rows])
            c.values = mx.concatenate([r[i].values for r in rows])
            c.pending = rows[0][i].pending
        return mx.concatenate(hs)

    def forward_layout(self, layout: Layout, cache: List[SpecCache]) -> mx.array:
        """Hidden states (1, L, d) of a decoding layout over ``cache``."""
        return self(layout.tokens, cache, layout.positions, layout.mask, layout.gate)

    def logits(self, tokens: mx.array, cache: Optional[List[SpecCache]] = None, **kwargs) -> mx.array:
        """Base LM-head logits of new tokens (see :meth:`__call__`)."""
        return self.lm_head(self(tokens, cache, **kwargs))

    def sampler_logits(self, prev_tokens: mx.array, z: mx.array) -> mx.array:
        """Sampler-head logits from the previous tokens and mask hidden states.

        With a draft vocabulary (:meth:`set_draft_vocab`) only its rows of the
        output projection are computed; other tokens get -inf.
        """
        h = self.sampler_hidden(prev_tokens, z)
        if self._draft_vocab is None:
            return self.lm_head(h)
        sub = self._draft_head(h)
        full = mx.full((*sub.shape[:-1], self.vocab_size), -mx.inf, dtype=sub.dtype)
        full[..., self._draft_vocab] = sub
        return full

    def sampler_hidden(self, prev_tokens: mx.array, z: mx.array) -> mx.array:
        """The sampler head's hidden state (what the LM head turns into its logits)."""
        if self.sampler is None:
            raise ValueError("this model has no adapter (no sampler head)")
        return self.sampler(self.model.model.embed_tokens(prev_tokens), z)

    @property
    def draft_vocab(self) -> Optional[mx.array]:
        return self._draft_vocab

    def set_draft_vocab(self, ids: Optional[mx.array]):
        """Restrict the sampler head's drafts to the token ids ``ids``.

        Drafting is then cheaper (the output projection is the sampler chain's
        main cost on small models, one call per speculated token); verification
        still uses the whole vocabulary, so outputs are unchanged.
        """
        if ids is None:
            self._draft_vocab = self._draft_head = None
            return
        ids = mx.array(ids).astype(mx.int32).reshape(-1)
        self._draft_vocab, self._draft_head = ids, self.vocab_head(ids)

    def vocab_head(self, ids: mx.array):
        """The output projection's rows ``ids`` as a function of final hidden
        states: ``h -> logits[..., ids]`` for a model whose output is a plain
        projection (tied or not, quantized or not), at the cost of those rows."""
        if ids.size and (ids.min().item() < 0 or ids.max().item() >= self.vocab_size):
            raise ValueError(f"draft vocabulary ids must be in [0, {self.vocab_size})")
        src = self.model.lm_head if hasattr(self.model, "lm_head") else self.model.model.embed_tokens
        if "scales" in src:
            w, scales = src.weight[ids], src.scales[ids]
            biases = src.biases[ids] if "biases" in src else None
            group_size, bits = src.group_size, src.bits
            mode = getattr(src, "mode", "affine")

            def head(h):
                return mx.quantized_matmul(
                    h, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode
                )
        else:
            w = src.weight[ids]

            def head(h):
                return h @ w.astype(h.dtype).T

        mx.eval(w)
        return head
