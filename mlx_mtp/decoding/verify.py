"""Verification: which speculations the base model accepts, as pure functions.

A step feeds ``n`` tokens: the pending token (node 0, the root) and the
speculations after it, a chain or a tree (``parents[i]`` is node i's parent).
The base model's logits at node i are its distribution for the token after
node i. Three rules decide, all exact (the output is distributed as the base
model's own decoding):

- **greedy** (:func:`verify_greedy`): a speculation is accepted when it and
  every ancestor equal the base model's argmax after their parent;
- **speculative sampling** (:func:`verify_sampled`, chains): draft j is
  accepted with probability ``min(1, p_j(s)/q_j(s))``, the first rejected one
  replaced by a sample of the normalised ``(p_j - q_j)+``;
- **matching** (:func:`verify_matching`): each node's target is a sample of
  any sampler's own distribution there, and a speculation is accepted when it
  equals its parent's target (what a caller's mlx-lm ``sampler`` needs: it
  gives tokens, not a distribution).

Everything here is lazy (mx arrays in, mx arrays out) except
:func:`accepted_path`, which reads a tree on the host after the step's sync.
"""

from functools import lru_cache
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from ..model.layouts import tree_structure


class Verdict(NamedTuple):
    """What the base model accepted in one step, lazy."""

    accepted: mx.array  # (1,) int32: speculations accepted (the depth of ``best``)
    best: mx.array  # (1,) int32: the accepted node furthest from the root (0: none)
    targets: mx.array  # (n,) int32: the base model's token after each node


class Acceptance(NamedTuple):
    """Speculative sampling over m drafts."""

    accept: mx.array  # (m,) bool: draft j passes its test
    correction: mx.array  # (m + 1,) int32: the token emitted where draft j is the first rejected (j = m: all accepted)


class TreeArrays(NamedTuple):
    """A tree of n fed tokens, for verifying it on the device."""

    depth: mx.array  # (n,) int32: each node's depth
    parent: mx.array  # (n-1,) int32: the parent of each non-root node
    ancestors: mx.array  # (n, n-1) bool: non-root node j is node i or an ancestor of it


@lru_cache(maxsize=64)
def tree_arrays(parents: Tuple[int, ...]) -> TreeArrays:
    """The :class:`TreeArrays` of a tree given by each node's parent."""
    depth, anc = tree_structure(parents)
    return TreeArrays(mx.array(depth, dtype=mx.int32), mx.array(parents[1:], dtype=mx.int32), mx.array(anc[:, 1:]))


def apply_filters(logprobs: mx.array, top_p: float, top_k: int) -> mx.array:
    """mlx-lm's top-p then top-k filters (same order as ``make_sampler``)."""
    if 0 < top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    if 0 < top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, top_k)
    return logprobs


def sampling_probs(logits: mx.array, temp: float, top_p: float = 1.0, top_k: int = 0) -> mx.array:
    """The distribution (float32) mlx-lm samples from: top-p/top-k, then temperature."""
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logprobs = apply_filters(logprobs, top_p, top_k)
    return mx.softmax(logprobs * (1.0 / temp), axis=-1)


def _leading(accept: mx.array) -> mx.array:
    """(1,) int32: how many of ``accept`` are true before the first false."""
    if accept.shape[0] == 0:
        return mx.zeros((1,), dtype=mx.int32)
    return mx.cumprod(accept.astype(mx.int32)).sum(keepdims=True).astype(mx.int32)


def verify_matching(tokens: mx.array, targets: mx.array, parents: Optional[Tuple[int, ...]] = None) -> Verdict:
    """Accept the speculations in ``tokens`` (n,) that equal their parent's
    target, and all their ancestors too; ``parents`` None: a chain."""
    targets = targets.astype(mx.int32)
    if parents is None:
        a = _leading(tokens[1:] == targets[:-1])
        return Verdict(a, a, targets)
    tree = tree_arrays(tuple(parents))
    ok = tokens[1:] == targets[tree.parent]
    reached = ~(tree.ancestors & ~ok[None]).any(axis=1)
    best = mx.argmax(mx.where(reached, tree.depth, -1), keepdims=True).astype(mx.int32)
    return Verdict(tree.depth[best], best, targets)


def verify_greedy(tokens: mx.array, logits: mx.array, parents: Optional[Tuple[int, ...]] = None) -> Verdict:
    """Greedy decoding's rule: the targets are the base model's argmax."""
    return verify_matching(tokens, mx.argmax(logits, axis=-1), parents)


def sampler_targets(sampler: Callable[[mx.array], mx.array], logprobs: mx.array) -> mx.array:
    """(n,) one token per row of ``logprobs`` (n, V) from an mlx-lm sampler,
    one call per row, so each row gets randomness of its own."""
    rows = [sampler(logprobs[i : i + 1]).reshape(-1)[:1] for i in range(logprobs.shape[0])]
    return mx.concatenate(rows).astype(mx.int32)


def speculative_accept(p: mx.array, q: Optional[mx.array], drafts: mx.array, u: mx.array) -> Acceptance:
    """Speculative sampling for m drafted tokens, vectorised.

    Args:
        p: (m+1, V) target distributions at the m+1 regular positions.
        q: (m, V) the distributions the m drafts were sampled from.
        drafts: (m,) the drafted tokens.
        u: (m,) uniform in [0, 1).

    Returns:
        Draft j is accepted when ``u_j q_j(d_j) < p_j(d_j)``; ``correction[j]``
        is a sample of the normalised ``(p_j - q_j)+`` for j < m (used when
        draft j is the first rejected) and of ``p_m`` for j = m (all accepted).
    """
    m = drafts.shape[0]
    if m == 0:
        return Acceptance(mx.zeros((0,), dtype=mx.bool_), mx.random.categorical(mx.log(p)).astype(mx.int32))
    idx = mx.arange(m)
    accept = u * q[idx, drafts] < p[idx, drafts]
    resid = mx.maximum(p[:m] - q, 0.0)
    # p == q (up to rounding) leaves no residual mass; rejection then has
    # probability ~0 and p itself is the right fallback.
    resid = mx.where(resid.sum(-1, keepdims=True) > 0, resid, p[:m])
    dist = mx.concatenate([resid, p[m:]], axis=0)
    return Acceptance(accept, mx.random.categorical(mx.log(dist)).astype(mx.int32))


def verify_sampled(tokens: mx.array, p: mx.array, q: Optional[mx.array]) -> Verdict:
    """Speculative sampling over a chain: ``p`` (n, V) the base model's
    sampling distributions, ``q`` (n-1, V) the drafts' (None when n = 1)."""
    m = tokens.shape[0] - 1
    accept, targets = speculative_accept(p, q, tokens[1:], mx.random.uniform(shape=(m,)))
    a = _leading(accept)
    return Verdict(a, a, targets)


def accepted_path(best: int, parents: Sequence[int]) -> List[int]:
    """The accepted nodes from the root's child down to ``best`` (host side)."""
    path = []
    node = best
    while node > 0:
        path.append(node)
        node = parents[node]
    path.reverse()
    return path
