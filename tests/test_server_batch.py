"""The server decodes concurrent requests as one batch: with the ``openai``
client on loopback, requests that join and leave a running batch each get
exactly the output they get alone (greedy, and seeded sampling), a cancelled
or failing request ends alone, the batch's byte budget makes the others wait,
and a full queue answers 503. A tiny model (word-level tokenizer w0..w127)
with a random adapter.

A gate holds the worker's first step until every request is queued, so that
they share the batch whatever the threads' timing; it records the batch's
size at each step."""

import http.client
import json
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import LoopbackServer, need

openai = need("openai", "pip install -e '.[test,server]'")
need("uvicorn", "pip install -e '.[server]'")

import mlx.core as mx  # noqa: E402

from mlx_mtp import generate, load  # noqa: E402
from mlx_mtp.decoding.batch import BatchEvent  # noqa: E402
from mlx_mtp.decoding.steps import Step  # noqa: E402
from mlx_mtp.server import ServerConfig  # noqa: E402

from tiny import save_tiny_model_dir  # noqa: E402

CONTEXT = 2048
MODEL_ID = "tiny"
NO_EOS = {"127": -100}  # keeps a generation going (EOS is w127) until it is cancelled
WAIT = 120  # seconds a test waits for the server before it fails


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    dirs = save_tiny_model_dir(
        tmp_path_factory.mktemp("batch"), tie_word_embeddings=False, max_position_embeddings=CONTEXT
    )
    return load(str(dirs[0]), adapter_path=str(dirs[1]))


class Gate:
    """Replaces the worker's step: holds it until released
    (:meth:`release_when`), so that every request queued by then joins the
    first step; records the batch's size at every step (``sizes``)."""

    def __init__(self, worker):
        self.worker, self.real = worker, worker.step
        self.opened = threading.Event()
        self.sizes = []
        worker.step = self

    def __call__(self):
        if not self.opened.is_set():
            assert self.opened.wait(WAIT), "the gate was never released"
            return []  # no step yet: every queued request joins before the first
        self.sizes.append(len(self.worker.rows))
        return self.real()

    def release_when(self, pending: int):
        """Release once ``pending`` requests are queued or running."""
        until(lambda: self.worker.pending >= pending)
        self.opened.set()


def until(condition, what="the server"):
    for _ in range(WAIT * 100):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} did not get there in {WAIT} s")


@pytest.fixture
def serve(loaded):
    """A server with its worker's steps behind a :class:`Gate`: ``serve(**config)``."""
    running = []

    def start(**config):
        server = LoopbackServer(*loaded, ServerConfig(model_id=MODEL_ID, max_tokens=16, **config))
        running.append(server)
        return server, Gate(server.worker)

    yield start
    for server in running:
        server.worker.step.opened.set()
        server.stop()


def solo(loaded, prompt, max_tokens, seed=None, **kwargs):
    """The request served alone: ``generate``'s text (after ``seed``)."""
    model, tokenizer = loaded
    if seed is not None:
        mx.random.seed(seed)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)


def chat_ids(loaded, text):
    return loaded[1].apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def run_clients(clients):
    """Run each client function in its own thread; the failures, as text."""
    failures = []

    def wrap(i, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (reported below)
            failures.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT * 3)
    return failures


def finished_stats(worker, job_count):
    until(lambda: len(worker.finished) >= job_count and worker.pending == 0)
    return worker.finished


