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
# tokens drafted per step from a datastore: its drafts are right for fewer
# leading tokens than copies from the text (docs/)
DATASTORE_TOKENS = 4
# prompt lookup matches n-grams of lookup_ngram (default 3) .. MAX_NGRAM tokens, longest first
MAX_NGRAM = 8

# (prev tokens (R,), mask hidden states (R, d), absolute positions of the
# predicted tokens (R,)) -> draft logits (R, V)
DraftFn = Callable[[mx.array, mx.array, mx.array], mx.array]


class Drafts(NamedTuple):
    """Copied drafts and where they came from."""

    tokens: List[int]
    source: str  # "lookup", "datastore", or "mtp" when there are none


def copied_drafts(lookup, datastore, limit: int) -> Drafts:
    """Up to ``limit`` tokens copied from earlier in the text (``lookup``, an
    :class:`~mlx_mtp.decoding.lookup.NGramLookup`), else from ``datastore``
    (or None); no tokens (source "mtp") when neither has any."""
    copied = lookup.draft(limit)
    if copied:
        return Drafts(copied, "lookup")
    if datastore is not None:
        copied = datastore.draft(lookup.tokens[-MAX_NGRAM:], min(limit, DATASTORE_TOKENS))
        if copied:
            return Drafts(copied, "datastore")
    return Drafts([], "mtp")


def one_hot(tokens: Sequence[int], vocab_size: int) -> mx.array:
    """The draft distribution of copied tokens: (d, V), one-hot."""
    return (mx.arange(vocab_size)[None] == mx.array(list(tokens), dtype=mx.int32)[:, None]).astype(mx.float32)


class Chain(NamedTuple):
    """The masks' next speculations, lazy."""

    tokens: mx.array  # (branches * k,) int32, branch by branch
    q: Optional[mx.array]  # (k, V): the distributions sampled from (sampling only)


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
    chain, qs = [], []
    for j in range(k):
        draft = draft_fn(prev, z[:, j], at + j)
        if probs is None and j == 0 and branches > 1:
            top = mx.argpartition(-draft[0], kth=branches - 1)[:branches]
            prev = top[mx.argsort(-draft[0, top])].astype(mx.int32)
            z, at = mx.broadcast_to(z, (branches, *z.shape[1:])), mx.broadcast_to(at, (branches,))
        elif probs is None:
            prev = mx.argmax(draft, axis=-1).astype(mx.int32)
        else:
            q = probs(draft)
            prev = mx.random.categorical(mx.log(q)).astype(mx.int32)
            qs.append(q[0])
        chain.append(prev)
    return Chain(mx.stack(chain, axis=1).reshape(-1), mx.stack(qs) if qs else None)
