"""``mlx_mtp <command> ...``: one entry point for every CLI, as ``mlx_lm``'s
``cli.py``; a command's module is imported only when it runs.

``python -m mlx_mtp generate --prompt hi`` is ``python -m mlx_mtp.generate
--prompt hi`` (and the ``mlx_mtp.generate`` console script).
"""

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import List, Optional

from .errors import USER_ERROR_EXIT, MTPError, cli_main

# command -> what it does (the module is mlx_mtp.<command>, its entry point main())
COMMANDS = {
    "generate": "generate text with an MTP adapter (speculative decoding)",
    "server": "an OpenAI-compatible HTTP server",
    "benchmark": "measure speed and tokens/step against plain decoding",
    "lora": "train an MTP adapter (mask embeddings, gated LoRA, sampler head)",
    "distill": "write training data from the base model's own responses",
    "datastore": "add a datastore of responses to an adapter",
    "draft_vocab": "add a draft vocabulary to an adapter",
    "calibrate": "measure this machine's verification costs",
    "check": "check that a model and adapter decode exactly",
    "launch": "run a command as several processes of MLX's ring backend on this machine",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mlx_mtp <command> [options]   (mlx_mtp <command> --help for a command's options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else USER_ERROR_EXIT
    if argv[0] == "--version":
        try:
            print(version("mlx-mtp"))
        except PackageNotFoundError:
            print("mlx-mtp (not installed)")
        return 0
    command = argv[0].replace("-", "_")
    if command not in COMMANDS:
        raise MTPError(f"unknown command '{argv[0]}'; one of: {', '.join(COMMANDS)}")
    module = importlib.import_module(f"mlx_mtp.{command}")
    sys.argv = [f"mlx_mtp {command}", *argv[1:]]
    return module.main()


if __name__ == "__main__":
    sys.exit(main())
