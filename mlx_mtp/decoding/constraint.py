"""A grammar constraint over token ids: :class:`Constraint` (compiled once
per request) and :class:`ConstraintMatcher` (one per generation), wrapping
llguidance (the optional extra ``structured``; the choice is measured in
docs/structured_output.md).

A :class:`Constraint` comes from an OpenAI ``response_format``
(:meth:`Constraint.from_response_format`: ``json_object``, ``json_schema``)
or a lark grammar (:meth:`Constraint.from_lark`, llguidance's syntax, which
embeds JSON schemas with ``%json {...}``). It is checked when made: a schema
or grammar llguidance cannot enforce raises :class:`ConstraintError` (a
``ValueError``) with llguidance's one-line reason, before anything decodes.

A :class:`ConstraintMatcher` follows one generation's text and answers what
decoding asks of it: which tokens may come next (a bitmask per position,
:meth:`~ConstraintMatcher.masks`, turned into logits by
:func:`apply_bitmask`), how many tokens of a draft the grammar allows
(:meth:`~ConstraintMatcher.validate`, state unchanged), the tokens it forces
(:meth:`~ConstraintMatcher.forced`), and it consumes the accepted text.
The grammar's end is the tokenizer's EOS: where the grammar is complete
the mask allows EOS (alone, once nothing else may follow).

:meth:`Constraint.logits_processor` is the same constraint as an mlx-lm
logits processor: what ``mlx_lm.generate_step`` applies at every position,
the reference that the speculative decoder's output equals.
"""

import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..errors import MTPError

__all__ = [
    "INSTALL_HINT",
    "WHITESPACE",
    "Constraint",
    "ConstraintError",
    "ConstraintMatcher",
    "ConstraintProcessor",
    "allowed_tokens",
    "apply_bitmask",
    "constraint_for",
]

INSTALL_HINT = 'pip install "mlx-mtp[structured]"'
# at most one space between JSON tokens: llguidance's default (any run of
# whitespace) lets a small model write newlines until max_tokens
# (docs/structured_output.md); applied after a schema's own x-guidance options
WHITESPACE = "[ ]?"


class ConstraintError(MTPError):
    """A schema, grammar or response_format that cannot be enforced (one line: why)."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise ConstraintError(f"structured output needs llguidance: {INSTALL_HINT}") from None
    return llguidance


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _eos_ids(tokenizer) -> List[int]:
    """mlx-lm's ``eos_token_ids`` (a TokenizerWrapper), else the tokenizer's EOS."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return []
    return sorted(set(int(t) for t in ([ids] if isinstance(ids, int) else ids)))


def _hf_tokenizer(tokenizer):
    """The Hugging Face tokenizer behind mlx-lm's ``TokenizerWrapper`` (or itself)."""
    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


# the llguidance tokenizer of each (tokenizer, vocabulary size, EOS ids), built
# once (about a second for a 49k vocabulary); an entry goes with its tokenizer
_TOKENIZERS: Dict[Tuple[int, int, Tuple[int, ...]], Any] = {}


def _grammar_tokenizer(tokenizer, vocab_size: int):
    llg = _llguidance()
    eos = tuple(_eos_ids(tokenizer))
    hf = _hf_tokenizer(tokenizer)
    key = (id(hf), int(vocab_size), eos)
    if key not in _TOKENIZERS:
        try:
            built = llg.hf.from_tokenizer(hf, n_vocab=int(vocab_size), eos_token=list(eos) or None)
        except Exception as e:  # llguidance cannot read this tokenizer's decoder
            raise ConstraintError(f"this tokenizer cannot be constrained: {_one_line(e)}") from None
        try:
            weakref.finalize(hf, _TOKENIZERS.pop, key, None)
        except TypeError:  # not weak-referenceable: kept for the process
            pass
        _TOKENIZERS[key] = built
    return _TOKENIZERS[key]


@mx.compile
def _bits(words: mx.array) -> mx.array:
    # the shifts are made here, not at import: an array belongs to the stream of the thread that made it
    shifts = mx.arange(32, dtype=mx.uint32)
    return ((words[..., None] >> shifts) & 1).reshape(*words.shape[:-1], -1).astype(mx.bool_)


