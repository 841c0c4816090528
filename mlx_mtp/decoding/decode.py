"""The speculative decode loop (lossless: the base model verifies every token).

State between steps: the KV cache holds the committed text; one *pending*
token (the base model's verified next token, not yet in the cache) and up to
k *speculations* s_1..s_k wait to be fed. A step feeds ``[pending, s_1..s_m]``
with mask tokens and, from that one forward pass:

- the base model's logits at the regular positions verify the speculations:
  greedy (temperature 0) keeps the longest prefix with ``s_{j+1} == g_j``;
  sampling accepts ``s_{j+1}`` with probability ``min(1, p_j(s)/q_j(s))`` and
  otherwise resamples from the normalised ``(p_j - q_j)+`` (speculative
  sampling, so the output distribution is exactly the base model's);
- the step emits the accepted prefix ``s_1..s_a`` plus the base model's own
  token at position a, which becomes the next pending token;
- the masks give the next speculations through the sampler head, chained
  token by token (``prev = t_a, z = m_1 -> s'_1; prev = s'_1, z = m_2 -> ...``).

Layouts (:mod:`mlx_mtp.model.layouts`):

- ``quadratic``: every fed token is followed by its own k masks, so whatever
  prefix is accepted, block a has k fresh masks. The accepted length a is
  computed on the device and the sampler chain runs from block a's masks in
  the same graph, so the host still waits once per step.
- ``linear``: the fed tokens, then k masks; the masks only give fresh
  speculations when every speculation was accepted, otherwise the next step
  feeds the pending token with masks only.
- ``off`` (or a model without adapter): one token per step, plain decoding
  through the same code path.

With ``branches=b`` > 1 (greedy, quadratic), the speculations are a tree:
the sampler head's b most likely first tokens, each followed by its own
greedy chain, all verified in one pass (each branch sees the pending token
and its own earlier tokens, :func:`mlx_mtp.layouts.block_layout`); the step
keeps the branch accepted the furthest. Where the first speculation is wrong
but among the sampler head's next choices, a branch still gets it, at the
cost of b times the tokens per forward: worth it where a wide forward costs
about as much as a narrow one (a GPU).

With k = 0 in another mode, only copied drafts (below) are verified, through
the plain causal forward: no masks, no LoRA. Where verifying the masks'
speculation costs more than it returns (a CPU, where a forward over 4 tokens
costs more than one, against masks accepted about a third of the time), that is fastest.

With ``lookup=d`` (:mod:`mlx_mtp.decoding.lookup`), a step whose last tokens occurred
earlier in the prompt or the output feeds up to d tokens copied from what
followed them instead of the masks' speculations. Masks follow only the
pending token and the last copied token (``block`` layout; linear mode: the
last only): copies are often right to their end, and on a CPU a forward over
d+1+2k tokens costs far less than over (d+1)(k+1), while a copy rejected from
its first token still leaves the masks' speculations for the next step. Their
draft distribution is one-hot, so speculative sampling stays exact. Where the text
has no such match, an adapter's datastore (:mod:`mlx_mtp.decoding.datastore`: the
responses it was trained on) drafts the most common continuation of the last
tokens in the same way.

With ``costs`` (a calibrated :class:`~mlx_mtp.calibrate.CostModel`), a
:class:`~mlx_mtp.decoding.policy.Policy` chooses each step's plan instead of
fixed settings: plain, masks only, a copy, the chain to some depth, branches,
or a copy beside the chain as one tree, each with 0..k masks per masked token
(:class:`~mlx_mtp.decoding.policy.Choice`). The sampler head's probability of
each chain token travels to the host in the step's packed array, for the
policy to read; after each step it learns how far each branch was right.

Only the accepted regular tokens are committed to the KV cache (their entries
equal the base model's); masks and rejected tokens are dropped.

Verification is :mod:`mlx_mtp.decoding.verify` (pure functions), the draft
sources :mod:`mlx_mtp.decoding.drafts`; this module runs the steps. A caller's
``logits_processors`` (mlx-lm's) apply to the base model's logits at every
verified position, each with the tokens before that position, and a caller's
mlx-lm ``sampler`` is verified by matching (its sample at each position
against the speculation there), so both stay exact.

A prompt cache (a list of :class:`~mlx_mtp.model.cache.SpecCache`) given to
:meth:`SpeculativeDecoder.steps` holds text before the prompt; the prompt
continues it, as in mlx-lm.

The loop is lazy: each step's graph (forward, verification, sampling, sampler
chains) is built and launched with ``mx.async_eval``, then the host hands the
previous step's tokens to the consumer while the device works, and waits once
per step (one ``tolist()`` of a small packed int array). Where a plain step
will be followed by another whatever its token (plain decoding, or the
policy's call), the next one is launched before the current one is read, fed
its token still on the device, as mlx-lm's loop does. The prompt is
prefilled in chunks through the plain causal forward.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx

from ..model.cache import SpecCache, commit
from ..model.layouts import block_layout, linear_layout, tree_parents
from ..model.mtp_model import MTPModel
from .drafts import DATASTORE_TOKENS, DEFAULT_LOOKUP, MAX_NGRAM, DraftFn, Drafts, copied_drafts, mask_chain, one_hot
from .fallback import plain_fallback
from .lookup import NGramLookup
from .policy import Choice, CopyDraft, Costs, Policy, Priors, StepDrafts, StepTimes
from .verify import (
    Verdict,
    accepted_path,
    sampler_targets,
    sampling_probs,
    verify_greedy,
    verify_matching,
    verify_sampled,
)

__all__ = [
    "MODES",
    "DEFAULT_LOOKUP",
    "DATASTORE_TOKENS",
    "MAX_NGRAM",
    "DraftFn",
    "Step",
    "SpeculativeDecoder",
    "context_limit",
    "resolve_num_masks",
]

MODES = ("quadratic", "linear", "off")

# mlx-lm's sampler: logprobs (1, V) -> token (1,); logits processor: (tokens, logits (1, V)) -> logits
Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def context_limit(model: MTPModel) -> Optional[int]:
    """The model's context length (``max_position_embeddings``), if it has one."""
    args = getattr(model.model, "args", None)
    limit = getattr(args, "max_position_embeddings", None)
    return int(limit) if limit else None


