"""The training-prompt generator of examples/ (the shipped adapter's data)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("make_prompts", ROOT / "examples" / "make_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prompt_sets_are_reproducible_distinct_and_cover_their_kinds():
    mp = _module()
    base = list(mp.make_prompts(300, seed=0))
    extra = list(mp.make_extra_prompts(200, seed=0))
    assert base == list(mp.make_prompts(300, seed=0))
    assert extra == list(mp.make_extra_prompts(200, seed=0))
    assert len({r["prompt"] for r in extra}) == 200
    assert {r["kind"] for r in base} == {"code", "stdlib", "math", "chat", "pair", "advice"}
    assert {r["kind"] for r in extra} == {
        "summary",
        "doc_qa",
        "extract",
        "translate",
        "roleplay",
        "reasoning",
        "qa",
        "writing",
    }
    assert not {r["prompt"] for r in base} & {r["prompt"] for r in extra}
    # the long-document kinds carry a whole docstring (60-400 words)
    docs = [r["prompt"] for r in extra if r["kind"] in ("summary", "extract")]
    assert min(len(p.split()) for p in docs) >= 60
    doc_qa = [r["prompt"] for r in extra if r["kind"] == "doc_qa"]
    assert all("Document 1:" in p and "Document 2:" in p for p in doc_qa)


def test_prompts_share_no_eight_word_span_with_spec_bench():
    """Disjoint from the evaluation: no 8-word span in common with Spec-Bench."""
    mp = _module()
    path = ROOT / "mlx_mtp" / "spec_bench" / "question.jsonl"
    texts = [t for line in path.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"]]
    assert len(texts) >= 480

    def spans(s, n=8):
        w = s.split()
        return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}

    bench = set().union(*(spans(t) for t in texts))
    ours = list(mp.make_prompts(3000, seed=0)) + list(mp.make_extra_prompts(400, seed=0))
    assert not [r["prompt"] for r in ours if spans(r["prompt"]) & bench]


def test_shipped_prompt_files_share_no_eight_word_span_with_spec_bench():
    """Every committed prompt file (examples/data/*.jsonl, written by
    mlx_mtp.training.prompt_writer), checked whole: no 8-word span in common
    with Spec-Bench, neither as written nor ignoring case and punctuation."""
    import re

    files = sorted((ROOT / "examples" / "data").glob("*.jsonl"))
    assert files, "no prompt file in examples/data"
    path = ROOT / "mlx_mtp" / "spec_bench" / "question.jsonl"
    texts = [t for line in path.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"]]

    def spans(words, n=8):
        return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}

    def norm(s):
        return re.findall(r"[a-z0-9']+", s.lower())

    raw = set().union(*(spans(t.split()) for t in texts))
    loose = set().union(*(spans(norm(t)) for t in texts))
    for f in files:
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        assert rows
        bad = [r["prompt"] for r in rows if spans(r["prompt"].split()) & raw or spans(norm(r["prompt"])) & loose]
        assert not bad, f"{f.name}: {bad[:3]}"