def apply_bitmask(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """``logits`` (n, V) with -inf where ``bitmask`` (n, ceil(V / 32)) int32,
    bit i of each row = token i allowed, has a 0 bit."""
    allowed = _bits(mx.array(bitmask.view(np.uint32)))[:, : logits.shape[-1]]
    return mx.where(allowed, logits, -mx.inf)


def allowed_tokens(bitmask: np.ndarray, vocab_size: int) -> mx.array:
    """(n, V) bool: the tokens each row of ``bitmask`` allows."""
    return _bits(mx.array(bitmask.view(np.uint32)))[:, :vocab_size]


class Constraint:
    """A compiled grammar for one tokenizer and vocabulary; make it with
    :meth:`from_response_format`, :meth:`from_json_schema` or :meth:`from_lark`.
    Immutable: one constraint serves any number of generations, each with its
    own :meth:`matcher`."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int, description: str = "grammar"):
        self._llg = _llguidance()
        self.vocab_size = int(vocab_size)
        self.eos = _eos_ids(tokenizer)
        self.grammar = grammar  # llguidance's JSON form of the grammar
        self.description = description
        self._tokenizer = _grammar_tokenizer(tokenizer, vocab_size)
        error = self._llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise ConstraintError(f"{description}: {_one_line(error)}")

    @classmethod
    def from_json_schema(cls, schema: Any, tokenizer, vocab_size: int, what: str = "schema") -> "Constraint":
        """JSON that fits ``schema`` (a dict, or True for any JSON value), at most one space between tokens."""
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"{what} must be a JSON object, got {type(schema).__name__}")
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": WHITESPACE})
        except Exception as e:  # not JSON-serialisable
            raise ConstraintError(f"{what}: {_one_line(e)}") from None
        return cls(grammar, tokenizer, vocab_size, what)

    @classmethod
    def from_lark(cls, grammar: str, tokenizer, vocab_size: int) -> "Constraint":
        """Text that ``grammar`` (llguidance's lark syntax) derives."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise ConstraintError("grammar must be a non-empty lark grammar (a str)")
        llg = _llguidance()
        return cls(llg.LLMatcher.grammar_from_lark(grammar), tokenizer, vocab_size, "grammar")

    @classmethod
    def from_response_format(cls, response_format: Any, tokenizer, vocab_size: int) -> Optional["Constraint"]:
        """OpenAI's ``response_format``: ``{"type": "text"}`` (None: no
        constraint), ``{"type": "json_object"}`` (any JSON object) or
        ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
        "strict": ...}}`` (JSON that fits the schema; llguidance enforces it
        whatever ``strict`` says, or refuses it)."""
        if not isinstance(response_format, dict):
            raise ConstraintError(f"response_format must be an object, got {type(response_format).__name__}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.from_json_schema({"type": "object"}, tokenizer, vocab_size, "response_format")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise ConstraintError("response_format.json_schema must be an object with a 'schema'")
            schema = spec.get("schema", {"type": "object"})
            name = spec.get("name")
            what = f"response_format.json_schema{' ' + repr(name) if isinstance(name, str) else ''}"
            return cls.from_json_schema(schema, tokenizer, vocab_size, what)
        raise ConstraintError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")

    def matcher(self) -> "ConstraintMatcher":
        """A fresh matcher at the start of the text (one per generation)."""
        return ConstraintMatcher(self)

    def logits_processor(self) -> "ConstraintProcessor":
        """This constraint as an mlx-lm logits processor (a fresh matcher):
        pass it in ``logits_processors`` to ``mlx_lm.generate_step``."""
        return ConstraintProcessor(self.matcher())

    def __repr__(self) -> str:
        return f"Constraint({self.description}, vocab_size={self.vocab_size})"


class ConstraintMatcher:
    """Where one generation stands in a :class:`Constraint`'s grammar.

    Its state follows the tokens consumed (:meth:`consume`); the queries
    (:meth:`masks`, :meth:`validate`, :meth:`forced`) leave it unchanged.
    ``seconds`` adds up the host time its calls took (the constraint's cost
    per step, for reports)."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.vocab_size = constraint.vocab_size
        self.eos = set(constraint.eos)
        self.words = (self.vocab_size + 31) // 32
        self._m = constraint._llg.LLMatcher(constraint._tokenizer, constraint.grammar, log_level=0)
        if self._m.is_error():
            raise ConstraintError(f"{constraint.description}: {_one_line(self._m.get_error())}")
        self.seconds = 0.0

    # --- queries (state unchanged) ---------------------------------------------------
    def forced(self) -> List[int]:
        """The tokens the grammar fixes next (its mask allows each alone, so
        any logits pick them); empty where there is a choice or it has stopped."""
        t0 = time.perf_counter()
        out = [] if self._m.is_stopped() else list(self._m.compute_ff_tokens())
        self.seconds += time.perf_counter() - t0
        return out

    def validate(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` the grammar allows in a row (none after EOS)."""
        t0 = time.perf_counter()
        n = int(self._m.validate_tokens([int(t) for t in tokens])) if tokens else 0
        for i in range(n):  # nothing follows the end of the text
            if tokens[i] in self.eos:
                n = i + 1
                break
        self.seconds += time.perf_counter() - t0
        return n

    def masks(self, paths: Sequence[Sequence[int]]) -> np.ndarray:
        """(len(paths), ceil(V / 32)) int32: the bitmask of the tokens allowed
        after each path (tokens after the current state, all allowed by
        :meth:`validate`; the empty path: the next token's). A path through
        EOS allows every token: generation ends at EOS, so that row is never used."""
        t0 = time.perf_counter()
        out = np.zeros((len(paths), self.words), dtype=np.int32)
        held: List[int] = []  # consumed beyond the state, walking from path to path
        for row, path in enumerate(paths):
            path = [int(t) for t in path]
            if any(t in self.eos for t in path):  # after the end: never read (every token, so no row is all -inf)
                out[row] = -1
                continue
            common = 0
            while common < min(len(held), len(path)) and held[common] == path[common]:
                common += 1
            if len(held) > common:
                self._m.rollback(len(held) - common)
            for t in path[common:]:
                self._consume_one(t)
            held = path
            self._m.unsafe_compute_mask_ptr(out[row].ctypes.data, out[row].nbytes)
        if held:
            self._m.rollback(len(held))
        self.seconds += time.perf_counter() - t0
        return out

    def is_accepting(self) -> bool:
        """The text so far is complete (EOS may come next)."""
        return bool(self._m.is_accepting())

    def is_stopped(self) -> bool:
        """Nothing may follow but EOS (or EOS was consumed)."""
        return bool(self._m.is_stopped())

    # --- state ------------------------------------------------------------------------
    def consume(self, tokens: Sequence[int]):
        """Advance by ``tokens`` (verified text: each allowed); those after
        EOS are ignored. RuntimeError for a token the grammar refuses (a bug:
        the decoder only emits allowed tokens)."""
        t0 = time.perf_counter()
        for t in tokens:
            if self._m.is_stopped():
                break
            self._consume_one(int(t))
        self.seconds += time.perf_counter() - t0

    def rollback(self, n: int):
        """Take back the last ``n`` tokens consumed."""
        if n:
            self._m.rollback(n)

    def _consume_one(self, token: int):
        # llguidance: a refused token leaves the matcher in an error state for good
        if self._m.validate_tokens([token]) != 1 or not self._m.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {_one_line(self._m.get_error())}")


class ConstraintProcessor:
    """An mlx-lm logits processor: advances its matcher by the tokens
    generated since its last call and masks the logits to what the grammar
    allows (EOS alone where it is complete)."""

    def __init__(self, matcher: ConstraintMatcher):
        self.matcher = matcher
        self.seen: Optional[int] = None  # tokens it was given last (prompt and output)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.seen is not None:
            new = tokens[self.seen :].tolist()
            if any(t in self.matcher.eos for t in new):
                # generate_step runs a step ahead: it asks for the position after EOS
                return logits
            self.matcher.consume(new)
        self.seen = tokens.size
        return apply_bitmask(logits, self.matcher.masks([[]]))


def constraint_for(
    tokenizer, vocab_size: int, response_format: Any = None, grammar: Any = None
) -> Optional[Constraint]:
    """The constraint of a request's ``response_format`` (OpenAI's) or
    ``grammar`` (lark), at most one of them; None for neither (or
    ``{"type": "text"}``). ConstraintError (a ValueError) saying why otherwise."""
    if response_format is not None and grammar is not None:
        raise ConstraintError("pass either response_format or grammar, not both")
    if grammar is not None:
        return Constraint.from_lark(grammar, tokenizer, vocab_size)
    if response_format is not None:
        return Constraint.from_response_format(response_format, tokenizer, vocab_size)
    return None
