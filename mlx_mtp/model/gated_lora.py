"""Gated LoRA: ``y = W x + g(t) * s * B(A x)``, g = 1 on mask positions only.

The gate is a per-token array supplied per forward through a shared
:class:`Gate` object, so regular tokens take exactly the base layer's path and
the base model's next-token outputs stay unchanged. It cannot be fused into W.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

DEFAULT_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class Gate:
    """Holds the gate of the forward in flight: None (LoRA off), or an array
    broadcastable to (batch, length, 1) that is 1 at mask positions.

    :meth:`scaled` gives ``scale * gate`` in a dtype, computed once per
    forward for all the layers that share a scale (one op fewer per layer)."""

    def __init__(self):
        self._value: Optional[Union[mx.array, float]] = None
        self._scaled: Dict[tuple, mx.array] = {}

    @property
    def value(self) -> Optional[Union[mx.array, float]]:
        return self._value

    @value.setter
    def value(self, value: Optional[Union[mx.array, float]]):
        self._value = value
        self._scaled = {}

    def scaled(self, scale: float, dtype: mx.Dtype) -> mx.array:
        key = (scale, dtype)
        g = self._scaled.get(key)
        if g is None:
            g = self._scaled[key] = (scale * mx.array(self._value)).astype(dtype)
        return g


class GatedLoRALinear(nn.Module):
    """Wraps ``nn.Linear`` or ``nn.QuantizedLinear`` with a gated low-rank update.

    ``lora_a`` has shape (in, r) and ``lora_b`` (r, out); ``lora_b`` starts at
    zero so a fresh adapter leaves every output unchanged.
    """

    def __init__(
        self,
        linear: nn.Module,
        gate: Gate,
        rank: int,
        scale: float,
    ):
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits
        self.linear = linear
        self._gate = gate
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if self._gate.value is None:
            return y
        # y + (s g (x A)) B in three ops; rows where g = 0 add exact zeros,
        # so regular tokens get the base layer's output bit for bit
        u = (x @ self.lora_a.astype(x.dtype)) * self._gate.scaled(self.scale, x.dtype)
        return mx.addmm(y, u.astype(y.dtype), self.lora_b.astype(y.dtype))


@dataclass
class LoRAConfig:
    """Where and how gated LoRA is applied.

    ``ranks`` and ``scales`` override ``rank`` and ``scale`` per key (an
    imported adapter whose fused projections were split can carry larger
    ranks on some keys).
    """

    rank: int = 16
    scale: float = 2.0
    keys: List[str] = field(default_factory=lambda: list(DEFAULT_KEYS))
    layers: Optional[List[int]] = None
    ranks: Dict[str, int] = field(default_factory=dict)
    scales: Dict[str, float] = field(default_factory=dict)

    def rank_for(self, key: str) -> int:
        return self.ranks.get(key, self.rank)

    def scale_for(self, key: str) -> float:
        return self.scales.get(key, self.scale)


def submodule(module: nn.Module, dotted: str) -> Optional[nn.Module]:
    """The module at a dotted path under ``module`` (``"self_attn.q_proj"``), or None."""
    for part in dotted.split("."):
        module = module.get(part) if isinstance(module, dict) else getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module):
    *parents, last = dotted.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


def model_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The transformer blocks of an mlx-lm model."""
    if hasattr(model, "layers"):
        return model.layers
    return model.model.layers


# the last part of a name that marks a mixture-of-experts router, left out
# of the default keys (it picks experts; the experts are not nn.Linear)
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def _linear_names(block: nn.Module) -> List[str]:
    return [
        name
        for name, m in block.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear, GatedLoRALinear)) and ".linear" not in f".{name}"
    ]


def default_keys(model: nn.Module) -> List[str]:
    """The projections gated LoRA wraps by default: those of
    :data:`DEFAULT_KEYS` that the model's blocks have, then every other
    linear layer of their blocks by name (fused projections such as Phi-3's
    ``qkv_proj`` and ``gate_up_proj``, StarCoder2's ``c_fc``), routers of
    mixture-of-experts blocks excepted."""
    found: List[str] = []
    for block in model_layers(model):
        for name in _linear_names(block):
            if name not in found and name.split(".")[-1] not in ROUTER_NAMES:
                found.append(name)
    return [k for k in DEFAULT_KEYS if k in found] + sorted(k for k in found if k not in DEFAULT_KEYS)


def resolve_keys(model: nn.Module, keys: Sequence[str]) -> List[str]:
    """``keys``, where they are the defaults (:data:`DEFAULT_KEYS`): the
    model's own (:func:`default_keys`), so an adapter records what it wraps."""
    return default_keys(model) if list(keys) == list(DEFAULT_KEYS) else list(keys)


def apply_gated_lora(model: nn.Module, gate: Gate, config: LoRAConfig) -> nn.Module:
    """Replace the ``config.keys`` projections of ``config.layers`` (default:
    all) of an mlx-lm model with :class:`GatedLoRALinear` sharing ``gate``.
    A block without a key is left as it is there (dense and
    mixture-of-experts blocks in one model), a key no block has is an error.

    Freezes the base model; only the LoRA matrices stay trainable.
    """
    layers = model_layers(model)
    indices = range(len(layers)) if config.layers is None else config.layers
    model.freeze()
    for i in indices:
        if not 0 <= i < len(layers):
            raise ValueError(f"LoRA layer {i} out of range: the model has {len(layers)} layers")
    for key in config.keys:
        if all(submodule(layers[i], key) is None for i in indices):
            raise ValueError(f"the model's layers have no projection named '{key}'")
    for i in indices:
        block = layers[i]
        for key in config.keys:
            linear = submodule(block, key)
            if linear is None:
                continue
            if isinstance(linear, GatedLoRALinear):
                raise ValueError(f"layer {i} '{key}' already has gated LoRA")
            if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
                raise ValueError(f"layer {i} '{key}' is a {type(linear).__name__}, not a Linear")
            lora = GatedLoRALinear(linear, gate, config.rank_for(key), config.scale_for(key))
            lora.linear.freeze()
            _set(block, key, lora)
    return model


def lora_parameters(model: nn.Module) -> Dict[str, mx.array]:
    """Flat {name: array} of every LoRA matrix in the model."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith(".lora_a") or k.endswith(".lora_b")}
