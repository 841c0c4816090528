"""The server's settings and limits (:class:`ServerConfig`), and its error type."""

from dataclasses import dataclass, field
from typing import Optional

from ..decoding.settings import DecodeSettings
from ..decoding.state import DecodingState

__all__ = ["DEFAULT_MAX_TOKENS", "MAX_BODY_BYTES", "MAX_STOP_STRINGS", "ROLES", "RequestError", "ServerConfig"]

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
    max_batch: int = 8  # requests decoded together, one batched step for all
    # the batch's caches' total size (each request counted for its prompt and max_tokens);
    # requests beyond it wait in the queue (one alone is served whatever its size)
    batch_bytes: int = 2 << 30


class RequestError(Exception):
    """A request that cannot be served: an HTTP status and an OpenAI-style error."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
