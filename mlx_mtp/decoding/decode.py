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

Layouts (:mod:`mlx_mtp.layouts`):

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
costs ~1.6x one, against masks accepted ~35% of the time), that is fastest.

With ``lookup=d`` (:mod:`mlx_mtp.lookup`), a step whose last tokens occurred
earlier in the prompt or the output feeds up to d tokens copied from what
followed them instead of the masks' speculations. Masks follow only the
pending token and the last copied token (``block`` layout; linear mode: the
last only): copies are often right to their end, and on a CPU a forward over
d+1+2k tokens costs far less than over (d+1)(k+1), while a copy rejected from
its first token still leaves the masks' speculations for the next step. Their
draft distribution is one-hot, so speculative sampling stays exact. Where the text
has no such match, an adapter's datastore (:mod:`mlx_mtp.datastore`: the
responses it was trained on) drafts the most common continuation of the last
tokens in the same way.

Only the accepted regular tokens are committed to the KV cache (their entries
equal the base model's); masks and rejected tokens are dropped.

The loop is lazy: each step's graph (forward, verification, sampling, sampler
chains) is built and launched with ``mx.async_eval``, then the host hands the
previous step's tokens to the consumer while the device works, and waits once
per step (one ``tolist()`` of a small packed int array). The prompt is
prefilled in chunks through the plain causal forward.
"""

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..model.cache import commit
from ..model.layouts import block_layout, linear_layout, tree_parents, tree_structure
from .lookup import NGramLookup
from ..model.mtp_model import MTPModel

MODES = ("quadratic", "linear", "off")

# copied tokens verified per lookup step (stream_generate, the CLIs); with the
# step-541 SmolLM2-135M adapter at k=1 (fp32; Spec-Bench, 1 prompt per category,
# 96 tokens, greedy): 1.40 tokens/step without lookup, 1.53 at d=4, 1.54 at d=6
DEFAULT_LOOKUP = 6
# tokens drafted per step from an adapter's datastore (at most the lookup's d):
# its drafts are right for fewer leading tokens than copies from the text
# (SmolLM2-135M, self-distilled responses, on 26 Spec-Bench greedy outputs:
# 0.80 leading tokens right of up to 4 drafted, 0.87 of up to 6)
DATASTORE_TOKENS = 4
# prompt lookup matches n-grams of lookup_ngram (default 3) .. MAX_NGRAM tokens, longest first
MAX_NGRAM = 8

# (prev tokens (R,), mask hidden states (R, d), absolute positions of the
# predicted tokens (R,)) -> draft logits (R, V)
DraftFn = Callable[[mx.array, mx.array, mx.array], mx.array]


@lru_cache(maxsize=64)
def _tree_arrays(parents: Tuple[int, ...]) -> Tuple[mx.array, mx.array, mx.array]:
    """For verifying a tree of n fed tokens: each node's depth (n,), the
    parent of each non-root node (n-1,) and whether non-root node j is node
    i or an ancestor of it (n, n-1)."""
    depth, anc = tree_structure(parents)
    return (
        mx.array(depth, dtype=mx.int32),
        mx.array(parents[1:], dtype=mx.int32),
        mx.array(anc[:, 1:]),
    )


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
            raise ValueError(
                f"num_masks={num_masks} is more than the adapter was trained with ({trained})"
            )
    if mode == "off":
        return 0
    return model.default_num_masks if num_masks is None else num_masks


def _apply_filters(logprobs: mx.array, top_p: float, top_k: int) -> mx.array:
    """mlx-lm's top-p then top-k filters (same order as ``make_sampler``)."""
    from mlx_lm.sample_utils import apply_top_k, apply_top_p

    if 0 < top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    if 0 < top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, top_k)
    return logprobs


def speculative_accept(
    p: mx.array, q: mx.array, drafts: mx.array, u: mx.array
) -> tuple:
    """Speculative sampling for m drafted tokens, vectorised.

    ``p`` (m+1, V): target distributions at the m+1 regular positions;
    ``q`` (m, V): the distributions the m drafts were sampled from;
    ``drafts`` (m,); ``u`` (m,) uniform in [0, 1).
    Returns ``(accept (m,) bool, correction (m+1,) int32)``: draft j is
    accepted when ``u_j q_j(d_j) < p_j(d_j)``; ``correction[j]`` is a sample
    of the normalised ``(p_j - q_j)+`` for j < m (used when draft j is the
    first rejected) and of ``p_m`` for j = m (all accepted).
    """
    m = drafts.shape[0]
    if m == 0:
        return mx.zeros((0,), dtype=mx.bool_), mx.random.categorical(mx.log(p)).astype(mx.int32)
    idx = mx.arange(m)
    ps = p[idx, drafts]
    qs = q[idx, drafts]
    accept = u * qs < ps
    resid = mx.maximum(p[:m] - q, 0.0)
    # p == q (up to rounding) leaves no residual mass; rejection then has
    # probability ~0 and p itself is the right fallback.
    resid = mx.where(resid.sum(-1, keepdims=True) > 0, resid, p[:m])
    dist = mx.concatenate([resid, p[m:]], axis=0)
    return accept, mx.random.categorical(mx.log(dist)).astype(mx.int32)


