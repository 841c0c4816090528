"""A ``tokenizers`` tokenizer rebuilt from a GGUF file's metadata, and the
``tokenizer_config.json`` / ``special_tokens_map.json`` that go with it.
Metadata of the wrong type or size is a :class:`~mlx_mtp.errors.ConversionError`.

Two kinds (``tokenizer.ggml.model``):

- ``gpt2``: byte-level BPE; merges from the file, the pre-tokenizer's split
  from ``tokenizer.ggml.pre``;
- ``llama``: a SentencePiece BPE model (pieces, scores, token types). The file
  has no merges: SentencePiece merges, at each step, the adjacent pair whose
  joined piece scores highest, so the merges are every way of cutting a piece
  into two pieces, ranked by the joined piece's score (the file's order among
  equal scores). Spaces become ``▁`` (and one is put before the text if
  ``tokenizer.ggml.add_space_prefix``, true by default as in llama.cpp);
  characters without a piece fall back to ``<0xNN>`` byte pieces;
  user-defined pieces (llama.cpp spells their ``▁`` as spaces) are matched
  whole in the text first, like control pieces, which are special tokens.
"""

from typing import List, Optional, Tuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import ConversionError
from .reader import require as _require_value
from .reader import value as _value

# Pre-tokenizer splits by `tokenizer.ggml.pre`. "gpt2" is the byte-level
# default regex; "digits+gpt2" first cuts every digit off on its own.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    "default": "gpt2",
    "gpt-2": "gpt2",
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
SPACE = "\u2581"  # SentencePiece's visible space


def _pre_tokenizer(pre: str):
    split = PRE_TOKENIZERS.get(pre)
    if split is None:
        raise ConversionError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "gpt2":
        return byte_level
    if split == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


SPECIAL_IDS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


def _special_token(metadata: dict, tokens: List[str], key: str) -> Optional[str]:
    i = _value(metadata, f"tokenizer.ggml.{SPECIAL_IDS[key]}_token_id")
    return tokens[i] if type(i) is int and 0 <= i < len(tokens) else None


def token_lists(metadata: dict) -> Tuple[List[str], List[int]]:
    """The vocabulary and the token types, checked: a non-empty list of
    strings and, if given, one integer type per token."""
    tokens = _require_value(metadata, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ConversionError("tokenizer.ggml.tokens is not a non-empty list of strings")
    types = _value(metadata, "tokenizer.ggml.token_type")
    if types is None:
        types = [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens) or not all(type(t) is int for t in types):
        raise ConversionError(f"tokenizer.ggml.token_type is not a list of {len(tokens)} integers")
    return tokens, types


def _merges(metadata: dict) -> List[Tuple[str, str]]:
    merges = _require_value(metadata, "tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise ConversionError("tokenizer.ggml.merges is not a list of 'left right' strings")
    return [tuple(m.split(" ", 1)) for m in merges]


def _scores(metadata: dict, n: int) -> List[float]:
    scores = _require_value(metadata, "tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != n or not all(type(s) in (int, float) for s in scores):
        raise ConversionError(f"tokenizer.ggml.scores is not a list of {n} numbers")
    return scores


def spm_merges(tokens: List[str], types: List[int], scores: List[float]) -> List[Tuple[str, str]]:
    """The BPE merges that reproduce SentencePiece's BPE on these pieces: every
    cut of a normal piece into two normal pieces, best joined score first."""
    normal = {t for t, ty in zip(tokens, types) if ty == TOKEN_NORMAL}
    order = sorted((i for i, ty in enumerate(types) if ty == TOKEN_NORMAL), key=lambda i: -scores[i])
    merges = []
    for i in order:
        piece = tokens[i]
        for cut in range(1, len(piece)):
            if piece[:cut] in normal and piece[cut:] in normal:
                merges.append((piece[:cut], piece[cut:]))
    return merges


def _add_vocabulary_tokens(tokenizer, tokens: List[str], types: List[int]) -> None:
    """Control tokens as special tokens, user-defined ones as plain added
    tokens: both matched whole in the raw text, never cut by the model."""
    for kind, add in ((TOKEN_CONTROL, tokenizer.add_special_tokens),
                      (TOKEN_USER_DEFINED, tokenizer.add_tokens)):  # fmt: skip
        special = kind == TOKEN_CONTROL
        add([AddedToken(t, special=special, normalized=False)
             for t, ty in zip(tokens, types) if ty == kind])  # fmt: skip


def _add_bos(tokenizer, metadata: dict, tokens: List[str]) -> bool:
    """Put BOS before every text if the file asks for it; whether it did."""
    bos = _special_token(metadata, tokens, "bos")
    if not (_value(metadata, "tokenizer.ggml.add_bos_token", False) and bos is not None):
        return False
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tokens.index(bos))],
    )
    return True