def test_8_concurrent_mixed_requests_each_get_their_solo_output(serve, loaded):
    """Non-streamed and streamed chats and completions, greedy and seeded
    sampling, a stop string, logprobs, different lengths, one cancelled and
    one malformed, all at once: the valid ones share the batch and each gets
    its solo text; the malformed one its 400."""
    server, gate = serve(max_batch=8)
    sampled = dict(temperature=0.9, top_p=0.95)
    want = {
        "chat": solo(loaded, chat_ids(loaded, "w3 w17 w42"), 12),
        "chat_stream": solo(loaded, chat_ids(loaded, "w5 w64 w9"), 20),
        "seeded": solo(loaded, "w7 w8 w9 w31", 14, seed=7, temp=0.9, top_p=0.95),
        "seeded_stream": solo(loaded, "w40 w41 w3", 10, seed=11, temp=0.9, top_p=0.95),
        "stop": solo(loaded, "w50 w51 w52", 24, stop=["w60", "w61 w62"]),
        "short": solo(loaded, chat_ids(loaded, "w3 w4"), 3),
    }
    got = {}
    c = server.new_client(timeout=WAIT * 2)

    def chat():
        r = c.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "w3 w17 w42"}], max_tokens=12
        )
        got["chat"] = r.choices[0].message.content

    def chat_stream():
        s = c.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "w5 w64 w9"}], max_tokens=20, stream=True
        )
        got["chat_stream"] = "".join(x.choices[0].delta.content or "" for x in s if x.choices)

    def seeded():
        r = c.completions.create(model=MODEL_ID, prompt="w7 w8 w9 w31", max_tokens=14, seed=7, **sampled)
        got["seeded"] = r.choices[0].text

    def seeded_stream():
        s = c.completions.create(model=MODEL_ID, prompt="w40 w41 w3", max_tokens=10, seed=11, stream=True, **sampled)
        got["seeded_stream"] = "".join(x.choices[0].text for x in s)

    def stop():
        r = c.completions.create(model=MODEL_ID, prompt="w50 w51 w52", max_tokens=24, stop=["w60", "w61 w62"])
        got["stop"] = r.choices[0].text

    def short():
        messages = [{"role": "user", "content": "w3 w4"}]
        r = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=3, logprobs=True, top_logprobs=2)
        got["short"] = r.choices[0].message.content
        got["short_logprobs"] = r.choices[0].logprobs.content

    def cancelled():
        s = c.completions.create(model=MODEL_ID, prompt="w11 w12", max_tokens=1500, stream=True, logit_bias=NO_EOS)
        chunks = iter(s)
        for _ in range(3):
            next(chunks)
        s.close()

    def malformed():
        status, err = server.request("POST", "/v1/chat/completions", {"messages": [{"role": "user"}], "stream": 1})
        assert status == 400 and err["error"]["type"] == "invalid_request_error", (status, err)

    clients = [chat, chat_stream, seeded, seeded_stream, stop, short, cancelled, malformed]
    releaser = threading.Thread(target=gate.release_when, args=(7,))
    releaser.start()
    failures = run_clients(clients)
    releaser.join()
    assert not failures, failures
    for name, text in want.items():
        assert got[name] == text, name
    assert len(got["short_logprobs"]) == 3 and all(len(lp.top_logprobs) == 2 for lp in got["short_logprobs"])
    stats = finished_stats(server.worker, 7)
    assert sorted(s["finish_reason"] for s in stats).count("cancelled") == 1
    assert gate.sizes[0] == 7  # all seven valid requests stepped together
    # rows left at different steps: the batch shrank while others went on
    assert gate.sizes[-1] < 7
    status, health = server.request("GET", "/health")
    assert status == 200 and health["queued"] == 0 and health["running"] == 0


def test_cancelling_one_request_mid_batch_leaves_the_others_untouched(serve, loaded):
    """At the batch's fifth step the streamed request is cancelled (what the
    HTTP side does when its client goes): it leaves the batch, its stream ends
    with finish_reason "cancelled", and the others get their solo text."""
    server, gate = serve()
    prompts = ["w3 w9 w27", "w4 w16 w64", "w5 w25 w100"]
    want = [solo(loaded, p, 40) for p in prompts]
    want_sampled = solo(loaded, "w6 w36", 30, seed=3, temp=1.0)
    got, cancelled_with = {}, []
    real = gate.real

    def step():
        if len(gate.sizes) == 5:
            (row,) = [r for r in server.worker.rows.values() if r.job.stream]
            row.job.cancelled.set()
            cancelled_with.append(len(server.worker.rows))
        return real()

    gate.real = step
    c = server.new_client(timeout=WAIT * 2)

    def greedy(i):
        return lambda: got.__setitem__(i, c.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=40))

    def sampled():
        got["sampled"] = c.completions.create(model=MODEL_ID, prompt="w6 w36", max_tokens=30, seed=3, temperature=1.0)

    def streamed():
        s = c.completions.create(model=MODEL_ID, prompt="w11 w12", max_tokens=1500, stream=True, logit_bias=NO_EOS)
        got["stream"] = [x.choices[0].finish_reason for x in s]

    releaser = threading.Thread(target=gate.release_when, args=(5,))
    releaser.start()
    failures = run_clients([greedy(0), greedy(1), greedy(2), sampled, streamed])
    releaser.join()
    assert not failures, failures
    assert [got[i].choices[0].text for i in range(3)] == want
    assert got["sampled"].choices[0].text == want_sampled
    assert cancelled_with == [5], cancelled_with  # cancelled while the whole batch ran
    assert got["stream"][-1] == "cancelled" and got["stream"].count("cancelled") == 1
    stats = finished_stats(server.worker, 5)
    (gone,) = [s for s in stats if s["finish_reason"] == "cancelled"]
    # its steps before the fifth (a row's first comes a step after it joins), never after
    assert 1 <= gone["completion_tokens"] < 1500 and 1 <= gone["steps"] <= 4, gone
    assert all(s["finish_reason"] in ("stop", "length") for s in stats if s is not gone)


def fail_rows(gate: Gate, which):
    """From their third step on, the rows of the jobs ``which`` picks fail
    (their events carry an error, as the batch reports a row's failure)."""
    real = gate.real

    def step():
        events = real()
        for i, event in enumerate(events):
            row = gate.worker.rows.get(event.uid)
            if row is not None and row.steps >= 2 and which(row.job):
                events[i] = BatchEvent(event.uid, Step(tokens=[], proposed=0, accepted=0), True, RuntimeError("lost"))
        return events

    gate.real = step