def resolve_num_masks(model: MTPModel, num_masks: Optional[int], mode: str) -> int:
    """The k to decode with: 0 in mode ``off`` or without an adapter; by
    default the adapter's choice for this device (:attr:`MTPModel.default_num_masks`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}': expected one of {', '.join(MODES)}")
    trained = model.num_masks
    if num_masks is not None:
        if num_masks < 0:
            raise ValueError(f"num_masks must be >= 0, got {num_masks}")
        if num_masks > trained:
            if trained == 0:
                raise ValueError(f"num_masks={num_masks}, but the model has no MTP adapter (no mask tokens)")
            raise ValueError(f"num_masks={num_masks} is more than the adapter was trained with ({trained})")
    if mode == "off":
        return 0
    return model.default_num_masks if num_masks is None else num_masks


@dataclass
class Step:
    """What one step emitted."""

    tokens: List[int]  # accepted speculations, then the base model's token
    proposed: int  # speculations fed (verified) in this step
    accepted: int  # of which accepted
    source: str = "mtp"  # where the accepted speculations came from: "mtp", "lookup" or "datastore"
    logprobs: List[mx.array] = field(default_factory=list)  # (V,) per token, lazy
    choice: str = "plain"  # what the step fed (:class:`~mlx_mtp.decoding.policy.Choice` kinds)


# probabilities travel to the host in the step's int32 array, in units of 1/PROB_SCALE
PROB_SCALE = 1 << 20


class _Chain(NamedTuple):
    """The masks' speculations at hand for the next step, read on the host."""

    specs: List[List[int]]  # one list per branch
    q: Optional[mx.array] = None  # their draft distributions (sampling)
    probs: List[List[float]] = []  # the sampler head's probability of each token, per branch
    first: List[float] = []  # of each branch's first token


_NO_CHAIN = _Chain([])


