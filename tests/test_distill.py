"""Self-distillation: prompt files, greedy responses equal to mlx-lm's,
the train/valid split, resume without lost or duplicated rows, errors."""

import json

import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_mtp.distill import DistillError, distill, is_valid_row, main, read_prompts
from mlx_mtp.training.data import read_jsonl

from conftest import distilled_dir, make_tokenizer, model_dir, prompts, prompts_file


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, r"p\.txt not found"),
        (lambda p: p.mkdir(), r"p\.txt is a directory, not a prompts file"),
        (lambda p: p.write_bytes(b"ok\n\xff\xfe"), r"p\.txt: not UTF-8 text \(invalid start byte at byte 3\)"),
    ],
)
def test_a_plain_prompts_file_that_cannot_be_read_is_one_error(tmp_path, make, message):
    p = tmp_path / "p.txt"
    make(p)
    with pytest.raises(DistillError, match=message):
        read_prompts(p)


def test_read_prompts_formats(tmp_path):
    p = tmp_path / "p.jsonl"
    rows = [
        "just a string",
        {"prompt": "a prompt", "kind": "x"},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "old"},
            ]
        },
        {"turns": ["first turn", "second"]},
    ]
    p.write_text(
        "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]) + "\n"
    )
    got = read_prompts(p)
    assert got == [
        "just a string",
        "a prompt",
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}],
        "first turn",
    ]
    t = tmp_path / "p.txt"
    t.write_text('one\n\n  two  \n{"prompt": "literal"}\n')
    assert read_prompts(t) == ["one", "two", '{"prompt": "literal"}']


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x"', "invalid JSON"),
        ('{"question": "x"}', "unknown prompt format"),
        ('{"prompt": "  "}', "empty prompt"),
        ('{"prompt": 3}', "must be a string"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "empty prompt"),
    ],
)
def test_bad_prompts_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "p.jsonl"
    p.write_text('"ok"\n' + line + "\n")
    with pytest.raises(DistillError) as e:
        read_prompts(p)
    assert f"{p}:2:" in str(e.value) and message in str(e.value)


def test_split_is_evenly_spread():
    assert [i for i in range(40) if is_valid_row(i, 0.1)] == [4, 14, 24, 34]
    assert [i for i in range(8) if is_valid_row(i, 0.25)] == [1, 5]
    assert not any(is_valid_row(i, 0.0) for i in range(100))


def test_cli_writes_greedy_responses_in_mlx_lm_chat_format():
    from mlx_lm.generate import generate
    from mlx_lm.utils import load

    out = distilled_dir()
    fmt_t, train = read_jsonl(out / "train.jsonl")
    fmt_v, valid = read_jsonl(out / "valid.jsonl")
    assert fmt_t == fmt_v == "chat"
    ps = prompts()
    valid_idx = [i for i in range(len(ps)) if is_valid_row(i, 0.25)]
    assert len(train) + len(valid) == len(ps)  # no response is empty here
    assert [r["messages"][0]["content"] for _, r in valid] == [ps[i] for i in valid_idx]
    assert [r["messages"][0]["content"] for _, r in train] == [p for i, p in enumerate(ps) if i not in valid_idx]
    # the responses are the model's own greedy responses (mlx-lm, one prompt at a time)
    model, tok = load(str(model_dir()))
    for _, row in train[:3]:
        msgs = row["messages"][:1]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
        assert generate(model, tok, ids, max_tokens=32) == row["messages"][1]["content"]


def _fake_generate(calls, fail_at=None):
    def gen(model, tok, prompts, max_tokens):
        calls.append(len(prompts))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        # deterministic, and empty for some prompts (skipped rows)
        return ["" if sum(p) % 7 == 0 else "r" + "".join(str(t % 10) for t in p[-5:]) for p in prompts]

    return gen


SETTINGS = {"model": "m", "max_tokens": 8, "valid_fraction": 0.25}


