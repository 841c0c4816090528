"""The worker: one thread owns the model and decodes the queued requests
together (:class:`Worker`): at each step boundary it admits waiting requests
into one :class:`~mlx_mtp.decoding.batch.BatchDecoder` as far as the batch's
byte budget allows, steps it, and turns each row's tokens into its request's
events. The prompt caches of recent conversations are reused
(:class:`PromptCacheStore`)."""

import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Deque, Dict, List, Optional, Sequence

import mlx.core as mx

from ..api import fit_prompt_cache, make_prompt_cache, prepare_decoding
from ..decoding.batch import BatchDecoder
from ..decoding.decode import context_limit
from ..decoding.fallback import plain_fallback
from ..decoding.settings import DecodeSettings
from ..decoding.state import state_for
from ..model.cache import SpecCache
from ..text_stream import TextStream
from .config import RequestError, ServerConfig
from .requests import Job

__all__ = ["CacheEntry", "PromptCacheStore", "Worker", "bytes_per_token"]


@dataclass
class CacheEntry:
    tokens: List[int]  # what the cache holds
    cache: List[Any]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


class PromptCacheStore:
    """The prompt caches of recent conversations, most recent last, bounded
    by count and bytes; a request takes the one sharing the longest prefix
    with its prompt (or a fresh one) and puts it back when done."""

    def __init__(self, model, max_count: int, max_bytes: int):
        self.model, self.max_count, self.max_bytes = model, max_count, max_bytes
        self.entries: "OrderedDict[int, CacheEntry]" = OrderedDict()
        self._next = 0

    def take(self, prompt: Sequence[int]) -> CacheEntry:
        best, best_len = None, 0
        for key, entry in self.entries.items():
            n = 0
            for a, b in zip(entry.tokens, prompt):
                if a != b:
                    break
                n += 1
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return CacheEntry([], make_prompt_cache(self.model))
        return self.entries.pop(best)

    def put(self, entry: CacheEntry):
        self.entries[self._next] = entry
        self._next += 1
        while self.entries and (
            len(self.entries) > self.max_count or sum(e.nbytes for e in self.entries.values()) > self.max_bytes
        ):
            self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def bytes_per_token(model) -> int:
    """Bytes one token takes in ``model``'s cache (every layer's keys and
    values), measured on a one-token forward."""
    cache = make_prompt_cache(model)
    model(mx.array([[0]], dtype=mx.int32), cache)
    return sum(math.ceil(c.nbytes / c.keys.shape[2]) for c in cache if c.keys is not None)


@dataclass
class Row:
    """A request in the batch: its job, cache and text so far."""

    job: Job
    entry: CacheEntry  # the cache it decodes into (held: its prompt and every token emitted)
    text: TextStream
    nbytes: int  # what its cache may grow to (the budget it holds)
    decoding: Dict[str, Any]  # num_masks, mode, policy: how it decodes (the stats say)
    emitted: List[int] = field(default_factory=list)  # every token the decoder gave it
    handed: int = 0  # of which handed out (the rest came after a stop)
    choices: Dict[str, int] = field(default_factory=dict)
    steps: int = 0
    forced: int = 0  # tokens a grammar constraint forced


