"""Frequency-ranked draft vocabulary for the sampler head.

On small models the output projection dominates the sampler chain (one call
per speculated token over the whole vocabulary). Drafting among the N most
frequent response tokens of the training data makes each call V/N times
cheaper; the base model still verifies over the whole vocabulary, so outputs
do not change, only how often a rare token is drafted.

    python -m mlx_mtp.draft_vocab --model M --adapter-path A --data DIR --size 8192
"""

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .arguments import non_negative_int
from .errors import cli_main
from .loading import edit_adapter
from .training.data import response_tokens

DEFAULT_SIZE = 8192  # the shipped adapter's: 97% of its training response tokens (docs/adapter.md)


def frequent_tokens(responses: Iterable[Sequence[int]], size: int, always: Sequence[int] = ()) -> np.ndarray:
    """The ``size`` most frequent ids in ``responses`` (``always`` included), sorted."""
    counts = Counter()
    for tokens in responses:
        counts.update(int(t) for t in tokens)
    chosen = list(dict.fromkeys(int(t) for t in always))
    for token, _ in counts.most_common():
        if len(chosen) >= size:
            break
        if token not in chosen:
            chosen.append(token)
    return np.array(sorted(chosen[:size]), dtype=np.int32)


def coverage(responses: Iterable[Sequence[int]], ids: np.ndarray) -> float:
    """Share of response tokens that are in ``ids``."""
    inside = total = 0
    ids = set(ids.tolist())
    for tokens in responses:
        total += len(tokens)
        inside += sum(1 for t in tokens if int(t) in ids)
    return inside / max(total, 1)


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_mtp.draft_vocab", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="mlx-lm model (default: the default model)")
    p.add_argument("--adapter-path", required=True, help="adapter directory to update")
    p.add_argument("--data", required=True, help="directory with train.jsonl (and valid.jsonl)")
    p.add_argument(
        "--size",
        type=non_negative_int,
        default=DEFAULT_SIZE,
        help=f"draft vocabulary size (0 removes it; default {DEFAULT_SIZE})",
    )
    args = p.parse_args(argv)

    def edit(model, tokenizer, recipe, state):
        if args.size <= 0:
            model.set_draft_vocab(None)
            recipe.pop("draft_vocab_size", None)
            return
        train = response_tokens(Path(args.data) / "train.jsonl", tokenizer)
        ids = frequent_tokens(train, args.size, always=tokenizer.eos_token_ids)
        model.set_draft_vocab(ids)
        recipe["draft_vocab_size"] = int(args.size)
        msg = f"draft vocabulary: {len(ids)} of {model.vocab_size} tokens, covering {coverage(train, ids):.2%} of train"
        if (Path(args.data) / "valid.jsonl").exists():
            valid = response_tokens(Path(args.data) / "valid.jsonl", tokenizer)
            msg += f", {coverage(valid, ids):.2%} of valid"
        print(msg + " response tokens")

    edit_adapter(args.model, args.adapter_path, edit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
