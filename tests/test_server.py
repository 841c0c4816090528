"""The OpenAI-compatible server on loopback, with the official ``openai``
client: text equal to ``generate``, streams, the cache across requests,
cancellation, bad requests, and a bounded load of concurrent clients (the
batch itself: tests/test_server_batch.py). A tiny model (word-level
tokenizer w0..w127) with a random adapter; one test on the real default model."""

import http.client
import json
import socket
import threading
import time

import pytest

from conftest import LoopbackServer, need

openai = need("openai", "pip install -e '.[test,server]'")
uvicorn = need("uvicorn", "pip install -e '.[server]'")

from mlx_mtp import generate, load, stream_generate  # noqa: E402
from mlx_mtp.server import ServerConfig  # noqa: E402

from tiny import save_tiny_model_dir  # noqa: E402

CONTEXT = 4096
MODEL_ID = "tiny"
NO_EOS = {"127": -100}  # keeps a generation going (EOS is w127) until it is cancelled


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    dirs = save_tiny_model_dir(
        tmp_path_factory.mktemp("server"), tie_word_embeddings=False, max_position_embeddings=CONTEXT
    )
    return load(str(dirs[0]), adapter_path=str(dirs[1]))


@pytest.fixture(scope="module")
def server(loaded):
    running = LoopbackServer(*loaded, ServerConfig(model_id=MODEL_ID, max_tokens=16, cache_count=4))
    yield running
    running.stop()


def chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def expected(loaded, ids, max_tokens, **kwargs):
    model, tokenizer = loaded
    return generate(model, tokenizer, ids, max_tokens=max_tokens, **kwargs)


MESSAGES = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": "w3 w17 w42 w99"}]


def test_chat_and_completions_with_the_openai_client(server, loaded):
    model, tokenizer = loaded
    client = server.client
    want = expected(loaded, chat_ids(tokenizer, MESSAGES), 12)
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("length", "stop")
    n_prompt = len(chat_ids(tokenizer, MESSAGES))
    n_tokens = len(list(stream_generate(model, tokenizer, chat_ids(tokenizer, MESSAGES), max_tokens=12)))
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == n_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    spec = r.model_extra["speculation"]
    # the per-step policy by default: up to the adapter's k, its choices' shares add up
    assert spec["num_masks"] == model.num_masks and spec["steps"] >= 1 and spec["policy"] is True
    assert set(spec["choices"]) <= {"plain", "masks", "copy", "chain", "branches", "tree"}
    assert sum(spec["choices"].values()) == pytest.approx(1.0, abs=1e-3)
    assert spec["tokens_per_step"] == pytest.approx(r.usage.completion_tokens / spec["steps"], abs=1e-3)
    # streamed: the same text, chunk by chunk, the last with the finish reason
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # completions: raw text prompt, as generate encodes it
    prompt = "w5 w64 w3 w17"
    want = expected(loaded, prompt, 10)
    c = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10)
    assert c.choices[0].text == want and c.object == "text_completion"
    streamed = "".join(
        x.choices[0].text for x in client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, stream=True)
    )
    assert streamed == want
    # sampling with a seed is reproducible and equals the API's seeded run
    import mlx.core as mx

    a = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    b = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    mx.random.seed(7)
    assert a.choices[0].text == b.choices[0].text == expected(loaded, prompt, 10, temp=0.9, top_p=0.95)
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert server.request("GET", "/health")[1]["status"] == "ok"


def test_sse_wire_format_ends_with_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps({"messages": MESSAGES, "stream": True, "max_tokens": 5}),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] in ("length", "stop")


