"""Tool calls through the OpenAI-compatible server, with the official
``openai`` client on 127.0.0.1: a round trip (call, tool result, answer)
streamed and not, each ``tool_choice``, streamed deltas that reassemble to
the call, and the 400s (bad tool definitions, a template without tools).

The model is a tiny random llama with a byte-level tokenizer (llguidance
reads it) that has the ``<tool_call>`` / ``</tool_call>`` markers and a
Hermes-style chat template (as Qwen's), so mlx-lm's loader picks its
``json_tools`` parser. A random model writes random text, so the tests that
check parsing script the text: a logits processor leaves one token allowed
per position (the script's, then EOS), and the server decodes it with
speculation as usual. ``required`` and a named function are decoded under
their grammar by the random model itself: equal to the API's constrained
generation, and a call that fits the function's parameters."""

import copy
import json

import jsonschema
import pytest

from conftest import LoopbackServer, need, scripted_decoding

openai = need("openai", "pip install -e '.[test,server]'")
need("uvicorn", "pip install -e '.[server]'")

from mlx_mtp import load, stream_generate  # noqa: E402
from mlx_mtp.server import ServerConfig  # noqa: E402
from mlx_mtp.serving.tools import ToolRequest, forced_call_grammar  # noqa: E402

from tiny import json_tokenizer, save_tiny_model_dir  # noqa: E402

MODEL_ID = "tiny-tools"
TOOL_MARKERS = ["<tool_call>", "</tool_call>"]
# Hermes-style, as Qwen2.5's: the tools in the system turn, calls as JSON between markers
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{%- endfor %}</tools>\n"
    'Call one as <tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call><|im_end|>\n{%- endif %}'
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- for tc in m.tool_calls %}{%- set tool_call = tc.function %}"
    '<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# names tool calls (so mlx-lm finds a parser) but never renders the tools
IGNORING_TEMPLATE = TOOLS_TEMPLATE.replace("{%- if tools %}", "{%- if false %}")
# Mistral's call format ([TOOL_CALLS]name[ARGS]{...}): parsed under auto, not forced
MISTRAL_TEMPLATE = (
    "{#- calls: [TOOL_CALLS] -#}{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}"
)
PLAIN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


def loaded_with(root, template):
    tokenizer = json_tokenizer()
    tokenizer.add_tokens(TOOL_MARKERS)
    tokenizer.chat_template = template
    dirs = save_tiny_model_dir(
        root, "llama", tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048
    )
    return load(str(dirs[0]), adapter_path=str(dirs[1]))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return loaded_with(tmp_path_factory.mktemp("tools"), TOOLS_TEMPLATE)


@pytest.fixture(scope="module")
def server(loaded):
    running = LoopbackServer(*loaded, ServerConfig(model_id=MODEL_ID, max_tokens=200))
    yield running
    running.stop()


class Scripted:
    """The worker's decoding settings replaced (:func:`conftest.scripted_decoding`):
    the next script of ``scripts`` is what it writes; ``prompts`` records the
    prompts it was given (what the cache held, then the rest)."""

    def __init__(self, tokenizer, worker):
        self.tokenizer, self.scripts, self.prompts = tokenizer, [], []
        self.decoding_for = scripted_decoding(worker, self.next_script, tokenizer)

    def next_script(self, prompt):
        self.prompts.append(prompt)
        return self.scripts.pop(0)

    def __call__(self, *args, **kwargs):
        return self.decoding_for(*args, **kwargs)


@pytest.fixture
def scripted(server, loaded, monkeypatch):
    script = Scripted(loaded[1], server.worker)
    monkeypatch.setattr(server.worker, "decoding_for", script)
    return script


def template_ids(tokenizer, messages, tools):
    return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))


def reassemble(chunks):
    """The streamed deltas' content, and their tool calls joined by index."""
    content, calls = "", {}
    for c in chunks:
        if not c.choices:
            continue
        delta = c.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)]


def test_the_tokenizer_has_mlx_lm_s_json_tool_parser(loaded):
    tokenizer = loaded[1]
    assert tokenizer.has_tool_calling and tokenizer.tool_call_start == "<tool_call>"
    assert tokenizer.tool_call_end == "</tool_call>" and len(tokenizer.tool_call_start_tokens) == 1


