"""Tool calls in the server, with the fields of OpenAI's API and mlx_lm.server:
the request's ``tools`` and ``tool_choice`` checked (:func:`parse_tools`), the
tool fields of the history's messages (:func:`tool_message_fields`), the
generated text split into content and ``tool_calls`` (:class:`ToolCallText`)
by mlx-lm's own seams: the tokenizer wrapper's tool-call markers and parser,
its ``TextStateMachine`` and mlx_lm.server's ``ToolCallFormatter``; and, for
``tool_choice`` ``required`` or a named function, the grammar of one call
(:func:`forced_call_grammar`) that constrained decoding writes it under."""

import json
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from mlx_lm.generate import TextStateMachine
from mlx_lm.server import ToolCallFormatter
from mlx_lm.tool_parsers import json_tools

from ..decoding.constraint import WHITESPACE, Constraint
from .config import RequestError

__all__ = [
    "TOOL_CHOICES",
    "ToolCallText",
    "ToolRequest",
    "forced_call_constraint",
    "forced_call_grammar",
    "parse_tools",
    "tool_call_text",
    "tool_message_fields",
]

TOOL_CHOICES = ("none", "auto", "required")
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # a function without parameters


@dataclass
class ToolRequest:
    """A request's checked tools: what the chat template gets, and what the
    response parses."""

    tools: List[dict]  # the tool definitions, as given
    choice: str  # "none", "auto", "required", or "function" (one named function)
    name: Optional[str] = None  # the function a named tool_choice forces

    @property
    def template_tools(self) -> Optional[List[dict]]:
        """What the chat template renders: no tools for ``tool_choice: none``."""
        return None if self.choice == "none" else self.tools

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def forced_tools(self) -> List[dict]:
        """The functions a forced call may name (their ``function`` objects)."""
        functions = [t["function"] for t in self.tools]
        return [f for f in functions if f["name"] == self.name] if self.choice == "function" else functions


def _bad(message: str, param: str = "tools") -> RequestError:
    return RequestError(400, message, param)