def test_multi_turn_through_the_server_reuses_the_cache(server, loaded):
    """Each turn's reply equals a fresh generate over the whole conversation,
    and the prefill counts show the earlier turns were not fed again."""
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "w7 w8 w9 w31"}]
    previous = 0
    for turn, next_user in enumerate(["w40 w41", "w50", None]):
        ids = chat_ids(tokenizer, messages)
        r = server.client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8)
        reply = r.choices[0].message.content
        assert reply == expected(loaded, ids, 8)
        cached = r.usage.prompt_tokens_details.cached_tokens
        prefill = r.model_extra["speculation"]["prefill_tokens"]
        assert cached + prefill == len(ids) == r.usage.prompt_tokens
        if turn:
            assert cached >= previous and prefill < len(ids) - previous + 8
        previous = len(ids)
        if next_user is None:
            break
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": next_user}]


def test_cancelled_stream_stops_and_the_server_goes_on(server, loaded):
    model, tokenizer = loaded
    before = len(server.worker.finished)
    big = CONTEXT - 100
    stream = server.client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "w11 w12"}],
        max_tokens=big,
        stream=True,
        logit_bias=NO_EOS,
    )
    got = 0
    for _chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()  # the client disconnects
    for _ in range(1000):
        if len(server.worker.finished) > before and server.worker.pending == 0:
            break
        time.sleep(0.01)
    stats = server.worker.finished[-1]
    assert stats["finish_reason"] == "cancelled"
    assert 3 <= stats["completion_tokens"] < big // 2 and stats["steps"] < big // 2
    # the next request is served, and right
    r = server.client.completions.create(model=MODEL_ID, prompt="w3 w4", max_tokens=6)
    assert r.choices[0].text == expected(loaded, "w3 w4", 6)


BAD = [
    ("POST", "/v1/chat/completions", None, "{not json", 400, "invalid JSON"),
    ("POST", "/v1/chat/completions", [1, 2], None, 400, "JSON object"),
    ("POST", "/v1/chat/completions", {}, None, 400, "messages must be a non-empty array"),
    ("POST", "/v1/chat/completions", {"messages": []}, None, 400, "messages must be a non-empty array"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "w3"}]},
        None,
        400,
        "role must be one of",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        None,
        400,
        "content must be a string",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 0},
        None,
        400,
        "max_tokens must be in [1, 4096]",
    ),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**12}, None, 400, "max_tokens must be in"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": "5"},
        None,
        400,
        "max_tokens must be an integer",
    ),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, None, 400, "temperature must be >= 0"),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "top_p": 2}, None, 400, "top_p must be in [0, 1]"),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "top_k": -3}, None, 400, "top_k must be >= 0"),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, None, 400, "stream must be a boolean"),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "stop": [1]}, None, 400, "stop must be a string"),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "model": "gpt-9"}, None, 404, "does not exist"),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "n": 3}, None, 400, "n must be 1"),
    ("POST", "/v1/completions", {"prompt": ""}, None, 400, "prompt must be a non-empty string"),
    ("POST", "/v1/completions", {"prompt": [3, 5000]}, None, 400, "outside the vocabulary"),
    ("POST", "/v1/completions", {"prompt": " ".join(["w5"] * CONTEXT)}, None, 400, "context of 4096 tokens"),
    ("POST", "/v1/completions", {"prompt": "w3", "logit_bias": {"x": 1}}, None, 400, "logit_bias must map"),
    ("GET", "/v1/nothing", None, None, 404, "no route"),
    ("GET", "/v1/chat/completions", None, None, 405, "not allowed"),
]


@pytest.mark.parametrize("method, path, body, raw, status, message", BAD)
def test_bad_requests_get_openai_style_4xx(server, method, path, body, raw, status, message):
    got, err = server.request(method, path, body, raw)
    assert got == status
    assert set(err) == {"error"} and message in err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"