def test_round_trip_call_result_answer(server, loaded, scripted):
    """The call (non-streamed), the tool's result fed back, the answer
    (streamed): the second prompt is the template's rendering of the whole
    history, with the call's arguments as an object."""
    tokenizer = loaded[1]
    client = server.client
    scripted.scripts = [CALL_TEXT, "Sunny, 21 C."]
    r = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert scripted.prompts[0] == template_ids(tokenizer, ASK, TOOLS)
    assert r.usage.completion_tokens == len(tokenizer.encode(CALL_TEXT, add_special_tokens=False)) + 1

    history = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    stream = client.chat.completions.create(model=MODEL_ID, messages=history, tools=TOOLS, stream=True)
    chunks = list(stream)
    content, calls = reassemble(chunks)
    assert content == "Sunny, 21 C." and calls == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    rendered = history[:1] + [
        {"role": "assistant", "content": "", "tool_calls": [{**call.model_dump(), "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        history[2],
    ]  # fmt: skip
    assert scripted.prompts[1] == template_ids(tokenizer, rendered, TOOLS)
    assert "<tool_response>" in tokenizer.decode(scripted.prompts[1])


def test_streamed_tool_call_deltas_reassemble_to_the_call(server, scripted):
    """Two calls and text around them: streamed, the deltas (with index)
    give the calls and content of the non-streamed response."""
    text = "Checking." + CALL_TEXT + '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    scripted.scripts = [text, text]
    whole = server.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS)
    chunks = list(server.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, stream=True))
    content, calls = reassemble(chunks)
    message = whole.choices[0].message
    assert content == message.content == "Checking."
    want = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    assert want == [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want
    assert all(c["id"] for c in calls) and len({c["id"] for c in calls}) == 2
    indices = [d.index for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert indices == [0, 1]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"] and whole.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_renders_no_tools_and_parses_nothing(server, loaded, scripted):
    scripted.scripts = [CALL_TEXT]
    r = server.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="none")
    assert scripted.prompts[0] == template_ids(loaded[1], ASK, None)
    assert r.choices[0].message.content == CALL_TEXT and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def test_tool_choice_auto_lets_the_model_answer_in_text(server, loaded, scripted):
    scripted.scripts = ["No call needed.", CALL_TEXT]
    r = server.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="auto")
    assert r.choices[0].message.content == "No call needed." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    assert scripted.prompts[0] == template_ids(loaded[1], ASK, TOOLS)
    r = server.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="auto")
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls[0].function.name


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_the_parser_cannot_read_stays_in_the_content(server, scripted, stream):
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"ci</tool_call>then text'
    scripted.scripts = [broken]
    r = server.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, stream=stream)
    if stream:
        content, calls = reassemble(list(r))
    else:
        content, calls = r.choices[0].message.content, r.choices[0].message.tool_calls or []
        assert r.choices[0].finish_reason == "stop"
    assert content == broken and calls == []


def test_a_call_cut_by_max_tokens_is_content_with_finish_length(server, scripted):
    scripted.scripts = [CALL_TEXT]
    r = server.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=20)
    ids = scripted.tokenizer.encode(CALL_TEXT, add_special_tokens=False)[:20]
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == scripted.tokenizer.decode(ids)


# bounded arguments: a random model under the grammar finishes the call
BOOK = {
    "type": "function",
    "function": {
        "name": "book_room",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "nights": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["city", "nights"],
            "additionalProperties": False,
        },
    },
}
CANCEL = {"type": "function", "function": {"name": "cancel"}}  # no parameters: its arguments are {}
FORCED = [BOOK, CANCEL]


