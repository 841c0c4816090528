"""Training data: the compact layout against the core's training layout,
--max-seq-length cuts, mlx-lm formats and their tokenization, bad data
reported with file and line, the batch schedule."""

import json

import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_mtp.model.layouts import IGNORE, training_layout
from mlx_mtp.training.batching import BatchSchedule, make_batch, shard
from mlx_mtp.training.data import (
    DataError,
    build_example,
    layout_length,
    load_data,
    read_jsonl,
    tokenize_file,
)

from conftest import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper(make_tokenizer())


def reference_mask(tokens) -> np.ndarray:
    """Who sees whom in an interleaved layout (masks as -j), by its definition,
    one pair at a time: every token sees the regular tokens up to its own (a
    mask's own is the regular token its block follows), and a mask sees the
    masks of its own block up to itself."""
    L = len(tokens)
    own = []  # the layout index of each token's regular token
    for i, t in enumerate(tokens):
        own.append(i if t >= 0 else own[i - 1])
    mask = np.zeros((L, L), dtype=bool)
    for q in range(L):
        for c in range(L):
            if tokens[c] >= 0:
                mask[q, c] = c <= own[q]
            else:
                mask[q, c] = tokens[q] < 0 and own[c] == own[q] and -tokens[c] <= -tokens[q]
    return mask


@pytest.mark.parametrize("k", [1, 3, 8])
def test_training_mask_is_the_definition(k):
    rng = np.random.default_rng(k)
    for _ in range(10):
        n = int(rng.integers(2, 12))
        lay = training_layout(rng.integers(0, 500, n).tolist(), k, loss_start=int(rng.integers(1, n)))
        np.testing.assert_array_equal(lay.mask, reference_mask(lay.tokens))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_compact_layout_and_batch_are_the_training_layout(k):
    """An example made into a batch (one chunk) holds what the dense layout
    holds at its masks: positions, attention over [regular | masks], labels,
    previous tokens and anchors."""
    rng = np.random.default_rng(k)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        x = rng.integers(0, 500, n).tolist()
        p = int(rng.integers(0, n))
        ex = build_example(x, p, k)
        ref = training_layout(x, k, loss_start=max(p, 1))
        assert ex.layout_length == len(ref.tokens) == layout_length(n, max(p, 1), k)
        batch = make_batch([ex], mask_chunk=0)
        (chunk,) = batch.chunks
        regular, masks = np.flatnonzero(~ref.gate), np.flatnonzero(ref.gate)
        where = f"n={n} p={p}"
        np.testing.assert_array_equal(np.array(batch.tokens)[0], ref.tokens[regular], err_msg=where)
        np.testing.assert_array_equal(np.array(chunk.tokens)[0], ref.tokens[masks], err_msg=where)
        np.testing.assert_array_equal(np.array(chunk.positions)[0], ref.positions[masks], err_msg=where)
        keys = np.concatenate([regular, masks])
        np.testing.assert_array_equal(np.array(chunk.mask)[0], ref.mask[masks][:, keys], err_msg=where)
        counted = np.flatnonzero(ref.labels[masks] != IGNORE)
        np.testing.assert_array_equal(np.array(chunk.valid), counted, err_msg=where)
        np.testing.assert_array_equal(np.array(chunk.labels), ref.labels[masks][counted], err_msg=where)
        np.testing.assert_array_equal(np.array(chunk.prev), ref.prev_tokens[masks][counted], err_msg=where)
        anchors = np.searchsorted(regular, ref.anchor[masks][counted])
        np.testing.assert_array_equal(np.array(chunk.anchor), anchors, err_msg=where)


def test_max_seq_length_cuts_responses_never_mask_blocks():
    k = 4
    x = list(range(100, 160))  # 10 prompt + 50 response tokens
    full = build_example(x, 10, k)
    assert full.layout_length == 60 + 50 * k and not full.truncated
    ex = build_example(x, 10, k, max_seq_length=100)
    # 10 + 5 * r <= 100 -> r = 18 response tokens kept, each block complete
    assert ex.truncated and len(ex.tokens) == 28 and ex.layout_length == 28 + 18 * k <= 100
    assert ex.labels.shape == (18, k)
    assert ex.tokens.tolist() == x[:28]
    assert build_example(x, 10, k, max_seq_length=14) is None  # not one response token fits
    assert build_example(x, 10, k, max_seq_length=15).num_blocks == 1


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


