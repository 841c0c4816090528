"""examples/structured_benchmark.py: its schemas (enough, varied, each with
an example that fits it); the harness end to end against two servers on
127.0.0.1 whose generation is scripted (each answer is the schema's example,
or a chosen wrong one, with the server's constraint left out), so that its
counts can be checked exactly; and against two real servers (speculation on
and off) on a tiny model under the constraint, where every answer fits and
both agree."""

import json
import sys
from pathlib import Path

import pytest

from conftest import LoopbackServer, need, scripted_decoding

need("openai", "pip install -e '.[test,server]'")
need("uvicorn", "pip install -e '.[server]'")
jsonschema = need("jsonschema", "pip install -e '.[test]'")

from mlx_mtp import load  # noqa: E402
from mlx_mtp.decoding.settings import DecodeSettings  # noqa: E402
from mlx_mtp.server import ServerConfig  # noqa: E402

from tiny import json_tokenizer, save_tiny_model_dir  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import structured_benchmark as bench  # noqa: E402

ENTRIES = json.loads(bench.SCHEMAS.read_text())
PYDANTIC_ANSWERS = {
    "CalendarEvent": {"name": "Lunch", "date": "2025-03-14", "participants": ["Alice", "Bob"]},
    "MathReasoning": {"steps": [{"explanation": "subtract 7", "output": "8x = -30"}], "final_answer": "x = -3.75"},
    "Pet": {"name": "Tom", "species": "cat", "age_years": 1, "vaccinated": True},
    "Trip": {"destination": "Rome", "nights": 2, "budget_eur": 500.0, "activities": ["Colosseum"]},
}


