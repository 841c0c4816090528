"""Store an adapter's training responses in it as a datastore (see
:mod:`mlx_mtp.decoding.datastore`), or remove it.

    python -m mlx_mtp.datastore --adapter-path A --data DIR   # store train.jsonl's responses in A
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .decoding.datastore import Datastore, hit_rate
from .errors import cli_main
from .loading import edit_adapter
from .training.data import response_tokens


def response_documents(data_dir: Path, tokenizer, split: str = "train") -> List[List[int]]:
    """The responses of ``split``.jsonl, each from the chat template's
    generation prompt on (e.g. ``<|im_start|>assistant\\n``, which the text
    being drafted for also has): what the model itself writes."""
    return response_tokens(data_dir / f"{split}.jsonl", tokenizer, prefix=_generation_header_length(tokenizer))


def _generation_header_length(tokenizer) -> int:
    """Tokens the chat template adds to open the assistant's turn (0 without a template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return 0
    msgs = [{"role": "user", "content": "x"}]
    try:
        with_header = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        without = tokenizer.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    except Exception:
        return 0
    if not with_header.startswith(without):
        return 0
    return len(tokenizer.encode(with_header[len(without) :], add_special_tokens=False))


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_mtp.datastore", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="mlx-lm model (default: the default model)")
    p.add_argument("--adapter-path", required=True, help="adapter directory to update")
    p.add_argument(
        "--data", default=None, help="directory with train.jsonl (and valid.jsonl: the hit rate is measured on it)"
    )
    p.add_argument("--remove", action="store_true", help="remove the adapter's datastore")
    args = p.parse_args(argv)
    if not args.remove and args.data is None:
        p.error("--data is required (or --remove)")

    def edit(model, tokenizer, recipe, state):
        if args.remove:
            state.datastore = None
            recipe.pop("datastore_tokens", None)
            return
        store = Datastore.from_documents(response_documents(Path(args.data), tokenizer, "train"))
        state.datastore = store
        recipe["datastore_tokens"] = store.num_tokens
        msg = f"datastore: {store.num_tokens} tokens"
        if (Path(args.data) / "valid.jsonl").exists():
            rate = hit_rate(store, response_documents(Path(args.data), tokenizer, "valid"))
            msg += (
                f"; on valid responses it drafts at {rate['share_drafted']:.0%} of positions, "
                f"{rate['leading_right_per_draft']:.2f} leading tokens right per draft"
            )
        print(msg)

    edit_adapter(args.model, args.adapter_path, edit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
