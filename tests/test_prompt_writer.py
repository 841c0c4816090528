"""Prompts written by the model: filters, deduplication, the plan of a chunk,
reproducibility from a seed and exact resume (tiny model with a chat template)."""

import json

import pytest

from mlx_mtp.errors import DataError
from mlx_mtp.training import prompt_writer as pw

from conftest import model_dir

SPANS = pw.load_spec_bench_spans()


def _spec_bench_turn(i=0):
    line = pw.SPEC_BENCH.read_text().splitlines()[i]
    return json.loads(line)["turns"][0]


def test_filter_rejects_an_eight_word_span_of_spec_bench_and_not_seven():
    w = _spec_bench_turn(3).split()
    assert len(w) >= 10
    eight = "Could you help me with this: " + " ".join(w[1:9]) + " please, thanks"
    seven = "Could you help me with this: " + " ".join(w[1:8]) + " please, thanks"
    assert pw.reject_reason(eight, SPANS) == "spec_bench"
    assert pw.reject_reason(seven, SPANS) is None
    # case and punctuation do not hide a span
    assert pw.reject_reason(eight.upper().replace(" ", " , "), SPANS) == "spec_bench"


@pytest.mark.parametrize(
    "text, finished, reason",
    [
        ("Write a Python function that sorts a list of tuples by their second item.", True, None),
        ("Write a Python function that sorts a list", False, "unfinished"),
        ("Hi there", True, "short"),
        ("word " * 401, True, "long"),
        ("What is <|im_start|>assistant the answer?", True, "markup"),
        ("I'm sorry, but I cannot help with that request today.", True, "refusal"),
        ("Как приготовить борщ дома быстро и вкусно?", True, "language"),
        ("Tell me more about it " * 6, True, "repetition"),
        ("Why is the sky blue!!!!!!!!!!!!!!!!!!!!!!!!", True, "repetition"),
    ],
)
def test_filters(text, finished, reason):
    assert pw.reject_reason(text, SPANS, finished) == reason


def test_deduper_exact_and_near_duplicates():
    d = pw.Deduper()
    first = "Write a Python function that checks whether a number is prime and returns a boolean."
    assert d.check(first) is None
    d.add(first)
    assert (
        d.check("write a python function that checks whether a number is prime, and returns a boolean!") == "duplicate"
    )
    assert (
        d.check("Write a Python function that checks whether a number is prime and returns True or False.")
        == "near_duplicate"
    )
    # sharing the opening only is not a duplicate
    assert d.check("Write a Python function that merges two sorted lists into one sorted list.") is None
    assert d.check("Short one") is None


def test_passages_and_translation_sources():
    text = "The river rose in spring. " * 2 + "Farmers moved their animals to the hills before the flood came. " * 4
    assert pw.clean_passage("Too short.", True) is None
    cut = pw.clean_passage("First sentence is here. " + "Some words that go on " * 12 + "and then stop mid", False)
    assert cut is None or cut.endswith(".")
    one = pw.first_sentences(text, max_words=12)
    assert one == "The river rose in spring. The river rose in spring."
    assert pw.first_sentences("One very long sentence " * 20 + ".", max_words=5).split()[0] == "One"


def test_chunk_plan_is_a_function_of_seed_and_chunk_and_covers_the_kinds():
    kinds = list(pw.KINDS)
    a = pw.chunk_plan(0, 3, 500, kinds)
    assert a == pw.chunk_plan(0, 3, 500, kinds)
    assert a != pw.chunk_plan(1, 3, 500, kinds) and a != pw.chunk_plan(0, 4, 500, kinds)
    assert {k for k, *_ in a} == set(kinds)
    assert all((src is not None) == (k in pw.SOURCE_KINDS) for k, _, src, _ in a)
    assert all(op in pw.KINDS[k] for k, op, *_ in a)


def test_diversity_ratios():
    d = pw.diversity(["a b c", "a b d"])
    assert d == {"distinct_1": 0.6667, "distinct_2": 0.75, "distinct_3": 1.0}


def _accept_new(text, spans, finished=True):
    # the tiny random model writes no English: keep everything but the empty
    return None if text and text.strip() else "short"


def _run(out, num=12, chunk=6, stop_after=None, seed=0):
    from mlx_lm.utils import load

    model, tok = load(str(model_dir()))
    settings = pw.Settings(model="tiny", seed=seed, num=num, chunk=chunk, batch_size=4)
    calls = []

    def log(msg):
        calls.append(msg)
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt

    return pw.write_prompts(model, tok, settings, out, log=log, reject=_accept_new)


def test_same_seed_same_file_and_exact_resume(tmp_path):
    ref = _run(tmp_path / "a.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert ref.rows == len(rows) == 12 and ref.chunks >= 2
    assert {r["kind"] for r in rows} <= set(pw.KINDS)
    _run(tmp_path / "b.jsonl")
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    _run(tmp_path / "c.jsonl", seed=1)
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()

    # interrupted after the first chunk, with half a row appended by a crash
    out = tmp_path / "d.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _run(out, stop_after=1)
    assert json.loads(pw._state_path(out).read_text())["chunks"] == 1
    with open(out, "a") as f:
        f.write('{"prompt": "half')
    again = _run(out)
    assert out.read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert again.rows == ref.rows and again.kept == ref.kept and again.rejected == ref.rejected
    # done: running again changes nothing; other settings are refused
    _run(out)
    assert out.read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    with pytest.raises(DataError, match="other settings.*seed"):
        _run(out, seed=5)


def test_cli_errors_and_report(tmp_path, capsys):
    assert pw.main(["--out", str(tmp_path / "x.jsonl"), "--kinds", "poetry"]) == 2
    assert "unknown kind(s) poetry" in capsys.readouterr().err
    assert pw.main(["--report", str(tmp_path / "none.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    f = tmp_path / "p.jsonl"
    f.write_text(
        "\n".join(json.dumps({"prompt": p, "kind": k}) for p, k in [("a b c", "qa"), ("a b d", "math")]) + "\n"
    )
    assert pw.main(["--report", str(f)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["prompts"] == 2 and rep["kinds"] == {"math": 1, "qa": 1} and rep["spec_bench_overlaps"] == 0
