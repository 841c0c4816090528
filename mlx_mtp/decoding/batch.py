"""Many generations at once: :class:`BatchDecoder` (continuous batching).

Requests join (:meth:`BatchDecoder.add`) and leave (:meth:`BatchDecoder.remove`,
or when they finish) a running batch between steps; :meth:`BatchDecoder.step`
takes one step of every active row and says what each emitted
(:class:`BatchEvent`). Each row is a generation of its own: its settings
(sampling, logits processors, mode, masks, the policy), its drafts (the
masks' chain, prompt lookup, the datastore), its cache, its policy and its
random stream (:mod:`mlx_mtp.decoding.randomness`), so each row's output is
the output of the same request decoded alone.

A row that raises ends alone: its event carries the error and the others go on.
"""

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

from ..model.cache import SpecCache
from .decode import SpeculativeDecoder
from .drafts import DraftFn
from .randomness import RandomStream
from .settings import DecodeSettings
from .state import DecodingState
from .steps import Step

__all__ = ["BatchDecoder", "BatchEvent"]


@dataclass
class BatchEvent:
    """What one row did in a step."""

    uid: Any
    step: Step  # what it emitted (no tokens where it ended without a step)
    finished: bool  # it emitted its last token (EOS, its budget or the context limit) or failed
    error: Optional[BaseException] = None  # why it failed (it ended alone)


@dataclass
class _Row:
    """One generation in the batch."""

    uid: Any
    decoder: SpeculativeDecoder
    steps: Iterator[Step]
    budget: int  # tokens it may generate (< 0: no limit)
    eos: frozenset
    text: List[int]  # the prompt, then every token handed out
    cache: Optional[List[SpecCache]]  # the caller's prompt cache, if any
    cached: int  # tokens in it before the prompt
    generated: int = 0

    def ended(self, step: Step) -> bool:
        """Whether ``step`` was the row's last (EOS, or its budget reached)."""
        return any(t in self.eos for t in step.tokens) or (0 <= self.budget <= self.generated)

    def settle(self):
        """Leave the caller's cache holding the text before, the prompt and every token handed out."""
        if self.cache is not None:
            self.decoder.settle(self.cached, self.text)


class BatchDecoder:
    """Decodes several generations at once; see the module docstring.

    Args:
        settings: the rows' default settings (a row may bring its own).
        state: the model's decoding state, shared by every row (the
            datastore, the policy's priors and costs, its measured times).
        draft_fn: replaces the sampler head (tests and inspection).
    """

    def __init__(
        self,
        model,
        settings: Optional[DecodeSettings] = None,
        state: Optional[DecodingState] = None,
        draft_fn: Optional[DraftFn] = None,
    ):
        self.model = model
        self.settings = settings or DecodeSettings()
        self.state = state if state is not None else DecodingState()
        self.draft_fn = draft_fn
        self.rows: Dict[Any, _Row] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, uid) -> bool:
        return uid in self.rows

    def add(
        self,
        uid,
        prompt: Sequence[int],
        max_tokens: int,
        eos_token_ids: Iterable[int] = (),
        settings: Optional[DecodeSettings] = None,
        cache: Optional[List[SpecCache]] = None,
        context: Sequence[int] = (),
        draft_fn: Optional[DraftFn] = None,
    ) -> None:
        """Add a generation under ``uid``; it takes its first step at the next
        :meth:`step`. Arguments as :meth:`SpeculativeDecoder.steps
        <mlx_mtp.decoding.decode.SpeculativeDecoder.steps>`; ``settings``:
        its own (None: the batch's); ``draft_fn``: its own sampler-head
        stand-in (None: the batch's). Its random stream (sampling) is drawn
        from mlx's global random state now, so ``mx.random.seed(s)`` before
        ``add`` gives the samples the same request gets alone after the same
        seed. ValueError for a prompt that does not fit, a uid in use."""
        if uid in self.rows:
            raise ValueError(f"a generation with uid {uid!r} is in the batch already")
        decoder = SpeculativeDecoder(self.model, settings or self.settings, self.state, draft_fn or self.draft_fn)
        prompt = [int(t) for t in prompt]
        cached = 0 if cache is None else cache[0].committed
        decoder.check_prompt(prompt, cached)
        if decoder.fallback is not None and decoder.sampled:
            raise ValueError(
                f"model type '{self.model.support.model_type}' decodes plainly through mlx-lm, whose "
                "sampling draws from one global random stream: sampled requests cannot share a batch"
            )
        eos = frozenset(int(t) for t in eos_token_ids)
        random = RandomStream.drawn() if decoder.sampled else None
        steps = decoder.steps(prompt, max_tokens, eos, cache=cache, context=context, random=random)
        budget = decoder.budget(len(prompt), max_tokens, cached)
        self.rows[uid] = _Row(uid, decoder, steps, budget, eos, list(prompt), cache, cached)

    def remove(self, uid) -> None:
        """End generation ``uid`` now (cancellation); the others go on. Its
        prompt cache, if it brought one, is left holding the text before, the
        prompt and every token handed out. KeyError for an unknown uid."""
        row = self.rows.pop(uid)
        self._close(row)

    def step(self) -> List[BatchEvent]:
        """One step of every active row: what each emitted, in the order the
        rows joined. Rows that finish (or fail) leave the batch."""
        events = []
        for row in list(self.rows.values()):
            try:
                step = next(row.steps, None)
                if step is None:  # nothing to generate (no room)
                    step = Step(tokens=[], proposed=0, accepted=0)
                row.generated += len(step.tokens)
                row.text += step.tokens
                finished = not step.tokens or row.ended(step)
                events.append(BatchEvent(row.uid, step, finished))
            except Exception as e:  # the row ends alone
                events.append(BatchEvent(row.uid, Step(tokens=[], proposed=0, accepted=0), True, e))
                finished = True
            if finished:
                del self.rows[row.uid]
                self._close(row)
        return events

    @staticmethod
    def _close(row: _Row):
        row.steps.close()
        try:
            row.settle()
        except Exception:  # a failed row's cache is dropped
            if row.cache is not None:
                for c in row.cache:
                    c.trim(c.committed)
