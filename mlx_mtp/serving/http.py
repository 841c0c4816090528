"""The HTTP side (Starlette): :class:`Routes` parse, queue and stream; the
worker (:mod:`mlx_mtp.serving.worker`) generates. Starlette is the server's
optional extra, so only :func:`mlx_mtp.serving.app.make_app` imports this module."""

import asyncio
import json
import time
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .config import MAX_BODY_BYTES, RequestError, ServerConfig
from .requests import DISCONNECT_POLL, Job, parse_request
from .responses import chunk, speculation, usage
from .tools import tool_call_text
from .worker import Worker

__all__ = ["Routes", "build_app"]


def error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_body(request: Request) -> bytes:
    """The request's body, at most ``MAX_BODY_BYTES`` (413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        chunks.append(part)
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


class Routes:
    """The endpoints over one worker."""

    def __init__(self, worker: Worker, tokenizer, config: ServerConfig):
        self.worker, self.tokenizer, self.config = worker, tokenizer, config

    async def complete(self, request: Request, kind: str):
        """A chat or text completion: queued, then answered whole or streamed."""
        try:
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"invalid JSON in the request body: {e}") from None
            job = parse_request(body, kind, self.tokenizer, self.worker.model, self.config)
            job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
            self.worker.submit(job)
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
            return StreamingResponse(self.stream_events(job, request), media_type="text/event-stream")
        return await self.whole(job, request)

    async def whole(self, job: Job, request: Request):
        """The completion in one response, once the generation is done."""
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
                content, calls, finish = "".join(text), [], stats["finish_reason"]
                split = tool_call_text(self.tokenizer, job.tools, streaming=False)
                if split is not None:
                    content, calls, finish = split.whole(content, finish)
                response = chunk(job, content, finish, logprobs, stream=False, tool_calls=calls)
                response["usage"] = usage(stats)
                response["speculation"] = speculation(stats)
                return JSONResponse(response)

    async def stream_events(self, job: Job, request: Request):
        """The completion as server-sent events, ending in ``data: [DONE]``."""
        split = tool_call_text(self.tokenizer, job.tools, streaming=True)
        try:
            while True:
                event = await next_event(job, request, watch=False)
                if event[0] == "token":
                    text, calls = split.feed(event[1]) if split is not None else (event[1], [])
                    if text or calls or event[3]:
                        part = chunk(job, text, None, [event[3]] if event[3] else [], stream=True, tool_calls=calls)
                        yield f"data: {json.dumps(part)}\n\n"
                elif event[0] == "error":
                    yield f"data: {json.dumps(RequestError(event[1], event[2]).body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    stats = event[1]
                    text, calls, finish = "", [], stats["finish_reason"]
                    if split is not None:
                        text, calls, finish = split.finish(finish)
                    last = chunk(job, text, finish, [], stream=True, tool_calls=calls)
                    last["speculation"] = speculation(stats)
                    yield f"data: {json.dumps(last)}\n\n"
                    if job.include_usage:
                        tail = chunk(job, "", None, [], stream=True)
                        tail["choices"], tail["usage"] = [], usage(stats)
                        yield f"data: {json.dumps(tail)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            # the client went (or the stream ended): stop the generation at its next token
            job.cancelled.set()

    async def chat_completions(self, request: Request):
        return await self.complete(request, "chat")

    async def completions(self, request: Request):
        return await self.complete(request, "text")

    async def models(self, request: Request):
        model = {"id": self.config.model_id, "object": "model", "created": int(time.time()), "owned_by": "mlx-mtp"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request):
        worker = self.worker
        return JSONResponse(
            {
                "status": "ok",
                "queued": worker.pending,  # waiting or running
                "running": len(worker.rows),
                "cached_conversations": len(worker.caches.entries),
            }
        )

    @staticmethod
    async def http_error(request: Request, exc: HTTPException):
        messages = {
            404: f"no route {request.method} {request.url.path}",
            405: f"method {request.method} not allowed here",
        }
        return error(RequestError(exc.status_code, messages.get(exc.status_code, str(exc.detail))))

    @staticmethod
    async def unexpected(request: Request, exc: Exception):
        return error(RequestError(500, f"internal error: {type(exc).__name__}: {exc}"))


def build_app(model, tokenizer, config: Optional[ServerConfig] = None) -> Starlette:
    """The Starlette application serving ``model`` and its tokenizer;
    ``app.state.worker`` runs the generations."""
    config = config or ServerConfig()
    worker = Worker(model, tokenizer, config)
    routes = Routes(worker, tokenizer, config)
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: routes.http_error, Exception: routes.unexpected},
    )
    app.state.worker = worker
    app.state.config = config
    return app