def _sentencepiece_tokenizer(metadata: dict):
    tokens, types = token_lists(metadata)
    scores = _scores(metadata, len(tokens))
    prefix = _value(metadata, "tokenizer.ggml.add_space_prefix", True)
    if type(prefix) is not bool:
        raise ConversionError(f"tokenizer.ggml.add_space_prefix is {prefix!r}, not a boolean")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError("tokenizer.ggml.tokens holds the same token twice")
    unk = _special_token(metadata, tokens, "unk")
    try:
        model = models.BPE(vocab, spm_merges(tokens, types, scores), unk_token=unk, fuse_unk=True,
                           byte_fallback=True)  # fmt: skip
    except Exception as e:  # the tokenizers library's own check
        raise ConversionError(f"the GGUF tokenizer metadata is not a valid SentencePiece model: {e}") from None
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    # the sequence mlx-lm recognises as SentencePiece's (its streaming detokenizer)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    _add_vocabulary_tokens(tokenizer, tokens, types)
    _add_bos(tokenizer, metadata, tokens)
    return tokenizer


def build_tokenizer(metadata: dict):
    """A ``tokenizers.Tokenizer`` from the GGUF tokenizer metadata."""
    kind = _require_value(metadata, "tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_tokenizer(metadata)
    if kind != "gpt2":
        raise ConversionError(
            f"unsupported tokenizer model tokenizer.ggml.model={kind!r}; supported: "
            "'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)"
        )
    pre = _value(metadata, "tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise ConversionError(f"tokenizer.ggml.pre is {pre!r}, not a string")
    pre_tokenizer = _pre_tokenizer(pre)
    tokens, types = token_lists(metadata)
    merges = _merges(metadata)
    vocab = {t: i for i, t in enumerate(tokens)}
    unknown = next((m for m in merges if m[0] not in vocab or m[1] not in vocab), None)
    if unknown is not None:
        raise ConversionError(f"tokenizer.ggml.merges: the merge {' '.join(unknown)!r} is not in the vocabulary")
    try:
        tokenizer = Tokenizer(models.BPE(vocab, merges))
    except Exception as e:  # the tokenizers library's own check
        raise ConversionError(f"the GGUF tokenizer metadata is not a valid BPE model: {e}") from None
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    _add_vocabulary_tokens(tokenizer, tokens, types)
    if not _add_bos(tokenizer, metadata, tokens):
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def tokenizer_configs(metadata: dict, context_length: int) -> Tuple[dict, dict]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` contents."""
    tokens, types = token_lists(metadata)
    special = {f"{key}_token": _special_token(metadata, tokens, key) for key in ("bos", "eos", "unk", "pad")}
    special["pad_token"] = special["pad_token"] or special["eos_token"]
    special = {k: v for k, v in special.items() if v is not None}
    extra = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    extra = [t for t in extra if t not in special.values()]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_value(metadata, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_value(metadata, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "additional_special_tokens": extra,
        **special,
    }
    template = _value(metadata, "tokenizer.chat_template")
    if template and isinstance(template, str):
        config["chat_template"] = template
    return config, {**special, "additional_special_tokens": extra}