@pytest.mark.parametrize(
    "bad, line, message",
    [
        ('{"text": "ok"', 3, "invalid JSON"),
        ({"question": "q", "answer": "a"}, 3, "unknown format"),
        ([1, 2], 3, "unknown format"),
        ({"prompt": "q", "completion": "   "}, 3, "empty response"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, 3, "empty response"),
        ({"messages": [{"role": "user", "content": "q"}]}, 3, "last message must be the assistant"),
        ({"text": ""}, 3, "empty response"),
        ({"text": 5}, 3, "empty response"),
        (CHAT, 3, "'chat' format but the file started in 'text'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, bad, line, message):
    path = _write(tmp_path / "train.jsonl", [{"text": "a b"}, "", bad, {"text": "c"}])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert f"{path}:{line}:" in str(e.value) and message in str(e.value)


def test_empty_file_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(_write(tmp_path / "a.jsonl", ["", "  "]))
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(p)


def test_formats_tokenize_like_mlx_lm(tmp_path, tokenizer):
    tok = tokenizer
    path = _write(tmp_path / "chat.jsonl", [CHAT])
    (row,) = tokenize_file(path, tok)
    full = tok.apply_chat_template(CHAT["messages"], return_dict=False)
    prompt = tok.apply_chat_template(CHAT["messages"][:1], add_generation_prompt=True, return_dict=False)
    assert row.tokens == list(full) and row.prompt_length == len(prompt)
    assert tok.decode(row.tokens[row.prompt_length :]) == "hello there<|im_end|>\n"
    assert row.source == f"{path}:1"

    path = _write(tmp_path / "comp.jsonl", [{"prompt": "hi", "completion": "hello there"}])
    (row2,) = tokenize_file(path, tok)
    assert row2.tokens == row.tokens and row2.prompt_length == row.prompt_length

    path = _write(tmp_path / "text.jsonl", [{"text": "abc"}])
    (row3,) = tokenize_file(path, tok)
    assert row3.tokens == tok.encode("abc") + [tok.eos_token_id] and row3.prompt_length == 0


def test_completions_without_chat_template(tmp_path):
    raw = make_tokenizer()
    raw.chat_template = None
    tok = TokenizerWrapper(raw)
    path = _write(tmp_path / "comp.jsonl", [{"prompt": "ab", "completion": "cd"}])
    (row,) = tokenize_file(path, tok)
    assert row.tokens == tok.encode("ab") + tok.encode("cd") + [tok.eos_token_id]
    assert row.prompt_length == 2
    with pytest.raises(DataError, match="chat template"):
        tokenize_file(_write(tmp_path / "chat.jsonl", [CHAT]), tok)


def test_load_data_splits(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "nope", tokenizer, 2, 256)
    with pytest.raises(DataError, match="train.jsonl not found"):
        load_data(tmp_path, tokenizer, 2, 256)
    _write(
        tmp_path / "train.jsonl", [CHAT, {"messages": CHAT["messages"][:1] + [{"role": "assistant", "content": "x"}]}]
    )
    out = load_data(tmp_path, tokenizer, 2, 256)
    assert out["valid"] is None and len(out["train"]) == 2
    # a prompt that cannot fit is skipped; if nothing fits, that is an error
    out = load_data(tmp_path, tokenizer, 2, 40)
    assert len(out["train"]) == 2 and out["train"].truncated == 1
    with pytest.raises(DataError, match="no example fits"):
        load_data(tmp_path, tokenizer, 2, 10)


def test_batch_schedule_is_a_function_of_seed_and_step():
    lengths = [5, 50, 7, 30, 9, 11, 40, 3, 22, 17]
    s = BatchSchedule(lengths, 3, seed=1)
    assert len(s) == 3
    # sorted by length, fixed batches
    assert sorted(map(sorted, s.batches)) == sorted(map(sorted, [[7, 0, 2], [4, 5, 9], [8, 3, 6]]))
    epoch0 = [tuple(s.batch(i)) for i in range(3)]
    assert sorted(epoch0) == sorted(map(tuple, s.batches))
    again = BatchSchedule(lengths, 3, seed=1)
    assert [again.batch(i) for i in (5, 0, 4, 1)] == [s.batch(i) for i in (5, 0, 4, 1)]
    orders = {tuple(tuple(BatchSchedule(lengths, 3, seed=z).batch(i)) for i in range(3)) for z in range(8)}
    assert len(orders) > 1
    assert shard([4, 5, 6, 7], 1, 2) == [5, 7]
    with pytest.raises(DataError, match="fewer than --batch-size"):
        BatchSchedule([1, 2], 3)
