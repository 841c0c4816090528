"""Response bodies as ``mlx_lm.server`` (and OpenAI) write them: the chunk or
completion object, the ``usage`` block and the ``speculation`` block."""

from typing import Any, Dict, List, Optional, Sequence

from .requests import Job

__all__ = ["chunk", "speculation", "usage"]


def usage(stats: dict) -> dict:
    prompt, completion = stats.get("prompt_tokens", 0), stats.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": stats.get("cached_tokens", 0)},
    }


def speculation(stats: dict) -> dict:
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
        "forced_tokens": stats.get("forced_tokens", 0),  # drafted for free: a response_format forced them
    }


def chunk(
    job: Job,
    text: str,
    finish_reason: Optional[str],
    logprobs: List[dict],
    stream: bool,
    tool_calls: Sequence[dict] = (),
) -> dict:
    """A response object as mlx_lm.server (and OpenAI) writes it; a message
    with tool calls and no text has ``content: null``, as OpenAI's."""
    obj = ("chat.completion.chunk" if stream else "chat.completion") if job.kind == "chat" else "text_completion"
    choice: Dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if logprobs:
        choice["logprobs"] = {"content": logprobs}
    if job.kind == "chat":
        message = {"role": "assistant"}
        if text or not stream:
            message["content"] = text if text or not tool_calls else None
        if tool_calls:
            message["tool_calls"] = list(tool_calls)
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
