"""An OpenAI-compatible HTTP server for MTP speculative decoding::

    python -m mlx_mtp.server --model M [--adapter-path A] [--host 127.0.0.1] [--port 8080]

``POST /v1/chat/completions`` (also ``/chat/completions``), ``POST
/v1/completions``, ``GET /v1/models``, ``GET /health``; request fields as
``mlx_lm.server`` takes them, so clients of either work with both. Streams
(``stream: true``) are server-sent events ending in ``data: [DONE]``.
Responses carry OpenAI's ``usage`` block (``prompt_tokens_details.cached_tokens``:
prompt tokens reused from the cache) and a ``speculation`` block (steps,
tokens per step, k, mode, whether the per-step policy chose and its share of
steps per choice, tokens prefilled).

How it works: one worker thread owns the model and runs the requests of a
bounded queue one at a time, so each gets exactly what it would get alone;
the HTTP side (Starlette on uvicorn, ``pip install -e ".[server]"``) only
parses, queues and streams. The caches of recent conversations are kept
(bounded by count and bytes) and a request reuses the one sharing the longest
prefix with its prompt. A client that disconnects stops its generation at
the next token; a failing generation ends its own request with an error.
Bad requests get a 4xx with an OpenAI-style error body. See docs/serving.md.
"""

import argparse
import asyncio
import json
import math
import queue
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx

from .api import (
    check_generation_args,
    check_text,
    encode_prompt,
    fit_prompt_cache,
    make_decoder,
    make_prompt_cache,
    stream_generate,
)
from .arguments import add_decoding_args, add_model_args, decoding_settings
from .decoding.decode import context_limit
from .decoding.settings import DecodeSettings, check_max_tokens
from .decoding.state import DecodingState
from .errors import USER_ERROR_EXIT

DEFAULT_MAX_TOKENS = 512  # mlx_lm.server's default
MAX_STOP_STRINGS = 16
MAX_BODY_BYTES = 32 << 20  # a request body larger than this gets a 413 (bounded memory)
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class ServerConfig:
    """What the server serves and its limits (the CLI's flags)."""

    model_id: str = "default_model"
    max_tokens: int = DEFAULT_MAX_TOKENS  # when a request gives none
    # decoding settings; temp/top_p/top_k: when a request gives none (default: the per-step policy, greedy)
    decoding: DecodeSettings = field(default_factory=DecodeSettings)
    state: Optional[DecodingState] = None  # the model's (None: the one the loader kept)
    cache_count: int = 8  # conversations whose caches are kept
    cache_bytes: int = 2 << 30  # their total size
    max_queue: int = 32  # requests waiting or running; more get a 503


