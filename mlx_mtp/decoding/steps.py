"""What a decode step is, from plan to output: the types the loop
(:mod:`mlx_mtp.decoding.decode`) passes between its named steps.

A :class:`Plan` says what a step feeds; launching it gives a :class:`Launched`
step (its graph computing on the device); the one sync reads it into a
:class:`Finished` step (verified tokens, the masks' next speculations as a
:class:`Chain`); the loop hands a :class:`Step` to the caller.
"""

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

import mlx.core as mx
import numpy as np

from .policy import Choice

__all__ = ["PROB_SCALE", "NO_CHAIN", "Chain", "Finished", "Launched", "Plan", "Step"]

# probabilities travel to the host in the step's int32 array, in units of 1/PROB_SCALE
PROB_SCALE = 1 << 20


@dataclass
class Step:
    """What one step emitted."""

    tokens: List[int]  # accepted speculations, then the base model's token
    proposed: int  # speculations fed (verified) in this step
    accepted: int  # of which accepted
    source: str = "mtp"  # where the accepted speculations came from: "mtp", "lookup", "datastore" or "forced"
    logprobs: List[mx.array] = field(default_factory=list)  # (V,) per token, lazy
    choice: str = "plain"  # what the step fed (:class:`~mlx_mtp.decoding.policy.Choice` kinds)
    forced: int = 0  # of the accepted speculations, those a grammar constraint forced
    constraint_seconds: float = 0.0  # host time the grammar constraint took for this step


class Chain(NamedTuple):
    """The masks' speculations at hand for the next step, read on the host."""

    specs: List[List[int]]  # one list per branch
    q: Optional[mx.array] = None  # their draft distributions (sampling)
    probs: List[List[float]] = []  # the sampler head's probability of each token, per branch
    first: List[float] = []  # of each branch's first token


NO_CHAIN = Chain([])


@dataclass
class Plan:
    """What a step feeds: a tree (or chain) of tokens after the pending one."""

    fed: List  # the pending token (an int, or a lazy (1,) array), then the speculations branch by branch
    parents: Tuple[int, ...]  # of each fed token
    masked: Tuple[bool, ...]  # which fed tokens get masks after them
    masks: int  # masks after each masked token (0: the plain causal forward)
    branches: List[Tuple[str, int, int]]  # (source, first node, length) of each branch
    q: Optional[mx.array] = None  # draft distributions of a chain (sampling)
    kind: str = "plain"
    choice: Optional[Choice] = None  # the policy's, if it chose
    chain_probs: Tuple[float, ...] = ()  # of the chain's tokens fed (first branch)
    forced: int = 0  # leading speculations a grammar constraint forces (a chain)
    allowed: Optional[np.ndarray] = None  # grammar constraint: bitmask of the tokens allowed after each fed node

    @property
    def tree(self) -> bool:
        return len(self.branches) > 1

    def source(self, node: int) -> str:
        """Where the speculation at fed node ``node`` came from (its branch's
        source; "mtp" where none was fed; "forced" for the tokens a grammar forced)."""
        if 1 <= node <= self.forced:
            return "forced"
        for source, start, length in self.branches:
            if start <= node < start + length:
                return source
        return self.branches[0][0] if self.branches else "mtp"

    def right(self, start: int, length: int, targets: List[int]) -> int:
        """How many leading tokens of the branch at ``start`` equal the base model's tokens."""
        run = 0
        for i in range(start, start + length):
            if self.fed[i] != targets[self.parents[i]]:
                break
            run += 1
        return run


@dataclass
class Launched:
    """A step in flight (everything lazy until the host syncs)."""

    plan: Plan
    regular: Tuple[int, ...]  # layout index of each fed token
    packed: mx.array  # [accepted, best, targets (n), next speculations, their probabilities], int32
    q_rows: Optional[mx.array]  # (k, V) draft distributions of the chain (sampling only)
    logprobs: mx.array  # (n, V)
    submitted: float = 0.0  # perf_counter() when its graph went to the device
    committed: bool = False  # its fed token is in the cache already (a plain step launched ahead)


class Finished(NamedTuple):
    """A step read on the host."""

    emitted: List[int]  # accepted speculations, then the base model's token
    accepted: int
    best: int  # the accepted node furthest from the root
    targets: List[int]  # the base model's token after each fed node
    chain: Chain  # the masks' next speculations
    keep: List[int]  # layout indices of the fed tokens to commit
    rows: List[int]  # the logprobs row of each emitted token
