"""Train an MTP adapter (mask embeddings, gated LoRA, sampler head) for an
mlx-lm model, locally, with one command:

    python -m mlx_mtp.lora --model MODEL --train --data DIR [--iters N] ...
    python -m mlx_mtp.lora -c config.yaml

Without ``--data``, ``--train`` makes a complete adapter from nothing but the
model (its own data, training, packaging; :mod:`mlx_mtp.make_adapter`).
``DIR`` holds ``train.jsonl`` and ``valid.jsonl`` in mlx-lm's formats
(``messages``, ``prompt``/``completion``, ``text``); ``python -m
mlx_mtp.distill`` writes them from the base model's own responses. Flags follow
``mlx_lm.lora``; a YAML config (``-c``) takes the same names with underscores,
and flags given on the command line win over it.

Several processes train data-parallel when started as ranks of MLX's ring
backend, on one machine or on several:

    python -m mlx_mtp.launch -n 2 -- -m mlx_mtp.lora ...
    mlx.launch --hosts mac1,mac2 --backend ring --python $(which python) -- -m mlx_mtp.lora ...

Ctrl-C saves a checkpoint and stops; ``--resume-adapter-file`` continues it.
Errors a user can cause (options, config, data, adapters, a full disk, an
interrupt) end in one line on stderr and exit status 2.
"""

import sys
from typing import List, Optional

from .errors import cli_main
from .make_adapter import make_adapter
from .train_adapter import (  # noqa: F401  (the command's option table and steps, used by tests and tools)
    CLI_ERRORS,
    CONFIG_DEFAULTS,
    OPTIONS,
    UsageError,
    build_parser,
    resolve_args,
    run,
    train_args,
)


@cli_main(**CLI_ERRORS)
def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; a user-caused error (bad option, config, data, adapter,
    a file that cannot be written, an interrupt) ends in one line on stderr
    and :data:`~mlx_mtp.errors.USER_ERROR_EXIT`."""
    args = resolve_args(argv)
    if args.train and args.data is None:  # the one-command adapter: data, training, packaging
        return make_adapter(args, argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
