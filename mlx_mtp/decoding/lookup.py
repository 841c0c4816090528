"""Prompt lookup: drafts copied from earlier in the text.

Small models repeat themselves and their prompts: extraction, RAG,
translation and role-play answers copy spans of the prompt, and greedy
decoding falls into loops. When the last few tokens (the pending token
included) occurred before, the tokens that followed them then are a draft for
what follows now (Saxena, "Prompt Lookup Decoding", 2023). The base model
verifies these drafts like the mask tokens' speculations, so they change
speed only, never the output.

:class:`NGramLookup` keeps, for every n-gram of the text (n from ``min_n`` to
``max_n``), where its most recent continuation starts; a draft follows the
longest n-gram that ends the text and has occurred before. Adding a token and
drafting cost a few dict operations on the host.
"""

from typing import Dict, Iterable, List, NamedTuple, Sequence, Tuple


class Match(NamedTuple):
    """A copied draft and the evidence behind it: the n-gram's length and
    how many times it occurred (prompt lookup: 1, its latest occurrence)."""

    tokens: List[int]
    ngram: int = 0
    count: int = 1


class NGramLookup:
    """An index of the text's n-grams, ``min_n <= n <= max_n``."""

    def __init__(self, min_n: int = 3, max_n: int = 8):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: List[int] = []
        # n-gram -> index of the token that followed its latest occurrence
        self.index: Dict[Tuple[int, ...], int] = {}

    def extend(self, tokens: Iterable[int]):
        """Append tokens to the text."""
        for t in tokens:
            end = len(self.tokens)  # the n-grams ending here are followed by t
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.index[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(int(t))

    def draft(self, max_tokens: int) -> List[int]:
        """Up to ``max_tokens`` tokens that followed the longest n-gram ending
        the text the last time it occurred; [] when none did (see :meth:`match`)."""
        return self.match(max_tokens).tokens

    def match(self, max_tokens: int, after: Sequence[int] = ()) -> Match:
        """:meth:`draft` with the length of the n-gram matched (0: none). A
        copy that runs into the end of the text goes on from its own start (a
        loop of period p repeats with period p). ``after``: tokens that will
        follow the text (a grammar's forced tokens): the copy follows them."""
        toks = self.tokens + [int(t) for t in after] if after else self.tokens
        for n in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            start = self.index.get(tuple(toks[len(toks) - n :]))
            if start is None:
                continue
            out: List[int] = []
            for i in range(max_tokens):
                j = start + i
                out.append(toks[j] if j < len(toks) else out[j - len(toks)])
            return Match(out, n)
        return Match([], 0)
