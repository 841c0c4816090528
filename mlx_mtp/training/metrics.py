"""Validation metrics: per-depth accuracy of the speculated tokens, the
tokens per decoding step they imply, and the totals a validation pass adds
up (over batches, chunks and processes)."""

from dataclasses import dataclass, field
from typing import Callable, Dict, List

import numpy as np

from .losses import TERMS


def expected_tokens_per_step(leading: np.ndarray, k: int) -> Dict[str, float]:
    """Tokens per decoding step if every step started at a random position:
    from the number of leading correct speculations ``a`` (0..k) of complete
    blocks, every block weighing the same. Decoding starts its steps where the
    last one stopped, more often at hard positions, so this overstates it
    (:func:`decoding_walk` does not).

    Quadratic decoding always has fresh speculations: 1 + E[a]. Linear
    decoding has none after a partial accept (a < k), so such a step is
    followed by one that yields a single token: (1 + E[a] + P(a<k)) / (1 + P(a<k)).
    """
    if len(leading) == 0:
        return {"linear": float("nan"), "quadratic": float("nan")}
    ea = float(np.mean(leading))
    partial = float(np.mean(leading < k))
    return {"linear": (1 + ea + partial) / (1 + partial), "quadratic": 1 + ea}


def decoding_walk(leading: np.ndarray, k: int) -> np.ndarray:
    """Greedy decoding of one sequence, walked over its blocks: block ``i``
    (the masks after response position ``i``) has ``leading[i]`` leading
    correct speculations ``a``. The sequence being the base model's own greedy
    output, these are the speculations decoding makes there.

    Quadratic: a step verifies block ``i``'s speculations and emits ``a + 1``
    tokens; the masks after its last accepted token give the next step's,
    block ``i + a + 1``. Linear: the same where all ``k`` are accepted;
    otherwise the next step has nothing to verify, emits one token and
    speculates from block ``i + a + 2``.

    Returns:
        ``[quadratic tokens, quadratic steps, linear tokens, linear steps]``.
    """
    return np.array([*_walk(leading, k, linear=False), *_walk(leading, k, linear=True)], dtype=np.float64)


def _walk(leading: np.ndarray, k: int, linear: bool):
    tokens = steps = i = 0
    while i < len(leading):
        a = int(leading[i])
        tokens, steps, i = tokens + a + 1, steps + 1, i + a + 1
        if linear and a < k:  # a plain step: one token, speculations from the next block
            tokens, steps, i = tokens + 1, steps + 1, i + 1
    return tokens, steps


def leading_correct(correct: np.ndarray, depth: np.ndarray, block: np.ndarray, k: int) -> np.ndarray:
    """Leading correct counts of the blocks whose k masks all carry labels."""
    if len(block) == 0:
        return np.zeros(0, dtype=np.int64)
    ids, inv = np.unique(block, return_inverse=True)
    table = np.zeros((len(ids), k), dtype=bool)
    seen = np.zeros((len(ids), k), dtype=bool)
    table[inv, depth] = correct
    seen[inv, depth] = True
    complete = seen.all(axis=1)
    return np.cumprod(table[complete], axis=1).sum(axis=1)


@dataclass
class EvalTotals:
    """What a validation pass adds up; :meth:`all_sum` adds the totals of
    every process."""

    k: int
    sums: np.ndarray = None  # (len(TERMS),) weighted loss sums
    correct: np.ndarray = None  # (2, k): sampler head, base LM head, per depth
    total: np.ndarray = None  # (k,) counted masks per depth
    n_counted: float = 0.0
    n_anchors: float = 0.0
    leading: List[np.ndarray] = field(default_factory=list)  # leading correct counts of complete blocks
    walk: np.ndarray = None  # decoding_walk's totals over the sequences

    def __post_init__(self):
        self.sums = np.zeros(len(TERMS)) if self.sums is None else self.sums
        self.correct = np.zeros((2, self.k)) if self.correct is None else self.correct
        self.total = np.zeros(self.k) if self.total is None else self.total
        self.walk = np.zeros(4) if self.walk is None else self.walk

    def walked(self) -> Dict[str, float]:
        """Tokens per step of decoding the validation sequences (:func:`decoding_walk`)."""
        q_tokens, q_steps, l_tokens, l_steps = self.walk
        return {
            "linear": float(l_tokens / l_steps) if l_steps else float("nan"),
            "quadratic": float(q_tokens / q_steps) if q_steps else float("nan"),
        }

    def lead(self) -> np.ndarray:
        return np.concatenate(self.leading) if self.leading else np.zeros(0, dtype=np.int64)

    def all_sum(self, add: Callable[[np.ndarray], np.ndarray]) -> "EvalTotals":
        """The totals over processes, ``add`` summing a float vector over them
        (the leading counts travel as a histogram)."""
        k, n = self.k, len(TERMS)
        packed = add(
            np.concatenate(
                [self.sums, self.correct.reshape(-1), self.total, self.walk, [self.n_counted, self.n_anchors]]
            )
        )
        hist = add(np.bincount(self.lead(), minlength=k + 1).astype(np.float32)).astype(np.int64)
        return EvalTotals(
            k=k,
            sums=packed[:n],
            correct=packed[n : n + 2 * k].reshape(2, k),
            total=packed[n + 2 * k : n + 3 * k],
            walk=packed[n + 3 * k : n + 3 * k + 4],
            n_counted=float(packed[-2]),
            n_anchors=float(packed[-1]),
            leading=[np.repeat(np.arange(k + 1), hist)],
        )
