"""Calibration's command line: measure what one forward costs on this
machine for this model, alone and in batches of requests, print it and cache
it (:mod:`mlx_mtp.calibration`), with a progress bar on stderr::

    python -m mlx_mtp.calibrate [--model M] [--adapter-path A] [--max-width T] [--gated]
"""

import argparse
import sys

from tqdm import tqdm

from .arguments import add_model_args
from .blas import describe
from .calibration import MAX_WIDTH, cost_model, feeds_masks
from .errors import cli_main
from .loading import load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.calibrate",
        description="Measure the cost of a forward for this model on this machine, alone and batched, "
        "print it and cache it.",
    )
    add_model_args(p)
    p.add_argument(
        "--max-width",
        type=int,
        default=MAX_WIDTH,
        help=f"widest forward to measure (default: {MAX_WIDTH}; wider ones extrapolate)",
    )
    p.add_argument(
        "--gated",
        action="store_true",
        help="measure the gated path (masks) too where the adapter feeds none on this device "
        "(by default only what the decoder uses here is measured)",
    )
    return p


@cli_main(user_errors=(ValueError, OSError))  # MTPError is a ValueError
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_width < 2:
        raise ValueError(f"--max-width must be >= 2, got {args.max_width}")
    model, _ = load(args.model, adapter_path=args.adapter_path)
    with tqdm(desc="timings", unit="timing", total=0, dynamic_ncols=True, leave=False) as bar:

        def progress(done: int, most: int):
            bar.total = most
            bar.update(done - bar.n)

        gated = args.gated or feeds_masks(model)
        result = cost_model(model, refresh=True, max_width=args.max_width, gated=gated, batched=True, progress=progress)
    table = result.costs.table
    print(f"BLAS: {describe()}")
    print(f"weights: {table.identity['dtype']}, device: {table.identity['device']}, MLX {table.identity['mlx']}")
    took = f"measured in {table.seconds:.1f} s, {table.timings} timings"
    print(f"seconds per forward over T new tokens after C cached ones ({took}):")
    print(result.costs.describe())
    where = f"cached in {result.path}" if result.written else f"not cached ({result.path.parent} is not writable)"
    print(where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
