"""Sampler head: ``logits = lm_head(MLP([embed(y_prev); z]))``.

It conditions each speculated token on the one before it, which makes the k
speculations coherent with each other. The MLP is blocks of Linear, SiLU,
RMSNorm; by default two (2d -> d, d -> d) with a residual ``h1 + block2(h1)``:
the layout PyTorch trainers of the method use, so their weights import 1:1.
Its shape is configurable: ``num_layers`` blocks whose inner width is
``hidden_dims`` (2d -> h, h -> h, ..., h -> d; one block: 2d -> d), and with
``residual`` every block after the first whose input and output widths agree
adds its input.

With ``skip`` the head adds its output to z (``z + MLP([E(y_prev); z])``) and
starts with zero norm weights in the blocks whose outputs make up the MLP's
output (the last one, and those before it that a residual carries there), so
an untrained head drafts exactly what the model's LM head says at the mask
and training only has to learn the correction that the previous token
brings. Without it a fresh head starts far from the LM head (cross-entropy
~25 against ~8 on SmolLM2) and spends its first hundreds of steps getting
back there.
"""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

# bounds on a head's shape, so that a config cannot build millions of modules or
# huge matrices before its tensors are checked; far above any useful head
MAX_LAYERS = 16
MAX_WIDTH_FACTOR = 16  # hidden_dims <= 16 x the model's hidden size


@dataclass
class SamplerConfig:
    residual: bool = True
    eps: float = 1e-5
    skip: bool = False  # z + MLP(...), starting as the LM head at the mask
    hidden_dims: Optional[int] = None  # inner width of the MLP (None: the model's hidden size)
    num_layers: int = 2  # MLP blocks (the paper's head: 2)


def sampler_widths(dims: int, config: SamplerConfig) -> List[int]:
    """Input and output widths of the MLP's blocks in order:
    ``[2d, h, ..., h, d]`` (``num_layers`` + 1 entries)."""
    if not 1 <= config.num_layers <= MAX_LAYERS:
        raise ValueError(f"the sampler head's num_layers must be in 1..{MAX_LAYERS}, got {config.num_layers}")
    hidden = dims if config.hidden_dims is None else config.hidden_dims
    if not 1 <= hidden <= MAX_WIDTH_FACTOR * dims:
        raise ValueError(
            f"the sampler head's hidden_dims must be in 1..{MAX_WIDTH_FACTOR * dims} "
            f"({MAX_WIDTH_FACTOR}x the model's hidden size), got {hidden}"
        )
    return [2 * dims] + [hidden] * (config.num_layers - 1) + [dims]


class SamplerBlock(nn.Module):
    def __init__(self, in_dims: int, out_dims: int, eps: float, adds_input: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.norm = nn.RMSNorm(out_dims, eps=eps)
        self.adds_input = adds_input  # a residual: x + block(x)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.norm(nn.silu(self.linear(x)))
        return x + y if self.adds_input else y


class SamplerHead(nn.Module):
    """Maps (embedding of the previous token, mask hidden state) to a hidden
    state that the model's own LM head turns into logits."""

    def __init__(self, dims: int, config: SamplerConfig = SamplerConfig()):
        super().__init__()
        self.skip = config.skip
        widths = sampler_widths(dims, config)
        # a block adds its input (a residual) when it is not the first and the widths agree
        self.layers = [
            SamplerBlock(widths[i], widths[i + 1], config.eps, config.residual and i > 0 and widths[i] == widths[i + 1])
            for i in range(len(widths) - 1)
        ]
        if self.skip:
            for block in reversed(self.layers):
                block.norm.weight = mx.zeros_like(block.norm.weight)
                if not block.adds_input:
                    break

    def __call__(self, prev_embedding: mx.array, z: mx.array) -> mx.array:
        h = mx.concatenate([prev_embedding.astype(z.dtype), z], axis=-1)
        for block in self.layers:
            h = block(h)
        return z + h if self.skip else h
