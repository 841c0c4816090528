"""Sampler head: ``logits = lm_head(MLP([embed(y_prev); z]))``.

It conditions each speculated token on the one before it, which makes the k
speculations coherent with each other. The MLP is two blocks of Linear, SiLU,
RMSNorm (2d -> d, d -> d), with an optional residual ``h1 + block2(h1)``: the
layout PyTorch trainers of the method use, so their weights import 1:1.

With ``skip`` the head adds its output to z (``z + MLP([E(y_prev); z])``) and
starts with zero norm weights, so an untrained head drafts exactly what the
model's LM head says at the mask and training only has to learn the
correction that the previous token brings. Without it a fresh head starts far
from the LM head (cross-entropy ~25 against ~8 on SmolLM2) and spends its
first hundreds of steps getting back there.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass
class SamplerConfig:
    residual: bool = True
    eps: float = 1e-5
    skip: bool = False  # z + MLP(...), starting as the LM head at the mask


class SamplerBlock(nn.Module):
    def __init__(self, in_dims: int, out_dims: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.norm = nn.RMSNorm(out_dims, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm(nn.silu(self.linear(x)))


class SamplerHead(nn.Module):
    """Maps (embedding of the previous token, mask hidden state) to a hidden
    state that the model's own LM head turns into logits."""

    def __init__(self, dims: int, config: SamplerConfig = SamplerConfig()):
        super().__init__()
        self.residual = config.residual
        self.skip = config.skip
        self.layers = [
            SamplerBlock(2 * dims, dims, config.eps),
            SamplerBlock(dims, dims, config.eps),
        ]
        if self.skip:
            for block in self.layers:
                block.norm.weight = mx.zeros_like(block.norm.weight)

    def __call__(self, prev_embedding: mx.array, z: mx.array) -> mx.array:
        x = mx.concatenate([prev_embedding.astype(z.dtype), z], axis=-1)
        h = self.layers[0](x)
        y = self.layers[1](h)
        out = h + y if self.residual else y
        return z + out if self.skip else out
