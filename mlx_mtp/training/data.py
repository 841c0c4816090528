"""Training data: mlx-lm's jsonl formats, checked line by line, tokenized,
and turned into the interleaved MTP training layout.

Formats (one JSON object per line, the same in every line of a file):

- chat: ``{"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}``;
  the last (assistant) message is the response;
- completions: ``{"prompt": ..., "completion": ...}``;
- text: ``{"text": ...}``: everything is response.

Prompt tokens carry no loss and get no masks. Tokenization goes through
mlx-lm's own dataset classes (``mlx_lm.tuner.datasets``, ``mask_prompt=True``),
so the token ids are exactly what ``mlx_lm.lora`` would train on; a tokenizer
without a chat template tokenizes prompt and completion as plain text.

The layout of an example is stored compactly (:class:`Example`): the regular
tokens, and per block of k masks the regular token it follows (its owner),
then per mask its label, previous token and anchor. The attention mask is
not stored: it is a function of the owners
(:func:`mlx_mtp.model.layouts.training_mask`, applied by
:mod:`mlx_mtp.training.batching`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mlx_lm.tuner import datasets as ds

from ..errors import DataError
from ..files import read_jsonl as jsonl_lines
from ..model.layouts import IGNORE

FORMATS = {
    "chat": ("messages",),
    "completions": ("prompt", "completion"),
    "text": ("text",),
}


# ---------------------------------------------------------------------------
# Reading and checking jsonl files
# ---------------------------------------------------------------------------


def detect_format(row) -> Optional[str]:
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "completions"
    if "text" in row:
        return "text"
    return None


def _nonempty_str(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def check_row(row, fmt: str) -> Optional[str]:
    """Why ``row`` is not a valid ``fmt`` row (None if it is)."""
    if fmt == "chat":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"message {i} must be an object with 'role' and 'content'"
            if not isinstance(m["content"], str):
                return f"message {i}: 'content' must be a string"
        if messages[-1]["role"] != "assistant":
            return "the last message must be the assistant's response"
        if not _nonempty_str(messages[-1]["content"]):
            return "empty response (the last assistant message is empty)"
    elif fmt == "completions":
        if not isinstance(row["prompt"], str):
            return "'prompt' must be a string"
        if not _nonempty_str(row["completion"]):
            return "empty response ('completion' is empty)"
    elif fmt == "text":
        if not _nonempty_str(row["text"]):
            return "empty response ('text' is empty)"
    return None


def read_jsonl(path: Path) -> Tuple[str, List[Tuple[int, dict]]]:
    """(format, [(line number, row)]) of a data file; blank lines are skipped.

    Raises :class:`DataError` naming the file and line of the first problem.
    """
    rows: List[Tuple[int, dict]] = []
    fmt: Optional[str] = None
    for lineno, row in jsonl_lines(path):
        where = f"{path}:{lineno}"
        row_fmt = detect_format(row)
        if row_fmt is None:
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{where}: unknown format (found {keys or 'an empty object'}; expected "
                "'messages', 'prompt' and 'completion', or 'text')"
            )
        problem = check_row(row, row_fmt)
        if problem:
            raise DataError(f"{where}: {problem}")
        if fmt is None:
            fmt = row_fmt
        elif row_fmt != fmt:
            raise DataError(f"{where}: this line is in '{row_fmt}' format but the file started in '{fmt}' format")
        rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: no examples")
    return fmt, rows


# ---------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class _PlainCompletions:
    """prompt/completion for a tokenizer without a chat template:
    ``encode(prompt) + encode(completion) + eos``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def process(self, row):
        tok = self.tokenizer
        prompt = tok.encode(row["prompt"]) if row["prompt"] else []
        completion = tok.encode(row["completion"], add_special_tokens=False)
        tokens = list(prompt) + list(completion)
        if tok.eos_token_id is not None and (not tokens or tokens[-1] != tok.eos_token_id):
            tokens.append(tok.eos_token_id)
        return tokens, len(prompt)


def make_processor(fmt: str, tokenizer):
    """An object whose ``process(row)`` returns (token ids, prompt length),
    mlx-lm's own dataset classes with ``mask_prompt=True`` where they apply."""
    if fmt == "chat":
        if not _has_chat_template(tokenizer):
            raise DataError("'messages' data needs a tokenizer with a chat template; this one has none")
        return ds.ChatDataset([], tokenizer, chat_key="messages", mask_prompt=True)
    if fmt == "completions":
        if not _has_chat_template(tokenizer):
            return _PlainCompletions(tokenizer)
        return ds.CompletionsDataset([], tokenizer, "prompt", "completion", mask_prompt=True)
    if fmt == "text":
        return ds.TextDataset([], tokenizer, text_key="text")
    raise DataError(f"unknown format '{fmt}'")


@dataclass
class TokenizedRow:
    tokens: List[int]
    prompt_length: int
    source: str  # "file:line"


def tokenize_file(path: Path, tokenizer) -> List[TokenizedRow]:
    """Read, check and tokenize one jsonl file."""
    fmt, rows = read_jsonl(path)
    processor = make_processor(fmt, tokenizer)
    out = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        try:
            tokens, offset = processor.process(row)
        except DataError:
            raise
        except Exception as e:  # the tokenizer's chat template can reject a row
            raise DataError(f"{where}: cannot tokenize this example ({type(e).__name__}: {e})") from None
        tokens = [int(t) for t in tokens]
        if offset >= len(tokens) or len(tokens) < 2:
            raise DataError(f"{where}: empty response after tokenization")
        out.append(TokenizedRow(tokens, int(offset), where))
    return out


