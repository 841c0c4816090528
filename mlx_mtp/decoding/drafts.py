"""Where a step's speculations come from.

- **Copied drafts** (:func:`copied_drafts`): where the last tokens occurred
  before in the prompt or the output, the tokens that followed them then
  (prompt lookup, :mod:`mlx_mtp.decoding.lookup`); else, with an adapter's
  datastore (:mod:`mlx_mtp.decoding.datastore`), the continuation its
  responses most often had. Their draft distribution is one-hot
  (:func:`one_hot`), so speculative sampling stays exact.
- **The masks' chain** (:func:`mask_chain`): the sampler head reads a mask's
  hidden state and the token before it, token by token (``prev = t_a, z = m_1
  -> s'_1; prev = s'_1, z = m_2 -> ...``): greedy, the b most likely first
  tokens each with its own greedy chain (branches), or sampled (with the
  distributions sampled from, for speculative sampling).

Figures behind the defaults are in docs/ (see the README's table).
"""

from typing import Callable, List, NamedTuple, Optional, Sequence

import mlx.core as mx

# copied tokens verified per lookup step (stream_generate, the CLIs): d = 4..6
# were best on Spec-Bench with the shipped adapter (docs/)
DEFAULT_LOOKUP = 6
# the policy's longest copy and shortest n-gram match: it weighs each copy by
# its n-gram's length, so short matches and long copies are offered (docs/calibration.md)
POLICY_MAX_COPY = 16
POLICY_MIN_NGRAM = 1
# tokens drafted per step from a datastore: its drafts are right for fewer
# leading tokens than copies from the text (docs/)
DATASTORE_TOKENS = 4
# prompt lookup matches n-grams of lookup_ngram (default 3) .. MAX_NGRAM tokens, longest first
MAX_NGRAM = 8

# (prev tokens (R,), mask hidden states (R, d), absolute positions of the
# predicted tokens (R,)) -> draft logits (R, V)
DraftFn = Callable[[mx.array, mx.array, mx.array], mx.array]


class Drafts(NamedTuple):
    """Copied drafts, where they came from and the evidence behind them."""

    tokens: List[int]
    source: str  # "lookup", "datastore", or "mtp" when there are none
    ngram: int = 0  # the length of the n-gram matched
    count: int = 1  # its occurrences (prompt lookup: 1, the latest)


def copied_drafts(lookup, datastore, limit: int, after: Sequence[int] = ()) -> Drafts:
    """Up to ``limit`` tokens copied from earlier in the text (``lookup``, an
    :class:`~mlx_mtp.decoding.lookup.NGramLookup`), else from ``datastore``
    (or None); no tokens (source "mtp") when neither has any. ``after``:
    tokens that will follow the text first (a grammar's forced tokens)."""
    match = lookup.match(limit, after)
    if match.tokens:
        return Drafts(match.tokens, "lookup", match.ngram, match.count)
    if datastore is not None:
        context = (lookup.tokens + list(after))[-MAX_NGRAM:] if after else lookup.tokens[-MAX_NGRAM:]
        match = datastore.match(context, min(limit, DATASTORE_TOKENS))
        if match.tokens:
            return Drafts(match.tokens, "datastore", match.ngram, match.count)
    return Drafts([], "mtp")


def one_hot(tokens: Sequence[int], vocab_size: int) -> mx.array:
    """The draft distribution of copied tokens: (d, V), one-hot."""
    return (mx.arange(vocab_size)[None] == mx.array(list(tokens), dtype=mx.int32)[:, None]).astype(mx.float32)


class Chain(NamedTuple):
    """The masks' next speculations, lazy."""

    tokens: mx.array  # (branches * k,) int32, branch by branch
    q: Optional[mx.array]  # (k, V): the distributions sampled from (sampling only)
    probs: mx.array  # (branches * k,) float32: the head's probability of each token
    first: mx.array  # (branches,) float32: of each branch's first token (the b most likely, best first)


def mask_chain(
    draft_fn: DraftFn,
    z: mx.array,
    prev: mx.array,
    start: mx.array,
    k: int,
    branches: int = 1,
    probs: Optional[Callable[[mx.array], mx.array]] = None,
) -> Chain:
    """Run the sampler head's chain over one block's k masks.

    Args:
        draft_fn: the sampler head (see :data:`DraftFn`).
        z: (1, k, d) the block's mask hidden states.
        prev: (1,) the token the block follows.
        start: (1,) the absolute position of the first predicted token.
        k: masks in the block.
        branches: greedy only: the first step keeps the b most likely tokens,
            each followed by its own greedy chain.
        probs: sampling: logits -> the distribution to sample from; None: greedy.
    """
    at = start
    chain, qs, ps = [], [], []
    first = None
    for j in range(k):
        draft = draft_fn(prev, z[:, j], at + j).astype(mx.float32)
        if probs is None:
            logp = draft - mx.logsumexp(draft, axis=-1, keepdims=True)
            if j == 0 and branches > 1:
                top = mx.argpartition(-draft[0], kth=branches - 1)[:branches]
                prev = top[mx.argsort(-draft[0, top])].astype(mx.int32)
                p = mx.exp(logp[0, prev])
                z, at = mx.broadcast_to(z, (branches, *z.shape[1:])), mx.broadcast_to(at, (branches,))
            else:
                prev = mx.argmax(draft, axis=-1).astype(mx.int32)
                p = mx.exp(logp.max(axis=-1))
        else:
            q = probs(draft)
            prev = mx.random.categorical(mx.log(q)).astype(mx.int32)
            p = q[0, prev]
            qs.append(q[0])
        if j == 0:
            first = p
        chain.append(prev)
        ps.append(p)
    return Chain(
        mx.stack(chain, axis=1).reshape(-1),
        mx.stack(qs) if qs else None,
        mx.stack(ps, axis=1).reshape(-1),
        first,
    )