@dataclass
class _Plan:
    """What a step feeds: a tree (or chain) of tokens after the pending one."""

    fed: List  # the pending token (an int, or a lazy (1,) array), then the speculations branch by branch
    parents: Tuple[int, ...]  # of each fed token
    masked: Tuple[bool, ...]  # which fed tokens get masks after them
    masks: int  # masks after each masked token (0: the plain causal forward)
    branches: List[Tuple[str, int, int]]  # (source, first node, length) of each branch
    q: Optional[mx.array] = None  # draft distributions of a chain (sampling)
    kind: str = "plain"
    choice: Optional[Choice] = None  # the policy's, if it chose
    chain_probs: Tuple[float, ...] = ()  # of the chain's tokens fed (first branch)

    @property
    def tree(self) -> bool:
        return len(self.branches) > 1


@dataclass
class _Launched:
    """A step in flight (everything lazy until the host syncs)."""

    plan: _Plan
    regular: Tuple[int, ...]  # layout index of each fed token
    packed: mx.array  # [accepted, best, targets (n), next speculations, their probabilities], int32
    q_rows: Optional[mx.array]  # (k, V) draft distributions of the chain (sampling only)
    logprobs: mx.array  # (n, V)
    submitted: float = 0.0  # perf_counter() when its graph went to the device
    committed: bool = False  # its fed token is in the cache already (a plain step launched ahead)


class _Finished(NamedTuple):
    """A step read on the host."""

    emitted: List[int]  # accepted speculations, then the base model's token
    accepted: int
    best: int  # the accepted node furthest from the root
    targets: List[int]  # the base model's token after each fed node
    chain: _Chain  # the masks' next speculations
    keep: List[int]  # layout indices of the fed tokens to commit
    rows: List[int]  # the logprobs row of each emitted token


def _source(plan: _Plan, best: int) -> str:
    """Where the step's accepted speculations came from (the branch of node
    ``best``; "mtp" where none was fed)."""
    for source, start, length in plan.branches:
        if start <= best < start + length:
            return source
    return plan.branches[0][0] if plan.branches else "mtp"


def _run(plan: _Plan, start: int, length: int, targets: List[int]) -> int:
    """How many leading tokens of a branch equal the base model's tokens."""
    run = 0
    for i in range(start, start + length):
        if plan.fed[i] != targets[plan.parents[i]]:
            break
        run += 1
    return run


