"""examples/structured_benchmark.py: its schemas (enough, varied, each with
an example that fits it) and the harness end to end against two servers on
127.0.0.1 whose generation is scripted (each answer is the schema's example,
or a chosen wrong one), so that its counts can be checked exactly."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import RunningServer, make_tokenizer, need

need("openai", "pip install -e '.[test,server]'")
need("uvicorn", "pip install -e '.[server]'")
jsonschema = need("jsonschema", "pip install -e '.[test]'")

from mlx_mtp import load, stream_generate  # noqa: E402
from mlx_mtp.server import ServerConfig  # noqa: E402

from tiny import save_tiny_model_dir  # noqa: E402

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
    """The worker's generation replaced: the real ``stream_generate``, with a
    logits processor that allows only the scripted answer's next token (then
    EOS); the answer is the example of the schema found in the prompt."""

    def __init__(self, tokenizer, wrong=None):
        self.tokenizer, self.wrong = tokenizer, wrong or {}

    def answer(self, prompt_text):
        for e in ENTRIES:
            if json.dumps(e["schema"]) in prompt_text:
                return self.wrong.get(e["name"], json.dumps(e["example"]))
        for model, task, _ in bench.pydantic_models():
            if task in prompt_text:
                return self.wrong.get(model.__name__, json.dumps(PYDANTIC_ANSWERS[model.__name__]))
        raise AssertionError(f"no schema in {prompt_text!r}")

    def __call__(self, model, tokenizer, prompt, context=(), settings=None, **kwargs):
        text = self.answer(self.tokenizer.decode(list(context) + list(prompt)))
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        fed = len(prompt)

        def only_the_answer(tokens, logits):
            allowed = ids[min(tokens.size - fed, len(ids) - 1)]
            return mx.where(mx.arange(logits.shape[-1]) == allowed, logits, -mx.inf)

        settings = replace(settings, logits_processors=(*settings.logits_processors, only_the_answer))
        return stream_generate(model, tokenizer, prompt, context=context, settings=settings, **kwargs)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    def write_tokenizer(path):
        tok = make_tokenizer()
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        tok.save_pretrained(str(path))

    dirs = save_tiny_model_dir(
        tmp_path_factory.mktemp("bench"),
        "llama",
        write_tokenizer=write_tokenizer,
        vocab_size=len(make_tokenizer()),
        max_position_embeddings=4096,
    )
    model, tokenizer = load(str(dirs[0]), adapter_path=str(dirs[1]))
    spec = RunningServer(model, tokenizer, ServerConfig(model_id="tiny"))
    plain = RunningServer(model, tokenizer, ServerConfig(model_id="tiny"))
    yield spec, plain, tokenizer
    spec.stop()
    plain.stop()


def test_the_harness_counts_what_parses_validates_and_agrees(servers, monkeypatch, capsys, tmp_path):
    spec, plain, tokenizer = servers
    # the speculating server gets one answer that breaks its schema, one that
    # is not JSON and one pydantic answer that its model refuses
    wrong = {"weather": '{"city": "Paris"}', "color": '{"name": "teal", "hex": ', "Pet": '{"name": "Tom"}'}
    monkeypatch.setattr(spec.worker, "generate", Answers(tokenizer, wrong))
    monkeypatch.setattr(plain.worker, "generate", Answers(tokenizer))
    out = tmp_path / "answers.json"
    argv = ["--spec-url", f"http://127.0.0.1:{spec.port}/v1", "--plain-url", f"http://127.0.0.1:{plain.port}/v1"]
    argv += ["--per-schema", "1", "--pydantic-per-model", "1", "--json-out", str(out)]
    assert bench.main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    n = len(ENTRIES)
    s, p = summary["json_schema"]["speculation"], summary["json_schema"]["plain"]
    assert (s["requests"], s["failed"], s["parsed"], s["valid"]) == (n, 0, n - 1, n - 2)
    assert (p["requests"], p["failed"], p["parsed"], p["valid"]) == (n, 0, n, n)
    assert summary["json_schema"]["identical"] == n - 2
    tokens = sum(len(tokenizer.encode(json.dumps(e["example"]), add_special_tokens=False)) + 1 for e in ENTRIES)
    assert p["tokens"] == tokens and p["tokens_per_s"] > 0 and p["decode_tokens_per_s"] > 0
    assert p["tokens_per_step"] > 0 and p["forced_tokens"] is None
    s, p = summary["pydantic"]["speculation"], summary["pydantic"]["plain"]
    assert (s["requests"], s["failed"], s["valid"]) == (4, 1, 3) and (p["failed"], p["valid"]) == (0, 4)
    assert summary["pydantic"]["identical"] == 3
    printed = capsys.readouterr().out
    assert f"json_schema (streamed): {n} requests over {n} schemas" in printed
    assert f"identical to no speculation: {n - 2}/{n}" in printed and "- weather: valid False" in printed
