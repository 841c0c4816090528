"""The server's application: :func:`make_app`."""

from typing import Optional

from .config import ServerConfig

__all__ = ["make_app"]


def make_app(model, tokenizer, config: Optional[ServerConfig] = None):
    """The Starlette application serving ``model`` (an :class:`MTPModel`) and
    its tokenizer; ``app.state.worker`` runs the generations."""
    # lazy: Starlette is the server's optional extra; importing the CLI must
    # work without it, so that it can say how to install it
    from .http import build_app

    return build_app(model, tokenizer, config)
