"""Batches: which examples make up each step and which of their mask blocks
are trained (pure functions of seed and step), and a batch of examples as
model inputs (padded regular tokens, masks in chunks of whole blocks with
their attention mask, labels and weights)."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import DataError
from ..model.layouts import IGNORE, training_mask
from .data import Example


class BatchSchedule:
    """Which examples make up global batch number ``step`` (0-based), as a
    pure function of (seed, step): examples sorted by length are cut into
    fixed batches (little padding), whose order is reshuffled every epoch.
    Restarting at any step gives the same batches as an uninterrupted run.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True):
        if len(lengths) < batch_size:
            raise DataError(f"the dataset has {len(lengths)} examples, fewer than --batch-size {batch_size}")
        order = np.argsort(np.asarray(lengths), kind="stable")
        nb = len(order) // batch_size
        self.batches = [order[i * batch_size : (i + 1) * batch_size].tolist() for i in range(nb)]
        self.seed = seed
        self.shuffle = shuffle
        self._perm: Dict[int, np.ndarray] = {}

    def __len__(self):
        return len(self.batches)

    def batch(self, step: int) -> List[int]:
        epoch, i = divmod(step, len(self.batches))
        if not self.shuffle:
            return self.batches[i]
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))}
        return self.batches[int(self._perm[epoch][i])]


def shard(indices: List[int], rank: int, size: int) -> List[int]:
    """This process's share of a global batch."""
    return indices[rank::size]


# the last entry of the block sampler's seed, so its stream differs from the batch order's
_BLOCK_STREAM = 1


def num_kept_blocks(num_blocks: int, fraction: float) -> int:
    """How many of ``num_blocks`` mask blocks a ``fraction`` keeps: the
    nearest integer, at least one."""
    return min(num_blocks, max(1, int(fraction * num_blocks + 0.5)))


def sample_blocks(
    examples: Sequence[Example], indices: Sequence[int], fraction: float, seed: int, step: int
) -> Optional[List[np.ndarray]]:
    """The mask blocks trained at ``step`` (``--mask-positions``): for each
    example (``indices``: its index in the dataset), ascending indices of
    :func:`num_kept_blocks` of its blocks drawn without replacement by a
    generator seeded with (seed, step, index), so a resumed run (or another
    number of processes) draws the same blocks. None (every block) when
    ``fraction`` >= 1."""
    if fraction >= 1.0:
        return None
    out = []
    for e, i in zip(examples, indices):
        rng = np.random.default_rng([seed, step, int(i), _BLOCK_STREAM])
        kept = rng.choice(e.num_blocks, size=num_kept_blocks(e.num_blocks, fraction), replace=False)
        out.append(np.sort(kept))
    return out


@dataclass
class Chunk:
    """A group of whole blocks of every example in a batch."""

    tokens: mx.array  # (B, W) mask ids -j
    positions: mx.array  # (B, W) absolute positions
    mask: mx.array  # (B, W, C + W) who each mask sees: committed regular tokens, then chunk masks
    gate: mx.array  # (B, W)
    valid: mx.array  # (N,) flat index into B*W of the counted masks
    anchor: mx.array  # (N,) flat index into B*C of the regular token sharing the label
    labels: mx.array  # (N,)
    prev: mx.array  # (N,)
    lcm_factor: np.ndarray  # (N,) 1/|S(t)|
    depth: np.ndarray  # (N,) j - 1
    block: np.ndarray  # (N,) block id within the chunk


@dataclass
class Batch:
    tokens: mx.array  # (B, C) regular tokens, right-padded
    chunks: List[Chunk]
    num_masks: int  # k
    n_counted: int  # masks with a label
    n_anchors: int  # regular tokens t with a non-empty S(t)
    layout_tokens: int  # regular tokens + masks, no padding
    response_tokens: int


