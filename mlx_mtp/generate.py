"""Command line generation with MTP speculative decoding (like ``mlx_lm.generate``)::

    python -m mlx_mtp.generate --model M [--adapter-path A] --prompt P|-
        [--max-tokens N] [--temp T] [--top-p P] [--top-k K] [--seed S]
        [--num-masks K] [--mode quadratic|linear|off] [--lookup N] [--branches B] [--no-policy]
        [--system-prompt S]
        [--ignore-chat-template] [--verbose true|false]

The Python API (``generate``, ``stream_generate``, ...) is :mod:`mlx_mtp.api`,
exported by the package: ``from mlx_mtp import generate``.
"""

import argparse
import sys
from typing import Optional, Sequence

import mlx.core as mx

from .api import (  # noqa: F401  (re-exported for code that imported the API from here)
    DEFAULT_MAX_TOKENS,
    MTPGenerationResponse,
    check_generation_args,
    check_text,
    generate,
    make_decoder,
    propose,
    stream_generate,
)
from .arguments import add_decoding_args, add_model_args, decoding_settings
from .decoding.settings import check_max_tokens
from .errors import cli_main
from .loading import load

DEFAULT_PROMPT = "hello"


# --- command line ---------------------------------------------------------------------------


def _str2bool(s: str) -> bool:
    if s.lower() in ("true", "t", "1", "yes", "y"):
        return True
    if s.lower() in ("false", "f", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.generate",
        description="Generate text with MTP speculative decoding (output identical to mlx-lm's).",
    )
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="the message ('-' reads stdin)")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the raw prompt without the chat template")
    p.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=("maximum number of tokens to generate"),
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--top-k", type=int, default=0, help="sample among the top k tokens only (0: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    add_decoding_args(p)
    p.add_argument("--verbose", type=_str2bool, default=True, help="print statistics after the text (default: true)")
    return p


def _read_prompt(arg: str) -> str:
    """The prompt: the argument (``\\n``, ``\\t`` unescaped) or, for ``-``, stdin as UTF-8."""
    prompt = arg.replace("\\n", "\n").replace("\\t", "\t")
    if prompt == "-":
        stdin = sys.stdin
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"stdin is not UTF-8 ({e.reason} at byte {e.start})"
            raise ValueError(f"the prompt is not valid text: {reason}") from None
    check_text(prompt)
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    return prompt


@cli_main(user_errors=(ValueError, TypeError, OSError))  # MTPError (AdapterError, ModelLoadError) is a ValueError
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.seed is not None:
        mx.random.seed(args.seed)
    check_max_tokens(args.max_tokens)
    settings = decoding_settings(args)
    prompt = _read_prompt(args.prompt)
    if args.system_prompt is not None:
        check_text(args.system_prompt, "the system prompt")
    model, tokenizer, state = load(args.model, adapter_path=args.adapter_path, return_state=True)
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = [] if args.system_prompt is None else [{"role": "system", "content": args.system_prompt}]
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)
    # every check (settings against the model, the prompt) runs before any output
    text = generate(
        model,
        tokenizer,
        ids,
        max_tokens=args.max_tokens,
        verbose=args.verbose,
        settings=settings,
        state=state,
    )
    if not args.verbose:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
