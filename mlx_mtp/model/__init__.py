"""The MTP model: mask tokens, gated LoRA, the sampler head, attention layouts
and the speculative KV cache, over an unmodified mlx-lm model."""