@pytest.mark.parametrize("choice", ["required", "book_room", "cancel"])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_choice_writes_one_call_under_its_grammar(server, loaded, choice, stream):
    """``required`` or a named function: the random model's own greedy
    output under the grammar, equal to the API's generation under the same
    grammar, is one call that parses and fits the function's parameters."""
    model, tokenizer = loaded
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    r = server.client.chat.completions.create(
        model=MODEL_ID, messages=ASK, tools=FORCED, tool_choice=tool_choice, max_tokens=120, stream=stream
    )
    if stream:
        chunks = list(r)
        content, calls = reassemble(chunks)
        names_args = [(c["name"], json.loads(c["arguments"])) for c in calls]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        spec = chunks[-1].model_extra["speculation"]
    else:
        message = r.choices[0].message
        content, finish = message.content or "", [r.choices[0].finish_reason]
        names_args = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
        spec = r.model_extra["speculation"]
    assert content == "" and finish == ["tool_calls"] and len(names_args) == 1
    name, arguments = names_args[0]
    assert name == choice or (choice == "required" and name in ("book_room", "cancel"))
    parameters = {t["function"]["name"]: t["function"].get("parameters", {"const": {}}) for t in FORCED}
    jsonschema.validate(arguments, parameters[name])
    assert spec["forced_tokens"] > 0  # the markers, the keys, the name at least
    # the API with the same grammar writes the same text
    request = ToolRequest(
        FORCED, "required" if choice == "required" else "function", None if choice == "required" else choice
    )
    ids = list(tokenizer.apply_chat_template(ASK, tools=FORCED, add_generation_prompt=True))
    out = list(stream_generate(model, tokenizer, ids, max_tokens=120, grammar=forced_call_grammar(tokenizer, request)))
    want = "".join(r.text for r in out)
    assert want.startswith("<tool_call>\n") and want.endswith("\n</tool_call>")
    assert json.loads(want[len("<tool_call>\n") : -len("\n</tool_call>")]) == {"name": name, "arguments": arguments}
    if not stream:
        assert r.usage.completion_tokens == len(out) and out[-1].finish_reason == "stop"


def test_forced_call_of_unenforceable_parameters_gets_a_400(server):
    """A parameter schema llguidance cannot enforce: a 400 naming tools for a
    forced call; under auto the same tools are taken (no grammar)."""
    odd = {
        "type": "function",
        "function": {"name": "odd", "parameters": {"type": "object", "not": {"required": ["a"]}}},
    }
    with pytest.raises(openai.BadRequestError, match="Unimplemented keys") as e:
        server.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[odd], tool_choice="required")
    assert e.value.body["param"] == "tools"
    r = server.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[odd], max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    with pytest.raises(openai.BadRequestError, match="response_format cannot be given with a forced tool_choice"):
        server.client.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=FORCED, tool_choice="required", response_format={"type": "json_object"}
        )


def fn(**function):
    return {"type": "function", "function": function}


BAD_TOOLS = [
    ({"tools": {"a": 1}}, "tools", "tools must be an array"),
    ({"tools": [{"type": "retrieval"}]}, "tools", 'tools[0] must be an object with "type": "function"'),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0].function must be an object"),
    ({"tools": [fn(name="has space")]}, "tools", "tools[0].function.name must be 1 to 64"),
    ({"tools": [fn(name="x" * 65)]}, "tools", "tools[0].function.name must be 1 to 64"),
    ({"tools": [WEATHER, fn(name="f", parameters=[1])]}, "tools", "tools[1].function.parameters must be a JSON schema"),
    ({"tools": [fn(name="f", parameters={"type": "string"})]}, "tools", "must be a JSON schema of an object"),
    ({"tools": [fn(name="f", description=3)]}, "tools", "description must be a string"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "tools name the function 'get_weather' twice"),
    ({"tool_choice": "auto"}, "tool_choice", "tool_choice is only allowed when tools are given"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "tool_choice must be none, auto, required"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "tool_choice must be"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}},
        "tool_choice",
        "names the function 'get_news', which is not in tools",
    ),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "parallel_tool_calls must be a boolean"),
]


@pytest.mark.parametrize("fields, param, message", BAD_TOOLS)
def test_bad_tool_definitions_get_a_400(server, fields, param, message):
    status, err = server.request("POST", "/v1/chat/completions", {"messages": ASK, **fields})
    assert status == 400 and message in err["error"]["message"] and err["error"]["param"] == param


BAD_HISTORY = [
    ([{"role": "tool", "content": "21 C"}], "messages[0].tool_call_id must be a string"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls must be an array on an assistant"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}], "messages[0].tool_calls[0] must"),
    (
        [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{no"}}]}],
        "messages[0].tool_calls[0].function.arguments is not valid JSON",
    ),
    (
        [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}],
        "arguments must be a JSON object",
    ),
]


@pytest.mark.parametrize("messages, message", BAD_HISTORY)
def test_bad_tool_messages_get_a_400(server, messages, message):
    status, err = server.request("POST", "/v1/chat/completions", {"messages": messages, "tools": TOOLS})
    assert status == 400 and message in err["error"]["message"] and err["error"]["param"] == "messages"


def test_tools_on_text_completions_get_a_400(server):
    status, err = server.request("POST", "/v1/completions", {"prompt": "hi", "tools": TOOLS})
    assert status == 400 and "only taken by chat completions" in err["error"]["message"]


@pytest.mark.parametrize(
    "template, message",
    [
        (PLAIN_TEMPLATE, "its chat template has no tool-call format that mlx-lm can parse"),
        (IGNORING_TEMPLATE, "its chat template ignores them"),
    ],
)
def test_a_template_without_tools_gets_one_400_naming_tools(tmp_path, template, message):
    model, tokenizer = loaded_with(tmp_path, template)
    running = LoopbackServer(model, tokenizer, ServerConfig(model_id=MODEL_ID))
    try:
        with pytest.raises(openai.BadRequestError, match="tools are not supported by this model") as e:
            running.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS)
        assert message in e.value.body["message"] and e.value.body["param"] == "tools"
        # without tools (or with tool_choice none) the same model answers
        r = running.client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=3)
        assert r.choices[0].finish_reason in ("length", "stop")
        r = running.client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=3, tools=TOOLS, tool_choice="none"
        )
        assert r.choices[0].finish_reason in ("length", "stop")
    finally:
        running.stop()


