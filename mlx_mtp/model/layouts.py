"""Token layouts: which tokens go in, at which positions, who sees whom.

Every builder returns token ids (masks m_j written as ``-j``), position ids
relative to the first new token, the LoRA gate (1 on masks) and the boolean
attention mask among the new tokens (row = query, column = key). Tokens
already in the KV cache are visible to every new token; the adapter prepends
that part.

- training: ``x0 m1..mk x1 m1..mk ...``; mask m_j after x_i sits at position
  i+j with label x_{i+j+1}; regular tokens see earlier regular tokens only;
  m_j after x_i sees x_0..x_i and m_1..m_j of its own block.
- linear decoding: the regular tokens, then k masks (plain causal).
- quadratic decoding: every regular token followed by its own k masks; a block
  sees the regular tokens of the blocks before it and its own prefix only.
- block decoding: the same with masks after chosen regular tokens only
  (quadratic: all of them; the masks after the last alone see what linear
  decoding's masks see).
- tree decoding: the regular tokens form a tree (``parents``: several
  speculated continuations of one token); a token sits at its depth and sees
  its ancestors, its masks see them and their own block. A chain
  (``parents[i] = i - 1``) is the block layout.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .masks import mask_ids

IGNORE = -100


@dataclass
class Layout:
    """A decoding layout; ``regular`` indexes the regular tokens in order."""

    tokens: mx.array  # (L,) int32, masks as -j
    positions: mx.array  # (L,) int32, relative to the first new token
    gate: mx.array  # (L,) bool, True on masks
    mask: mx.array  # (L, L) bool, query x key
    regular: Tuple[int, ...]  # indices of the regular tokens
    # indices of the masks, block by block ((blocks with masks) * k,), and for
    # each regular token, the index of its mask block among them (0 if none)
    masks: Optional[mx.array] = None
    mask_block: Optional[mx.array] = None


@dataclass
class TrainLayout:
    """The interleaved training layout of one sequence (numpy, host side)."""

    tokens: np.ndarray  # (L,) masks as -j
    positions: np.ndarray  # (L,)
    gate: np.ndarray  # (L,) bool
    mask: np.ndarray  # (L, L) bool
    labels: np.ndarray  # (L,) next-token label, IGNORE where none or no loss
    prev_tokens: np.ndarray  # (L,) the token before the label (sampler input)
    anchor: np.ndarray  # (L,) for a mask: index of the regular token with the same label; -1 else


def _as_tokens(tokens: Union[Sequence[int], mx.array]) -> mx.array:
    return tokens.astype(mx.int32) if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.int32)


@lru_cache(maxsize=64)
def _linear_structure(n: int, k: int):
    L = n + k
    positions = np.arange(L, dtype=np.int32)
    gate = np.arange(L) >= n
    mask = np.tril(np.ones((L, L), dtype=bool))
    masks, mask_block = mx.arange(n, L, dtype=mx.int32), mx.zeros((n,), dtype=mx.int32)
    return mx.array(positions), mx.array(gate), mx.array(mask), tuple(range(n)), masks, mask_block


def linear_layout(tokens: Union[Sequence[int], mx.array], k: int) -> Layout:
    """``tokens`` followed by ``m_1..m_k``; causal attention."""
    tokens = _as_tokens(tokens)
    n = tokens.shape[0]
    positions, gate, mask, regular, masks, mask_block = _linear_structure(n, k)
    ids = mx.concatenate([tokens, mask_ids(k)]) if k else tokens
    return Layout(ids, positions, gate, mask, regular, masks, mask_block)


def chain_parents(n: int) -> Tuple[int, ...]:
    """The parents of n tokens in a chain: ``(-1, 0, 1, ..., n - 2)``."""
    return tuple(range(-1, n - 1))


def tree_parents(branch_lengths: Sequence[int]) -> Tuple[int, ...]:
    """The parents of a root followed by branches laid out one after another,
    each a chain from the root: ``(2, 1)`` -> ``(-1, 0, 1, 0)``."""
    parents, start = [-1], 1
    for length in branch_lengths:
        # the branch's first token hangs off the root, each next one off the one before
        parents += [0, *range(start, start + length - 1)][:length]
        start += length
    return tuple(parents)


def tree_structure(parents: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Depth of every node and the (n, n) matrix ``anc[i, j]``: j is i or an
    ancestor of i. Token 0 is the root; every parent comes before its child."""
    n = len(parents)
    depth = np.zeros(n, dtype=np.int64)
    anc = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if i == 0:
            if p != -1:
                raise ValueError("token 0 must be the root (parent -1)")
            continue
        if not 0 <= p < i:
            raise ValueError(f"token {i} has parent {p}: parents must come before their children")
        depth[i] = depth[p] + 1
        anc[i] |= anc[p]
    return depth, anc