def _check_tool(tool: Any, i: int) -> str:
    """One tool definition (``{"type": "function", "function": {...}}``); its name."""
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise _bad(f'{where} must be an object with "type": "function"')
    function = tool.get("function")
    if not isinstance(function, dict):
        raise _bad(f"{where}.function must be an object with a name")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise _bad(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
    if not isinstance(function.get("description", ""), str):
        raise _bad(f"{where}.function.description must be a string")
    parameters = function.get("parameters", {})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise _bad(f"{where}.function.parameters must be a JSON schema of an object")
    if not isinstance(function.get("strict", False), bool):
        raise _bad(f"{where}.function.strict must be a boolean")
    return name


def _choice(choice: Any, names: List[str]) -> Tuple[str, Optional[str]]:
    """``tool_choice`` as (choice, forced name)."""
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise _bad(f"tool_choice must be {', '.join(TOOL_CHOICES)} or a function, got {choice!r}", "tool_choice")
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(function, dict):
        raise _bad(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    name = function.get("name")
    if name not in names:
        raise _bad(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
    return "function", name


def parse_tools(body: dict, kind: str, tokenizer) -> Optional[ToolRequest]:
    """The request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``,
    checked (None without tools); a 400 naming the field for anything wrong,
    and for tools that this model's chat template cannot take."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise _bad(f"tools must be an array of function definitions, got {type(tools).__name__}")
    if not isinstance(body.get("parallel_tool_calls", False), bool):
        raise _bad("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if not tools:
        if choice is not None:
            raise _bad("tool_choice is only allowed when tools are given", "tool_choice")
        return None
    if kind != "chat":
        raise _bad("tools are only taken by chat completions (/v1/chat/completions)")
    names = [_check_tool(tool, i) for i, tool in enumerate(tools)]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise _bad(f"tools name the function {duplicate!r} twice")
    choice, name = _choice(choice, names)
    if choice != "none" and not (getattr(tokenizer, "has_chat_template", False) and tokenizer.has_tool_calling):
        raise _bad(
            "tools are not supported by this model: its chat template has no tool-call format that mlx-lm can parse"
        )
    return ToolRequest(tools, choice, name)


def tool_message_fields(message: dict, i: int) -> dict:
    """A history message's tool fields, checked: an assistant's ``tool_calls``
    (arguments as objects, which is what chat templates render, as
    mlx_lm.server passes them) and a tool result's ``tool_call_id``."""
    where = f"messages[{i}]"
    fields = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if message["role"] != "assistant" or not isinstance(calls, list):
            raise _bad(f"{where}.tool_calls must be an array on an assistant message", "messages")
        fields["tool_calls"] = [_history_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls)]
    if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise _bad(f"{where}.tool_call_id must be a string: the id of the call this is the result of", "messages")
    return fields


def _history_call(call: Any, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _bad(f"{where} must be an object with a function and its name", "messages")
    if not isinstance(call.get("id", ""), str) or call.get("type", "function") != "function":
        raise _bad(f'{where} must have a string id and "type": "function"', "messages")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise _bad(f"{where}.function.arguments is not valid JSON: {e}", "messages") from None
    if not isinstance(arguments, dict):
        raise _bad(f"{where}.function.arguments must be a JSON object", "messages")
    return {**call, "function": {**function, "arguments": arguments}}


class ToolCallText:
    """Splits generated text, piece by piece, into content and tool calls:
    mlx-lm's ``TextStateMachine`` finds the tokenizer's tool-call markers,
    the tokenizer's parser reads each call and mlx_lm.server's
    ``ToolCallFormatter`` writes it (``{id, type, function: {name,
    arguments}}``, with ``index`` when streamed). A call the parser cannot
    read stays in the content, markers and all: nothing is dropped."""

    def __init__(self, tokenizer, tools: List[dict], streaming: bool):
        self.start, self.end = tokenizer.tool_call_start, tokenizer.tool_call_end or ""
        transitions = {"normal": [(self.start, "tool")], "tool": [(self.end, "normal")] if self.end else []}
        self.state = TextStateMachine(transitions).make_state("normal")
        self.formatter = ToolCallFormatter(tokenizer.tool_parser, tools, streaming)
        self.call_text: Optional[str] = None  # the text of the call being written (None: outside a call)
        self.made_call = False

    def feed(self, text: str) -> Tuple[str, List[dict]]:
        """The content and the calls that ``text`` completes."""
        self.state, segments = TextStateMachine.split(self.state, text)
        content, calls = [], []
        for state, piece in segments:
            if state == "tool":
                self.call_text = (self.call_text or "") + piece
                continue
            if self.call_text is not None:  # a call just ended
                text, call = self._call(closed=True)
                content.append(text)
                calls += call
            content.append(piece)
        return "".join(content), calls

    def finish(self, finish_reason: str) -> Tuple[str, List[dict], str]:
        """The rest of the content and calls, and the finish reason
        (``tool_calls`` where the generation stopped after a call)."""
        self.state, rest, _ = TextStateMachine.flush(self.state)
        content, calls = rest, []
        if self.call_text is not None:  # the text ended inside a call: parsed if it can be
            self.call_text += rest
            content, calls = self._call(closed=False)
        if self.made_call and finish_reason == "stop":
            finish_reason = "tool_calls"
        return content, calls, finish_reason

    def whole(self, text: str, finish_reason: str) -> Tuple[str, List[dict], str]:
        """``feed`` and ``finish`` at once: a whole generation's text."""
        content, calls = self.feed(text)
        rest, more, finish_reason = self.finish(finish_reason)
        return content + rest, calls + more, finish_reason

    def _call(self, closed: bool) -> Tuple[str, List[dict]]:
        text, self.call_text = self.call_text, None
        try:
            calls = self.formatter([text])
        except Exception:  # noqa: BLE001  (any parser's failure: the text was not a call it can read)
            calls = []
        if not calls:
            return self.start + text + (self.end if closed else ""), []
        self.made_call = True
        return "", calls


def tool_call_text(tokenizer, request: Optional[ToolRequest], streaming: bool) -> Optional[ToolCallText]:
    """What splits a request's text into content and tool calls (None: no
    tools, or ``tool_choice: none``: the text is all content)."""
    if request is None or request.choice == "none":
        return None
    return ToolCallText(tokenizer, request.tools, streaming)


def _marker(tokenizer, text: str) -> str:
    """A tool-call marker in llguidance's lark: the token itself where the
    marker is one token (an added token, which llguidance never spells out
    in bytes), else the text."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text)


def forced_call_grammar(tokenizer, request: ToolRequest) -> str:
    """The lark grammar (llguidance's) of exactly one call to one of the
    request's forced functions, in the format of mlx-lm's ``json_tools``
    parser (Hermes, Qwen): ``<tool_call>\n{"name": ..., "arguments":
    {...}}\n</tool_call>``, the arguments fitting the function's
    ``parameters``; a 400 for models whose calls have another format."""
    if tokenizer.tool_parser is not json_tools.parse_tool_call:
        raise _bad(
            "tool_choice 'required' or a named function needs a model whose tool calls are JSON "
            "(mlx-lm's json_tools parser: Hermes, Qwen); this model's are another format",
            "tool_choice",
        )
    rules = []
    for i, function in enumerate(request.forced_tools()):
        schema = {
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                "arguments": function.get("parameters") or NO_ARGUMENTS,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": {"whitespace_pattern": WHITESPACE},  # as response_format's JSON
        }
        rules.append(f"call_{i}: %json {json.dumps(schema)}")
    calls = " | ".join(f"call_{i}" for i in range(len(rules)))
    start, end = _marker(tokenizer, tokenizer.tool_call_start), _marker(tokenizer, tokenizer.tool_call_end)
    return "\n".join([f'start: {start} "\\n" ({calls}) "\\n" {end}', *rules]) + "\n"


def forced_call_constraint(tokenizer, vocab_size: int, request: ToolRequest) -> Constraint:
    """``tool_choice`` ``required`` or a named function as a constraint on
    the output (:func:`forced_call_grammar`), compiled now: a 400 naming
    ``tools`` where llguidance cannot enforce a function's parameters."""
    try:
        return Constraint.from_lark(forced_call_grammar(tokenizer, request), tokenizer, vocab_size)
    except ValueError as e:
        raise _bad(f"tools: {e}") from None
