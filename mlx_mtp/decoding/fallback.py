"""Plain decoding for a model the MTP adapter cannot serve.

A model without the adapter's seams (recurrent or state-space layers, caches
that cannot hold speculated tokens: :mod:`mlx_mtp.model.architectures`) still
decodes through the same API: :class:`~mlx_mtp.decoding.decode.SpeculativeDecoder`
asks :func:`plain_fallback` and, where it gets one, hands the whole generation
to mlx-lm's own ``generate_step``, one token per step, so every token is
mlx-lm's. The first time a model takes this path a one-line notice goes to
stderr.
"""

import sys
import weakref
from typing import Callable, Iterable, Iterator, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from .steps import Step

# the models whose notice was printed, by id; the weak reference tells a model
# from a later one that reuses a collected model's id
_NOTIFIED: dict = {}


def notice(model) -> str:
    """The one line saying why ``model`` (an MTPModel) decodes plainly."""
    s = model.support
    return f"notice: model type '{s.model_type}' decodes without speculation: {s.reason}"


def plain_fallback(model) -> Optional[Callable]:
    """:func:`plain_steps` for an MTPModel without the adapter's seams
    (printing the notice once per model), None for one with them."""
    if model.support.supported:
        return None
    seen = _NOTIFIED.get(id(model))
    if seen is None or seen() is not model:
        _NOTIFIED[id(model)] = weakref.ref(model)
        print(notice(model), file=sys.stderr)
    return plain_steps


def plain_steps(decoder, prompt: Sequence[int], max_tokens: int, eos_token_ids: Iterable[int]) -> Iterator:
    """``decoder.steps`` through mlx-lm's ``generate_step``: one
    :class:`~mlx_mtp.decoding.steps.Step` per token, with the decoder's
    sampling settings, budget (``max_tokens``, context limit) and EOS rule."""
    eos = set(int(t) for t in eos_token_ids)
    budget = decoder.budget(len(prompt), max_tokens)
    if budget == 0:
        return
    settings = decoder.settings
    sampler = settings.sampler
    if sampler is None and not settings.greedy:
        sampler = make_sampler(settings.temp, settings.top_p, top_k=settings.top_k)
    processors = list(settings.logits_processors)
    if settings.constraint is not None:  # the grammar last, as the speculative decoder applies it
        processors.append(settings.constraint.logits_processor())
    steps = generate_step(
        mx.array(list(prompt), dtype=mx.int32),
        decoder.model.model,
        max_tokens=budget,
        sampler=sampler,
        logits_processors=processors or None,
        prefill_step_size=settings.prefill_step_size,
    )
    for token, logprobs in steps:
        token = int(token)
        yield Step(tokens=[token], proposed=0, accepted=0, logprobs=[logprobs])
        if token in eos:
            return
