"""Requests: the validated form of one (:class:`Job`) and :func:`parse_request`,
which reads a body as ``mlx_lm.server`` does and refuses anything wrong with
a 4xx :class:`~mlx_mtp.serving.config.RequestError` naming the field."""

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.server import convert_chat

from ..api import check_text, encode_prompt
from ..decoding.constraint import Constraint
from ..decoding.decode import context_limit
from ..decoding.settings import check_generation_args
from .config import MAX_STOP_STRINGS, ROLES, RequestError, ServerConfig
from .tools import ToolRequest, forced_call_constraint, parse_tools, tool_message_fields

__all__ = ["DISCONNECT_POLL", "Job", "parse_request"]

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
    tools: Optional[ToolRequest] = None  # the request's tools (None: no tools, the text is all content)
    constraint: Optional[Constraint] = None  # response_format or a forced tool call, compiled (None: free text)
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
    rest = {k: v for k, v in message.items() if k != "content"}
    return {**rest, "content": content, **tool_message_fields(message, i)}


def parse_request(body: Any, kind: str, tokenizer, model, config: ServerConfig) -> Job:
    """Validate a request body (``kind`` "chat" or "text") as ``mlx_lm.server``
    reads it; RequestError (4xx) for anything wrong (the first field wrong,
    in the order mlx_lm.server reads them)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    requested = _target(body, config)
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    include_usage = bool(options.get("include_usage", False))
    limit = context_limit(model) or (1 << 20)
    max_tokens = _max_tokens(body, config, limit)
    options = _sampling_options(body, config, max_tokens, limit, model.vocab_size)
    logprobs = _get(body, "logprobs", bool, False)
    top_logprobs = _get(body, "top_logprobs", int, 0, lambda v: -1 <= v <= 10, "in [0, 10]")
    seed = _get(body, "seed", int, None)
    stop = body.get("stop")
    stop = [] if stop is None else ([stop] if isinstance(stop, str) else stop)
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise RequestError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    sampling = _sampling(options, tokenizer)
    tools = parse_tools(body, kind, tokenizer)
    constraint = _response_format(body, tokenizer, model)
    if tools is not None and tools.forced:  # a call, written under a grammar: lossless
        if constraint is not None:
            raise RequestError(400, "response_format cannot be given with a forced tool_choice", "response_format")
        constraint = forced_call_constraint(tokenizer, model.vocab_size, tools)
    prompt = _prompt(body, kind, tokenizer, model, limit, tools)
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
        tools=tools,
        constraint=constraint,
        id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
    )


def _target(body: dict, config: ServerConfig) -> str:
    """The model asked for (this server's); 4xx for another model, adapters,
    a draft model or n != 1."""
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
    return requested


def _max_tokens(body: dict, config: ServerConfig, limit: int) -> int:
    """``max_completion_tokens`` (or ``max_tokens``), in [1, the context]; the server's default without."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        return config.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise RequestError(400, f"{name} must be an integer, got {type(max_tokens).__name__}", name)
    if not 1 <= max_tokens <= limit:
        raise RequestError(400, f"{name} must be in [1, {limit}] (the model's context), got {max_tokens}", name)
    return max_tokens


def _sampling_options(body: dict, config: ServerConfig, max_tokens: int, limit: int, vocab: int) -> Dict[str, Any]:
    """The request's sampling fields, checked (the server's settings where it gives none)."""
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
    number, unit = (int, float), (lambda v: 0 <= v <= 1, "in [0, 1]")
    options = dict(temp=temp, top_p=top_p, top_k=top_k)
    options["min_p"] = _get(body, "min_p", number, 0.0, *unit)
    options["xtc_probability"] = _get(body, "xtc_probability", number, 0.0, *unit)
    options["xtc_threshold"] = _get(body, "xtc_threshold", number, 0.1, *unit)
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        options[name] = _get(body, name, number, 0.0, lambda v: -100 <= v <= 100, "in [-100, 100]")
    for name in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
        options[name] = _get(body, name, int, 20, lambda v: 0 <= v <= limit, f"in [0, {limit}]")
    logit_bias = _get(body, "logit_bias", dict, None)
    if logit_bias is not None:
        try:
            logit_bias = {int(k): float(v) for k, v in logit_bias.items()}
        except (TypeError, ValueError):
            raise RequestError(400, "logit_bias must map token ids to numbers", "logit_bias") from None
        if any(not 0 <= t < vocab for t in logit_bias):
            raise RequestError(400, f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
    options["logit_bias"] = logit_bias
    return options


def _sampling(o: Dict[str, Any], tokenizer) -> Dict[str, Any]:
    """The decoding settings of checked sampling options: temp/top_p/top_k,
    or mlx-lm's own sampler (verified by matching its samples: exact) where
    min_p or XTC is asked for; mlx-lm's logits processors for a bias or penalties."""
    sampling: Dict[str, Any] = {}
    if o["min_p"] > 0 or o["xtc_probability"] > 0:
        sampling["sampler"] = make_sampler(
            o["temp"], o["top_p"], o["min_p"], 1, o["top_k"], o["xtc_probability"], o["xtc_threshold"],
            tokenizer.eos_token_ids,
        )  # fmt: skip
    else:
        sampling.update(temp=float(o["temp"]), top_p=float(o["top_p"]), top_k=o["top_k"])
    penalties = [o[f"{name}_penalty"] for name in ("repetition", "presence", "frequency")]
    if o["logit_bias"] or any(penalties):
        sampling["logits_processors"] = make_logits_processors(
            o["logit_bias"],
            o["repetition_penalty"] or None,
            o["repetition_context_size"],
            o["presence_penalty"] or None,
            o["presence_context_size"],
            o["frequency_penalty"] or None,
            o["frequency_context_size"],
        )
    return sampling


def _response_format(body: dict, tokenizer, model) -> Optional[Constraint]:
    """``response_format`` as OpenAI reads it (``text``, ``json_object``,
    ``json_schema``), compiled now: a 400 naming it, with the reason, for a
    schema that cannot be enforced."""
    response_format = body.get("response_format")
    if response_format is None:
        return None
    try:
        return Constraint.from_response_format(response_format, tokenizer, model.vocab_size)
    except ValueError as e:
        raise RequestError(400, str(e), "response_format") from None


def _prompt(body: dict, kind: str, tokenizer, model, limit: int, tools: Optional[ToolRequest]) -> List[int]:
    """The prompt's token ids: the chat's messages through the template, or the text (or ids)."""
    try:
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError(400, "messages must be a non-empty array of messages", "messages")
            messages = [_message_text(m, i) for i, m in enumerate(messages)]
            prompt = _chat_prompt(tokenizer, messages, body, tools.template_tools if tools else None)
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
    return prompt


def _chat_prompt(tokenizer, messages: List[dict], body: dict, tools: Optional[List[dict]]) -> List[int]:
    """The chat's token ids: the tokenizer's chat template (or mlx-lm's
    role mapping when it has none), as mlx_lm.server builds them; tools that
    the template leaves out of the prompt get a 400."""
    if getattr(tokenizer, "has_chat_template", False):
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise RequestError(400, "chat_template_kwargs must be an object", "chat_template_kwargs")
        ids = _render(tokenizer, messages, tools, kwargs)
        if tools and ids == _render(tokenizer, messages, None, kwargs):
            raise RequestError(400, "tools are not supported by this model: its chat template ignores them", "tools")
        return ids
    return list(tokenizer.encode(convert_chat(messages, body.get("role_mapping"))))


def _render(tokenizer, messages: List[dict], tools: Optional[List[dict]], kwargs: dict) -> List[int]:
    try:
        return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **kwargs))
    except Exception as e:  # a template error is the request's (a role it does not take, ...)
        raise RequestError(400, f"the chat template cannot render these messages: {e}", "messages") from None
