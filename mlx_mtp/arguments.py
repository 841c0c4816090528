"""Argument types for the CLIs: ranges checked by argparse itself, so a bad
value ends in argparse's one-line usage error and exit status 2 (the one
status for user errors, :data:`mlx_mtp.errors.USER_ERROR_EXIT`)."""

import argparse
import math
from typing import Callable, Optional


def int_range(lo: int, hi: Optional[int] = None, also: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``lo..hi`` (no upper bound if None),
    or exactly ``also`` (a documented special value such as -1)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value == also or (value >= lo and (hi is None or value <= hi)):
            return value
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        extra = f" (or {also})" if also is not None else ""
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be {span}{extra}")

    parse.__name__ = "integer"
    return parse


def float_range(lo: float, hi: float = math.inf, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[lo, hi]`` (``(lo, hi]`` if ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi:
            return value
        left = "(" if lo_open else "["
        raise argparse.ArgumentTypeError(f"{text} is out of range: must be in {left}{lo:g}, {hi:g}]")

    parse.__name__ = "number"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)


def add_model_args(parser: argparse.ArgumentParser):
    """``--model`` and ``--adapter-path``, as every command that loads a
    model with its adapter takes them (:func:`mlx_mtp.loading.load`)."""
    parser.add_argument("--model", default=None, help="local model directory or hub id (default: the default model)")
    parser.add_argument(
        "--adapter-path", default=None, help="MTP adapter directory (default: the one shipped for the model, if any)"
    )
