"""Every decoding setting in one place: :class:`DecodeSettings`.

The API (:func:`mlx_mtp.api.stream_generate`), the command lines
(:func:`mlx_mtp.arguments.decoding_settings`), the server and the decoder
(:class:`~mlx_mtp.decoding.decode.SpeculativeDecoder`) share one frozen
dataclass. It checks its values once, when it is made, with the messages the
CLIs print and the server returns (TypeError/ValueError); what depends on the
model (the adapter's masks, whether the policy decides) is decided once by
:meth:`DecodeSettings.resolve`, which the decoder calls.

Adding an option touches this class and the code that uses it. For example
``prefill_step_size`` (tokens per chunk of the prompt's prefill) is:

1. a field here with its default, and its range in :meth:`DecodeSettings._check_ranges`;
2. read where it acts: ``settings.prefill_step_size`` in
   :meth:`SpeculativeDecoder.prefill <mlx_mtp.decoding.decode.SpeculativeDecoder.prefill>`.

``stream_generate(..., prefill_step_size=512)`` reaches it because the API
builds the settings from its keywords by field name (those it does not list,
``lookup_ngram`` or a new field, pass through ``**options``); a CLI flag adds
one ``add_argument`` in :func:`mlx_mtp.arguments.add_decoding_args` and its
name in :func:`~mlx_mtp.arguments.decoding_settings`.
"""

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional, Tuple

import mlx.core as mx

from .constraint import Constraint
from .drafts import DEFAULT_LOOKUP, POLICY_MAX_COPY, POLICY_MIN_NGRAM
from .policy import MAX_BRANCHES

__all__ = [
    "MODES",
    "DEFAULT_LOOKUP_NGRAM",
    "DecodeSettings",
    "LogitsProcessor",
    "Sampler",
    "check_generation_args",
    "check_max_tokens",
    "check_sampling_args",
    "resolve_num_masks",
]

MODES = ("quadratic", "linear", "off")
DEFAULT_LOOKUP_NGRAM = 3  # the shortest run of last tokens prompt lookup matches (fixed settings)

# mlx-lm's sampler: logprobs (1, V) -> token (1,); logits processor: (tokens, logits (1, V)) -> logits
Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# the settings that, given, fix the decoding instead of the per-step policy
FIXING = ("num_masks", "mode", "lookup", "branches")


def _number(name: str, value: Any, integer: bool):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_sampling_args(temp: Any = 0.0, top_p: Any = 1.0, top_k: Any = 0):
    """Raise TypeError/ValueError for sampling settings outside their ranges:
    ``temp`` finite, >= 0; ``top_p`` in [0, 1] (0 and 1: off); ``top_k`` >= 0 (0: off)."""
    _number("temp", temp, False)
    if temp < 0:
        raise ValueError(f"temp must be >= 0, got {temp}")
    _number("top_p", top_p, False)
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1] (0 or 1: off), got {top_p}")
    _number("top_k", top_k, True)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")


def check_max_tokens(max_tokens: Any):
    """Raise TypeError/ValueError unless ``max_tokens`` is -1 (no limit) or >= 1."""
    _number("max_tokens", max_tokens, True)
    if max_tokens == 0 or max_tokens < -1:
        raise ValueError(f"max_tokens must be non-zero: a number of tokens >= 1, or -1 for no limit (got {max_tokens})")


def check_generation_args(max_tokens: Any = -1, temp: Any = 0.0, top_p: Any = 1.0, top_k: Any = 0):
    """Raise TypeError/ValueError, with the message the CLIs and the server
    print, for arguments outside their ranges: ``max_tokens``
    (:func:`check_max_tokens`) and the sampling settings (:func:`check_sampling_args`)."""
    check_max_tokens(max_tokens)
    check_sampling_args(temp, top_p, top_k)


def resolve_num_masks(model, num_masks: Optional[int], mode: str) -> int:
    """The k to decode with: 0 in mode ``off`` or without an adapter; by
    default the adapter's choice for this device (``MTPModel.default_num_masks``)."""
    trained = model.num_masks
    if num_masks is not None and num_masks > trained:
        if trained == 0:
            raise ValueError(f"num_masks={num_masks}, but the model has no MTP adapter (no mask tokens)")
        raise ValueError(f"num_masks={num_masks} is more than the adapter was trained with ({trained})")
    if mode == "off":
        return 0
    return model.default_num_masks if num_masks is None else num_masks


