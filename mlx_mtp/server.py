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

How it works: one worker thread owns the model and decodes the requests of a
bounded queue together, joining and leaving one batch at step boundaries (at
most ``--max-batch`` of them and ``--batch-bytes`` of cache; the others wait),
each getting exactly what it would get alone; the HTTP side (Starlette on
uvicorn, ``pip install -e ".[server]"``) only parses, queues and streams. The caches of recent conversations are kept
(bounded by count and bytes) and a request reuses the one sharing the longest
prefix with its prompt. A client that disconnects leaves the batch at the
next step; a failing generation ends its own request with an error.
Bad requests get a 4xx with an OpenAI-style error body. See docs/serving.md.

This module is the command line; the server itself is :mod:`mlx_mtp.serving`.
"""

import argparse
import socket
import sys
from typing import Optional, Sequence

from .api import prepare_decoding
from .arguments import add_decoding_args, add_model_args, decoding_settings
from .decoding.settings import check_max_tokens
from .errors import cli_main
from .loading import load
from .serving.app import make_app
from .serving.config import DEFAULT_MAX_TOKENS, RequestError, ServerConfig
from .serving.requests import parse_request

__all__ = ["RequestError", "ServerConfig", "main", "make_app", "parse_request", "setup_arg_parser"]


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
    d = ServerConfig()  # the limits' defaults
    limits = [
        ("--prompt-cache-size", d.cache_count, "conversations whose caches are kept"),
        ("--prompt-cache-bytes", d.cache_bytes, "their total size in bytes"),
        ("--max-queue", d.max_queue, "requests waiting or running at once; more get a 503"),
        ("--max-batch", d.max_batch, "requests decoded together, in one batched step"),
        (
            "--batch-bytes",
            d.batch_bytes,
            "the batch's caches in bytes, each request counted for its prompt and max_tokens; "
            "requests beyond wait in the queue",
        ),
    ]
    for flag, default, what in limits:
        p.add_argument(flag, type=int, default=default, help=f"{what} (default: {default})")
    p.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="uvicorn's log level"
    )
    return p


@cli_main(user_errors=(ValueError, TypeError, OSError))
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        raise ValueError('the server needs its extra: pip install -e ".[server]" (starlette, uvicorn)') from None
    check_max_tokens(args.max_tokens)
    settings = decoding_settings(args)
    for name in ("port", "prompt_cache_size", "prompt_cache_bytes", "max_queue", "max_batch", "batch_bytes"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'port' else 1}")
    model, tokenizer, state = load(args.model, adapter_path=args.adapter_path, return_state=True)
    prepare_decoding(model, settings, state)  # the settings against the model; calibrates once for the policy
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    config = ServerConfig(
        model_id=args.model or "default_model",
        max_tokens=args.max_tokens,
        decoding=settings,
        state=state,
        cache_count=args.prompt_cache_size,
        cache_bytes=args.prompt_cache_bytes,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_bytes=args.batch_bytes,
    )
    app = make_app(model, tokenizer, config)
    host, port = sock.getsockname()[:2]
    print(f"mlx_mtp.server: serving {config.model_id} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
