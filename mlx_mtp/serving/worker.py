"""The worker: one thread owns the model and runs the queued requests one at
a time (:class:`Worker`), reusing the prompt caches of recent conversations
(:class:`PromptCacheStore`)."""

import math
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx

from ..api import fit_prompt_cache, make_prompt_cache, stream_generate
from .config import RequestError, ServerConfig
from .requests import Job

__all__ = ["CacheEntry", "PromptCacheStore", "Worker"]


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


class Worker:
    """Owns the model: runs queued jobs one at a time on its own thread."""

    def __init__(self, model, tokenizer, config: ServerConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.jobs: "queue.Queue[Job]" = queue.Queue()
        self.pending = 0  # queued or running
        self.lock = threading.Lock()
        self.caches = PromptCacheStore(model, config.cache_count, config.cache_bytes)
        self.finished: List[Dict[str, Any]] = []  # recent jobs' stats (newest last)
        self.generate = stream_generate  # the generation function (tests replace it to inject failures)
        self.thread = threading.Thread(target=self._run, name="mlx-mtp-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job):
        with self.lock:
            if self.pending >= self.config.max_queue:
                raise RequestError(
                    503, f"the server is busy ({self.pending} requests queued); retry later", code="server_busy"
                )
            self.pending += 1
        self.jobs.put(job)

    def _run(self):
        while True:
            job = self.jobs.get()
            try:
                self._serve(job)
            except BaseException as e:  # noqa: BLE001  (one request fails, never the worker)
                job.emit("error", 500, f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self.lock:
                    self.pending -= 1
                self.finished = (self.finished + [dict(job.stats, id=job.id)])[-256:]

    def _serve(self, job: Job):
        job.stats.update(finish_reason="cancelled", completion_tokens=0, steps=0, prompt_tokens=len(job.prompt))
        if job.cancelled.is_set():
            return
        entry = self.caches.take(job.prompt)
        reused = fit_prompt_cache(entry.cache, entry.tokens, job.prompt)
        entry.tokens = job.prompt[:reused]
        job.stats.update(cached_tokens=reused, prefill_tokens=len(job.prompt) - reused)
        if job.seed is not None:
            mx.random.seed(job.seed)
        try:
            # the request's sampling over the server's decoding settings
            sampling = {**dict(temp=0.0, top_p=1.0, top_k=0, sampler=None, logits_processors=()), **job.sampling}
            responses = self.generate(
                self.model,
                self.tokenizer,
                job.prompt[reused:],
                max_tokens=job.max_tokens,
                stop=job.stop or None,
                prompt_cache=entry.cache,
                context=job.prompt[:reused],
                settings=replace(self.config.decoding, constraint=job.constraint, **sampling),
                state=self.config.state,
            )
        except (TypeError, ValueError) as e:  # the request's arguments (checked before anything runs)
            self.caches.put(entry)
            job.emit("error", 400, str(e))
            return
        job.emit("start")
        out: List[int] = []
        ok = False
        try:
            r = None
            for r in responses:
                out.append(r.token)
                job.emit("token", r.text, r.token, self._logprobs(job, r))
                job.stats.update(
                    completion_tokens=len(out),
                    steps=r.steps,
                    tokens_per_step=r.tokens_per_step,
                    num_masks=r.num_masks,
                    mode=r.mode,
                    policy=r.policy,
                    choices=r.choices,
                    forced_tokens=r.forced,
                )
                if job.cancelled.is_set():
                    responses.close()
                    return
            job.stats["finish_reason"] = r.finish_reason if r is not None else "length"
            ok = True
        finally:
            if ok or job.cancelled.is_set():
                entry.tokens = job.prompt + out
                self.caches.put(entry)
            # else: a failed generation's cache is dropped
        job.emit("done", dict(job.stats))

    def _logprobs(self, job: Job, r) -> Optional[dict]:
        if not job.logprobs:
            return None
        lp = r.logprobs.astype(mx.float32)

        def entry(t):
            value = lp[t].item()
            return {"id": t, "token": self.tokenizer.decode([t]), "logprob": value if math.isfinite(value) else -1e30}

        item = entry(r.token)
        if job.top_logprobs > 0:
            item["top_logprobs"] = [entry(t) for t in mx.argsort(-lp)[: job.top_logprobs].tolist()]
        return item
