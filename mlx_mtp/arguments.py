"""Argument types for the CLIs: ranges checked by argparse itself, so a bad
value ends in argparse's one-line usage error and exit status 2 (the one
status for user errors, :data:`mlx_mtp.errors.USER_ERROR_EXIT`)."""

import argparse
import math
from typing import Callable, Optional

from .decoding.drafts import DEFAULT_LOOKUP
from .decoding.settings import MODES, DecodeSettings
from .model.masks import MAX_MASKS


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


def add_decoding_args(parser: argparse.ArgumentParser):
    """The flags that fix a decoding setting instead of the per-step policy
    (``--num-masks``, ``--mode``, ``--lookup``, ``--branches``,
    ``--no-policy``) and ``--no-datastore``, as generate and the server take
    them; :func:`decoding_settings` turns them into the settings."""
    parser.add_argument(
        "--num-masks",
        type=int_range(0, MAX_MASKS),
        default=None,
        help=(
            "fix the masks' speculated tokens per step (default: the policy chooses each step; "
            "with fixed settings, the adapter's choice for this device; 0: copied drafts only)"
        ),
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="fix the decoding layout (the policy decodes quadratic; 'off': plain decoding)",
    )
    parser.add_argument(
        "--lookup",
        type=non_negative_int,
        default=None,
        help=(
            "fix prompt lookup: where the last tokens occurred before in the prompt or output, verify up to N "
            f"of the tokens that followed them instead of the masks' speculations (fixed: default {DEFAULT_LOOKUP}; "
            "0: off)"
        ),
    )
    parser.add_argument(
        "--branches",
        type=positive_int,
        default=None,
        help=(
            "fix the branches (greedy, quadratic, k >= 1): verify the sampler head's B most likely first "
            "speculations, each with its own chain, in one pass (fixed: default 1)"
        ),
    )
    parser.add_argument(
        "--no-policy",
        action="store_true",
        help=(
            "decode with fixed settings (those given, defaults for the rest) instead of the per-step policy, "
            "which chooses from this machine's measured costs (python -m mlx_mtp.calibrate)"
        ),
    )
    parser.add_argument("--no-datastore", action="store_true", help="no drafts from the adapter's datastore")


def decoding_settings(args: argparse.Namespace) -> DecodeSettings:
    """The :class:`~mlx_mtp.decoding.settings.DecodeSettings` of
    :func:`add_decoding_args`'s flags, and of ``--temp``/``--top-p``/``--top-k``
    where the command has them (TypeError/ValueError: the message to print)."""
    sampling = {name: getattr(args, name) for name in ("temp", "top_p", "top_k") if hasattr(args, name)}
    return DecodeSettings(
        num_masks=args.num_masks,
        mode=args.mode,
        lookup=args.lookup,
        branches=args.branches,
        policy=False if args.no_policy else None,
        use_datastore=not args.no_datastore,
        **sampling,
    )