class Worker:
    """Owns the model: decodes the queued jobs as one batch on its own thread.

    A job waits in the queue until the batch has a free row (``max_batch``)
    and room in its byte budget (``batch_bytes``; a job alone always has
    room), then joins at the next step. Each step hands every row its tokens;
    a row ends at its EOS, stop string or limit, when its client goes
    (cancelled), or alone with an error where its decoding fails."""

    def __init__(self, model, tokenizer, config: ServerConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.waiting: Deque[Job] = deque()
        self.rows: Dict[str, Row] = {}  # by job id
        self.pending = 0  # waiting or running
        self.lock = threading.Condition()
        self.caches = PromptCacheStore(model, config.cache_count, config.cache_bytes)
        self.finished: List[Dict[str, Any]] = []  # recent jobs' stats (newest last)
        self.token_bytes = bytes_per_token(model)
        self.context = context_limit(model)
        self.state = state_for(model, config.state)  # the model's decoding state, shared by the rows
        self.batch = BatchDecoder(model, config.decoding, self.state)
        self.step = self.batch.step  # one batched step (tests replace it to inject failures)
        self.thread = threading.Thread(target=self._run, name="mlx-mtp-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job):
        with self.lock:
            if self.pending >= self.config.max_queue:
                raise RequestError(
                    503, f"the server is busy ({self.pending} requests queued); retry later", code="server_busy"
                )
            self.pending += 1
            self.waiting.append(job)
            self.lock.notify()

    @property
    def reserved(self) -> int:
        """Bytes the running rows' caches may grow to."""
        return sum(row.nbytes for row in self.rows.values())

    def _run(self):
        while True:
            self._admit()
            if not self.rows:
                continue
            try:
                events = self.step()
            except Exception as e:  # noqa: BLE001  (a step no row owns: each running request ends with it)
                for row in list(self.rows.values()):
                    self._fail(row, e)
                continue
            for event in events:
                row = self.rows.get(event.uid)
                if row is not None:
                    self._deliver(row, event)
            for row in [r for r in self.rows.values() if r.job.cancelled.is_set()]:
                self._end(row, "cancelled")

    # --- joining ---------------------------------------------------------------------------
    def _admit(self):
        """Move waiting jobs into the batch while it has rows and bytes free
        (blocks while there is nothing to do)."""
        while True:
            with self.lock:
                while not self.waiting and not self.rows:
                    self.lock.wait()
                if not self.waiting or len(self.rows) >= self.config.max_batch:
                    return
                job = self.waiting[0]
                need = self._nbytes(job)
                if self.rows and self.reserved + need > self.config.batch_bytes:
                    return  # it waits for rows to end (first come, first served)
                self.waiting.popleft()
            job.stats.update(finish_reason="cancelled", completion_tokens=0, steps=0, prompt_tokens=len(job.prompt))
            if job.cancelled.is_set():
                self._close(job)
                job.emit("done", dict(job.stats))
                continue
            self._join(job, need)

    def _nbytes(self, job: Job) -> int:
        """What ``job``'s cache may grow to: its prompt, its tokens and a step's
        speculations (the cache grows in blocks of ``SpecCache.step``)."""
        tokens = len(job.prompt) + job.max_tokens
        if self.context is not None:
            tokens = min(tokens, self.context)
        return (tokens + SpecCache.step) * self.token_bytes

    def _limit(self, job: Job) -> int:
        """Tokens ``job`` may generate: its max_tokens, within the context."""
        if self.context is None:
            return job.max_tokens
        return min(job.max_tokens, self.context - len(job.prompt))

    def _join(self, job: Job, need: int):
        """Add ``job`` to the batch (from the conversation cache sharing most of its prompt)."""
        entry = self.caches.take(job.prompt)
        try:
            reused = fit_prompt_cache(entry.cache, entry.tokens, job.prompt)
            entry.tokens = job.prompt[:reused]
            job.stats.update(cached_tokens=reused, prefill_tokens=len(job.prompt) - reused)
            # resolved for the model (the policy's costs calibrated once, as the API does)
            settings = prepare_decoding(
                self.model, self.decoding_for(job, job.prompt[reused:], job.prompt[:reused]), self.state
            )
            if job.seed is not None:
                mx.random.seed(job.seed)  # the row's random stream is drawn from it as it joins
            eos = self.tokenizer.eos_token_ids
            self.batch.add(
                job.id,
                job.prompt[reused:],
                self._limit(job),
                eos,
                settings=settings,
                cache=entry.cache,
                context=job.prompt[:reused],
            )
        except (TypeError, ValueError) as e:  # the request's arguments (checked before anything runs)
            self.caches.put(entry)
            self._close(job)
            job.emit("error", 400, str(e))
            return
        except Exception as e:  # noqa: BLE001
            self._close(job)
            job.emit("error", 500, f"generation failed: {type(e).__name__}: {e}")
            return
        text = TextStream(self.tokenizer, job.stop, eos, self._limit(job))
        self.rows[job.id] = Row(job, entry, text, need, self._decoding(settings))
        job.emit("start")

    def decoding_for(self, job: Job, prompt: List[int], context: List[int]) -> DecodeSettings:
        """How ``job`` decodes ``prompt`` after ``context`` (what its cache
        holds): its sampling and constraint over the server's decoding
        settings. Tests replace it to script what a request writes."""
        sampling = {**dict(temp=0.0, top_p=1.0, top_k=0, sampler=None, logits_processors=()), **job.sampling}
        return replace(self.config.decoding, constraint=job.constraint, **sampling)

    def _decoding(self, settings: DecodeSettings) -> Dict[str, Any]:
        """How a request with ``settings`` decodes, as its stats report it."""
        if plain_fallback(self.model) is not None:
            return dict(num_masks=0, mode="off", policy=False)
        resolved = settings.resolve(self.model)
        return dict(num_masks=resolved.num_masks, mode=resolved.mode, policy=resolved.policy)

    # --- stepping --------------------------------------------------------------------------
    def _deliver(self, row: Row, event):
        """Hand out the tokens of ``row``'s step; end it where they end it."""
        job = row.job
        if job.cancelled.is_set():
            return  # it leaves after this step, with nothing more handed out
        try:
            if event.error is not None:
                raise event.error if isinstance(event.error, BaseException) else RuntimeError(str(event.error))
            step = event.step
            row.emitted += step.tokens
            row.steps += 1
            row.forced += step.forced
            row.choices[step.choice] = row.choices.get(step.choice, 0) + 1
            for i, token in enumerate(step.tokens):
                if row.text.finish_reason is not None:
                    break
                text = row.text.add(token)
                row.handed += 1
                job.emit("token", text, token, self._logprobs(job, token, step.logprobs[i]))
            job.stats.update(
                completion_tokens=row.handed,
                steps=row.steps,
                tokens_per_step=row.handed / row.steps,
                choices=dict(row.choices),
                forced_tokens=row.forced,
                **row.decoding,
            )
        except Exception as e:  # noqa: BLE001  (one request fails, never the batch)
            self._fail(row, e)
            return
        if row.text.finish_reason is not None:
            self._end(row, row.text.finish_reason, decoding=not event.finished)
        elif event.finished:
            self._end(row, "length", decoding=False)

    def _end(self, row: Row, finish_reason: str, decoding: bool = True):
        """``row`` is done: out of the batch, its cache back in the store."""
        job = row.job
        del self.rows[job.id]
        job.stats["finish_reason"] = finish_reason
        try:
            if decoding:
                self.batch.remove(job.id)
            # the cache holds a prefix of the prompt and every token the decoder emitted
            held = job.prompt + row.emitted
            committed = row.entry.cache[0].size()
            if committed <= len(held):
                row.entry.tokens = held[:committed]
                self.caches.put(row.entry)
        except Exception:  # noqa: BLE001  (its text is complete: only its cache is lost)
            pass
        self._close(job)
        job.emit("done", dict(job.stats))

    def _fail(self, row: Row, e: BaseException):
        """``row`` ends with an error (its cache is dropped); the others go on."""
        job = row.job
        del self.rows[job.id]
        if job.id in self.batch:
            try:
                self.batch.remove(job.id)
            except Exception:  # noqa: BLE001  (it fails anyway; its cache is dropped)
                pass
        job.stats["finish_reason"] = "error"
        self._close(job)
        job.emit("error", 500, f"generation failed: {type(e).__name__}: {e}")

    def _close(self, job: Job):
        with self.lock:
            self.pending -= 1
        self.finished = (self.finished + [dict(job.stats, id=job.id)])[-256:]

    def _logprobs(self, job: Job, token: int, logprobs: mx.array) -> Optional[dict]:
        if not job.logprobs:
            return None
        lp = logprobs.astype(mx.float32)

        def entry(t):
            value = lp[t].item()
            return {"id": t, "token": self.tokenizer.decode([t]), "logprob": value if math.isfinite(value) else -1e30}

        item = entry(token)
        if job.top_logprobs > 0:
            item["top_logprobs"] = [entry(t) for t in mx.argsort(-lp)[: job.top_logprobs].tolist()]
        return item