def keywords(schema):
    """Every JSON-schema keyword used anywhere in ``schema``."""
    found = set()
    if isinstance(schema, dict):
        found |= set(schema)
        for value in schema.values():
            found |= keywords(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= keywords(value)
    return found


def test_the_schemas_are_many_varied_and_their_examples_fit():
    assert len(ENTRIES) >= 20 and len({e["name"] for e in ENTRIES}) == len(ENTRIES)
    assert len(bench.schema_cases(bench.SCHEMAS, 10)) >= 200
    for e in ENTRIES:
        jsonschema.Draft202012Validator.check_schema(e["schema"])
        jsonschema.validate(e["example"], e["schema"])
        assert len(e["subjects"]) >= 10 and len(set(e["subjects"])) == len(e["subjects"])
    used = set().union(*(keywords(e["schema"]) for e in ENTRIES))
    assert {"enum", "pattern", "minimum", "maximum", "maxItems", "maxLength", "anyOf", "const"} <= used
    kinds = json.dumps([e["schema"] for e in ENTRIES])
    assert '"type": "number"' in kinds and '"type": "array"' in kinds and '"type": "null"' in kinds
    nested = [e for e in ENTRIES if any(p.get("type") == "object" for p in e["schema"]["properties"].values())]
    optional = [e for e in ENTRIES if set(e["schema"]["required"]) != set(e["schema"]["properties"])]
    assert nested and optional


def test_the_pydantic_answers_fit_their_models():
    for model, _, subjects in bench.pydantic_models():
        model.model_validate(PYDANTIC_ANSWERS[model.__name__])
        assert len(subjects) >= 5


class Answers:
    """The worker's decoding settings replaced (:func:`conftest.scripted_decoding`,
    without the request's constraint, so that a wrong answer can be written):
    the example of the schema found in the prompt, or the chosen wrong one."""

    def __init__(self, tokenizer, worker, wrong=None):
        self.tokenizer, self.wrong = tokenizer, wrong or {}
        self.decoding_for = scripted_decoding(worker, self.answer, tokenizer, keep_constraint=False)

    def answer(self, prompt):
        prompt_text = self.tokenizer.decode(prompt)
        for e in ENTRIES:
            if json.dumps(e["schema"]) in prompt_text:
                return self.wrong.get(e["name"], json.dumps(e["example"]))
        for model, task, _ in bench.pydantic_models():
            if task in prompt_text:
                return self.wrong.get(model.__name__, json.dumps(PYDANTIC_ANSWERS[model.__name__]))
        raise AssertionError(f"no schema in {prompt_text!r}")

    def __call__(self, *args, **kwargs):
        return self.decoding_for(*args, **kwargs)


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    """A tiny model with a byte-level tokenizer (llguidance reads it): (model, adapter) directories."""
    return save_tiny_model_dir(
        tmp_path_factory.mktemp("bench"),
        "llama",
        tokenizer=json_tokenizer(),
        vocab_size=len(json_tokenizer()),
        max_position_embeddings=8192,
    )


@pytest.fixture(scope="module")
def servers(bench_dirs):
    """Speculation on (the default) and off (no masks, no copies, no policy)."""
    loaded = load(str(bench_dirs[0]), adapter_path=str(bench_dirs[1]))
    plain = DecodeSettings(num_masks=0, lookup=0, policy=False)
    spec, plain = (
        LoopbackServer(*loaded, ServerConfig(model_id="tiny")),
        LoopbackServer(*loaded, ServerConfig("tiny", decoding=plain)),
    )
    yield spec, plain, loaded[1]
    spec.stop()
    plain.stop()


def urls(spec, plain):
    spec_url, plain_url = f"http://127.0.0.1:{spec.port}/v1", f"http://127.0.0.1:{plain.port}/v1"
    return ["--spec-url", spec_url, "--baseline", "server", "--plain-url", plain_url]


def test_the_harness_counts_what_parses_validates_and_agrees(servers, monkeypatch, capsys, tmp_path):
    spec, plain, tokenizer = servers
    # the speculating server gets one answer that breaks its schema, one that
    # is not JSON and one pydantic answer that its model refuses
    wrong = {"weather": '{"city": "Paris"}', "color": '{"name": "teal", "hex": ', "Pet": '{"name": "Tom"}'}
    monkeypatch.setattr(spec.worker, "decoding_for", Answers(tokenizer, spec.worker, wrong))
    monkeypatch.setattr(plain.worker, "decoding_for", Answers(tokenizer, plain.worker))
    out = tmp_path / "answers.json"
    argv = urls(spec, plain) + ["--per-schema", "1", "--pydantic-per-model", "1", "--json-out", str(out)]
    assert bench.main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    n = len(ENTRIES)
    s, p = summary["json_schema"]["speculation"], summary["json_schema"]["plain"]
    assert (s["requests"], s["failed"], s["parsed"], s["valid"]) == (n, 0, n - 1, n - 2)
    assert (p["requests"], p["failed"], p["parsed"], p["valid"]) == (n, 0, n, n)
    assert summary["json_schema"]["identical"] == n - 2
    tokens = sum(len(tokenizer.encode(json.dumps(e["example"]), add_special_tokens=False)) + 1 for e in ENTRIES)
    assert p["tokens"] == tokens and p["tokens_per_s"] > 0 and p["decode_tokens_per_s"] > 0
    assert p["tokens_per_step"] > 0 and p["forced_tokens"] == 0  # nothing constrained: nothing forced
    s, p = summary["pydantic"]["speculation"], summary["pydantic"]["plain"]
    assert (s["requests"], s["failed"], s["valid"]) == (4, 1, 3) and (p["failed"], p["valid"]) == (0, 4)
    assert summary["pydantic"]["identical"] == 3
    printed = capsys.readouterr().out
    assert f"json_schema (streamed): {n} requests over {n} schemas" in printed
    assert f"identical to the baseline: {n - 2}/{n}" in printed and "- weather: valid False" in printed


BOUNDED = [
    {
        "name": "pick",
        "task": "Pick one.",
        "subjects": ["a colour", "a size"],
        "schema": {
            "type": "object",
            "properties": {
                "choice": {"enum": ["red", "blue", "small", "large"]},
                "n": {"type": "integer", "minimum": 0, "maximum": 99},
                "ok": {"type": "boolean"},
                "code": {"type": "string", "pattern": "^[a-c]{2}-[0-9]$"},
            },
            "required": ["choice", "n", "ok", "code"],
            "additionalProperties": False,
        },
        "example": {"choice": "red", "n": 3, "ok": True, "code": "ab-1"},
    }
]


@pytest.mark.parametrize("baseline", ["server", "mlx-lm"])
def test_the_harness_on_real_servers_under_the_constraint(servers, bench_dirs, tmp_path, baseline):
    """The tiny random model's own greedy answers under the constraint: all
    fit their schema, and the speculating server's equal the baseline's:
    the server without speculation (which still drafts the forced tokens),
    or mlx-lm's loop with the constraint as a logits processor (one token a
    step)."""
    spec, plain, _ = servers
    schemas = tmp_path / "schemas.json"
    schemas.write_text(json.dumps(BOUNDED))
    out = tmp_path / "answers.json"
    argv = urls(spec, plain) if baseline == "server" else ["--spec-url", f"http://127.0.0.1:{spec.port}/v1"]
    argv += ["--baseline", baseline, "--model", str(bench_dirs[0]), "--adapter-path", str(bench_dirs[1])]
    argv += ["--schemas", str(schemas), "--per-schema", "2", "--pydantic-per-model", "1", "--max-tokens", "64"]
    assert bench.main(argv + ["--json-out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    both = summary["json_schema"]
    assert (both["speculation"]["requests"], both["speculation"]["valid"]) == (2, 2)
    assert (both["plain"]["requests"], both["plain"]["valid"]) == (2, 2) and both["identical"] == 2
    assert both["speculation"]["forced_tokens"] > 0
    if baseline == "mlx-lm":
        assert both["plain"]["tokens_per_step"] == 1.0 and both["plain"]["tokens"] == both["speculation"]["tokens"]
    else:
        assert both["plain"]["forced_tokens"] > 0
    # pydantic through parse: the tiny model's answers may run out of tokens; equal either way
    assert summary["pydantic"]["identical"] == summary["pydantic"]["speculation"]["requests"] == 4