@dataclass(frozen=True)
class DecodeSettings:
    """How to decode: every setting, checked when made.

    By default (``policy`` None and none of ``num_masks``, ``mode``,
    ``lookup``, ``branches`` given) a per-step policy chooses each step's
    plan from this machine's calibrated costs; any of them given (or
    ``policy=False``) fixes the decoding, the others taking their defaults.
    :meth:`resolve` decides both for a model; its result has every field set
    and, with ``policy`` True, ``num_masks``, ``lookup`` and ``branches`` are
    the most the policy may feed.
    """

    num_masks: Optional[int] = None  # masks' speculations per step (None: the adapter's k for this device)
    mode: Optional[str] = None  # "quadratic", "linear" or "off" (None: quadratic)
    lookup: Optional[int] = None  # most tokens copied from the text or the datastore per step (0: none)
    branches: Optional[int] = None  # greedy, quadratic: the sampler head's b most likely first tokens
    policy: Optional[bool] = None  # None: on unless a setting above is given
    lookup_ngram: Optional[int] = None  # shortest run of last tokens prompt lookup matches
    use_datastore: bool = True  # drafts from the adapter's datastore where the text has none
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    sampler: Optional[Sampler] = None  # mlx-lm's make_sampler; replaces temp/top_p/top_k
    logits_processors: Tuple[LogitsProcessor, ...] = ()  # mlx-lm's make_logits_processors
    prefill_step_size: int = 2048  # prompt tokens per prefill chunk
    constraint: Optional[Constraint] = None  # a grammar the output must follow (applied after logits_processors)

    def __post_init__(self):
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors or ()))
        check_sampling_args(self.temp, self.top_p, self.top_k)
        self._check_ranges()
        self._check_sampler()
        self._check_branches()

    def _check_ranges(self):
        for name, low in (("num_masks", 0), ("lookup", 0), ("branches", 1), ("lookup_ngram", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {self.prefill_step_size}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}': expected one of {', '.join(MODES)}")

    def _check_sampler(self):
        if self.sampler is not None:
            if not callable(self.sampler):
                raise TypeError(f"sampler must be callable (mlx-lm's make_sampler), got {type(self.sampler).__name__}")
            if self.temp != 0 or self.top_p != 1.0 or self.top_k != 0:
                raise ValueError("pass either a sampler or temp/top_p/top_k, not both")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise TypeError(
                f"constraint must be a Constraint (mlx_mtp.decoding.constraint), got {type(self.constraint).__name__}"
            )
        if not all(callable(p) for p in self.logits_processors):
            raise TypeError("logits_processors must be a list of callables (mlx-lm's make_logits_processors)")

    def _check_branches(self):
        if (self.branches or 1) > 1:
            if self.mode not in (None, "quadratic"):
                raise ValueError("branches > 1 needs mode 'quadratic'")
            if self.temp != 0 or self.sampler is not None:
                raise ValueError("branches > 1 needs greedy decoding (temp 0, no sampler)")
            if self.logits_processors:
                raise ValueError("branches > 1 cannot apply logits_processors (use branches=1)")
        if self.policy and self.mode == "linear":
            raise ValueError("the policy decodes in mode 'quadratic' (pass policy=False for mode 'linear')")

    # --- what the settings mean for a model ----------------------------------------------------
    @property
    def fixed(self) -> Tuple[str, ...]:
        """The settings given that fix the decoding (:data:`FIXING`)."""
        return tuple(name for name in FIXING if getattr(self, name) is not None)

    @property
    def resolved(self) -> bool:
        """Every field set (as :meth:`resolve` returns them): taken as they are."""
        return self.policy is not None and None not in (
            self.num_masks,
            self.mode,
            self.lookup,
            self.branches,
            self.lookup_ngram,
        )

    @property
    def greedy(self) -> bool:
        """Drafts are the sampler head's argmax (temperature 0, or a caller's sampler)."""
        return self.temp == 0

    @property
    def trees(self) -> bool:
        """Branches and a copy beside the chain can be verified: greedy, no sampler or processors."""
        return self.greedy and self.sampler is None and not self.logits_processors

    def resolve(self, model) -> "DecodeSettings":
        """The settings the decoder runs for ``model`` (an MTPModel), every field
        set: the policy's limits (the adapter's masks for this device, copies of
        up to ``POLICY_MAX_COPY`` tokens, ``MAX_BRANCHES`` branches where
        :attr:`trees`), or the fixed settings with defaults for those not
        given (quadratic, lookup ``DEFAULT_LOOKUP``, one branch, the adapter's
        k for this device). ValueError where they do not fit the model."""
        if self.resolved:
            return self._fit(model, self.num_masks, self.mode)
        fixed = self.fixed
        policy = not fixed if self.policy is None else self.policy
        if policy and fixed:
            raise ValueError(
                f"the policy chooses the masks, copies and branches itself: pass either policy=True "
                f"or {', '.join(fixed)}, not both"
            )
        if not policy:
            out = replace(
                self,
                policy=False,
                lookup=DEFAULT_LOOKUP if self.lookup is None else self.lookup,
                branches=1 if self.branches is None else self.branches,
                lookup_ngram=DEFAULT_LOOKUP_NGRAM if self.lookup_ngram is None else self.lookup_ngram,
            )
            return out._fit(model, self.num_masks, self.mode or "quadratic")
        # the adapter's masks for this device (decode_num_masks: where it was measured that they do not pay, none)
        k = model.default_num_masks
        out = replace(
            self,
            policy=True,
            lookup=POLICY_MAX_COPY,
            lookup_ngram=POLICY_MIN_NGRAM if self.lookup_ngram is None else self.lookup_ngram,
            branches=MAX_BRANCHES if (self.trees and k > 0) else 1,
        )
        return out._fit(model, k, "quadratic")

    def _fit(self, model, num_masks: Optional[int], mode: str) -> "DecodeSettings":
        """With k decided for ``model``; the mode "off" where nothing is
        drafted (no masks, no copies)."""
        k = resolve_num_masks(model, num_masks, mode)
        if self.constraint is not None and self.constraint.vocab_size != model.vocab_size:
            raise ValueError(
                f"the constraint was made for a vocabulary of {self.constraint.vocab_size} tokens, "
                f"the model has {model.vocab_size}"
            )
        if self.branches > 1 and k == 0:
            raise ValueError(
                "branches > 1 needs the masks' speculations: pass num_masks >= 1 "
                "(k is 0 here: no adapter, or the adapter's choice for this device)"
            )
        lookup = self.lookup if mode != "off" else 0
        # k = 0 with lookup: copied drafts only
        return replace(self, num_masks=k, lookup=lookup, mode=mode if (k or lookup) else "off")

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """The fields' names (the API's keyword arguments of the same names)."""
        return tuple(f.name for f in fields(cls))
