"""A generation's own random stream: :class:`RandomStream`.

Sampled decoding draws from mlx's global random state (speculative sampling's
uniforms and resamples, the masks' sampled chain, a caller's mlx-lm
``sampler``). Generations that share a batch take their steps in turns, so
drawing from one global stream would make each one's samples depend on the
others. Each generation therefore owns a stream: a seed drawn from the global
state when it starts (so ``mx.random.seed(s)`` before a generation decides
it, alone or in a batch), from which every step reseeds mlx's global state
just before its graph is built. A generation's samples are then a function of
its seed and its own steps only, whatever else runs beside it.
"""

import mlx.core as mx
import numpy as np

__all__ = ["RandomStream"]

# seeds are drawn below this bound (mx.random.seed takes a 64-bit integer)
_SEED_BOUND = 1 << 62


class RandomStream:
    """The random stream of one generation (see the module docstring)."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    @classmethod
    def drawn(cls) -> "RandomStream":
        """A stream seeded from mlx's global random state (which it advances)."""
        return cls(int(mx.random.randint(0, 1 << 30, ()).item()))

    def reseed(self):
        """Seed mlx's global state for the generation's next step."""
        mx.random.seed(int(self._rng.integers(0, _SEED_BOUND)))