def quadratic_structure(
    n: int, k: int, masked: Optional[Sequence[bool]] = None, parents: Optional[Sequence[int]] = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions, gate and mask of n regular tokens each followed by k masks
    (only those with ``masked[i]``, if given); a chain unless ``parents``."""
    depth, anc = tree_structure(chain_parents(n) if parents is None else parents)
    sizes = 1 + k * (np.ones(n, dtype=np.int64) if masked is None else np.asarray(masked, dtype=np.int64))
    block = np.repeat(np.arange(n), sizes)  # block of each slot
    j = np.arange(block.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # 0: the regular token, j: mask m_j
    positions = (depth[block] + j).astype(np.int32)
    gate = j > 0
    qb, kb = block[:, None], block[None, :]
    qj, kj = j[:, None], j[None, :]
    sees_regular = (kj == 0) & anc[qb, kb]
    sees_own_masks = (kb == qb) & (kj > 0) & (kj <= qj)
    mask = sees_regular | sees_own_masks
    return positions, gate, mask


@lru_cache(maxsize=256)
def _block_structure(k: int, masked: Tuple[bool, ...], parents: Optional[Tuple[int, ...]]):
    n = len(masked)
    positions, gate, mask = quadratic_structure(n, k, masked, parents)
    # which slots of the quadratic layout (every token with its k masks) are kept
    slots = np.arange(n * (k + 1)).reshape(n, k + 1)
    kept = np.concatenate([row if b else row[:1] for row, b in zip(slots, masked)])
    regular = tuple(int(i) for i in np.flatnonzero(~gate))
    mask_block = np.where(masked, np.cumsum(masked) - 1, 0)
    return (
        mx.array(positions),
        mx.array(gate),
        mx.array(mask),
        regular,
        None if all(masked) else mx.array(kept, dtype=mx.int32),
        mx.array(np.flatnonzero(gate), dtype=mx.int32),
        mx.array(mask_block, dtype=mx.int32),
    )


def block_layout(
    tokens: Union[Sequence[int], mx.array],
    k: int,
    masked: Sequence[bool],
    parents: Optional[Sequence[int]] = None,
) -> Layout:
    """``tokens``, each with ``masked[i]`` followed by its own ``m_1..m_k``
    (the quadratic layout's attention); a tree of tokens with ``parents``
    (:func:`tree_parents`), else a chain."""
    tokens = _as_tokens(tokens)
    masked = tuple(bool(b) for b in masked)
    n = tokens.shape[0]
    if len(masked) != n:
        raise ValueError(f"masked has {len(masked)} entries for {n} tokens")
    if parents is not None:
        parents = tuple(int(p) for p in parents)
        if len(parents) != n:
            raise ValueError(f"parents has {len(parents)} entries for {n} tokens")
        if parents == chain_parents(n):
            parents = None
    positions, gate, mask, regular, kept, masks, mask_block = _block_structure(k, masked, parents)
    ids = mx.concatenate([tokens[:, None], mx.broadcast_to(mask_ids(k)[None], (n, k))], axis=1).reshape(-1)
    return Layout(ids if kept is None else ids[kept], positions, gate, mask, regular, masks, mask_block)


def quadratic_layout(tokens: Union[Sequence[int], mx.array], k: int) -> Layout:
    """Each of ``tokens`` followed by its own ``m_1..m_k``."""
    return block_layout(tokens, k, (True,) * len(_as_tokens(tokens)))


def training_mask(q_owner: np.ndarray, q_j: np.ndarray, k_owner: np.ndarray, k_j: np.ndarray) -> np.ndarray:
    """The training layout's attention rule, the one place it is written.

    A token is (owner i, j): j = 0 for the regular token x_i, j = 1..k for the
    mask m_j of the block after x_i. A query sees a regular key x_i' when
    i' <= i, and a mask key of its own block up to itself (masks only). Leading
    dimensions broadcast; the result is ``(..., queries, keys)``.
    """
    qo, qj = np.asarray(q_owner)[..., :, None], np.asarray(q_j)[..., :, None]
    ko, kj = np.asarray(k_owner)[..., None, :], np.asarray(k_j)[..., None, :]
    sees_regular = (kj == 0) & (ko <= qo)
    sees_own_masks = (qj > 0) & (ko == qo) & (kj > 0) & (kj <= qj)
    return sees_regular | sees_own_masks


def training_layout(
    tokens: Sequence[int],
    k: int,
    loss_start: int = 1,
    loss_mask: Optional[Sequence[bool]] = None,
    blocks: Optional[Sequence[bool]] = None,
) -> TrainLayout:
    """The interleaved layout ``x0 m1..mk x1 m1..mk ...`` of one sequence.

    Token x_t carries loss when ``loss_mask[t]`` (default: t >= loss_start).
    A block of k masks follows x_i when x_{i+1} carries loss and ``blocks[i]``
    (default: every i; position subsampling keeps a subset); its mask m_j
    predicts x_{i+j+1} (IGNORE past the end of the sequence). Regular tokens
    keep their labels whether a block follows them or not.
    """
    x = np.asarray(tokens, dtype=np.int64)
    n = len(x)
    if loss_mask is None:
        loss = np.arange(n) >= loss_start
    else:
        loss = np.asarray(loss_mask, dtype=bool)
        if len(loss) != n:
            raise ValueError("loss_mask must have one entry per token")
    has_block = np.zeros(n, dtype=bool)
    has_block[:-1] = loss[1:]
    if blocks is not None:
        blocks = np.asarray(blocks, dtype=bool)
        if len(blocks) != n:
            raise ValueError("blocks must have one entry per token")
        has_block &= blocks
    sizes = 1 + k * has_block
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # layout index of x_i
    L = int(sizes.sum())

    owner = np.repeat(np.arange(n), sizes)  # i of the block (or regular) each slot belongs to
    j = np.arange(L) - start[owner]  # 0: regular, 1..k: mask m_j
    ids = np.where(j == 0, x[owner], -j)
    positions = owner + j
    gate = j > 0

    target = owner + j + 1  # index of the label token in x
    valid = target < n
    labels = np.full(L, IGNORE, dtype=np.int64)
    labels[valid] = x[target[valid]]
    labels[valid & ~loss[np.minimum(target, n - 1)]] = IGNORE
    prev = np.where(valid, x[np.minimum(target - 1, n - 1)], 0)
    anchor = np.where(gate & valid, start[np.minimum(owner + j, n - 1)], -1)

    mask = training_mask(owner, j, owner, j)
    return TrainLayout(
        tokens=ids.astype(np.int32),
        positions=positions.astype(np.int32),
        gate=gate,
        mask=mask,
        labels=labels,
        prev_tokens=prev.astype(np.int32),
        anchor=anchor.astype(np.int64),
    )