class SpeculativeDecoder:
    """Decodes with an :class:`MTPModel`; see the module docstring.

    ``draft_fn`` replaces the sampler head (for tests and inspection); it is
    called with the previous tokens, the mask hidden states and the absolute
    positions of the tokens to predict. ``sampler`` and ``logits_processors``
    are mlx-lm's (``make_sampler``, ``make_logits_processors``); a sampler
    replaces ``temp``/``top_p``/``top_k``.

    With ``costs`` (:func:`mlx_mtp.calibrate.cost_model`), a
    :class:`~mlx_mtp.decoding.policy.Policy` chooses each step's plan (mode
    quadratic): ``num_masks``, ``lookup`` and ``branches`` are then the most
    it may feed, and ``priors`` its prior acceptance. Without, every step
    feeds what those settings fix.
    """

    def __init__(
        self,
        model: MTPModel,
        num_masks: Optional[int] = None,
        mode: str = "quadratic",
        temp: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        draft_fn: Optional[DraftFn] = None,
        prefill_step_size: int = 2048,
        lookup: int = 0,
        lookup_ngram: int = 3,
        use_datastore: bool = True,
        branches: int = 1,
        sampler: Optional[Sampler] = None,
        logits_processors: Optional[Sequence[LogitsProcessor]] = None,
        costs: Optional[Costs] = None,
        priors: Optional[Priors] = None,
        times: Optional[StepTimes] = None,
    ):
        if not isinstance(model, MTPModel):
            model = MTPModel(model)
        if temp < 0:
            raise ValueError(f"temp must be >= 0, got {temp}")
        if lookup < 0:
            raise ValueError(f"lookup must be >= 0, got {lookup}")
        if lookup_ngram < 1:
            raise ValueError(f"lookup_ngram must be >= 1, got {lookup_ngram}")
        if prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
        if sampler is not None:
            if not callable(sampler):
                raise TypeError(f"sampler must be callable (mlx-lm's make_sampler), got {type(sampler).__name__}")
            if temp != 0 or top_p != 1.0 or top_k != 0:
                raise ValueError("pass either a sampler or temp/top_p/top_k, not both")
        processors = list(logits_processors or [])
        if not all(callable(p) for p in processors):
            raise TypeError("logits_processors must be a list of callables (mlx-lm's make_logits_processors)")
        self.model = model
        self.k = resolve_num_masks(model, num_masks, mode)
        if branches < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        if branches > 1:
            if self.k == 0:
                raise ValueError(
                    "branches > 1 needs the masks' speculations: pass num_masks >= 1 "
                    "(k is 0 here: no adapter, or the adapter's choice for this device)"
                )
            if mode != "quadratic":
                raise ValueError("branches > 1 needs mode 'quadratic'")
            if temp != 0 or sampler is not None:
                raise ValueError("branches > 1 needs greedy decoding (temp 0, no sampler)")
            if processors:
                raise ValueError("branches > 1 cannot apply logits_processors (use branches=1)")
        self.branches = branches
        self.lookup = lookup if mode != "off" else 0
        # k = 0 with lookup: copied drafts only (see the module docstring)
        self.mode = mode if (self.k or self.lookup) else "off"
        self.temp = float(temp)
        self.top_p = top_p
        self.top_k = top_k
        self.sampler = sampler
        self.logits_processors = processors
        self.prefill_step_size = prefill_step_size
        self.lookup_ngram = lookup_ngram
        # drafts from the adapter's datastore where prompt lookup finds none
        self.datastore = getattr(model, "datastore", None) if (use_datastore and self.lookup) else None
        if draft_fn is None and self.k:
            draft_fn = lambda prev, z, pos: model.sampler_logits(prev, z)  # noqa: E731
        self.draft_fn = draft_fn
        self.context_limit = context_limit(model)
        self.cache: Optional[List[SpecCache]] = None
        # a model the adapter cannot serve decodes plainly (mlx_mtp.decoding.fallback)
        self.fallback = plain_fallback(model)
        if self.fallback is not None:
            self.k, self.lookup, self.mode = 0, 0, "off"
            self.datastore = None
        if costs is not None and self.mode == "linear":
            raise ValueError("the policy decodes in mode 'quadratic' (pass costs=None for mode 'linear')")
        self.costs = costs if self.fallback is None else None
        self.priors = priors
        # measured step times the policy starts from and updates, across generations (greedy only)
        self.times = times if times is not None else StepTimes()
        self.policy: Optional[Policy] = None  # the current generation's (with costs)
        # trees (branches, a copy beside the chain) need greedy verification without processors
        self.trees = self.greedy and sampler is None and not processors

    @property
    def _timed(self) -> bool:
        """Whether measured step times steer the policy: greedy decoding only
        (sampled output must follow the seed, so its choices may not depend
        on timing)."""
        return self.temp == 0 and self.sampler is None

    @property
    def greedy(self) -> bool:
        """Drafts are the sampler head's argmax (greedy decoding, or a caller's sampler)."""
        return self.temp == 0

    # --- pieces ------------------------------------------------------------------
    def _probs(self, logits: mx.array) -> mx.array:
        return sampling_probs(logits, self.temp, self.top_p, self.top_k)

    def prefill(self, tokens: Sequence[int], cache: Optional[List[SpecCache]] = None):
        """Feed ``tokens`` (all of them) in chunks into ``cache`` (None: a
        fresh one), which becomes the decoder's cache."""
        self.cache = self.model.make_cache() if cache is None else cache
        ids = mx.array(list(tokens), dtype=mx.int32)
        for start in range(0, len(tokens), self.prefill_step_size):
            chunk = ids[start : start + self.prefill_step_size]
            self.model(chunk[None], self.cache)
            commit(self.cache)
            mx.eval([c.keys for c in self.cache] + [c.values for c in self.cache])
            mx.clear_cache()

    def _process(self, logits: mx.array, fed: List[int], parents: Tuple[int, ...], seen: List[int]) -> mx.array:
        """The caller's logits processors at each fed node, each with the
        tokens before its prediction (``seen``, then the path to the node)."""
        rows = []
        for i in range(len(fed)):
            tokens = mx.array(seen + [fed[0]] + [fed[j] for j in accepted_path(i, parents)], dtype=mx.int32)
            row = logits[i : i + 1]
            for processor in self.logits_processors:
                row = processor(tokens, row)
            rows.append(row)
        return mx.concatenate(rows, axis=0)

    def _verify(self, tokens: mx.array, logits: mx.array, logprobs: mx.array, parents, q_prev) -> Verdict:
        if self.sampler is not None:
            return verify_matching(tokens, sampler_targets(self.sampler, logprobs), parents)
        if self.greedy:
            return verify_greedy(tokens, logits, parents)
        return verify_sampled(tokens, self._probs(logits), q_prev)

    def _launch(self, plan: _Plan, seen: Optional[List[int]] = None) -> _Launched:
        """Build one step's graph and start computing it. ``seen``: the
        tokens before the pending one (for logits processors)."""
        model, cache, j = self.model, self.cache, plan.masks
        C = cache[0].committed
        fed, parents, masked = plan.fed, plan.parents, plan.masked
        n = len(fed)
        tokens = fed[0] if isinstance(fed[0], mx.array) else mx.array(fed, dtype=mx.int32)
        if j == 0:
            h = model(tokens[None], cache)[0]
            regular, layout = h, None
        else:
            if not plan.tree and not any(masked[:-1]):  # masks after the last token only: plain causal attention
                layout = linear_layout(tokens, j)
                h = model(layout.tokens[None], cache, gate=layout.gate)[0]
            else:
                layout = block_layout(tokens, j, masked, parents if plan.tree else None)
                h = model.forward_layout(layout, cache)[0]
            regular = h[mx.array(layout.regular)]  # (n, d)
            Z = h[layout.masks].reshape(-1, j, h.shape[-1])  # (blocks with masks, j, d)
        logits = model.lm_head(regular)  # (n, V), at the regular positions only
        if self.logits_processors:
            logits = self._process(logits, fed, parents, seen or [])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        # on the device: the sampler chain runs from node best, picked before the host waits
        verdict = self._verify(tokens, logits, logprobs, parents if plan.tree else None, plan.q)
        head = [verdict.accepted, verdict.best, verdict.targets]
        q_rows = None
        if j:
            # the chain from node best: valid when it has masks (the host
            # checks); chain step i predicts position C + a + i + 2
            chain = mask_chain(
                self.draft_fn,
                Z[layout.mask_block[verdict.best]],
                verdict.targets[verdict.best],
                verdict.accepted + (C + 2),
                j,
                branches=self.branches,
                probs=None if self.greedy else self._probs,
            )
            head.append(chain.tokens)
            if self.costs is not None:  # the policy reads the head's probabilities
                head.append(mx.round(mx.concatenate([chain.probs, chain.first]) * PROB_SCALE).astype(mx.int32))
            q_rows = chain.q
        packed = mx.concatenate(head)
        submitted = time.perf_counter()
        mx.async_eval(packed, logprobs, *([q_rows] if q_rows is not None else []))
        regular_index = tuple(range(n)) if layout is None else layout.regular
        return _Launched(plan, regular_index, packed, q_rows, logprobs, submitted)

    def _finish(self, step: _Launched) -> _Finished:
        """Wait for a step (the one sync) and read it."""
        vals = step.packed.tolist()
        plan = step.plan
        n, j = len(plan.fed), plan.masks
        a, best, targets = vals[0], vals[1], vals[2 : n + 2]
        path = accepted_path(best, plan.parents)  # the accepted nodes, root excluded
        emitted = [plan.fed[i] for i in path] + [targets[best]]
        # the chain ran from node best: its speculations are fresh only if
        # that node had masks
        chain = _NO_CHAIN
        if j and plan.masked[best]:
            b = self.branches
            tokens = vals[n + 2 : n + 2 + b * j]
            specs = [tokens[i : i + j] for i in range(0, b * j, j)]
            if self.costs is not None:
                probs = [p / PROB_SCALE for p in vals[n + 2 + b * j :]]
                chain = _Chain(specs, step.q_rows, [probs[i : i + j] for i in range(0, b * j, j)], probs[b * j :])
            else:
                chain = _Chain(specs, step.q_rows)
        keep = [step.regular[0]] + [step.regular[i] for i in path]
        # the base model's distribution for each emitted token is the row of
        # the node before it on the accepted path (fed order differs in a tree)
        rows = [0] + path
        return _Finished(emitted, a, best, targets, chain, keep, rows)

    def _ahead(self, step: _Launched, generated: int, budget: int) -> Optional[_Launched]:
        """The step after ``step``, launched before ``step`` is read (as
        mlx-lm does), where both are plain steps: its token is ``step``'s,
        still on the device, and ``step``'s cache entry is committed now.
        Only where the next step would be plain whatever ``step`` emits:
        plain decoding (no masks, no copies), or the policy's say
        (:meth:`~mlx_mtp.decoding.policy.Policy.pipelines`). None otherwise."""
        plan = step.plan
        if plan.kind != "plain" or plan.masks or self.logits_processors:
            return None
        room = budget - generated - 1 if budget >= 0 else -1  # after step's token
        if budget >= 0 and room < 1:
            return None
        choice = None
        if self.policy is not None:
            choice = self.policy.pipelines(self.cache[0].committed + 1, room)
            if choice is None:
                return None
        elif self.k or self.lookup:  # fixed settings draft wherever they can
            return None
        commit(self.cache, [0])
        step.committed = True
        token = step.packed[2:3]  # the base model's token after the pending one, on the device
        return self._launch(_Plan([token], (), (False,), 0, [], kind="plain", choice=choice))

    def _masked(self, n: int, source: str) -> Tuple[bool, ...]:
        """Fixed settings: which of the n fed tokens get k masks after them:
        none without masks; linear: the last; quadratic: every one, or for
        copied drafts the pending token and the last draft (a copy is mostly
        right to its end or wrong from its first token, and masks after each
        token would cost more than they give on a CPU)."""
        if self.k == 0:
            return (False,) * n
        if self.mode == "linear" or n == 1:
            return (False,) * (n - 1) + (True,)
        if source == "mtp":
            return (True,) * n
        return (True,) + (False,) * (n - 2) + (True,)

    def _copied(self, lookup: Optional[NGramLookup]) -> Drafts:
        return copied_drafts(lookup, self.datastore, self.lookup) if lookup is not None else Drafts([], "mtp")

    def _plan(self, pending: int, lookup: Optional[NGramLookup], chain: _Chain, room: int) -> _Plan:
        """The next step's plan: the policy's choice, or the fixed settings'
        (copied drafts where there are any, else the masks' speculations),
        with at most ``room`` - 1 drafts per branch (``room`` < 0: no limit)."""
        if self.policy is not None:
            return self._plan_policy(pending, lookup, chain, room)
        copied = self._copied(lookup)
        specs, q, source = chain.specs, chain.q, "mtp"
        if copied.tokens:
            specs, source = [copied.tokens], copied.source
            q = None if self.greedy else one_hot(copied.tokens, self.model.vocab_size)
        limit = None if room < 0 else max(0, room - 1)
        specs = [branch[:limit] for branch in specs if branch[:limit]]
        q = q[: len(specs[0])] if (q is not None and specs) else None
        source = source if specs else "mtp"
        fed = [pending] + [t for branch in specs for t in branch]
        branches, start = [], 1
        for branch in specs:
            branches.append((source, start, len(branch)))
            start += len(branch)
        if not specs:
            kind = "masks" if self.k else "plain"
        else:
            kind = "copy" if source != "mtp" else ("branches" if len(specs) > 1 else "chain")
        parents = tree_parents([len(branch) for branch in specs])
        return _Plan(fed, parents, self._masked(len(fed), source), self.k, branches, q, kind)

    def _choose(self, lookup: Optional[NGramLookup], chain: _Chain, room: int) -> Tuple[Choice, Drafts]:
        """The policy's choice for the next step, and the copy it was offered."""
        copied = self._copied(lookup)
        offer = CopyDraft(len(copied.tokens), copied.source, copied.ngram, copied.count) if copied.tokens else None
        drafts = StepDrafts(
            context=self.cache[0].committed,
            copy=offer,
            chain_probs=tuple(chain.probs[0]) if chain.specs else (),
            branch_probs=tuple(chain.first) if chain.specs else (),
            room=room,
        )
        return self.policy.choose(drafts), copied

    def _plan_policy(self, pending: int, lookup: Optional[NGramLookup], chain: _Chain, room: int) -> _Plan:
        """The policy's plan for the next step (see :class:`~mlx_mtp.decoding.policy.Choice`)."""
        choice, copied = self._choose(lookup, chain, room)
        chain_probs = tuple(chain.probs[0]) if chain.specs else ()
        m, d, j = choice.depth, choice.copy, choice.masks
        branches: List[Tuple[str, List[int]]] = []
        if d:
            branches.append((copied.source, copied.tokens[:d]))
        if m:
            branches += [("mtp", spec[:m]) for spec in chain.specs[: choice.branches]]
        fed, spans, start = [pending], [], 1
        for source, tokens in branches:
            fed += tokens
            spans.append((source, start, len(tokens)))
            start += len(tokens)
        parents = tree_parents([len(tokens) for _, tokens in branches])
        if j == 0:
            masked = (False,) * len(fed)
        else:
            marks = [True]
            for source, tokens in branches:
                # a copy: masks after its last token only; the chain's tokens: each
                marks += [source == "mtp" or i == len(tokens) - 1 for i in range(len(tokens))]
            masked = tuple(marks)
        q = None
        if not self.greedy and branches:
            q = chain.q[:m] if m else one_hot(copied.tokens[:d], self.model.vocab_size)
        return _Plan(fed, parents, masked, j, spans, q, choice.kind, choice, chain_probs[:m])

    def _observe(self, plan: _Plan, done: _Finished, seconds: Optional[float]):
        """Tell the policy how far each branch of the step's drafts was right
        and how long the step took (since the previous step's sync)."""
        if plan.choice is None:
            return
        copy_right, chain_right, source = 0, [], "lookup"
        for branch_source, start, length in plan.branches:
            # greedy: every branch's run from the targets; sampling: the accepted run (one branch)
            run = _run(plan, start, length, done.targets) if self.greedy else done.accepted
            if branch_source == "mtp":
                chain_right.append(run)
            else:
                copy_right, source = run, branch_source
        self.policy.observe(plan.choice, copy_right, chain_right, plan.chain_probs, source, seconds)

    # --- the loop ------------------------------------------------------------------
    def budget(self, prompt_len: int, max_tokens: int, cached: int = 0) -> int:
        """How many tokens may be generated after ``cached`` tokens in the
        cache and a prompt of ``prompt_len``: ``max_tokens`` (negative: no
        limit) and the context limit."""
        limits = []
        if max_tokens >= 0:
            limits.append(max_tokens)
        if self.context_limit is not None:
            limits.append(self.context_limit - cached - prompt_len)
        return min(limits) if limits else -1

    def check_prompt(self, prompt: Sequence[int], cached: int = 0):
        """Raise ValueError for an empty prompt or one that leaves no room in
        the context after ``cached`` tokens."""
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        if self.context_limit is not None and cached + len(prompt) >= self.context_limit:
            held = f" after the {cached} tokens in the prompt cache" if cached else ""
            raise ValueError(
                f"the prompt is {len(prompt)} tokens{held}, which leaves no room in the model's "
                f"context of {self.context_limit} tokens"
            )

    def steps(
        self,
        prompt: Sequence[int],
        max_tokens: int = 256,
        eos_token_ids: Iterable[int] = (),
        cache: Optional[List[SpecCache]] = None,
        context: Sequence[int] = (),
    ) -> Iterator[Step]:
        """Generate from ``prompt`` (token ids), one :class:`Step` per
        verification pass. Stops after the first EOS token (which is emitted),
        after ``max_tokens`` tokens, or at the context limit.

        Args:
            cache: a prompt cache holding text before ``prompt`` (None: a
                fresh one); afterwards it holds at least the prompt and every
                token but the last of each step, see :meth:`settle`.
            context: the tokens in ``cache``, where known (prompt lookup
                drafts from them too; speed only).
        """
        prompt = [int(t) for t in prompt]
        cached = 0 if cache is None else cache[0].committed
        self.check_prompt(prompt, cached)
        eos = set(int(t) for t in eos_token_ids)
        if self.fallback is not None:
            if cache is not None:
                raise ValueError(
                    f"model type '{self.model.support.model_type}' decodes plainly "
                    f"({self.model.support.reason}); prompt caches are not supported for it"
                )
            yield from self.fallback(self, prompt, max_tokens, eos)
            return
        budget = self.budget(len(prompt), max_tokens, cached)
        if budget == 0:
            return
        self.prefill(prompt[:-1], cache)
        lookup = NGramLookup(self.lookup_ngram, max(self.lookup_ngram, MAX_NGRAM)) if self.lookup else None
        if lookup is not None:
            lookup.extend(list(context) + prompt)
        # the policy's estimates are this generation's
        self.policy = self._make_policy() if self.costs is not None else None
        # mlx-lm's logits processors see the prompt and the tokens generated
        seen = prompt[:-1] if self.logits_processors else None
        timed = self._timed
        synced = time.perf_counter()
        inflight = self._launch(self._plan(prompt[-1], lookup, _NO_CHAIN, budget), seen)
        ahead: Optional[_Launched] = None  # the next step, launched before inflight is read
        generated = 0
        while True:
            serial = ahead is None  # inflight was not launched ahead
            if serial:
                ahead = self._ahead(inflight, generated, budget)
            waiting = time.perf_counter()
            done_step = self._finish(inflight)
            plan = inflight.plan
            # a step takes from the previous sync to its own: planning, launching, computing
            now = time.perf_counter()
            self._observe(plan, done_step, now - synced if timed else None)
            synced = now
            emitted = done_step.emitted
            if not inflight.committed:
                commit(self.cache, done_step.keep)
            logprobs = inflight.logprobs
            if seen is not None:
                seen = seen + [plan.fed[0]] + emitted[:-1]
            done = False
            for i, t in enumerate(emitted):
                if t in eos or (budget >= 0 and generated + i + 1 >= budget):
                    emitted, done = emitted[: i + 1], True
                    break
            generated += len(emitted)
            if not done:
                if lookup is not None:
                    lookup.extend(emitted)
                # the next step is in flight before the host hands over these tokens
                room = budget - generated if budget >= 0 else -1
                if ahead is not None:
                    if self.policy is not None:  # what the step would have been, launched now
                        self.policy.after_plain(self._choose(lookup, done_step.chain, room)[0])
                    inflight, ahead = ahead, None
                else:
                    next_plan = self._plan(emitted[-1], lookup, done_step.chain, room)
                    inflight = self._launch(next_plan, seen)
                    if self.policy is not None and plan.kind == "plain":
                        self.policy.after_plain(next_plan.choice)
                        if timed and serial and next_plan.kind == "plain":
                            # the host's work before this launch, which launching it ahead
                            # could hide behind at most the time the host waited for the last
                            self.policy.observe_host(min(inflight.submitted - now, now - waiting))
            yield Step(
                tokens=emitted,
                proposed=len(plan.fed) - 1,
                accepted=min(done_step.accepted, len(emitted)),
                logprobs=[logprobs[done_step.rows[i]] for i in range(len(emitted))],
                source=_source(plan, done_step.best),
                choice=plan.kind,
            )
            if done:
                return
            if generated % 256 < len(emitted):
                mx.clear_cache()

    def _make_policy(self) -> Policy:
        return Policy(
            self.costs,
            max_masks=self.k,
            max_branches=self.branches if self.trees else 1,
            max_copy=self.lookup,
            greedy=self.trees,
            priors=self.priors,
            # sampled output must follow the seed: its choices never depend on timing
            times=self.times if self._timed else None,
        )

    def settle(self, cached: int, text: Sequence[int]):
        """Leave the cache holding its first ``cached`` entries and then
        ``text`` (a generation's prompt and the tokens handed out): entries
        beyond are dropped (speculations accepted after a stop, a step in
        flight), missing ones fed."""
        if self.cache is None:
            return
        text = [int(t) for t in text]
        have = self.cache[0].committed - cached
        for c in self.cache:
            c.trim(max(0, have - len(text)))
        have = min(max(have, 0), len(text))
        if have < len(text):
            self.prefill(text[have:], self.cache)

    def propose(self, prompt: Sequence[int]) -> List[int]:
        """One pass over ``prompt``: the base model's next token and the k
        speculations that follow it (greedy through the sampler head)."""
        prompt = [int(t) for t in prompt]
        self.check_prompt(prompt)
        self.prefill(prompt[:-1])
        self.policy = None
        step = self._finish(self._launch(self._plan(prompt[-1], None, _NO_CHAIN, -1)))
        return step.emitted + (step.chain.specs[0] if step.chain.specs else [])
