"""Many generations at once: :class:`BatchDecoder` (continuous batching).

Requests join (:meth:`BatchDecoder.add`) and leave (:meth:`BatchDecoder.remove`,
or when they finish) a running batch between steps; :meth:`BatchDecoder.step`
takes one step of every active row and says what each emitted
(:class:`BatchEvent`). Each row is a generation of its own: its settings
(sampling, logits processors, mode, masks, the policy), its drafts (the
masks' chain, prompt lookup, the datastore), its cache, its policy and its
random stream (:mod:`mlx_mtp.decoding.randomness`), so each row's output is
the output of the same request decoded alone.

A step runs the solo decoder's parts
(:class:`~mlx_mtp.decoding.decode.SpeculativeDecoder`, one per row) for
every row, with one forward for all: each row's plan gives what it feeds
(:meth:`~mlx_mtp.decoding.decode.SpeculativeDecoder.feed`), the rows go
through the model packed along the token axis with attention row by row
(:meth:`MTPModel.forward_rows <mlx_mtp.model.mtp_model.MTPModel.forward_rows>`),
the output head runs once over every row's fed tokens, then each row's
verification and sampler chain are built on its share and all rows are
launched at once. The host waits once per step (each row's small packed
array, all computed by then), commits each row's accepted tokens to its own
cache, plans every row's next step and launches it before it hands the
events out, so the device computes the next step while the caller reads
these. Rows added between steps join the next launch (their prompts are
prefilled first, together: packed forwards of one chunk per row); their
first events come one step later.

What a row's tokens are computed from is its own forward's: attention over
its own cache, positions and mask. The linear layers and the output head
run over all rows at once, and a BLAS may round a row of a matrix product
differently with a different number of rows; tokens differ only where two
logits tie to within that rounding (docs/batching.md says what was measured).

A model that decodes plainly through mlx-lm (:mod:`mlx_mtp.decoding.fallback`)
or whose attention cannot take packed rows steps its rows one after another.
A row that raises ends alone: its event carries the error and the others go on.
"""

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set

import mlx.core as mx

