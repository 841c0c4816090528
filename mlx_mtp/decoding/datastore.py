"""Datastore drafts: continuations from the model's own earlier answers.

A small model words its answers alike ("Here's a Python function that",
"def ...(", "Step 1:"). An adapter can carry the token ids of the
self-distilled responses it was trained on; where the last n tokens of the
text (``min_n <= n <= max_n``, longest first) occur in them, the most common
continuation is a draft (He et al., "REST: Retrieval-Based Speculative
Decoding", 2023). The base model verifies it like any speculation, so it
changes speed only, never the output.

A draft grows token by token along the most common next token of the
occurrences still matching; it stops where that token is shared by fewer than
``min_share`` of them (``min_first_share`` for the first token), at the end
of a document, or at ``max_tokens``.

Index: every suffix of the concatenated documents, sorted by its first
``max_n`` tokens packed into unsigned 64-bit words, so the occurrences of an
n-gram are one contiguous range found with a few ``searchsorted`` calls.

The CLI that stores responses in an adapter is :mod:`mlx_mtp.datastore`.
"""

import math
from typing import Iterable, List, Sequence

import numpy as np

from .lookup import Match

# documents are stored as token id + 1, separated (and ended) by 0
SEPARATOR = 0


class Datastore:
    """Drafts from a set of token documents (see the module docstring).

    ``packed``: 1-D ints, each token id + 1, documents separated by 0 (what
    :meth:`from_documents` builds and adapters store).
    """

    def __init__(
        self,
        packed: np.ndarray,
        min_n: int = 3,
        max_n: int = 8,
        min_first_share: float = 0.5,
        min_share: float = 0.5,
        max_occurrences: int = 512,
    ):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        packed = np.asarray(packed).astype(np.int64).reshape(-1)
        if packed.size and packed.min() < 0:
            raise ValueError("datastore ids must be >= 0 (token id + 1, 0 separates documents)")
        self.min_n, self.max_n = min_n, max_n
        self.min_first_share, self.min_share = min_first_share, min_share
        self.max_occurrences = max_occurrences
        self.packed = packed
        N = packed.size
        # tokens, padded so that every suffix has max_n + max_tokens entries to read
        self._tokens = np.concatenate([packed, np.zeros(max_n + 1, dtype=np.int64)])
        self._bits = max(1, int(packed.max(initial=0)).bit_length())
        self._per = 64 // self._bits  # tokens per key word
        words = math.ceil(max_n / self._per)
        keys = []
        for w in range(words):
            key = np.zeros(N, dtype=np.uint64)
            for j in range(self._per):
                i = w * self._per + j
                col = self._tokens[i : i + N] if i < max_n else np.zeros(N, dtype=np.int64)
                key = (key << np.uint64(self._bits)) | col.astype(np.uint64)
            keys.append(key)
        self._order = np.lexsort(keys[::-1]) if N else np.zeros(0, dtype=np.int64)
        self._keys = [k[self._order] for k in keys]

    @classmethod
    def from_documents(cls, documents: Iterable[Sequence[int]], **kwargs) -> "Datastore":
        parts = []
        for doc in documents:
            doc = np.asarray(doc, dtype=np.int64).reshape(-1)
            if doc.size and doc.min() < 0:
                raise ValueError("token ids must be >= 0")
            parts.append(doc + 1)
            parts.append(np.zeros(1, dtype=np.int64))
        packed = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return cls(packed, **kwargs)

    @property
    def num_tokens(self) -> int:
        """Tokens stored (separators not counted)."""
        return int((self.packed != SEPARATOR).sum())

    def storage(self) -> np.ndarray:
        """``packed`` in the smallest unsigned dtype that holds it (for saving)."""
        dtype = np.uint16 if self.packed.max(initial=0) < 2**16 else np.uint32
        return self.packed.astype(dtype)

    def _range(self, ngram: np.ndarray):
        """The range of sorted suffixes that begin with ``ngram`` (packed ids)."""
        bits, per = self._bits, self._per
        start, end = 0, self.packed.size
        for w in range(math.ceil(len(ngram) / per)):
            part = ngram[w * per : (w + 1) * per]
            value = 0
            for t in part:
                value = (value << bits) | int(t)
            free = bits * (per - len(part))
            lo, hi = value << free, ((value + 1) << free) - 1
            keys = self._keys[w][start:end]
            start, end = (
                start + int(np.searchsorted(keys, np.uint64(lo), "left")),
                start + int(np.searchsorted(keys, np.uint64(hi), "right")),
            )
            if start == end:
                break
        return start, end

    def draft(self, context: Sequence[int], max_tokens: int) -> List[int]:
        """Up to ``max_tokens`` tokens that most often followed the longest
        n-gram ending ``context``; [] when none occurred."""
        return self.match(context, max_tokens).tokens

    def match(self, context: Sequence[int], max_tokens: int) -> Match:
        """:meth:`draft` with the n-gram's length and its occurrences in the
        documents (n-gram 0 when none occurred)."""
        if max_tokens <= 0 or self.packed.size == 0:
            return Match([], 0)
        tail = np.asarray(list(context[-self.max_n :]), dtype=np.int64) + 1
        if tail.size and (tail.min() < 1 or tail.max() >= 2**self._bits):
            # an id the documents cannot hold: only n-grams after it can match
            bad = np.nonzero((tail < 1) | (tail >= 2**self._bits))[0][-1]
            tail = tail[bad + 1 :]
        best, start, end = None, 0, 0
        for n in range(self.min_n, min(self.max_n, tail.size) + 1):
            # the longer n-gram starts a token earlier: a range of its own
            s, e = self._range(tail[tail.size - n :])
            if s == e:
                break
            best, start, end = n, s, e
        if best is None:
            return Match([], 0)
        starts = self._order[start:end] + best
        count = int(starts.size)
        if starts.size > self.max_occurrences:  # an even sample of a frequent n-gram
            starts = starts[:: math.ceil(starts.size / self.max_occurrences)]
        out: List[int] = []
        for j in range(max_tokens):
            following = self._tokens[starts]
            values, counts = np.unique(following, return_counts=True)
            i = int(counts.argmax())
            token, share = int(values[i]), counts[i] / following.size
            if token == SEPARATOR or share < (self.min_first_share if j == 0 else self.min_share):
                break
            out.append(token - 1)
            starts = starts[following == token] + 1
        return Match(out, best, count)


def hit_rate(store: Datastore, documents: Iterable[Sequence[int]], max_tokens: int = 6) -> dict:
    """Drafts for every position of ``documents``: how often one is proposed,
    and how many of its leading tokens are right."""
    positions = fired = right = 0
    for doc in documents:
        doc = list(doc)
        for i in range(1, len(doc)):
            positions += 1
            draft = store.draft(doc[:i], max_tokens)
            if not draft:
                continue
            fired += 1
            for a, b in zip(draft, doc[i:]):
                if a != b:
                    break
                right += 1
    return {
        "positions": positions,
        "share_drafted": fired / max(positions, 1),
        "leading_right_per_draft": right / max(fired, 1),
    }