# ---------------------------------------------------------------------------
# The compact training layout
# ---------------------------------------------------------------------------


@dataclass
class Example:
    """One sequence in the interleaved layout ``x0 m1..mk x1 m1..mk ...``.

    ``tokens`` are the n regular tokens x. Block b follows x_{owner[b]}; its
    mask m_j (j = 1..k) sits at position owner+j, predicts
    ``labels[b, j-1] = x[owner+j+1]`` (IGNORE past the end) from the previous
    token ``prev[b, j-1] = x[owner+j]``, and shares that label with the
    regular token ``anchor[b, j-1] = owner+j`` (-1 past the end). It sees
    x_0..x_owner and m_1..m_j of its own block.
    """

    tokens: np.ndarray  # (n,) int32
    owner: np.ndarray  # (nb,) int32
    labels: np.ndarray  # (nb, k) int64
    prev: np.ndarray  # (nb, k) int32
    anchor: np.ndarray  # (nb, k) int64
    source: str = ""
    truncated: bool = False

    @property
    def num_masks(self) -> int:
        return self.labels.shape[1]

    @property
    def num_blocks(self) -> int:
        return len(self.owner)

    @property
    def layout_length(self) -> int:
        return len(self.tokens) + self.labels.size

    def keep_blocks(self, blocks: np.ndarray) -> "Example":
        """The same sequence with the mask blocks ``blocks`` (indices into
        the blocks, ascending) only; the regular tokens are unchanged."""
        return Example(
            tokens=self.tokens,
            owner=self.owner[blocks],
            labels=self.labels[blocks],
            prev=self.prev[blocks],
            anchor=self.anchor[blocks],
            source=self.source,
            truncated=self.truncated,
        )


def response_tokens(path: Path, tokenizer, prefix: int = 0) -> List[List[int]]:
    """The response tokens of each row of a jsonl file, with the last
    ``prefix`` tokens of its prompt before them."""
    return [r.tokens[max(0, r.prompt_length - prefix) :] for r in tokenize_file(path, tokenizer)]


def layout_length(n: int, loss_start: int, k: int) -> int:
    """Length of the interleaved layout of n tokens whose first loss token is ``loss_start``."""
    return n + k * max(n - loss_start, 0)


def build_example(
    tokens: Sequence[int],
    prompt_length: int,
    k: int,
    max_seq_length: Optional[int] = None,
    source: str = "",
) -> Optional[Example]:
    """The compact layout of one sequence, responses cut so that the layout
    (regular tokens + k masks per response token) fits ``max_seq_length``.

    Returns None when not even one response token fits.
    """
    x = np.asarray(tokens, dtype=np.int64)
    loss_start = max(int(prompt_length), 1)
    n = len(x)
    truncated = False
    if max_seq_length is not None and layout_length(n, loss_start, k) > max_seq_length:
        r = (max_seq_length - loss_start) // (k + 1)
        if r < 1:
            return None
        n = loss_start + r
        x = x[:n]
        truncated = True
    if n - loss_start < 1:
        return None
    owner = np.arange(loss_start - 1, n - 1)  # a block after x_i when x_{i+1} carries loss
    j = np.arange(1, k + 1)
    target = owner[:, None] + j[None, :] + 1
    valid = target < n
    labels = np.where(valid, x[np.minimum(target, n - 1)], IGNORE)
    prev = np.where(valid, x[np.minimum(target - 1, n - 1)], 0)
    anchor = np.where(valid, target - 1, -1)
    return Example(
        tokens=x.astype(np.int32),
        owner=owner.astype(np.int32),
        labels=labels.astype(np.int64),
        prev=prev.astype(np.int32),
        anchor=anchor.astype(np.int64),
        source=source,
        truncated=truncated,
    )


@dataclass
class Dataset:
    examples: List[Example]
    path: Optional[Path] = None
    skipped: int = 0  # sequences whose prompt alone exceeds max_seq_length
    truncated: int = 0

    def __len__(self):
        return len(self.examples)


def build_dataset(
    sequences: List[TokenizedRow], k: int, max_seq_length: Optional[int], path: Optional[Path] = None
) -> Dataset:
    examples, skipped = [], 0
    for s in sequences:
        ex = build_example(s.tokens, s.prompt_length, k, max_seq_length, s.source)
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    return Dataset(examples, path, skipped, sum(e.truncated for e in examples))


def load_data(
    data_dir, tokenizer, k: int, max_seq_length: Optional[int], splits=("train", "valid")
) -> Dict[str, Optional[Dataset]]:
    """Read, check and lay out ``{split}.jsonl`` of ``data_dir``.

    A missing ``train.jsonl`` is an error, a missing ``valid.jsonl`` is not
    (its entry is None). Every file is checked completely before anything
    else happens.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory '{data_dir}' not found")
    out: Dict[str, Optional[Dataset]] = {}
    for split in splits:
        path = data_dir / f"{split}.jsonl"
        if not path.exists():
            if split == "train":
                raise DataError(f"{path} not found (the data directory needs train.jsonl and valid.jsonl)")
            out[split] = None
            continue
        dataset = build_dataset(tokenize_file(path, tokenizer), k, max_seq_length, path)
        if not dataset.examples:
            raise DataError(
                f"{path}: no example fits --max-seq-length {max_seq_length} "
                f"(each response token takes {k + 1} layout slots)"
            )
        out[split] = dataset
    return out
