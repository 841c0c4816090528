"""Validation metrics: per-depth accuracy of the speculated tokens, the
expected tokens per decoding step they imply, and the totals a validation
pass adds up (over batches, chunks and processes)."""

from dataclasses import dataclass, field
from typing import Callable, Dict, List

import numpy as np

from .losses import TERMS


def expected_tokens_per_step(leading: np.ndarray, k: int) -> Dict[str, float]:
    """Expected tokens per decoding step from the number of leading correct
    speculations ``a`` (0..k) of complete blocks.

    Quadratic decoding always has fresh speculations: 1 + E[a]. Linear
    decoding has none after a partial accept (a < k), so such a step is
    followed by one that yields a single token: (1 + E[a] + P(a<k)) / (1 + P(a<k)).
    """
    if len(leading) == 0:
        return {"linear": float("nan"), "quadratic": float("nan")}
    ea = float(np.mean(leading))
    partial = float(np.mean(leading < k))
    return {"linear": (1 + ea + partial) / (1 + partial), "quadratic": 1 + ea}


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

    def __post_init__(self):
        self.sums = np.zeros(len(TERMS)) if self.sums is None else self.sums
        self.correct = np.zeros((2, self.k)) if self.correct is None else self.correct
        self.total = np.zeros(self.k) if self.total is None else self.total

    def lead(self) -> np.ndarray:
        return np.concatenate(self.leading) if self.leading else np.zeros(0, dtype=np.int64)

    def all_sum(self, add: Callable[[np.ndarray], np.ndarray]) -> "EvalTotals":
        """The totals over processes, ``add`` summing a float vector over them
        (the leading counts travel as a histogram)."""
        k, n = self.k, len(TERMS)
        packed = add(
            np.concatenate([self.sums, self.correct.reshape(-1), self.total, [self.n_counted, self.n_anchors]])
        )
        hist = add(np.bincount(self.lead(), minlength=k + 1).astype(np.float32)).astype(np.int64)
        return EvalTotals(
            k=k,
            sums=packed[:n],
            correct=packed[n : n + 2 * k].reshape(2, k),
            total=packed[n + 2 * k : n + 3 * k],
            n_counted=float(packed[-2]),
            n_anchors=float(packed[-1]),
            leading=[np.repeat(np.arange(k + 1), hist)],
        )
