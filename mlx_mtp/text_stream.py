"""One generation's text as its tokens come (:class:`TextStream`): streaming
detokenization, stop strings, EOS and the token limit, and so its finish
reason. The API (:func:`mlx_mtp.api.stream_generate`) and the server's
worker (:mod:`mlx_mtp.serving.worker`) both hand text out through it."""

from typing import Iterable, List, Optional, Sequence

__all__ = ["TextStream", "check_text", "stop_strings"]


def check_text(text: str, what: str = "the prompt") -> str:
    """``text`` if it is text that can be encoded (no lone surrogates), else ValueError."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid text: {e.reason} at character {e.start}") from None
    return text


def stop_strings(stop) -> List[str]:
    """``stop`` (None, a str or a list of str) as a checked list of stop strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise TypeError("stop must be a str or a list of str")
    for s in stops:
        check_text(s, "a stop string")
    return stops


class _StopText:
    """Finds the first stop string in the decoded text; until then hands out
    text that cannot turn out to be the start of one."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: List[int] = []
        self.sent = 0  # characters handed out
        self.text = ""

    def add(self, token: int) -> Optional[int]:
        """Add a token; returns the index where a stop string starts, or None."""
        self.tokens.append(token)
        old = len(self.text)
        self.text = self.tokenizer.decode(self.tokens)
        start = max(0, min(old, len(self.text)) - max(len(s) for s in self.stop))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def segment(self, end: Optional[int] = None) -> str:
        """Text not handed out yet, up to ``end``, or (None) up to what is safe."""
        if end is None:
            text = self.text.rstrip("\ufffd")
            end = len(text)
            for s in self.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        end = min(end, len(text) - n)
                        break
        seg = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return seg


class TextStream:
    """The text of one generation, token by token: :meth:`add` gives the text
    to hand out after each token and sets :attr:`finish_reason` on the one
    that ends it: "stop" (an EOS token, whose text is what remained, or a stop
    string, which the text leaves out) or "length" (the ``limit``-th token;
    < 0: no limit). ``tokenizer`` is mlx-lm's ``TokenizerWrapper``."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), eos: Iterable[int] = (), limit: int = -1):
        self.eos = set(eos)
        self.limit = limit
        self.stopper = _StopText(tokenizer, stop) if any(stop) else None
        self.detokenizer = tokenizer.detokenizer  # a fresh one per generation
        self.count = 0  # tokens added
        self.finish_reason: Optional[str] = None

    def add(self, token: int) -> str:
        """The text to hand out after ``token`` (the generation's next)."""
        self.count += 1
        last = self.count == self.limit
        if token in self.eos:
            self.detokenizer.finalize()
            self.finish_reason = "stop"
            return self.stopper.segment(len(self.stopper.text)) if self.stopper else self.detokenizer.last_segment
        if self.stopper is not None:
            hit = self.stopper.add(token)
            if hit is not None:
                self.finish_reason = "stop"
                return self.stopper.segment(hit)
            text = self.stopper.segment(len(self.stopper.text) if last else None)
        else:
            self.detokenizer.add_token(token)
            if last:
                self.detokenizer.finalize()
            text = self.detokenizer.last_segment
        if last:
            self.finish_reason = "length"
        return text