def test_a_failing_request_ends_alone(serve, loaded):
    """A row whose decoding fails (injected at the worker's step: its event
    carries the error, as the batch reports one) ends with a 500; the others
    get their solo text."""
    server, gate = serve()

    fail_rows(gate, lambda job: loaded[1].decode(job.prompt) == "w3 w4 w5")
    want = [solo(loaded, p, 20) for p in ("w9 w10", "w11 w12 w13")]
    got = {}
    c = server.new_client(timeout=WAIT * 2)

    def ok(i, prompt):
        return lambda: got.__setitem__(i, c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20))

    def fails():
        body = {"prompt": "w3 w4 w5", "max_tokens": 30, "logit_bias": NO_EOS}
        status, err = server.request("POST", "/v1/completions", body)
        got["fails"] = (status, err["error"]["message"])

    releaser = threading.Thread(target=gate.release_when, args=(3,))
    releaser.start()
    failures = run_clients([ok(0, "w9 w10"), ok(1, "w11 w12 w13"), fails])
    releaser.join()
    assert not failures, failures
    assert [got[0].choices[0].text, got[1].choices[0].text] == want
    assert got["fails"][0] == 500 and "RuntimeError: lost" in got["fails"][1]
    assert max(gate.sizes) == 3
    stats = finished_stats(server.worker, 3)
    assert sorted(s["finish_reason"] for s in stats).count("error") == 1


def test_a_failing_streamed_request_ends_with_an_error_event(serve, loaded):
    server, gate = serve()

    fail_rows(gate, lambda job: job.stream)
    want = solo(loaded, "w9 w10", 20)
    got = {}
    c = server.new_client(timeout=WAIT * 2)

    def ok():
        got["ok"] = c.completions.create(model=MODEL_ID, prompt="w9 w10", max_tokens=20).choices[0].text

    def fails_streamed():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
        body = {"prompt": "w6 w7 w8", "max_tokens": 30, "stream": True, "logit_bias": NO_EOS}
        conn.request("POST", "/v1/completions", body=json.dumps(body))
        got["events"] = [e for e in conn.getresponse().read().decode().split("\n\n") if e]
        conn.close()

    releaser = threading.Thread(target=gate.release_when, args=(2,))
    releaser.start()
    failures = run_clients([ok, fails_streamed])
    releaser.join()
    assert not failures, failures
    assert got["ok"] == want
    assert "lost" in got["events"][-2] and got["events"][-1] == "data: [DONE]"
    assert max(gate.sizes) == 2
    r = c.completions.create(model=MODEL_ID, prompt="w3 w4", max_tokens=6)  # the server goes on
    assert r.choices[0].text == solo(loaded, "w3 w4", 6)


@pytest.mark.parametrize("rows", [1, 2])
def test_the_byte_budget_makes_requests_wait_and_all_finish(serve, loaded, rows):
    """A budget for ``rows`` requests' caches: never more in the batch, the
    others wait in the queue, and all get their solo text (a request larger
    than the whole budget runs alone)."""
    server, gate = serve()
    worker = server.worker
    prompts = [f"w{3 + i} w{40 + i} w{80 + i}" for i in range(5)]
    ids = loaded[1].encode(prompts[0])
    assert all(len(loaded[1].encode(p)) == len(ids) for p in prompts)
    need_one = worker._nbytes(SimpleNamespace(prompt=ids, max_tokens=16))
    worker.config.batch_bytes = rows * need_one + need_one // 2 if rows > 1 else 1
    want = [solo(loaded, p, 16) for p in prompts]
    got = {}
    c = server.new_client(timeout=WAIT * 2)

    def client(i):
        return lambda: got.__setitem__(i, c.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=16))

    releaser = threading.Thread(target=gate.release_when, args=(5,))
    releaser.start()
    failures = run_clients([client(i) for i in range(5)])
    releaser.join()
    assert not failures, failures
    assert [got[i].choices[0].text for i in range(5)] == want
    assert max(gate.sizes) == rows


def test_a_full_queue_answers_503_at_once(serve, loaded):
    """Requests waiting for the batch count toward the queue: past
    ``max_queue`` a request gets a 503 ``server_busy`` at once."""
    server, gate = serve(max_batch=1, max_queue=3)
    c = server.new_client(timeout=WAIT)
    streams = []

    def hold():
        s = c.completions.create(model=MODEL_ID, prompt="w3", max_tokens=5, stream=True)
        streams.append(s)
        list(s)

    holders = [threading.Thread(target=hold) for _ in range(3)]
    for t in holders:
        t.start()
    until(lambda: server.worker.pending == 3)
    start = time.perf_counter()
    status, err = server.request("POST", "/v1/completions", {"prompt": "w3", "max_tokens": 2})
    assert status == 503 and err["error"]["code"] == "server_busy" and "busy" in err["error"]["message"]
    assert time.perf_counter() - start < 10
    with pytest.raises(openai.APIStatusError, match="busy"):
        c.completions.create(model=MODEL_ID, prompt="w3", max_tokens=2)
    gate.opened.set()
    for t in holders:
        t.join(timeout=WAIT)
    assert max(gate.sizes) == 1 and len(server.worker.finished) == 3
    r = c.completions.create(model=MODEL_ID, prompt="w3 w4", max_tokens=6)
    assert r.choices[0].text == solo(loaded, "w3 w4", 6)