from ..model.cache import SpecCache, commit
from ..model.mtp_model import MTPModel
from ..model.rows import Feed
from .decode import SpeculativeDecoder
from .drafts import DraftFn
from .randomness import RandomStream
from .settings import DecodeSettings
from .state import DecodingState
from .steps import Launched, Plan, Step

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
    budget: int  # tokens it may generate (< 0: no limit)
    eos: Set[int]
    prompt_len: int
    text: List[int]  # the prompt, then every token handed out
    cache: Optional[List[SpecCache]]  # the caller's prompt cache, if any
    cached: int  # tokens in it before the prompt
    start: Optional[tuple] = None  # until its first launch: begin()'s arguments
    run: Any = None  # the decoder's state between steps (decode._Run)
    plan: Optional[Plan] = None  # its next step's plan
    ahead: bool = False  # that plan was decided before its last step was read
    previous: Optional[Plan] = None  # its last step's plan
    step: Optional[Launched] = None  # its step in flight
    steps: Optional[Iterator[Step]] = None  # unbatched: its own loop

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
        self.model = model if isinstance(model, MTPModel) else MTPModel(model)
        self.settings = settings or DecodeSettings()
        self.state = state if state is not None else DecodingState()
        self.draft_fn = draft_fn
        self.rows: Dict[Any, _Row] = {}
        # one forward for every row, or each row's own loop in turn
        self.batched = self.model.support.supported and self.model.packs_rows
        self._generated = 0  # tokens handed out, for clearing mlx's buffer cache now and then

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
        eos = set(int(t) for t in eos_token_ids)
        random = RandomStream.drawn() if decoder.sampled else None
        budget = decoder.budget(len(prompt), max_tokens, cached)
        row = _Row(uid, decoder, budget, eos, len(prompt), list(prompt), cache, cached)
        if self.batched:
            row.start = (prompt, budget, eos, cache, context, random)
        else:
            row.steps = decoder.steps(prompt, max_tokens, eos, cache=cache, context=context, random=random)
        self.rows[uid] = row

    def remove(self, uid) -> None:
        """End generation ``uid`` now (cancellation); the others go on. Its
        prompt cache, if it brought one, is left holding the text before, the
        prompt and every token handed out. KeyError for an unknown uid."""
        self._end(self.rows[uid])

    def step(self) -> List[BatchEvent]:
        """One step of every active row: what each emitted, in the order the
        rows joined (a row that joined since the last step: from the next
        one). Rows that finish (or fail) leave the batch."""
        if not self.batched:
            return self._step_each()
        events: List[BatchEvent] = []
        if not any(row.step is not None for row in self.rows.values()):
            self._launch(events)  # nothing in flight: this step's launch
        events += self._read()
        self._launch(events)  # the next step computes while the caller reads these
        return events

    # --- the batched step ------------------------------------------------------------------
    def _read(self) -> List[BatchEvent]:
        """Wait for the step in flight; each row's tokens, its next plan."""
        events = []
        for row in list(self.rows.values()):
            if row.step is None:
                continue
            decoder, run, step = row.decoder, row.run, row.step
            try:
                ahead = decoder.ahead(step, run)
                done, emitted, stop = decoder.read(step, run)
                row.step = None
                if not stop:
                    row.plan, row.ahead = decoder.next_plan(done, emitted, ahead, run), ahead is not None
                row.text += emitted
                events.append(BatchEvent(row.uid, decoder.emit(step, done, emitted), stop))
                self._generated += len(emitted)
                if stop:
                    self._end(row)
            except Exception as e:  # the row ends alone
                self._fail(row, e, events)
        if self._generated >= 256:
            self._generated = 0
            mx.clear_cache()
        return events

    def _launch(self, events: List[BatchEvent]):
        """Launch every row's planned step in one forward (rows that joined:
        prefilled together and planned first)."""
        self._prefill([row for row in self.rows.values() if row.start is not None], events)
        rows, feeds = [], []
        for row in list(self.rows.values()):
            try:
                if row.start is not None:
                    start, row.start = row.start, None
                    row.run, row.plan = row.decoder.begin(*start, prefilled=True)
                feeds.append(row.decoder.feed(row.plan))
                rows.append(row)
            except Exception as e:
                self._fail(row, e, events)
        if not rows:
            return
        try:
            hs = self.model.forward_rows([feed for _, feed, _ in feeds], [row.decoder.cache for row in rows])
            split = [
                SpeculativeDecoder.split(h, layout, row.plan.masks) for h, row, (_, _, layout) in zip(hs, rows, feeds)
            ]
            counts = [regular.shape[0] for regular, _ in split]
            logits = self.model.lm_head(mx.concatenate([regular for regular, _ in split]))
            logits = (
                mx.split(logits, [sum(counts[: i + 1]) for i in range(len(counts) - 1)]) if len(rows) > 1 else [logits]
            )
        except Exception as e:  # the shared forward failed: every row in it ends
            for row in rows:
                self._fail(row, e, events)
            return
        launched = []
        for row, (tokens, _, layout), (_, Z), row_logits in zip(rows, feeds, split, logits):
            try:
                row.step = row.decoder.conclude(row.plan, row.run, tokens, row_logits, Z, layout)
                launched.append(row)
            except Exception as e:
                self._fail(row, e, events)
        SpeculativeDecoder.submit([row.step for row in launched])
        for row in launched:
            if row.previous is not None and not row.ahead:
                row.run.observer.launched(row.previous, row.step)
            row.previous = row.step.plan

    def _prefill(self, rows: List[_Row], events: List[BatchEvent]):
        """Feed all but the last prompt token of every row that joined, in
        packed forwards of one chunk per row (each row's ``prefill_step_size``)."""
        for row in list(rows):
            if row.start[1] == 0:  # no room to generate
                events.append(BatchEvent(row.uid, _empty(), True))
                self._end(row)
                rows.remove(row)
            else:
                row.decoder.cache = self.model.make_cache() if row.cache is None else row.cache
        texts = [row.start[0][:-1] for row in rows]
        done = [0] * len(rows)
        try:
            while True:
                chunks = []
                for i, (row, text) in enumerate(zip(rows, texts)):
                    size = row.decoder.settings.prefill_step_size
                    if done[i] < len(text):
                        chunks.append((row, text[done[i] : done[i] + size]))
                        done[i] += size
                if not chunks:
                    return
                feeds = [Feed(mx.array(chunk, dtype=mx.int32)) for _, chunk in chunks]
                self.model.forward_rows(feeds, [row.decoder.cache for row, _ in chunks])
                for row, _ in chunks:
                    commit(row.decoder.cache)
                mx.eval([c.keys for row, _ in chunks for c in row.decoder.cache])
                mx.clear_cache()
        except Exception as e:  # the shared prefill failed: every row in it ends
            for row in rows:
                self._fail(row, e, events)

    # --- rows one after another ------------------------------------------------------------
    def _step_each(self) -> List[BatchEvent]:
        events = []
        for row in list(self.rows.values()):
            try:
                step = next(row.steps, None)
                if step is None:  # nothing to generate (no room)
                    step = _empty()
                row.text += step.tokens
                finished = not step.tokens or _ended(step, row)
                events.append(BatchEvent(row.uid, step, finished))
                if finished:
                    self._end(row)
            except Exception as e:  # the row ends alone
                self._fail(row, e, events)
        return events

    # --- leaving ---------------------------------------------------------------------------
    def _fail(self, row: _Row, error: BaseException, events: List[BatchEvent]):
        events.append(BatchEvent(row.uid, _empty(), True, error))
        self._end(row)

    def _end(self, row: _Row):
        """Take ``row`` out of the batch; its caller's cache settled (dropped where that fails)."""
        self.rows.pop(row.uid, None)
        if row.steps is not None:
            row.steps.close()
        try:
            row.settle()
        except Exception:
            for c in row.cache or []:
                c.trim(c.committed)


def _empty() -> Step:
    return Step(tokens=[], proposed=0, accepted=0)


def _ended(step: Step, row: _Row) -> bool:
    """Whether ``step`` was the last of ``row``'s own loop (EOS, or its budget reached)."""
    generated = len(row.text) - row.prompt_len
    return any(t in row.eos for t in step.tokens) or 0 <= row.budget <= generated
