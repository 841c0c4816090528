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

With the policy on (``settings.policy``; the calibrated
:class:`~mlx_mtp.calibration.costs.CostModel` in the decoding state), a
:class:`~mlx_mtp.decoding.policy.Policy` chooses each step's plan instead of
fixed settings: plain, masks only, a copy, the chain to some depth, branches,
or a copy beside the chain as one tree, each with 0..k masks per masked token
(:class:`~mlx_mtp.decoding.policy.Choice`). The sampler head's probability of
each chain token travels to the host in the step's packed array, for the
policy to read; after each step it learns how far each branch was right
(:class:`~mlx_mtp.decoding.observer.PolicyObserver`, which the loop calls).

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

The loop (:meth:`SpeculativeDecoder.steps`) names its parts: *plan*
(:meth:`~SpeculativeDecoder._plan`: the policy's choice or the fixed
settings', a :class:`~mlx_mtp.decoding.steps.Plan`), *launch*
(:meth:`~SpeculativeDecoder._launch`: the forward over what the plan feeds,
:meth:`~SpeculativeDecoder.feed`, then :meth:`~SpeculativeDecoder.conclude`
and :meth:`~SpeculativeDecoder.submit`; and :meth:`~SpeculativeDecoder.ahead`
for a plain step launched before the current one is read), *verify and
commit* (:meth:`~SpeculativeDecoder.read`: the one sync) with the *cut* at EOS or the
budget, *next* (:meth:`~SpeculativeDecoder.next_plan`, launched while the
host still holds these tokens) and *emit* (a :class:`~mlx_mtp.decoding.steps.Step`).
Continuous batching (:mod:`mlx_mtp.decoding.batch`) runs the same parts for
every row of a batch, the forwards of all rows in one.
"""

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import mlx.core as mx

from ..model.cache import SpecCache, commit
from ..model.layouts import Layout, block_layout, linear_layout, tree_parents
from ..model.mtp_model import MTPModel
from ..model.rows import Feed
from .constraint import ConstraintMatcher, allowed_tokens, apply_bitmask
from .drafts import DATASTORE_TOKENS, DEFAULT_LOOKUP, MAX_NGRAM, DraftFn, Drafts, copied_drafts, mask_chain, one_hot
from .fallback import plain_fallback
from .lookup import NGramLookup
from .observer import PolicyObserver
from .policy import ALONE, BatchLoad, Choice, CopyDraft, Policy, StepDrafts
from .randomness import RandomStream
from .settings import MODES, DecodeSettings, resolve_num_masks
from .state import DecodingState
from .steps import NO_CHAIN, PROB_SCALE, Chain, Finished, Launched, Plan, Step
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


def context_limit(model: MTPModel) -> Optional[int]:
    """The model's context length (``max_position_embeddings``), if it has one."""
    args = getattr(model.model, "args", None)
    limit = getattr(args, "max_position_embeddings", None)
    return int(limit) if limit else None


@dataclass
class _Run:
    """One generation's state between steps (:meth:`SpeculativeDecoder.steps`)."""

    budget: int  # tokens it may generate (< 0: no limit)
    eos: Set[int]
    lookup: Optional[NGramLookup]  # prompt lookup over the text so far
    seen: Optional[List[int]]  # the tokens before the pending one (for logits processors)
    observer: PolicyObserver
    grammar: Optional[ConstraintMatcher] = None  # where the text stands in the settings' constraint
    random: Optional[RandomStream] = None  # sampling: the generation's own random stream
    generated: int = 0
    grammar_seconds: float = 0.0  # the grammar's host time reported in steps so far

    @property
    def room(self) -> int:
        """Tokens it may still generate (< 0: no limit)."""
        return self.budget - self.generated if self.budget >= 0 else -1


class SpeculativeDecoder:
    """Decodes with an :class:`MTPModel`; see the module docstring.

    Args:
        settings: how to decode (:class:`~mlx_mtp.decoding.settings.DecodeSettings`,
            resolved for the model here). With the policy on, ``num_masks``,
            ``lookup`` and ``branches`` are the most it may feed.
        state: the model's decoding state (the adapter's datastore and
            priors; the calibrated costs the policy needs, and the step
            times it carries across generations). None: an empty one.
        draft_fn: replaces the sampler head (for tests and inspection); it is
            called with the previous tokens, the mask hidden states and the
            absolute positions of the tokens to predict.
    """

    def __init__(
        self,
        model: MTPModel,
        settings: Optional[DecodeSettings] = None,
        state: Optional[DecodingState] = None,
        draft_fn: Optional[DraftFn] = None,
    ):
        if not isinstance(model, MTPModel):
            model = MTPModel(model)
        self.model = model
        self.settings = s = (settings or DecodeSettings()).resolve(model)
        self.state = state if state is not None else DecodingState()
        self.k, self.mode, self.lookup, self.branches = s.num_masks, s.mode, s.lookup, s.branches
        self.logits_processors = list(s.logits_processors)
        # drafts from the adapter's datastore where prompt lookup finds none
        self.datastore = self.state.datastore if (s.use_datastore and self.lookup) else None
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
        self.policy: Optional[Policy] = None  # the current generation's (policy on)
        if s.policy and self.fallback is None and self.state.costs is None:
            raise ValueError("the policy needs calibrated costs: pass a state with costs (mlx_mtp.api.make_decoder)")

    @property
    def costs(self):
        """The calibrated costs the policy chooses from; None with fixed settings."""
        return self.state.costs if (self.settings.policy and self.fallback is None) else None

    @property
    def times(self):
        """The step times the policy measured, across generations (the state's)."""
        return self.state.times

    @property
    def _timed(self) -> bool:
        """Whether measured step times steer the policy: greedy decoding only
        (sampled output must follow the seed, so its choices may not depend
        on timing)."""
        return self.settings.temp == 0 and self.settings.sampler is None

    @property
    def greedy(self) -> bool:
        """Drafts are the sampler head's argmax (greedy decoding, or a caller's sampler)."""
        return self.settings.greedy

    @property
    def sampled(self) -> bool:
        """Steps draw random numbers (temperature > 0, or a caller's sampler)."""
        return not self.settings.greedy or self.settings.sampler is not None

    # --- pieces ------------------------------------------------------------------
    def _probs(self, logits: mx.array) -> mx.array:
        s = self.settings
        return sampling_probs(logits, s.temp, s.top_p, s.top_k)

    def prefill(self, tokens: Sequence[int], cache: Optional[List[SpecCache]] = None):
        """Feed ``tokens`` (all of them) in chunks into ``cache`` (None: a
        fresh one), which becomes the decoder's cache."""
        self.cache = self.model.make_cache() if cache is None else cache
        ids = mx.array(list(tokens), dtype=mx.int32)
        size = self.settings.prefill_step_size
        for start in range(0, len(tokens), size):
            chunk = ids[start : start + size]
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
        sampler = self.settings.sampler
        if sampler is not None:
            return verify_matching(tokens, sampler_targets(sampler, logprobs), parents)
        if self.greedy:
            return verify_greedy(tokens, logits, parents)
        return verify_sampled(tokens, self._probs(logits), q_prev)

    def feed(self, plan: Plan) -> Tuple[mx.array, Feed, Optional[Layout]]:
        """What ``plan``'s forward feeds: the fed tokens (n,), the forward's
        input (:class:`~mlx_mtp.model.rows.Feed`) and its layout (None:
        plain causal)."""
        fed, j = plan.fed, plan.masks
        tokens = fed[0] if isinstance(fed[0], mx.array) else mx.array(fed, dtype=mx.int32)
        if j == 0:
            return tokens, Feed(tokens), None
        if not plan.tree and not any(plan.masked[:-1]):  # masks after the last token only: plain causal attention
            layout = linear_layout(tokens, j)
            return tokens, Feed(layout.tokens, gate=layout.gate), layout
        layout = block_layout(tokens, j, plan.masked, plan.parents if plan.tree else None)
        return tokens, Feed(layout.tokens, layout.positions, layout.mask, layout.gate), layout

    @staticmethod
    def split(h: mx.array, layout: Optional[Layout], j: int) -> Tuple[mx.array, Optional[mx.array]]:
        """A step's hidden states (L, d) split: the fed tokens' (n, d) and
        the masks' (blocks with masks, j, d; None without masks)."""
        if layout is None:
            return h, None
        return h[mx.array(layout.regular)], h[layout.masks].reshape(-1, j, h.shape[-1])

    def _launch(self, plan: Plan, run: Optional[_Run] = None) -> Launched:
        """Build one step's graph and start computing it, for the
        generation ``run`` (its tokens so far for logits processors, its
        random stream)."""
        tokens, feed, layout = self.feed(plan)
        h = self.model(feed.tokens[None], self.cache, feed.positions, feed.mask, feed.gate)[0]
        regular, Z = self.split(h, layout, plan.masks)
        step = self.conclude(plan, run, tokens, self.model.lm_head(regular), Z, layout)
        self.submit([step])
        return step

    @staticmethod
    def submit(steps: List[Launched]):
        """Start computing ``steps``' graphs (one launch for all)."""
        outputs = []
        for step in steps:
            outputs += [step.packed, step.logprobs] + ([step.q_rows] if step.q_rows is not None else [])
        submitted = time.perf_counter()
        mx.async_eval(*outputs)
        for step in steps:
            step.submitted = submitted

    def conclude(
        self, plan: Plan, run: Optional[_Run], tokens: mx.array, logits: mx.array, Z: Optional[mx.array], layout
    ) -> Launched:
        """The rest of a step's graph after the forward: the caller's logits
        processors, verification and the masks' next chain, packed for the
        host (not launched yet). ``logits``: the base model's at the fed
        tokens (n, V); ``Z``: the masks' hidden states."""
        if run is not None and run.random is not None:
            run.random.reseed()
        C, fed, j = self.cache[0].committed, plan.fed, plan.masks
        if self.logits_processors:
            logits = self._process(logits, fed, plan.parents, (run.seen if run is not None else None) or [])
        q = plan.q
        if plan.allowed is not None:  # the grammar at each node, after the caller's processors (as mlx-lm's list)
            logits = apply_bitmask(logits, plan.allowed)
            if q is not None:
                # the drafts fed are those the grammar allows: their distribution is q renormalised over them
                q = q * allowed_tokens(plan.allowed[: q.shape[0]], q.shape[-1])
                q = q / mx.maximum(q.sum(axis=-1, keepdims=True), 1e-30)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        # on the device: the sampler chain runs from node best, picked before the host waits
        verdict = self._verify(tokens, logits, logprobs, plan.parents if plan.tree else None, q)
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
        regular_index = tuple(range(len(fed))) if layout is None else layout.regular
        return Launched(plan, regular_index, mx.concatenate(head), q_rows, logprobs)

    def _finish(self, step: Launched) -> Finished:
        """Wait for a step (the one sync) and read it."""
        vals = step.packed.tolist()
        plan = step.plan
        n, j = len(plan.fed), plan.masks
        a, best, targets = vals[0], vals[1], vals[2 : n + 2]
        path = accepted_path(best, plan.parents)  # the accepted nodes, root excluded
        emitted = [plan.fed[i] for i in path] + [targets[best]]
        # the chain ran from node best: its speculations are fresh only if
        # that node had masks
        chain = NO_CHAIN
        if j and plan.masked[best]:
            b = self.branches
            tokens = vals[n + 2 : n + 2 + b * j]
            specs = [tokens[i : i + j] for i in range(0, b * j, j)]
            if self.costs is not None:
                probs = [p / PROB_SCALE for p in vals[n + 2 + b * j :]]
                chain = Chain(specs, step.q_rows, [probs[i : i + j] for i in range(0, b * j, j)], probs[b * j :])
            else:
                chain = Chain(specs, step.q_rows)
        keep = [step.regular[0]] + [step.regular[i] for i in path]
        # the base model's distribution for each emitted token is the row of
        # the node before it on the accepted path (fed order differs in a tree)
        rows = [0] + path
        return Finished(emitted, a, best, targets, chain, keep, rows)

    def ahead(self, step: Launched, run: _Run) -> Optional[Plan]:
        """The plan of the step after ``step``, decided before ``step`` is
        read, where both are plain steps: its token is ``step``'s, still on
        the device, and ``step``'s cache entry is committed now (the loop
        launches it before reading ``step``, as mlx-lm does). Only where the
        next step would be plain whatever ``step`` emits: plain decoding (no
        masks, no copies), or the policy's say
        (:meth:`~mlx_mtp.decoding.policy.Policy.pipelines`). None otherwise."""
        plan = step.plan
        if plan.kind != "plain" or plan.masks or self.logits_processors or self.settings.constraint is not None:
            return None
        room = run.budget - run.generated - 1 if run.budget >= 0 else -1  # after step's token
        if run.budget >= 0 and room < 1:
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
        return Plan([token], (), (False,), 0, [], kind="plain", choice=choice)

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

    def _copied(self, lookup: Optional[NGramLookup], after: Sequence[int] = ()) -> Drafts:
        """Copied drafts for the text so far and then ``after`` (a grammar's forced tokens)."""
        return copied_drafts(lookup, self.datastore, self.lookup, after) if lookup is not None else Drafts([], "mtp")

    def _plan(
        self,
        pending: int,
        lookup: Optional[NGramLookup],
        chain: Chain,
        room: int,
        grammar: Optional[ConstraintMatcher] = None,
        load: BatchLoad = ALONE,
    ) -> Plan:
        """The next step's plan: the policy's choice (``load``: what the rest
        of a batch feeds beside it), or the fixed settings' (copied drafts
        where there are any, else the masks' speculations), with at most
        ``room`` - 1 drafts per branch (``room`` < 0: no limit); under a
        ``grammar``, its forced tokens first and every draft cut at the first
        token it refuses (:meth:`_constrain`)."""
        limit = None if room < 0 else max(0, room - 1)
        forced = self._forced(grammar, limit)
        if self.policy is not None:
            return self._plan_policy(pending, lookup, chain, room, grammar, forced, limit, load)
        copied = self._copied(lookup, forced)
        specs, q, source = chain.specs, chain.q, "mtp"
        if copied.tokens:
            specs, source = [copied.tokens], copied.source
            q = None if self.greedy else one_hot(copied.tokens, self.model.vocab_size)
        specs = [branch[:limit] for branch in specs if branch[:limit]]
        q = q[: len(specs[0])] if (q is not None and specs) else None
        source = source if specs else "mtp"
        if not specs:
            kind = "masks" if self.k else "plain"
        else:
            kind = "copy" if source != "mtp" else ("branches" if len(specs) > 1 else "chain")
        if grammar is not None:
            constrained, q = self._constrain(grammar, forced, [(source, b) for b in specs], q, limit)
            specs = [b for _, b in constrained]
            source = constrained[0][0] if constrained else "mtp"
        fed = [pending] + [t for branch in specs for t in branch]
        branches, start = [], 1
        for branch in specs:
            branches.append((source, start, len(branch)))
            start += len(branch)
        parents = tree_parents([len(branch) for branch in specs])
        plan = Plan(fed, parents, self._masked(len(fed), source), self.k, branches, q, kind, forced=len(forced))
        return self._allow(plan, grammar)

    def _choose(
        self,
        lookup: Optional[NGramLookup],
        chain: Chain,
        room: int,
        forced: Sequence[int] = (),
        load: BatchLoad = ALONE,
    ) -> Tuple[Choice, Drafts]:
        """The policy's choice for the next step, and the copy it was offered
        (following ``forced``, a grammar's forced tokens); in a batch
        (``load``) priced in the batch's forward under greedy decoding only:
        a sampled row's choices decide how it consumes the random stream, so
        they must be those it makes alone (its output is then the one it has
        alone, whichever requests share its steps)."""
        copied = self._copied(lookup, forced)
        offer = CopyDraft(len(copied.tokens), copied.source, copied.ngram, copied.count) if copied.tokens else None
        drafts = StepDrafts(
            context=self.cache[0].committed,
            copy=offer,
            chain_probs=tuple(chain.probs[0]) if chain.specs else (),
            branch_probs=tuple(chain.first) if chain.specs else (),
            room=room,
            load=load if self._timed else ALONE,
        )
        return self.policy.choose(drafts), copied

    def _plan_policy(
        self,
        pending: int,
        lookup: Optional[NGramLookup],
        chain: Chain,
        room: int,
        grammar: Optional[ConstraintMatcher],
        forced: List[int],
        limit: Optional[int],
        load: BatchLoad,
    ) -> Plan:
        """The policy's plan for the next step (see :class:`~mlx_mtp.decoding.policy.Choice`),
        after the grammar's ``forced`` tokens; ``limit``: the most drafts ``room``
        allows (:meth:`_plan` took both)."""
        choice, copied = self._choose(lookup, chain, room, forced, load)
        chain_probs = tuple(chain.probs[0]) if chain.specs else ()
        m, d, j = choice.depth, choice.copy, choice.masks
        branches: List[Tuple[str, List[int]]] = []
        if d:
            branches.append((copied.source, copied.tokens[:d]))
        if m:
            branches += [("mtp", spec[:m]) for spec in chain.specs[: choice.branches]]
        q = None
        if not self.greedy and branches:
            q = chain.q[:m] if m else one_hot(copied.tokens[:d], self.model.vocab_size)
        if grammar is not None:
            branches, q = self._constrain(grammar, forced, branches, q, limit)
            chain_probs = chain_probs[: next((len(t) for s, t in branches if s == "mtp"), 0)]
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
        plan = Plan(fed, parents, masked, j, spans, q, choice.kind, choice, chain_probs[:m], len(forced))
        return self._allow(plan, grammar)

    @staticmethod
    def _forced(grammar: Optional[ConstraintMatcher], limit: Optional[int]) -> List[int]:
        """The tokens the grammar forces next, at most ``limit`` (None: no limit)."""
        return grammar.forced()[:limit] if (grammar is not None and limit != 0) else []

    def _constrain(
        self,
        grammar: ConstraintMatcher,
        forced: List[int],
        branches: List[Tuple[str, List[int]]],
        q: Optional[mx.array],
        limit: Optional[int],
    ) -> Tuple[List[Tuple[str, List[int]]], Optional[mx.array]]:
        """``branches`` (source, drafts) under the grammar, with their draft
        distributions ``q`` (sampling: one branch), at most ``limit`` drafts
        each (None: no limit).

        Where the grammar forces tokens (``forced``), they lead a single
        chain (they are certain: their masks allow them alone), followed by
        the first branch's drafts for the positions after them: a copy was
        made after them (:meth:`_copied`), the masks' chain predicted from
        the pending token on, so its first ``len(forced)`` tokens are
        dropped. Their source is "forced" where nothing follows. Every
        branch is cut at the first token the grammar refuses (it would be
        rejected anyway), and dropped if nothing is left."""
        if not forced:
            kept = [(source, tokens[: grammar.validate(tokens)]) for source, tokens in branches]
            kept = [(source, tokens) for source, tokens in kept if tokens]
            return kept, (q[: len(kept[0][1])] if (q is not None and kept) else None)
        source, rest = branches[0] if branches else ("forced", [])
        skip = len(forced) if source == "mtp" else 0
        tokens = (forced + rest[skip:])[:limit]
        tokens = tokens[: max(len(forced), grammar.validate(tokens))]
        if len(tokens) == len(forced):
            source = "forced"
        if not self.greedy:  # forced tokens' draft distribution is one-hot
            rows = [one_hot(forced, self.model.vocab_size)]
            if len(tokens) > len(forced):
                rows.append(q[skip : skip + len(tokens) - len(forced)])
            q = mx.concatenate(rows)
        return [(source, tokens)], q

    @staticmethod
    def _allow(plan: Plan, grammar: Optional[ConstraintMatcher]) -> Plan:
        """``plan`` with the grammar's bitmask of the tokens allowed after
        each fed node (the path from the root to it), where there is a grammar."""
        if grammar is not None:
            plan.allowed = grammar.masks(
                [[plan.fed[j] for j in accepted_path(i, plan.parents)] for i in range(len(plan.fed))]
            )
        return plan

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
        random: Optional[RandomStream] = None,
    ) -> Iterator[Step]:
        """Generate from ``prompt`` (token ids), one :class:`Step` per
        verification pass. Stops after the first EOS token (which is emitted),
        after ``max_tokens`` tokens, or at the context limit.

        Each pass: launch the next plain step ahead where it will be plain
        anyway (:meth:`ahead`), wait for this one and commit what it
        accepted (:meth:`_sync`), cut at EOS or the budget (:meth:`_cut`),
        plan and launch the next one (:meth:`next_plan`) while the host hands
        these tokens out (:meth:`emit`).

        Args:
            cache: a prompt cache holding text before ``prompt`` (None: a
                fresh one); afterwards it holds at least the prompt and every
                token but the last of each step, see :meth:`settle`.
            context: the tokens in ``cache``, where known (prompt lookup
                drafts from them too; speed only).
            random: the generation's random stream where it samples
                (:mod:`mlx_mtp.decoding.randomness`; None: drawn from mlx's
                global random state when the generation starts).
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
        run, plan = self.begin(prompt, budget, eos, cache, context, random)
        step = self._launch(plan, run)
        while True:
            ahead = self.ahead(step, run)
            nxt = None if ahead is None else self._launch(ahead, run)
            done, emitted, stop = self.read(step, run)
            if not stop:
                plan = self.next_plan(done, emitted, ahead, run)
                if nxt is None:
                    nxt = self._launch(plan, run)
                    run.observer.launched(step.plan, nxt)
            yield self.emit(step, done, emitted, run)
            if stop:
                return
            step = nxt
            if run.generated % 256 < len(emitted):
                mx.clear_cache()

    def begin(
        self,
        prompt: List[int],
        budget: int,
        eos: Set[int],
        cache,
        context: Sequence[int],
        random,
        prefilled: bool = False,
    ):
        """A generation's start (:meth:`steps`' arguments, its ``budget``
        > 0): its state between steps (:meth:`_start`) and its first plan.
        ``prefilled``: :attr:`cache` holds all but the prompt's last token already."""
        run = self._start(prompt, cache, context, budget, eos, random, prefilled)
        return run, self._plan(prompt[-1], run.lookup, NO_CHAIN, budget, run.grammar)

    def _start(
        self, prompt: List[int], cache, context: Sequence[int], budget: int, eos: Set[int], random, prefilled=False
    ) -> _Run:
        """Prefill all but the prompt's last token (unless ``prefilled``);
        this generation's lookup, policy and random stream."""
        if not prefilled:
            self.prefill(prompt[:-1], cache)
        ngram = self.settings.lookup_ngram
        lookup = NGramLookup(ngram, max(ngram, MAX_NGRAM)) if self.lookup else None
        if lookup is not None:
            lookup.extend(list(context) + prompt)
        # the policy's estimates are this generation's
        self.policy = self._make_policy() if self.costs is not None else None
        # mlx-lm's logits processors see the prompt and the tokens generated
        seen = prompt[:-1] if self.logits_processors else None
        constraint = self.settings.constraint
        grammar = constraint.matcher() if constraint is not None else None
        if self.sampled and random is None:
            random = RandomStream.drawn()
        observer = PolicyObserver(self.policy, self._timed, self.greedy)
        return _Run(budget, eos, lookup, seen, observer, grammar, random if self.sampled else None)

    def read(self, step: Launched, run: _Run) -> Tuple[Finished, List[int], bool]:
        """Wait for ``step`` and commit what it accepted (:meth:`_sync`); the
        tokens to hand out and whether the generation ends (:meth:`_cut`)."""
        done = self._sync(step, run)
        emitted, stop = self._cut(done.emitted, run)
        return done, emitted, stop

    def _sync(self, step: Launched, run: _Run) -> Finished:
        """Wait for ``step`` (the one sync), tell the policy, commit what it accepted."""
        run.observer.waiting()
        done = self._finish(step)
        run.observer.synced(step.plan, done)
        if not step.committed:
            commit(self.cache, done.keep)
        if run.seen is not None:
            run.seen = run.seen + [step.plan.fed[0]] + done.emitted[:-1]
        if run.grammar is not None:
            run.grammar.consume(done.emitted)
        return done

    @staticmethod
    def _cut(emitted: List[int], run: _Run) -> Tuple[List[int], bool]:
        """The tokens to hand out, up to the first EOS or the budget, and whether the generation ends."""
        stop = False
        for i, t in enumerate(emitted):
            if t in run.eos or (run.budget >= 0 and run.generated + i + 1 >= run.budget):
                emitted, stop = emitted[: i + 1], True
                break
        run.generated += len(emitted)
        return emitted, stop

    def next_plan(
        self, done: Finished, emitted: List[int], ahead: Optional[Plan], run: _Run, load: BatchLoad = ALONE
    ) -> Plan:
        """The next step's plan (before the host hands over ``emitted``):
        the one decided ahead (:meth:`ahead`), or planned now (``load``: what
        the rest of a batch feeds beside it)."""
        if run.lookup is not None:
            run.lookup.extend(emitted)
        if ahead is not None:
            if self.policy is not None:  # what the step would have been, launched now
                run.observer.pipelined(self._choose(run.lookup, done.chain, run.room)[0])
            return ahead
        return self._plan(emitted[-1], run.lookup, done.chain, run.room, run.grammar, load)

    @staticmethod
    def emit(step: Launched, done: Finished, emitted: List[int], run: _Run) -> Step:
        """What the caller gets of a step."""
        seconds = 0.0
        if run.grammar is not None:
            seconds, run.grammar_seconds = run.grammar.seconds - run.grammar_seconds, run.grammar.seconds
        accepted = min(done.accepted, len(emitted))
        return Step(
            tokens=emitted,
            proposed=len(step.plan.fed) - 1,
            accepted=accepted,
            logprobs=[step.logprobs[done.rows[i]] for i in range(len(emitted))],
            source=step.plan.source(done.best),
            choice=step.plan.kind,
            forced=min(step.plan.forced, accepted),
            constraint_seconds=seconds,
        )

    def _make_policy(self) -> Policy:
        trees = self.settings.trees
        return Policy(
            self.costs,
            max_masks=self.k,
            max_branches=self.branches if trees else 1,
            max_copy=self.lookup,
            greedy=trees,
            priors=self.state.priors,
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
        step = self._finish(self._launch(self._plan(prompt[-1], None, NO_CHAIN, -1)))
        return step.emitted + (step.chain.specs[0] if step.chain.specs else [])