class RequestError(Exception):
    """A request that cannot be served: an HTTP status and an OpenAI-style error."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- requests -----------------------------------------------------------------------------

DISCONNECT_POLL = 0.05  # seconds between checks that a non-streaming client is still connected


@dataclass
class Job:
    """One request: its validated arguments, and the channel back to the HTTP side."""

    kind: str  # "chat" or "text"
    prompt: List[int]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    sampling: Dict[str, Any]  # temp/top_p/top_k, or sampler; logits_processors
    stop: List[str]
    seed: Optional[int]
    logprobs: bool
    top_logprobs: int
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: Optional[asyncio.Queue] = None
    loop: Optional[asyncio.AbstractEventLoop] = None
    stats: Dict[str, Any] = field(default_factory=dict)
    watched: float = 0.0  # when the handler last asked whether the client is still there

    def emit(self, *event):
        """Hand an event to the request's handler (from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _get(body: dict, name: str, kinds, default=None, check=None, what: Optional[str] = None):
    """``body[name]`` (or ``default`` when absent or null), of type ``kinds``
    and passing ``check``; else a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise RequestError(400, f"{name} must be {what or _kind_name(kinds)}, got a boolean", name)
    if not isinstance(value, kinds):
        raise RequestError(400, f"{name} must be {what or _kind_name(kinds)}, got {type(value).__name__}", name)
    if check is not None and not check(value):
        raise RequestError(400, f"{name} must be {what}, got {value!r}", name)
    return value


def _kind_name(kinds) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "a boolean",
        dict: "an object",
        list: "an array",
    }
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _message_text(message: Any, i: int) -> dict:
    """A chat message with its content as text (text parts joined)."""
    if not isinstance(message, dict):
        raise RequestError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
    role = message.get("role")
    if role not in ROLES:
        raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
    try:
        check_text(content, f"messages[{i}].content")
    except ValueError as e:
        raise RequestError(400, str(e), "messages") from None
    return {**{k: v for k, v in message.items() if k != "content"}, "content": content}


def parse_request(body: Any, kind: str, tokenizer, model, config: ServerConfig) -> Job:
    """Validate a request body (``kind`` "chat" or "text") as ``mlx_lm.server``
    reads it; RequestError (4xx) for anything wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    requested = _get(body, "model", str, "default_model")
    if requested not in ("default_model", config.model_id):
        raise RequestError(
            404,
            f"the model '{requested}' does not exist: this server serves '{config.model_id}'",
            "model",
            "model_not_found",
        )
    for name in ("adapters", "draft_model"):
        value = body.get(name)
        if value not in (None, "default_model"):
            raise RequestError(
                400, f"{name} is not supported: this server decodes with the model's own MTP adapter", name
            )
    n = _get(body, "n", int, 1)
    if n != 1:
        raise RequestError(400, f"n must be 1, got {n}", "n")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    include_usage = bool(options.get("include_usage", False))
    limit = context_limit(model) or (1 << 20)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = config.max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise RequestError(400, f"{name} must be an integer, got {type(max_tokens).__name__}", name)
    elif not 1 <= max_tokens <= limit:
        raise RequestError(400, f"{name} must be in [1, {limit}] (the model's context), got {max_tokens}", name)
    temp = _get(body, "temperature", (int, float), config.decoding.temp)
    top_p = _get(body, "top_p", (int, float), config.decoding.top_p)
    top_k = _get(body, "top_k", int, config.decoding.top_k)
    try:
        check_generation_args(max_tokens, temp, top_p, top_k)
    except (TypeError, ValueError) as e:
        param = str(e).split(" ", 1)[0]
        raise RequestError(
            400, str(e).replace("temp ", "temperature ", 1), "temperature" if param == "temp" else param
        ) from None
    number = (int, float)
    min_p = _get(body, "min_p", number, 0.0, lambda v: 0 <= v <= 1, "in [0, 1]")
    xtc_probability = _get(body, "xtc_probability", number, 0.0, lambda v: 0 <= v <= 1, "in [0, 1]")
    xtc_threshold = _get(body, "xtc_threshold", number, 0.1, lambda v: 0 <= v <= 1, "in [0, 1]")
    penalties = {}
    for name, default in (("repetition_penalty", 0.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
        penalties[name] = _get(body, name, number, default, lambda v: -100 <= v <= 100, "in [-100, 100]")
    sizes = {}
    for name in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
        sizes[name] = _get(body, name, int, 20, lambda v: 0 <= v <= limit, f"in [0, {limit}]")
    logit_bias = _get(body, "logit_bias", dict, None)
    if logit_bias is not None:
        try:
            logit_bias = {int(k): float(v) for k, v in logit_bias.items()}
        except (TypeError, ValueError):
            raise RequestError(400, "logit_bias must map token ids to numbers", "logit_bias") from None
        if any(not 0 <= t < model.vocab_size for t in logit_bias):
            raise RequestError(400, f"logit_bias token ids must be in [0, {model.vocab_size})", "logit_bias")
    logprobs = _get(body, "logprobs", bool, False)
    top_logprobs = _get(body, "top_logprobs", int, 0, lambda v: -1 <= v <= 10, "in [0, 10]")
    seed = _get(body, "seed", int, None)
    stop = body.get("stop")
    stop = [] if stop is None else ([stop] if isinstance(stop, str) else stop)
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise RequestError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")

    sampling: Dict[str, Any] = {}
    if min_p > 0 or xtc_probability > 0:
        # mlx-lm's own sampler, verified by matching its samples (exact)
        from mlx_lm.sample_utils import make_sampler

        sampling["sampler"] = make_sampler(
            temp, top_p, min_p, 1, top_k, xtc_probability, xtc_threshold, tokenizer.eos_token_ids
        )
    else:
        sampling.update(temp=float(temp), top_p=float(top_p), top_k=top_k)
    if logit_bias or any(penalties.values()):
        from mlx_lm.sample_utils import make_logits_processors

        sampling["logits_processors"] = make_logits_processors(
            logit_bias,
            penalties["repetition_penalty"] or None,
            sizes["repetition_context_size"],
            penalties["presence_penalty"] or None,
            sizes["presence_context_size"],
            penalties["frequency_penalty"] or None,
            sizes["frequency_context_size"],
        )

    try:
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError(400, "messages must be a non-empty array of messages", "messages")
            messages = [_message_text(m, i) for i, m in enumerate(messages)]
            prompt = _chat_prompt(tokenizer, messages, body)
        else:
            text = body.get("prompt")
            if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
                text = text[0]
            if not isinstance(text, (str, list)) or not text:
                raise RequestError(400, "prompt must be a non-empty string (or a list of token ids)", "prompt")
            prompt = encode_prompt(tokenizer, text, model.vocab_size)
    except (TypeError, ValueError) as e:
        raise RequestError(400, str(e), "messages" if kind == "chat" else "prompt") from None
    if len(prompt) >= limit:
        raise RequestError(
            400,
            f"the prompt is {len(prompt)} tokens, which leaves no room in the model's context of {limit} tokens",
            "messages" if kind == "chat" else "prompt",
            "context_length_exceeded",
        )
    return Job(
        kind=kind,
        prompt=prompt,
        model=requested,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        seed=seed,
        logprobs=logprobs,
        top_logprobs=max(top_logprobs, 0),
        id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
    )


def _chat_prompt(tokenizer, messages: List[dict], body: dict) -> List[int]:
    """The chat's token ids: the tokenizer's chat template (or mlx-lm's
    role mapping when it has none), as mlx_lm.server builds them."""
    if getattr(tokenizer, "has_chat_template", False):
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise RequestError(400, "chat_template_kwargs must be an object", "chat_template_kwargs")
        tools = body.get("tools") or None
        try:
            return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **kwargs))
        except Exception as e:  # a template error is the request's (a role it does not take, ...)
            raise RequestError(400, f"the chat template cannot render these messages: {e}", "messages") from None
    from mlx_lm.server import convert_chat

    return list(tokenizer.encode(convert_chat(messages, body.get("role_mapping"))))


