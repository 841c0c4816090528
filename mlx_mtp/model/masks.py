"""Learned mask embeddings m_1..m_k.

They live in the adapter, not in the tokenizer's vocabulary. In token arrays a
mask m_j (j = 1..k) is written as the negative id ``-j``, so one int array
carries both regular tokens and masks, and ``tokens < 0`` is the LoRA gate.
"""

import mlx.core as mx
import mlx.nn as nn

MAX_MASKS = 16


def mask_ids(k: int) -> mx.array:
    """The ids of m_1..m_k: ``[-1, ..., -k]``."""
    return -mx.arange(1, k + 1, dtype=mx.int32)


class MaskEmbeddings(nn.Module):
    """k distinct learned input embeddings, one per future offset."""

    def __init__(self, num_masks: int, dims: int, init_std: float = 0.02):
        super().__init__()
        if not 1 <= num_masks <= MAX_MASKS:
            raise ValueError(f"num_masks must be in 1..{MAX_MASKS}, got {num_masks}")
        self.weight = init_std * mx.random.normal((num_masks, dims))

    @property
    def num_masks(self) -> int:
        return self.weight.shape[0]

    def init_like(self, sample: mx.array):
        """Draw the rows anew as the model's token embeddings look: per
        coordinate, the mean plus Gaussian noise of the standard deviation of
        ``sample`` ((n, dims): embeddings of regular tokens).

        The default rows (std 0.02) can be several times smaller than a
        model's token embeddings; at the tokens' scale the masks enter the
        first layer as a token would (``--mask-init tokens``)."""
        sample = sample.astype(mx.float32)
        mean, std = sample.mean(axis=0), sample.std(axis=0)
        self.weight = mean + std * mx.random.normal(self.weight.shape)

    def __call__(self, tokens: mx.array, embed_tokens: nn.Module) -> mx.array:
        """Embed ``tokens`` (masks as negative ids) with the model's own input
        embedding for regular tokens and the mask table for masks."""
        is_mask = (tokens < 0)[..., None]
        h = embed_tokens(mx.maximum(tokens, 0))
        m = self.weight[mx.clip(-tokens - 1, 0, self.num_masks - 1)]
        return mx.where(is_mask, m.astype(h.dtype), h)