def test_resume_loses_and_duplicates_nothing(tmp_path):
    tok = TokenizerWrapper(make_tokenizer())
    ps = prompts()
    kw = dict(max_tokens=8, batch_size=5, valid_fraction=0.25, progress=False)
    ref = distill(None, tok, ps, tmp_path / "ref", SETTINGS, generate=_fake_generate([]), **kw)
    assert ref.done == 48 and ref.empty > 0

    out = tmp_path / "out"
    calls = []
    with pytest.raises(KeyboardInterrupt):
        distill(None, tok, ps, out, SETTINGS, generate=_fake_generate(calls, fail_at=3), **kw)
    state = json.loads((out / ".distill_state.json").read_text())
    assert state["done"] == 10
    # a crash after appending rows but before recording them leaves extra bytes
    with open(out / "train.jsonl", "a") as f:
        f.write('{"messages": [{"role": "user", "content": "half-writ')
    calls = []
    again = distill(None, tok, ps, out, SETTINGS, generate=_fake_generate(calls), **kw)
    assert sum(calls) == 38  # only the prompts not done yet
    assert again.rows == ref.rows and again.empty == ref.empty
    for split in ("train", "valid"):
        assert (out / f"{split}.jsonl").read_bytes() == (tmp_path / "ref" / f"{split}.jsonl").read_bytes()
    # finished: running again generates nothing
    calls = []
    distill(None, tok, ps, out, SETTINGS, generate=_fake_generate(calls), **kw)
    assert calls == []


def test_batched_resume_ends_with_the_files_of_an_uninterrupted_run(tmp_path):
    """Real continuous batching (4 sequences, checkpoints every 8 prompts):
    an interruption between chunks changes no byte of the output."""
    from functools import partial

    from mlx_lm.utils import load

    from mlx_mtp.distill import generate_batch

    model, tok = load(str(model_dir()))
    ps = prompts(20)
    settings = {**SETTINGS, "max_tokens": 12}
    kw = dict(max_tokens=12, batch_size=4, chunk=8, valid_fraction=0.25, progress=False)
    distill(model, tok, ps, tmp_path / "ref", settings, **kw)
    calls = []

    def stop_second(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return partial(generate_batch, batch_size=4)(*a)

    with pytest.raises(KeyboardInterrupt):
        distill(model, tok, ps, tmp_path / "out", settings, generate=stop_second, **kw)
    assert json.loads((tmp_path / "out" / ".distill_state.json").read_text())["done"] == 8
    distill(model, tok, ps, tmp_path / "out", settings, **kw)
    for split in ("train", "valid"):
        assert (tmp_path / "out" / f"{split}.jsonl").read_bytes() == (tmp_path / "ref" / f"{split}.jsonl").read_bytes()


def test_follows_a_growing_prompts_file_and_refuses_changed_prompts(tmp_path):
    """Distilling the first 16 prompts, then all 24 once the file has grown,
    ends with the files of one run over the 24; a changed early prompt is refused."""
    tok = TokenizerWrapper(make_tokenizer())
    ps = prompts(24)
    kw = dict(max_tokens=8, batch_size=4, chunk=8, valid_fraction=0.25, progress=False)
    distill(None, tok, ps, tmp_path / "ref", SETTINGS, generate=_fake_generate([]), **kw)
    calls = []
    distill(None, tok, ps[:16], tmp_path / "out", SETTINGS, generate=_fake_generate(calls), **kw)
    assert calls == [8, 8]
    calls = []
    state = distill(None, tok, ps, tmp_path / "out", SETTINGS, generate=_fake_generate(calls), **kw)
    assert calls == [8] and state.done == 24
    for split in ("train", "valid"):
        assert (tmp_path / "out" / f"{split}.jsonl").read_bytes() == (tmp_path / "ref" / f"{split}.jsonl").read_bytes()
    changed = list(ps)
    changed[3] = changed[3] + " (edited)"
    for bad in (changed, ps[:10]):
        with pytest.raises(DistillError, match="not the first 24"):
            distill(None, tok, bad, tmp_path / "out", SETTINGS, generate=_fake_generate([]), **kw)


def test_resume_refuses_other_settings_and_foreign_files(tmp_path):
    tok = TokenizerWrapper(make_tokenizer())
    kw = dict(batch_size=8, progress=False)
    distill(None, tok, prompts(8), tmp_path / "a", SETTINGS, generate=_fake_generate([]), **kw)
    with pytest.raises(DistillError, match="different settings.*max_tokens"):
        distill(
            None,
            tok,
            prompts(8),
            tmp_path / "a",
            {**SETTINGS, "max_tokens": 9},
            generate=_fake_generate([]),
            **kw,
        )
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.jsonl").write_text("{}\n")
    with pytest.raises(DistillError, match="not written by distill"):
        distill(None, tok, prompts(8), tmp_path / "b", SETTINGS, generate=_fake_generate([]), **kw)


def test_cli_errors_write_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"prompt": \n')
    out = tmp_path / "out"
    assert main(["--model", str(model_dir()), "--prompts", str(bad), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: invalid JSON" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["--model", str(tmp_path / "no-model"), "--prompts", str(prompts_file()), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["--model", str(model_dir()), "--prompts", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()