def test_openai_client_raises_on_4xx(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=-4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.chat.completions.create(model="other", messages=MESSAGES)


def test_load_8_clients_by_5_requests_mixed(server, loaded):
    """8 concurrent clients x 5 requests: streamed, non-streamed, cancelled
    and malformed. Every valid request gets its solo output, every bad one
    its 4xx, and the server is alive at the end with nothing queued."""
    model, tokenizer = loaded
    prompts = [f"w{3 + i} w{20 + 2 * i} w{50 + i}" for i in range(8)]
    solo = {
        p: expected(
            loaded, [*tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)], 10
        )
        for p in prompts
    }
    failures = []

    def client(i):
        try:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0, timeout=300)
            p = prompts[i]
            messages = [{"role": "user", "content": p}]
            for j in range(5):
                kind = (i + j) % 4
                if kind == 0:
                    r = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10)
                    assert r.choices[0].message.content == solo[p], (i, j)
                elif kind == 1:
                    s = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10, stream=True)
                    assert "".join(x.choices[0].delta.content or "" for x in s if x.choices) == solo[p], (i, j)
                elif kind == 2:
                    s = c.chat.completions.create(
                        model=MODEL_ID, messages=messages, max_tokens=2000, stream=True, logit_bias=NO_EOS
                    )
                    next(iter(s))
                    s.close()
                else:
                    status, err = server.request(
                        "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 0}
                    )
                    assert status == 400 and "max_tokens" in err["error"]["message"]
        except Exception as e:  # noqa: BLE001  (reported below)
            failures.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures, failures
    for _ in range(1000):
        if server.worker.pending == 0:
            break
        time.sleep(0.01)
    status, health = server.request("GET", "/health")
    assert status == 200 and health["queued"] == 0
    assert len(server.worker.caches.entries) <= 4  # bounded by count


def test_busy_server_answers_503(loaded):
    """Beyond the queue's bound a request is refused at once, not queued."""
    running = LoopbackServer(*loaded, ServerConfig(model_id=MODEL_ID, max_queue=1))
    try:
        stream = running.client.completions.create(
            model=MODEL_ID, prompt="w3", max_tokens=3000, stream=True, logit_bias=NO_EOS
        )
        next(iter(stream))  # the one slot is taken
        status, err = running.request("POST", "/v1/completions", {"prompt": "w3", "max_tokens": 2})
        assert status == 503 and "busy" in err["error"]["message"]
        stream.close()
    finally:
        running.stop()


def test_cli_binds_loopback_and_refuses_bad_flags(capsys):
    from mlx_mtp.server import main, setup_arg_parser

    assert setup_arg_parser().parse_args([]).host == "127.0.0.1"
    assert main(["--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: max_tokens must be non-zero")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        assert main(["--model", "/nonexistent/model"]) == 2
        assert "no model at" in capsys.readouterr().err
    finally:
        busy.close()


@pytest.mark.real_model
def test_real_model_server_text_equals_generate(default_model_path):
    """SmolLM2-135M-Instruct with its shipped adapter behind the server: the
    openai client's chat completion (streamed and not) equals ``generate``."""
    model, tokenizer = load(str(default_model_path))
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    want = generate(model, tokenizer, ids, max_tokens=24)
    running = LoopbackServer(model, tokenizer, ServerConfig(model_id="smollm2"))
    try:
        r = running.client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24)
        assert r.choices[0].message.content == want
        s = running.client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == want
        assert r.model_extra["speculation"]["tokens_per_step"] >= 1
    finally:
        running.stop()


def test_non_streamed_request_cancelled_when_the_client_goes(server):
    before = len(server.worker.finished)
    body = json.dumps({"prompt": "w3 w4", "max_tokens": CONTEXT - 100, "logit_bias": NO_EOS}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    for _ in range(1000):  # until it runs
        if server.worker.pending and server.worker.finished[before:] == [] and _ > 20:
            break
        time.sleep(0.01)
    sock.close()
    for _ in range(3000):
        if len(server.worker.finished) > before:
            break
        time.sleep(0.01)
    stats = server.worker.finished[-1]
    assert stats["finish_reason"] == "cancelled" and stats["completion_tokens"] < CONTEXT // 2


def test_oversized_body_gets_413(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n{" % (64 << 20)
    )
    reply = b""
    while b"the request body is over" not in reply:
        data = sock.recv(65536)
        if not data:
            break
        reply += data
    reply = reply.decode()
    sock.close()
    assert reply.startswith("HTTP/1.1 413") and "the request body is over" in reply