@dataclass
class Step:
    """What one step emitted."""

    tokens: List[int]  # accepted speculations, then the base model's token
    proposed: int  # speculations fed (verified) in this step
    accepted: int  # of which accepted
    source: str = "mtp"  # where the speculations came from: "mtp", "lookup" or "datastore"
    logprobs: List[mx.array] = field(default_factory=list)  # (V,) per token, lazy


@dataclass
class _Launched:
    """A step in flight (everything lazy until the host syncs)."""

    fed: List[int]
    parents: Tuple[int, ...]  # of each fed token in the tree of speculations
    masked: Tuple[bool, ...]  # which fed tokens had masks after them
    regular: Tuple[int, ...]  # layout index of each fed token
    source: str
    packed: mx.array
    q_rows: Optional[mx.array]  # (k, V) draft distributions of the chain (sampling only)
    logprobs: mx.array  # (n, V)


class SpeculativeDecoder:
    """Decodes with an :class:`MTPModel`; see the module docstring.

    ``draft_fn`` replaces the sampler head (for tests and inspection); it is
    called with the previous tokens, the mask hidden states and the absolute
    positions of the tokens to predict.
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
            if temp != 0:
                raise ValueError("branches > 1 needs greedy decoding (temp 0)")
        self.branches = branches
        self.lookup = lookup if mode != "off" else 0
        # k = 0 with lookup: copied drafts only (see the module docstring)
        self.mode = mode if (self.k or self.lookup) else "off"
        self.temp = float(temp)
        self.top_p = top_p
        self.top_k = top_k
        self.prefill_step_size = prefill_step_size
        self.lookup_ngram = lookup_ngram
        # drafts from the adapter's datastore where prompt lookup finds none
        self.datastore = getattr(model, "datastore", None) if (use_datastore and self.lookup) else None
        if draft_fn is None and self.k:
            draft_fn = lambda prev, z, pos: model.sampler_logits(prev, z)  # noqa: E731
        self.draft_fn = draft_fn
        self.context_limit = context_limit(model)
        self.cache = None

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    # --- pieces ------------------------------------------------------------------
    def _probs(self, logits: mx.array) -> mx.array:
        """Sampling distribution (float32) from logits: top-p/top-k, then temperature."""
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        logprobs = _apply_filters(logprobs, self.top_p, self.top_k)
        return mx.softmax(logprobs * (1.0 / self.temp), axis=-1)

    def prefill(self, prompt: Sequence[int]):
        """A fresh cache holding ``prompt`` (all of it), in chunks."""
        self.cache = self.model.make_cache()
        tokens = mx.array(list(prompt), dtype=mx.int32)
        for start in range(0, len(prompt), self.prefill_step_size):
            chunk = tokens[start : start + self.prefill_step_size]
            self.model(chunk[None], self.cache)
            commit(self.cache)
            mx.eval([c.keys for c in self.cache] + [c.values for c in self.cache])
            mx.clear_cache()

    def _verify(
        self, tokens: mx.array, logits: mx.array, parents: Optional[Tuple[int, ...]], q_prev: Optional[mx.array]
    ) -> Tuple[mx.array, mx.array, mx.array]:
        """Verify the fed tokens' speculations (a chain, or a tree with
        ``parents``) against the base model's ``logits`` (n, V) at them:
        ``(a, best, targets)``, lazy. ``best`` (1,)
        is the accepted node furthest from the pending token (0: none
        accepted), ``a`` (1,) its depth (the accepted speculations) and
        ``targets`` (n,) the base model's token after each fed token (when
        sampling: the correction sample there)."""
        m = tokens.shape[0] - 1
        if self.greedy:
            targets = mx.argmax(logits, axis=-1).astype(mx.int32)
            if parents is not None:
                # a tree: a node is accepted when it and each of its ancestors
                # equal the base model's token after their parent
                depth, parent_index, ancestors = _tree_arrays(parents)
                ok = tokens[1:] == targets[parent_index]
                reached = ~(ancestors & ~ok[None]).any(axis=1)
                best = mx.argmax(mx.where(reached, depth, -1), keepdims=True).astype(mx.int32)
                return depth[best], best, targets
            accept = tokens[1:] == targets[:m]
        else:
            p = self._probs(logits)
            accept, targets = speculative_accept(
                p, q_prev if m else None, tokens[1:], mx.random.uniform(shape=(m,))
            )
        if m:
            a = mx.cumprod(accept.astype(mx.int32)).sum(keepdims=True).astype(mx.int32)
        else:
            a = mx.zeros((1,), dtype=mx.int32)
        return a, a, targets

    def _launch(
        self, pending: int, specs: List[List[int]], q_prev: Optional[mx.array], source: str = "mtp"
    ) -> _Launched:
        """Build one step's graph and start computing it. ``specs``: the
        speculations, one list per branch (each a chain after ``pending``)."""
        model, cache, k = self.model, self.cache, self.k
        C = cache[0].committed
        fed = [pending] + [t for branch in specs for t in branch]
        parents = tree_parents([len(branch) for branch in specs])
        n = len(fed)
        tree = len(specs) > 1
        tokens = mx.array(fed, dtype=mx.int32)
        masked = self._masked(n, source)
        if k == 0:
            h = model(tokens[None], cache)[0]
            regular, layout = h, None
        else:
            if not tree and not any(masked[:-1]):  # masks after the last token only: plain causal attention
                layout = linear_layout(tokens, k)
                h = model(layout.tokens[None], cache, gate=layout.gate)[0]
            else:
                layout = block_layout(tokens, k, masked, parents if tree else None)
                h = model.forward_layout(layout, cache)[0]
            regular = h[mx.array(layout.regular)]  # (n, d)
            Z = h[layout.masks].reshape(-1, k, h.shape[-1])  # (blocks with masks, k, d)
        logits = model.lm_head(regular)  # (n, V), at the regular positions only
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        # on the device: the sampler chain runs from node best, picked before the host waits
        a, best, targets = self._verify(tokens, logits, parents if tree else None, q_prev)
        head = [a, best, targets]

        q_rows = None
        if k:
            # the chain from node best: valid when it has masks (the host checks);
            # with branches, its first step keeps the b most likely tokens
            z, prev, at = Z[layout.mask_block[best]], targets[best], a
            chain, qs = [], []
            for j in range(k):
                # chain step j from the node at position C + a predicts position C + a + j + 2
                draft = self.draft_fn(prev, z[:, j], at + (C + j + 2))
                if self.greedy and j == 0 and self.branches > 1:
                    b = self.branches
                    top = mx.argpartition(-draft[0], kth=b - 1)[:b]
                    prev = top[mx.argsort(-draft[0, top])].astype(mx.int32)
                    z, at = mx.broadcast_to(z, (b, *z.shape[1:])), mx.broadcast_to(at, (b,))
                elif self.greedy:
                    prev = mx.argmax(draft, axis=-1).astype(mx.int32)
                else:
                    q = self._probs(draft)
                    prev = mx.random.categorical(mx.log(q)).astype(mx.int32)
                    qs.append(q[0])
                chain.append(prev)
            head.append(mx.stack(chain, axis=1).reshape(-1))  # branch by branch
            if qs:
                q_rows = mx.stack(qs)  # (k, V)
        packed = mx.concatenate(head)
        mx.async_eval(packed, logprobs, *([q_rows] if q_rows is not None else []))
        regular_index = tuple(range(n)) if layout is None else layout.regular
        return _Launched(fed, parents, masked, regular_index, source, packed, q_rows, logprobs)

    def _finish(self, step: _Launched):
        """Wait for a step (the one sync) and read it: (emitted tokens, accepted
        count, next speculations (one list per branch), their draft
        distributions, keep indices)."""
        vals = step.packed.tolist()
        n = len(step.fed)
        k = self.k
        a, best, targets, chain = vals[0], vals[1], vals[2 : n + 2], vals[n + 2 :]
        path = []  # the accepted nodes, root excluded
        node = best
        while node > 0:
            path.append(node)
            node = step.parents[node]
        path.reverse()
        emitted = [step.fed[i] for i in path] + [targets[best]]
        # the chain ran from node best: its speculations are fresh only if
        # that node had masks
        fresh = k > 0 and step.masked[best]
        next_specs = [chain[i : i + k] for i in range(0, len(chain), k)] if fresh else []
        next_q = step.q_rows if fresh else None
        keep = [step.regular[0]] + [step.regular[i] for i in path]
        # the base model's distribution for each emitted token is the row of
        # the node before it on the accepted path (fed order differs in a tree)
        rows = [0] + path
        return emitted, a, next_specs, next_q, keep, rows

    def _masked(self, n: int, source: str) -> Tuple[bool, ...]:
        """Which of the n fed tokens get k masks after them: none without
        masks; linear: the last; quadratic: every one, or for copied drafts
        the pending token and the last draft (a copy is mostly right to its
        end or wrong from its first token, and masks after each token would
        cost more than they give on a CPU)."""
        if self.k == 0:
            return (False,) * n
        if self.mode == "linear" or n == 1:
            return (False,) * (n - 1) + (True,)
        if source == "mtp":
            return (True,) * n
        return (True,) + (False,) * (n - 2) + (True,)

    def _one_hot(self, tokens: List[int]) -> mx.array:
        """The draft distribution of copied tokens: (d, V), one-hot."""
        V = self.model.vocab_size
        return (mx.arange(V)[None] == mx.array(tokens, dtype=mx.int32)[:, None]).astype(mx.float32)

    def _copied_drafts(self, lookup: NGramLookup) -> Tuple[List[int], str]:
        """Drafts copied from earlier in the text, else from the datastore:
        (tokens, source); ([], "mtp") when neither has any."""
        copied = lookup.draft(self.lookup)
        if copied:
            return copied, "lookup"
        if self.datastore is not None:
            copied = self.datastore.draft(lookup.tokens[-MAX_NGRAM:], min(self.lookup, DATASTORE_TOKENS))
            if copied:
                return copied, "datastore"
        return [], "mtp"

    def _launch_next(
        self,
        pending: int,
        lookup: Optional[NGramLookup],
        specs: List[List[int]],
        q: Optional[mx.array],
        room: int,
    ) -> _Launched:
        """Launch the step that feeds ``pending`` (the last token of the text
        in ``lookup``, if any) and its drafts: copied drafts where there are
        any, else the masks' speculations ``specs`` (one list per branch); at
        most ``room`` - 1 drafts per branch (``room`` < 0: no limit)."""
        copied, source = self._copied_drafts(lookup) if lookup is not None else ([], "mtp")
        if copied:
            specs, q = [copied], None if self.greedy else self._one_hot(copied)
        limit = None if room < 0 else max(0, room - 1)
        specs = [branch[:limit] for branch in specs if branch[:limit]]
        q = q[: len(specs[0])] if (q is not None and specs) else None
        return self._launch(pending, specs, q, source if specs else "mtp")

    # --- the loop ------------------------------------------------------------------
    def budget(self, prompt_len: int, max_tokens: int) -> int:
        """How many tokens may be generated: ``max_tokens`` (negative: no
        limit) and the context limit."""
        limits = []
        if max_tokens >= 0:
            limits.append(max_tokens)
        if self.context_limit is not None:
            limits.append(self.context_limit - prompt_len)
        return min(limits) if limits else -1

    def check_prompt(self, prompt: Sequence[int]):
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        if self.context_limit is not None and len(prompt) >= self.context_limit:
            raise ValueError(
                f"the prompt is {len(prompt)} tokens, which leaves no room in the model's "
                f"context of {self.context_limit} tokens"
            )

    def steps(
        self,
        prompt: Sequence[int],
        max_tokens: int = 256,
        eos_token_ids: Iterable[int] = (),
    ) -> Iterator[Step]:
        """Generate from ``prompt`` (token ids), one :class:`Step` per
        verification pass. Stops after the first EOS token (which is emitted),
        after ``max_tokens`` tokens, or at the context limit."""
        prompt = [int(t) for t in prompt]
        self.check_prompt(prompt)
        eos = set(int(t) for t in eos_token_ids)
        budget = self.budget(len(prompt), max_tokens)
        if budget == 0:
            return
        self.prefill(prompt[:-1])
        lookup = NGramLookup(self.lookup_ngram, max(self.lookup_ngram, MAX_NGRAM)) if self.lookup else None
        if lookup is not None:
            lookup.extend(prompt)
        inflight = self._launch_next(prompt[-1], lookup, [], None, budget)
        generated = 0
        while True:
            emitted, a, specs, q, keep, rows = self._finish(inflight)
            proposed, step_source = len(inflight.fed) - 1, inflight.source
            commit(self.cache, keep)
            logprobs = inflight.logprobs
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
                inflight = self._launch_next(emitted[-1], lookup, specs, q, room)
            yield Step(
                tokens=emitted,
                proposed=proposed,
                accepted=min(a, len(emitted)),
                logprobs=[logprobs[rows[i]] for i in range(len(emitted))],
                source=step_source,
            )
            if done:
                return
            if generated % 256 < len(emitted):
                mx.clear_cache()

    def propose(self, prompt: Sequence[int]) -> List[int]:
        """One pass over ``prompt``: the base model's next token and the k
        speculations that follow it (greedy through the sampler head)."""
        prompt = [int(t) for t in prompt]
        self.check_prompt(prompt)
        self.prefill(prompt[:-1])
        emitted, _, specs, _, _, _ = self._finish(self._launch(prompt[-1], [], None))
        return emitted + (specs[0] if specs else [])
