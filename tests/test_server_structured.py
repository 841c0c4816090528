"""response_format in the server, with the official ``openai`` client: JSON
schema and json_object responses equal the API's constrained generation and
validate, ``beta.chat.completions.parse`` with a pydantic model, bad schemas
as one 400 naming response_format, and a cancelled constrained request. A
tiny model with a byte-level tokenizer (llguidance reads it) and a random
adapter."""

import json
import time
from typing import Literal

import jsonschema
import pytest

from conftest import LoopbackServer, need

openai = need("openai", "pip install -e '.[test,server]'")
need("uvicorn", "pip install -e '.[server]'")
pydantic = need("pydantic", "pip install -e '.[test]'")

from mlx_mtp import generate, load  # noqa: E402
from mlx_mtp.server import ServerConfig  # noqa: E402

from tiny import json_tokenizer, save_tiny_model_dir  # noqa: E402

MODEL_ID = "tiny-json"
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "tags", "ok"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "an item, please"}]


class Item(pydantic.BaseModel):
    id: int = pydantic.Field(ge=0, le=99)
    tag: Literal["a", "bc"]
    ok: bool


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    dirs = save_tiny_model_dir(
        tmp_path_factory.mktemp("server_json"),
        tokenizer=json_tokenizer(),
        vocab_size=300,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    return load(str(dirs[0]), adapter_path=str(dirs[1]))


@pytest.fixture(scope="module")
def server(loaded):
    running = LoopbackServer(*loaded, ServerConfig(model_id=MODEL_ID, max_tokens=64, cache_count=4))
    yield running
    running.stop()


def chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_json_schema_and_json_object_responses(server, loaded):
    """Greedy: the text equals the API's constrained generate, validates,
    ends with "stop", and reports its forced tokens; streamed the same."""
    model, tokenizer = loaded
    ids = chat_ids(tokenizer, MESSAGES)
    client = server.client
    for response_format, schema in ((RESPONSE_FORMAT, SCHEMA), ({"type": "json_object"}, {"type": "object"})):
        want = generate(model, tokenizer, ids, max_tokens=64, response_format=response_format)
        r = client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, max_tokens=64, temperature=0, response_format=response_format
        )
        text = r.choices[0].message.content
        assert text == want and r.model_extra["speculation"]["forced_tokens"] > 0
        if schema is SCHEMA:  # bounded: it ends (json_object may write keys until max_tokens)
            assert r.choices[0].finish_reason == "stop"
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(text), schema)
        chunks = client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, max_tokens=64, response_format=response_format, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    text_format = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=8, response_format={"type": "text"}
    )
    assert text_format.choices[0].message.content == generate(model, tokenizer, ids, max_tokens=8)


def test_parse_with_a_pydantic_model(server):
    r = server.client.beta.chat.completions.parse(
        model=MODEL_ID, messages=MESSAGES, max_tokens=64, response_format=Item
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Item) and parsed == Item.model_validate_json(r.choices[0].message.content)


@pytest.mark.parametrize(
    "response_format, message",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "Invalid type: strin"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "not": {}}}},
            'Unimplemented keys: ["not"]',
        ),
        ({"type": "xml"}, "response_format.type must be"),
        ("json", "response_format must be an object"),
    ],
)
def test_bad_response_format_is_one_400(server, response_format, message):
    status, body = server.request(
        "POST", "/v1/chat/completions", {"messages": MESSAGES, "response_format": response_format}
    )
    assert status == 400
    assert body["error"]["param"] == "response_format" and message in body["error"]["message"]
    assert "\n" not in body["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, response_format=response_format)


def test_cancelled_constrained_request_stops_and_the_server_goes_on(server, loaded):
    """A schema that asks for a long string: the client leaves after three
    chunks; the worker stops early, and the next constrained request is right."""
    model, tokenizer = loaded
    before = len(server.worker.finished)
    long_text = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2000}}, "required": ["s"]}
    stream = server.client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        max_tokens=3000,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "long", "schema": long_text}},
    )
    got = 0
    for _chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()
    for _ in range(1000):
        if len(server.worker.finished) > before and server.worker.pending == 0:
            break
        time.sleep(0.01)
    stats = server.worker.finished[-1]
    assert stats["finish_reason"] == "cancelled" and 3 <= stats["completion_tokens"] < 1000
    r = server.client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=64, response_format=RESPONSE_FORMAT
    )
    want = generate(model, tokenizer, chat_ids(tokenizer, MESSAGES), max_tokens=64, response_format=RESPONSE_FORMAT)
    assert r.choices[0].message.content == want