# --- the cache across requests ------------------------------------------------------------


@dataclass
class CacheEntry:
    tokens: List[int]  # what the cache holds
    cache: List[Any]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


class PromptCacheStore:
    """The prompt caches of recent conversations, most recent last, bounded
    by count and bytes; a request takes the one sharing the longest prefix
    with its prompt (or a fresh one) and puts it back when done."""

    def __init__(self, model, max_count: int, max_bytes: int):
        self.model, self.max_count, self.max_bytes = model, max_count, max_bytes
        self.entries: "OrderedDict[int, CacheEntry]" = OrderedDict()
        self._next = 0

    def take(self, prompt: Sequence[int]) -> CacheEntry:
        best, best_len = None, 0
        for key, entry in self.entries.items():
            n = 0
            for a, b in zip(entry.tokens, prompt):
                if a != b:
                    break
                n += 1
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return CacheEntry([], make_prompt_cache(self.model))
        return self.entries.pop(best)

    def put(self, entry: CacheEntry):
        self.entries[self._next] = entry
        self._next += 1
        while self.entries and (
            len(self.entries) > self.max_count or sum(e.nbytes for e in self.entries.values()) > self.max_bytes
        ):
            self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


# --- the worker ---------------------------------------------------------------------------


class Worker:
    """Owns the model: runs queued jobs one at a time on its own thread."""

    def __init__(self, model, tokenizer, config: ServerConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.jobs: "queue.Queue[Job]" = queue.Queue()
        self.pending = 0  # queued or running
        self.lock = threading.Lock()
        self.caches = PromptCacheStore(model, config.cache_count, config.cache_bytes)
        self.finished: List[Dict[str, Any]] = []  # recent jobs' stats (newest last)
        self.generate = stream_generate  # the generation function (tests replace it to inject failures)
        self.thread = threading.Thread(target=self._run, name="mlx-mtp-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job):
        with self.lock:
            if self.pending >= self.config.max_queue:
                raise RequestError(
                    503, f"the server is busy ({self.pending} requests queued); retry later", code="server_busy"
                )
            self.pending += 1
        self.jobs.put(job)

    def _run(self):
        while True:
            job = self.jobs.get()
            try:
                self._serve(job)
            except BaseException as e:  # noqa: BLE001  (one request fails, never the worker)
                job.emit("error", 500, f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self.lock:
                    self.pending -= 1
                self.finished = (self.finished + [dict(job.stats, id=job.id)])[-256:]

    def _serve(self, job: Job):
        job.stats.update(finish_reason="cancelled", completion_tokens=0, steps=0, prompt_tokens=len(job.prompt))
        if job.cancelled.is_set():
            return
        entry = self.caches.take(job.prompt)
        reused = fit_prompt_cache(entry.cache, entry.tokens, job.prompt)
        entry.tokens = job.prompt[:reused]
        job.stats.update(cached_tokens=reused, prefill_tokens=len(job.prompt) - reused)
        if job.seed is not None:
            mx.random.seed(job.seed)
        try:
            # the request's sampling over the server's decoding settings
            sampling = {**dict(temp=0.0, top_p=1.0, top_k=0, sampler=None, logits_processors=()), **job.sampling}
            responses = self.generate(
                self.model,
                self.tokenizer,
                job.prompt[reused:],
                max_tokens=job.max_tokens,
                stop=job.stop or None,
                prompt_cache=entry.cache,
                context=job.prompt[:reused],
                settings=replace(self.config.decoding, **sampling),
                state=self.config.state,
            )
        except (TypeError, ValueError) as e:  # the request's arguments (checked before anything runs)
            self.caches.put(entry)
            job.emit("error", 400, str(e))
            return
        job.emit("start")
        out: List[int] = []
        ok = False
        try:
            r = None
            for r in responses:
                out.append(r.token)
                job.emit("token", r.text, r.token, self._logprobs(job, r))
                job.stats.update(
                    completion_tokens=len(out),
                    steps=r.steps,
                    tokens_per_step=r.tokens_per_step,
                    num_masks=r.num_masks,
                    mode=r.mode,
                    policy=r.policy,
                    choices=r.choices,
                )
                if job.cancelled.is_set():
                    responses.close()
                    return
            job.stats["finish_reason"] = r.finish_reason if r is not None else "length"
            ok = True
        finally:
            if ok or job.cancelled.is_set():
                entry.tokens = job.prompt + out
                self.caches.put(entry)
            # else: a failed generation's cache is dropped
        job.emit("done", dict(job.stats))

    def _logprobs(self, job: Job, r) -> Optional[dict]:
        if not job.logprobs:
            return None
        lp = r.logprobs.astype(mx.float32)

        def entry(t):
            value = lp[t].item()
            return {"id": t, "token": self.tokenizer.decode([t]), "logprob": value if math.isfinite(value) else -1e30}

        item = entry(r.token)
        if job.top_logprobs > 0:
            item["top_logprobs"] = [entry(t) for t in mx.argsort(-lp)[: job.top_logprobs].tolist()]
        return item


# --- responses ----------------------------------------------------------------------------


def _usage(stats: dict) -> dict:
    prompt, completion = stats.get("prompt_tokens", 0), stats.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": stats.get("cached_tokens", 0)},
    }


def _speculation(stats: dict) -> dict:
    choices = stats.get("choices") or {}
    total = sum(choices.values())
    return {
        "steps": stats.get("steps", 0),
        "tokens_per_step": round(stats.get("tokens_per_step", 0.0), 4),
        "num_masks": stats.get("num_masks", 0),
        "mode": stats.get("mode", "off"),
        "policy": stats.get("policy", False),
        # share of steps per choice (what each step fed: decoding.policy.KINDS)
        "choices": {kind: round(n / total, 4) for kind, n in choices.items()} if total else {},
        "prefill_tokens": stats.get("prefill_tokens", 0),
    }


def _chunk(job: Job, text: str, finish_reason: Optional[str], logprobs: List[dict], stream: bool) -> dict:
    """A response object as mlx_lm.server (and OpenAI) writes it."""
    obj = ("chat.completion.chunk" if stream else "chat.completion") if job.kind == "chat" else "text_completion"
    choice: Dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if logprobs:
        choice["logprobs"] = {"content": logprobs}
    if job.kind == "chat":
        message = {"role": "assistant"}
        if text or not stream:
            message["content"] = text
        choice["delta" if stream else "message"] = message
    else:
        choice["text"] = text
    return {
        "id": job.id,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "system_fingerprint": "mlx-mtp",
        "choices": [choice],
    }


def make_app(model, tokenizer, config: Optional[ServerConfig] = None):
    """The Starlette application serving ``model`` (an :class:`MTPModel`) and
    its tokenizer; ``app.state.worker`` runs the generations."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    config = config or ServerConfig()
    worker = Worker(model, tokenizer, config)

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def next_event(job: Job, request: Request, watch: bool):
        """The job's next event; with ``watch``, cancel it if the client goes
        (asked at least every ``DISCONNECT_POLL`` seconds, events or not)."""
        while True:
            if watch and time.monotonic() - job.watched >= DISCONNECT_POLL:
                job.watched = time.monotonic()
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None
            try:
                return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL if watch else None)
            except asyncio.TimeoutError:
                continue

    async def complete(request: Request, kind: str):
        try:
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"invalid JSON in the request body: {e}") from None
            job = parse_request(body, kind, tokenizer, worker.model, config)
            job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
            worker.submit(job)
        except RequestError as e:
            return error(e)
        # wait for the start (or an error) before answering, so errors get a status
        first = await next_event(job, request, watch=True)
        if first is None:
            return Response(status_code=499)
        if first[0] == "error":
            return error(RequestError(first[1], first[2]))
        if first[0] == "done":  # cancelled before it started
            return Response(status_code=499)
        if job.stream:
            return StreamingResponse(stream_events(job, request), media_type="text/event-stream")
        text, logprobs = [], []
        while True:
            event = await next_event(job, request, watch=True)
            if event is None:
                return Response(status_code=499)
            if event[0] == "token":
                text.append(event[1])
                if event[3]:
                    logprobs.append(event[3])
            elif event[0] == "error":
                return error(RequestError(event[1], event[2]))
            else:
                stats = event[1]
                response = _chunk(job, "".join(text), stats["finish_reason"], logprobs, stream=False)
                response["usage"] = _usage(stats)
                response["speculation"] = _speculation(stats)
                return JSONResponse(response)

    async def stream_events(job: Job, request: Request):
        try:
            while True:
                event = await next_event(job, request, watch=False)
                if event[0] == "token":
                    if event[1] or event[3]:
                        chunk = _chunk(job, event[1], None, [event[3]] if event[3] else [], stream=True)
                        yield f"data: {json.dumps(chunk)}\n\n"
                elif event[0] == "error":
                    yield f"data: {json.dumps(RequestError(event[1], event[2]).body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    stats = event[1]
                    chunk = _chunk(job, "", stats["finish_reason"], [], stream=True)
                    chunk["speculation"] = _speculation(stats)
                    yield f"data: {json.dumps(chunk)}\n\n"
                    if job.include_usage:
                        usage = _chunk(job, "", None, [], stream=True)
                        usage["choices"], usage["usage"] = [], _usage(stats)
                        yield f"data: {json.dumps(usage)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            # the client went (or the stream ended): stop the generation at its next token
            job.cancelled.set()

    async def chat_completions(request: Request):
        return await complete(request, "chat")

    async def completions(request: Request):
        return await complete(request, "text")

    async def models(request: Request):
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": config.model_id, "object": "model", "created": int(time.time()), "owned_by": "mlx-mtp"}
                ],
            }
        )

    async def health(request: Request):
        return JSONResponse(
            {"status": "ok", "queued": worker.pending, "cached_conversations": len(worker.caches.entries)}
        )

    async def http_error(request: Request, exc: HTTPException):
        messages = {
            404: f"no route {request.method} {request.url.path}",
            405: f"method {request.method} not allowed here",
        }
        return error(RequestError(exc.status_code, messages.get(exc.status_code, str(exc.detail))))

    async def unexpected(request: Request, exc: Exception):
        return error(RequestError(500, f"internal error: {type(exc).__name__}: {exc}"))

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: unexpected},
    )
    app.state.worker = worker
    app.state.config = config
    return app


# --- command line -------------------------------------------------------------------------


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.server",
        description="An OpenAI-compatible server with MTP speculative decoding (output identical to mlx-lm's).",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"tokens per request when it gives none (default: {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument("--temp", type=float, default=0.0, help="temperature when a request gives none (default: 0, greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p when a request gives none")
    p.add_argument("--top-k", type=int, default=0, help="top-k when a request gives none")
    add_decoding_args(p)
    p.add_argument("--prompt-cache-size", type=int, default=8, help="conversations whose caches are kept (default: 8)")
    p.add_argument("--prompt-cache-bytes", type=int, default=2 << 30, help="their total size in bytes (default: 2 GiB)")
    p.add_argument("--max-queue", type=int, default=32, help="requests queued at once; more get a 503 (default: 32)")
    p.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="uvicorn's log level"
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        try:
            import uvicorn
        except ImportError:
            raise ValueError('the server needs its extra: pip install -e ".[server]" (starlette, uvicorn)') from None
        check_max_tokens(args.max_tokens)
        settings = decoding_settings(args)
        for name in ("port", "prompt_cache_size", "prompt_cache_bytes", "max_queue"):
            if getattr(args, name) < (0 if name == "port" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'port' else 1}")
        from .loading import load

        model, tokenizer, state = load(args.model, adapter_path=args.adapter_path, return_state=True)
        make_decoder(model, settings, state)  # the settings against the model; calibrates once for the policy
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as e:
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    config = ServerConfig(
        model_id=args.model or "default_model",
        max_tokens=args.max_tokens,
        decoding=settings,
        state=state,
        cache_count=args.prompt_cache_size,
        cache_bytes=args.prompt_cache_bytes,
        max_queue=args.max_queue,
    )
    app = make_app(model, tokenizer, config)
    host, port = sock.getsockname()[:2]
    print(f"mlx_mtp.server: serving {config.model_id} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