def make_batch(examples: List[Example], mask_chunk: int, blocks: Optional[Sequence[np.ndarray]] = None) -> Batch:
    """Model inputs of ``examples``: the padded regular tokens and the masks
    split into chunks of whole blocks of at most ``mask_chunk`` mask tokens
    (whole batch) each. ``blocks`` (:func:`sample_blocks`): the blocks of
    each example to train, default all; ``response_tokens`` counts all."""
    response = int(sum(e.num_blocks for e in examples))
    if blocks is not None:
        examples = [e.keep_blocks(b) for e, b in zip(examples, blocks)]
    B = len(examples)
    k = examples[0].num_masks
    C = max(len(e.tokens) for e in examples)
    reg = np.zeros((B, C), dtype=np.int32)
    for b, e in enumerate(examples):
        reg[b, : len(e.tokens)] = e.tokens
    # |S(t)|: how many masks of the example share regular token t's label
    counts = []
    n_anchors = 0
    for e in examples:
        a = e.anchor[e.anchor >= 0]
        c = np.bincount(a, minlength=len(e.tokens))
        counts.append(c)
        n_anchors += int((c > 0).sum())
    nb_max = max(e.num_blocks for e in examples)
    per_chunk = max(1, mask_chunk // (B * k)) if mask_chunk and mask_chunk > 0 else nb_max
    j = np.arange(1, k + 1)
    chunks = []
    for c0 in range(0, nb_max, per_chunk):
        nbc = min(per_chunk, max(max(e.num_blocks - c0, 0) for e in examples))
        W = nbc * k
        owners = np.full((B, nbc), -1, dtype=np.int64)
        labels = np.full((B, nbc, k), IGNORE, dtype=np.int64)
        prev = np.zeros((B, nbc, k), dtype=np.int32)
        anchor = np.full((B, nbc, k), -1, dtype=np.int64)
        factor = np.zeros((B, nbc, k), dtype=np.float32)
        for b, e in enumerate(examples):
            sl = slice(c0, min(c0 + nbc, e.num_blocks))
            m = sl.stop - sl.start
            if m <= 0:
                continue
            owners[b, :m] = e.owner[sl]
            labels[b, :m] = e.labels[sl]
            prev[b, :m] = e.prev[sl]
            anchor[b, :m] = e.anchor[sl]
            a = e.anchor[sl]
            factor[b, :m] = np.where(a >= 0, 1.0 / np.maximum(counts[b][np.maximum(a, 0)], 1), 0.0)
        q_owner = np.repeat(owners, k, axis=1)  # (B, W); -1: padding
        q_j = np.broadcast_to(np.tile(j, nbc), (B, W))
        positions = np.where(q_owner >= 0, q_owner + q_j, 0).astype(np.int32)
        # keys: the committed regular tokens (x_c is (owner c, j 0)), then the chunk's masks
        k_owner = np.concatenate([np.broadcast_to(np.arange(C), (B, C)), q_owner], axis=1)
        k_j = np.concatenate([np.zeros((B, C), dtype=q_j.dtype), q_j], axis=1)
        mask = training_mask(q_owner, q_j, k_owner, k_j)
        mask[:, :, 0] |= q_owner < 0  # padding rows must see something
        flat_labels = labels.reshape(-1)
        valid = np.flatnonzero(flat_labels != IGNORE)
        rows = valid // W
        anchor_flat = rows * C + anchor.reshape(-1)[valid]
        chunks.append(
            Chunk(
                tokens=mx.array((-q_j).astype(np.int32)),
                positions=mx.array(positions),
                mask=mx.array(mask),
                gate=mx.ones((B, W), dtype=mx.bool_),
                valid=mx.array(valid.astype(np.int32)),
                anchor=mx.array(anchor_flat.astype(np.int32)),
                labels=mx.array(flat_labels[valid].astype(np.int32)),
                prev=mx.array(prev.reshape(-1)[valid]),
                lcm_factor=factor.reshape(-1)[valid],
                depth=np.tile(np.arange(k), B * nbc)[valid],
                block=(np.arange(B * W) // k)[valid],
            )
        )
    return Batch(
        tokens=mx.array(reg),
        chunks=chunks,
        num_masks=k,
        n_counted=int(sum(len(c.block) for c in chunks)),
        n_anchors=n_anchors,
        layout_tokens=int(sum(e.layout_length for e in examples)),
        response_tokens=response,
    )