@pytest.mark.real_model
def test_real_model_without_tool_support_gets_the_400(default_model_path):
    """SmolLM2-135M-Instruct's chat template has no tools (mlx-lm finds no
    tool parser for it): tools get the one 400, tool_choice none is served."""
    model, tokenizer = load(str(default_model_path))
    assert not tokenizer.has_tool_calling
    running = LoopbackServer(model, tokenizer, ServerConfig(model_id="smollm2"))
    try:
        with pytest.raises(openai.BadRequestError, match="tools are not supported by this model") as e:
            running.client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS)
        assert e.value.body["param"] == "tools"
        r = running.client.chat.completions.create(
            model="smollm2", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4
        )
        assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    finally:
        running.stop()


def test_forced_call_for_a_model_whose_calls_are_not_json_gets_a_400(tmp_path):
    model, tokenizer = loaded_with(tmp_path, MISTRAL_TEMPLATE)
    assert tokenizer.has_tool_calling and tokenizer.tool_call_start == "[TOOL_CALLS]"
    running = LoopbackServer(model, tokenizer, ServerConfig(model_id=MODEL_ID))
    try:
        with pytest.raises(openai.BadRequestError, match="needs a model whose tool calls are JSON") as e:
            running.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=FORCED, tool_choice="required")
        assert e.value.body["param"] == "tool_choice"
        r = running.client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=FORCED, max_tokens=3)
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    finally:
        running.stop()


@pytest.mark.real_model
def test_real_model_forced_call_with_a_hermes_template(default_model_path):
    """SmolLM2-135M-Instruct's weights and tokenizer behind a Hermes tool
    template (its own has none; ``<tool_call>`` is several tokens there):
    ``required`` gives one call that fits its function, the text the API
    writes under the same grammar."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from mlx_lm.tool_parsers import json_tools

    model, plain = load(str(default_model_path))
    hf = copy.copy(plain._tokenizer)
    hf.chat_template = TOOLS_TEMPLATE
    tokenizer = TokenizerWrapper(
        hf, eos_token_ids=plain.eos_token_ids, tool_parser=json_tools.parse_tool_call,
        tool_call_start="<tool_call>", tool_call_end="</tool_call>",
    )  # fmt: skip
    assert len(tokenizer.tool_call_start_tokens) > 1
    messages = [{"role": "user", "content": "Book a room in Paris for 3 nights."}]
    running = LoopbackServer(model, tokenizer, ServerConfig(model_id="smollm2"))
    try:
        r = running.client.chat.completions.create(
            model="smollm2", messages=messages, tools=FORCED, tool_choice="required", max_tokens=80
        )
    finally:
        running.stop()
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name in ("book_room", "cancel")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(
        arguments,
        {t["function"]["name"]: t["function"].get("parameters") for t in FORCED}[call.function.name] or {"const": {}},
    )
    ids = list(tokenizer.apply_chat_template(messages, tools=FORCED, add_generation_prompt=True))
    grammar = forced_call_grammar(tokenizer, ToolRequest(FORCED, "required"))
    out = list(stream_generate(model, tokenizer, ids, max_tokens=80, grammar=grammar))
    want = "".join(x.text for x in out)
    body = want[len("<tool_call>\n") : -len("\n</tool_call>")]
    assert want == f"<tool_call>\n{body}\n</tool_call>" and r.usage.completion_tokens == len(out)
    assert json.loads(body) == {"name": call.function.name, "arguments": arguments}
    assert r.model_extra["speculation"]["forced_tokens"] > 0
