"""The per-step policy: what to verify next, chosen for expected tokens per second.

Each step the decoder feeds one forward. What it can feed: nothing but the
pending token (plain decoding); a copied draft (prompt lookup or datastore);
the masks' chain from the last step, to some depth, or several branches of
it; a copy and the chain together as a tree. Each may or may not carry mask
tokens, which cost width now and give the next step a chain to verify.

The policy scores every such plan with what it expects: tokens (from the
acceptance estimates, :class:`AcceptanceEstimator`) and seconds (from the
calibrated :class:`~mlx_mtp.calibration.costs.CostModel`). Plans that feed masks are
also worth what a chain will be worth next step. It is an average-reward
problem over two kinds of state (a chain of depth j at hand, or none); with
``rho`` the best long-run rate (tokens per second) the estimates allow, the
plan chosen maximises

    expected tokens + P(a fresh chain next) * value(chain of depth j) - rho * seconds

where ``value(j)`` is what having a chain of depth j is worth against having
none, in tokens, from the same estimates (:meth:`Policy.regime`). Where a
wide forward costs about as much as a narrow one (GPUs) this picks long
chains and trees; where a forward over T tokens costs T times one (4-bit
weights on a CPU) nothing but plain steps can pay, and it picks those.

In a batch (several requests verified in one forward, each with its own
policy), a step's seconds are the row's share of the batch's least forward
plus what its drafts add to the forward, from the calibrated cost of
batched forwards and what the other rows feed (:class:`BatchLoad`): as the
batch fills, width stops being free where the device is busy, and the
policy drafts less there (:meth:`Policy.seconds`).

Acceptance is estimated online, per source ("mtp", "lookup", "datastore")
and depth, from this generation's steps (a Beta posterior around priors that
an adapter can carry in its recipe, :class:`Priors`), and sharpened by the
draft's own signals: the sampler head's probability of each drafted token,
and the length and count of the n-gram behind a copy. Everything here is a
few dozen float operations per step on the host; docs/calibration.md has
the details and measured figures.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

SOURCES = ("mtp", "lookup", "datastore")
KINDS = ("plain", "masks", "copy", "chain", "branches", "tree")
# the most branches of the masks' chain the decoder offers the policy
MAX_BRANCHES = 3
# steps over which measured step times correct the calibrated costs (Policy.observe)
SCALE_STEPS = 8
# the host's share of a plain step (reading it, planning and launching the
# next) that launching the next plain step before reading this one hides,
# until measured (Policy.pipelines; docs/calibration.md)
HOST_SHARE = 0.05
# weight, in steps, of the prior (no gain) in the mean gain of the plans
# chosen after plain steps (Policy.pipelines)
GAIN_PRIOR_STEPS = 4.0


class Costs(Protocol):
    """What the policy needs of a cost model (:class:`mlx_mtp.calibration.costs.CostModel`)."""

    def cost(self, width: int, context: int, gated: bool = False) -> float: ...

    def chain(self, depth: int) -> float: ...

    def batch_cost(self, rows: int, tokens: int, context: int, gated: bool = False) -> float: ...


# --- acceptance ------------------------------------------------------------------------------
@dataclass
class Priors:
    """Prior acceptance: for each source, the chance that the drafted token
    at depth i is right given that the ones before it were (the last value
    holds for deeper ones), worth ``strength`` observed steps. A copy's first
    token gets ``ngram_bonus`` (in log-odds) per n-gram token beyond
    ``ngram_base`` and ``count_bonus`` per doubling of its count. An adapter
    carries them as ``recipe["policy_priors"]`` (:meth:`from_dict`)."""

    # defaults from the default adapter's measurements (docs/calibration.md)
    mtp: List[float] = field(default_factory=lambda: [0.35, 0.5, 0.55, 0.6])
    lookup: List[float] = field(default_factory=lambda: [0.55, 0.75, 0.8, 0.85])
    datastore: List[float] = field(default_factory=lambda: [0.4, 0.55, 0.6, 0.6])
    strength: float = 4.0
    ngram_base: int = 3
    ngram_bonus: float = 0.7
    count_bonus: float = 0.3

    def __post_init__(self):
        for source in SOURCES:
            values = getattr(self, source)
            if not values or not all(isinstance(p, (int, float)) and 0 < p < 1 for p in values):
                raise ValueError(f"policy_priors: '{source}' must be a non-empty list of probabilities in (0, 1)")
        if not self.strength > 0:
            raise ValueError(f"policy_priors: strength must be > 0, got {self.strength}")

    def prior(self, source: str, depth: int) -> float:
        values = getattr(self, source)
        return float(values[min(depth, len(values)) - 1])

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, object]]) -> "Priors":
        """From an adapter recipe's ``policy_priors`` (None: the defaults)."""
        if not d:
            return cls()
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"policy_priors: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()})


def _running_mean(old: float, new: float) -> float:
    """A running geometric mean over about ``SCALE_STEPS`` observations."""
    w = 1.0 / SCALE_STEPS
    return math.exp((1 - w) * math.log(old) + w * math.log(new))


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class AcceptanceEstimator:
    """Online acceptance per (source, depth): Beta posteriors around the
    priors, from the steps of this generation.

    A step that verified d drafted tokens of a source and found the first a
    right (a <= d) is a success at depths 1..a and, if a < d, a failure at
    depth a+1; deeper ones were not tried. For the masks' chain it also
    keeps the sampler head's probability of the tokens tried, so that a
    draft's own probability can be scaled by how well they have predicted
    acceptance so far.
    """

    def __init__(self, priors: Optional[Priors] = None):
        self.priors = priors or Priors()
        # (source, depth) -> [successes, trials, sum of the sampler probabilities tried]
        self.counts: Dict[Tuple[str, int], List[float]] = {}

    def observe(self, source: str, proposed: int, accepted: int, probs: Optional[Sequence[float]] = None):
        """Record a verified draft: ``proposed`` tokens of ``source``, the first
        ``accepted`` of them right; ``probs``: the draft's probability of each
        token (the masks' chain)."""
        if source not in SOURCES:
            raise ValueError(f"unknown draft source '{source}'")
        accepted = min(max(accepted, 0), proposed)
        for depth in range(1, min(accepted + 1, proposed) + 1):
            c = self.counts.setdefault((source, depth), [0.0, 0.0, 0.0])
            c[0] += depth <= accepted
            c[1] += 1
            if probs is not None and depth <= len(probs):
                c[2] += float(probs[depth - 1])

    def conditional(self, source: str, depth: int) -> float:
        """P(the token at ``depth`` is right | those before it were)."""
        prior, n0 = self.priors.prior(source, depth), self.priors.strength
        s, t, _ = self.counts.get((source, depth), (0.0, 0.0, 0.0))
        return (prior * n0 + s) / (n0 + t)

    def calibration(self, depth: int) -> float:
        """How much more often the chain's tokens at ``depth`` were right than
        the sampler head's probability said (1 with no history)."""
        prior, n0 = self.priors.prior("mtp", depth), self.priors.strength
        s, t, q = self.counts.get(("mtp", depth), (0.0, 0.0, 0.0))
        if t and not q:  # tried without probabilities: no evidence about them
            return 1.0
        return (prior * n0 + s) / (prior * n0 + q)

    def reach(
        self, source: str, depth: int, probs: Optional[Sequence[float]] = None, ngram: int = 0, count: int = 1
    ) -> List[float]:
        """P(the first i drafted tokens are all right), i = 1..depth, from the
        estimates and the draft's signals: ``probs`` (the sampler head's
        probability of each token) or, for a copy, its n-gram's length and
        count."""
        out, p = [], 1.0
        for i in range(1, depth + 1):
            if probs is not None and i <= len(probs):
                c = min(1.0, float(probs[i - 1]) * self.calibration(i))
            else:
                c = self.conditional(source, i)
                if i == 1 and source != "mtp" and ngram:
                    pr = self.priors
                    shift = pr.ngram_bonus * (ngram - pr.ngram_base) + pr.count_bonus * math.log2(max(count, 1))
                    c = _sigmoid(_logit(c) + shift)
            p *= c
            out.append(p)
        return out


# --- plans -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CopyDraft:
    """A copied draft on offer: up to ``length`` tokens from ``source``
    ("lookup" or "datastore"), behind an n-gram of ``ngram`` tokens that
    occurred ``count`` times (1 for prompt lookup: its latest occurrence)."""

    length: int
    source: str = "lookup"
    ngram: int = 3
    count: int = 1


@dataclass(frozen=True)
class BatchLoad:
    """What the rest of a batch feeds in the step being chosen: ``rows``
    other rows (requests) and ``tokens`` new tokens in all (at least one
    each), verified in the same forward as this row; ``gated``: some of them
    feed masks (the forward takes the gated path whatever this row feeds)."""

    rows: int = 0
    tokens: int = 0
    gated: bool = False

    def __post_init__(self):
        if self.rows < 0 or self.tokens < self.rows or (self.tokens and not self.rows):
            raise ValueError(f"a batch's load needs rows >= 0 and tokens >= rows (0 without rows): {self}")
        if self.gated and not self.rows:
            raise ValueError("a batch's load without other rows feeds no masks")


# a row decoded alone (no other rows in its forward)
ALONE = BatchLoad()


def _rounded(load: BatchLoad) -> BatchLoad:
    """``load`` with the others' tokens per row rounded to a power of two:
    the load the long-run view is computed at (a few ms each; the others'
    widths change every step)."""
    if not load.rows:
        return load
    per_row = 2 ** round(math.log2(load.tokens / load.rows))
    return BatchLoad(load.rows, load.rows * per_row, load.gated)


@dataclass(frozen=True)
class StepDrafts:
    """What a step could verify.

    ``chain_probs``: the sampler head's probability of each token of the
    masks' chain from the last step (empty: no chain); ``branch_probs``: of
    the head's b most likely first tokens, best first (the first is the
    chain's); ``room``: tokens that may still be generated (-1: no limit);
    ``load``: what the rest of the batch feeds in the same forward.
    """

    context: int
    copy: Optional[CopyDraft] = None
    chain_probs: Tuple[float, ...] = ()
    branch_probs: Tuple[float, ...] = ()
    room: int = -1
    load: BatchLoad = ALONE


@dataclass(frozen=True)
class Choice:
    """What to feed this step.

    ``copy`` copied tokens, ``depth`` tokens of the masks' chain per branch
    (``branches`` of them; a tree with the copy when both are > 0), and
    ``masks`` mask tokens after each masked fed token (0: the plain causal
    forward, and no chain next step). Masked tokens: every one for a chain or
    branches; the pending token and the copy's last for a copy; both for a
    tree, and every chain token in it.
    """

    kind: str  # "plain", "copy", "chain", "branches", "tree", "masks"
    copy: int = 0
    depth: int = 0
    branches: int = 1
    masks: int = 0
    width: int = 1
    expected_tokens: float = 1.0
    seconds: float = 0.0
    fresh: float = 0.0  # P(the next step has a chain to verify)
    gain: float = 0.0  # its score over a plain step's, in tokens (Policy.choose)
    scaled: float = 1.0  # measured over calibrated seconds that ``seconds`` includes (Policy.measured)
    load: BatchLoad = ALONE  # what the rest of the batch fed beside it (``seconds``: the row's part)

    @property
    def rate(self) -> float:
        """Expected tokens per second of this step alone."""
        return self.expected_tokens / self.seconds if self.seconds > 0 else float("inf")


def width_of(copy: int, depth: int, branches: int, masks: int) -> int:
    """Tokens in the forward of a plan (see :class:`Choice` for where masks go)."""
    regular = 1 + copy + branches * depth
    if masks == 0:
        return regular
    if copy and depth:
        masked = 2 + branches * depth
    elif copy:
        masked = 2
    else:
        masked = regular
    return regular + masked * masks


@dataclass
class Regime:
    """The long-run view behind each step's choice (:meth:`Policy.regime`)."""

    rate: float  # rho: the best long-run tokens per second the estimates allow
    chain_value: List[float]  # [j] = value in tokens of a chain of depth j at hand (j = 0: none)


def _positive_cycle_rate(acts: List[List[Tuple[float, float, int]]], rate: float) -> Optional[float]:
    """Tokens per second around a cycle of states whose net reward at
    ``rate`` is positive (``acts[i]``: (tokens, seconds, next state) of the
    actions from state i); None where there is none (Bellman-Ford)."""
    n = len(acts)
    edges: Dict[Tuple[int, int], Tuple[float, float, float]] = {}
    for i, actions in enumerate(acts):
        for t, s, j in actions:
            w = t - rate * s
            if (i, j) not in edges or w > edges[(i, j)][0]:
                edges[(i, j)] = (w, t, s)
    dist, pred = [0.0] * n, list(range(n))
    changed = None
    for _ in range(n):
        changed = None
        for (i, j), (w, _, _) in edges.items():
            if dist[i] + w > dist[j] + 1e-12:
                dist[j], pred[j], changed = dist[i] + w, i, j
        if changed is None:
            return None
    v = changed
    for _ in range(n):  # onto the cycle
        v = pred[v]
    cycle, u = [v], pred[v]
    while u != v:
        cycle.append(u)
        u = pred[u]
    if any((pred[x], x) not in edges for x in cycle):
        return None
    tokens = sum(edges[(pred[x], x)][1] for x in cycle)
    seconds = sum(edges[(pred[x], x)][2] for x in cycle)
    return tokens / seconds


@dataclass
class StepTimes:
    """What steps have measured against the calibrated costs, kept across
    generations on one machine and model (:meth:`Policy.observe`,
    :meth:`Policy.observe_host`): a new policy starts from them rather than
    from the calibration alone."""

    # measured over calibrated seconds, per path (plain, gated)
    scale: Dict[bool, float] = field(default_factory=lambda: {False: 1.0, True: 1.0})
    # and per band of widths on a path, (gated, width.bit_length()); the path's where unmeasured
    band_scale: Dict[Tuple[bool, int], float] = field(default_factory=dict)
    # host seconds that launching a plain step ahead hides
    host_seconds: Optional[float] = None


class Policy:
    """Chooses each step's plan (see the module docstring).

    Args:
        costs: seconds per forward (:class:`mlx_mtp.calibration.costs.CostModel`).
        max_masks: the most mask tokens the adapter was trained with (0: none).
        max_branches: the most branches of the chain to verify at once.
        max_copy: the longest copied draft to verify.
        greedy: trees and branches need greedy verification.
        priors: prior acceptance (an adapter's ``recipe["policy_priors"]``).
        refresh: steps between recomputations of the long-run view.
        times: measured step times to start from and update (None: a fresh
            :class:`StepTimes`, the calibration as it is).
    """

    def __init__(
        self,
        costs: Costs,
        max_masks: int,
        max_branches: int = 1,
        max_copy: int = 6,
        greedy: bool = True,
        priors: Optional[Priors] = None,
        refresh: int = 16,
        times: Optional[StepTimes] = None,
    ):
        if max_masks < 0 or max_branches < 1 or max_copy < 0:
            raise ValueError("need max_masks >= 0, max_branches >= 1, max_copy >= 0")
        self.costs = costs
        self.max_masks = max_masks
        self.max_branches = max_branches if greedy else 1
        self.max_copy = max_copy
        self.greedy = greedy
        self.estimator = AcceptanceEstimator(priors)
        self.refresh = refresh
        self._regimes: Dict[BatchLoad, Regime] = {}  # per batch load, computed at _regime_at
        self._regime_at: Tuple[int, int] = (-1, -1)  # (steps, context bucket) they were computed at
        self._steps = 0
        self._seconds: Dict[Tuple[int, bool, int], float] = {}  # alone
        self._loaded: Dict[Tuple[int, bool, int, BatchLoad], float] = {}  # in a batch, cleared with _regimes
        self.times = times if times is not None else StepTimes()
        self._regime_scale = self._scales()  # the scales the long-run view was computed at
        # sum and count of the gain of the plans chosen right after plain steps (after_plain)
        self._after_plain = [0.0, 0.0]

    # --- costs ---------------------------------------------------------------------------
    @property
    def scale(self) -> Dict[bool, float]:
        """Measured over calibrated seconds per path (:class:`StepTimes`)."""
        return self.times.scale

    @property
    def band_scale(self) -> Dict[Tuple[bool, int], float]:
        """Measured over calibrated seconds per band of widths (:class:`StepTimes`)."""
        return self.times.band_scale

    @property
    def host_seconds(self) -> Optional[float]:
        """Host seconds that launching a plain step ahead hides (:class:`StepTimes`)."""
        return self.times.host_seconds

    def seconds(self, width: int, masks: int, context: int, load: BatchLoad = ALONE) -> float:
        """A plan's seconds: its forward (looked up once per 64 tokens of
        context), plus the sampler chain of ``masks`` calls where it feeds
        masks, times what the steps of its band of widths (1, 2-3, 4-7,
        8-15, ...) on its path have measured against their prediction, or
        where none has run yet, the steps of the path (:meth:`observe`).

        In a batch (``load``: the other rows), the forward is the batch's,
        over R rows and N tokens, on the gated path where any row feeds
        masks. Each row pays an even share of the least forward the batch
        could feed (every row its pending token alone, R tokens, on the
        row's own path) and what its own drafts add to the forward as the
        others load it (N0 = the others' tokens + 1, on the batch's path):

            cost(R, R) / R + cost(R, N0 + width - 1) - cost(R, N0).

        The rows' parts add up to the forward (where the extra costs add
        up), and rho is then the batch's rate per row, so a plan is worth its
        width where it raises the batch's tokens per second. Charging a row
        the share of the forward as loaded instead would make its width look
        cheap once the others draft (a batch of rows that each copy where
        none should), and charging the first row that feeds masks the whole
        forward's gated path would keep every row from feeding them where
        all should (alone, R = 1: the forward itself)."""
        bucket = context // 64
        gated = masks > 0
        C = bucket * 64
        if load.rows == 0:
            key = (width, gated, bucket)
            fwd = self._seconds.get(key)
            if fwd is None:
                fwd = self._seconds[key] = self.costs.cost(width, C, gated)
        else:
            key = (width, gated, bucket, load)
            fwd = self._loaded.get(key)
            if fwd is None:
                R, N0, path = load.rows + 1, load.tokens + 1, gated or load.gated
                extra = self.costs.batch_cost(R, N0 + width - 1, C, path) - self.costs.batch_cost(R, N0, C, path)
                fwd = self._loaded[key] = self.costs.batch_cost(R, R, C, gated) / R + extra
        return (fwd + (self.costs.chain(masks) if masks else 0.0)) * self.measured(width, masks)

    def measured(self, width: int, masks: int) -> float:
        """Measured over calibrated seconds for a forward of ``width`` tokens
        (with ``masks`` masks: the gated path), so far (:meth:`observe`)."""
        gated = masks > 0
        return self.band_scale.get((gated, width.bit_length()), self.scale[gated])

    def _scales(self) -> Dict[object, float]:
        return {**self.scale, **self.band_scale}

    # --- the long-run view -----------------------------------------------------------------
    def regime(self, context: int, load: BatchLoad = ALONE) -> Regime:
        """rho and the value of a chain of each depth, from the estimates
        without any step's own signals, were the batch's ``load`` to last
        (recomputed every ``refresh`` steps, when the context has grown by
        64 tokens, or when the measured scale of a path's or a band's costs
        has moved by 5% since; one per load met in between, the others'
        tokens per row rounded to a power of two)."""
        at = (self._steps // self.refresh, context // 64)
        scales = self._scales()
        moved = any(abs(math.log(v / self._regime_scale.get(key, 1.0))) > 0.05 for key, v in scales.items())
        if at != self._regime_at or moved:
            self._regimes.clear()
            self._loaded.clear()
            self._regime_at, self._regime_scale = at, scales
        load = _rounded(load)
        if load not in self._regimes:
            self._regimes[load] = self._long_run(context, load)
        return self._regimes[load]

    def _long_run(self, context: int, load: BatchLoad) -> Regime:
        """:meth:`regime`, computed."""
        k, B = self.max_masks, self.max_branches
        est = self.estimator
        reach = [0.0] + est.reach("mtp", k)  # [m] = P(first m of a chain right)
        first = est.conditional("mtp", 1)

        def expected(m: int, b: int) -> float:
            if m == 0:
                return 1.0
            if b == 1:
                return 1.0 + sum(reach[1 : m + 1])
            # b branches: the first token is right in one of them with
            # probability ~ 1 - (1 - p1)^b, the rest of the branch as a chain
            hit = 1.0 - (1.0 - first) ** b
            return 1.0 + hit * (1.0 + sum(reach[i] / first for i in range(2, m + 1)))

        # actions from "a chain of depth j at hand" (j = 0: none): (tokens, seconds, next j)
        def seconds(width: int, masks: int) -> float:
            return self.seconds(width, masks, context, load)

        def actions(j: int):
            out = [(1.0, seconds(1, 0), 0)]
            for jn in range(1, k + 1):
                out.append((1.0, seconds(1 + jn, jn), jn))  # masks only
            for m in range(1, j + 1):
                out.append((expected(m, 1), seconds(1 + m, 0), 0))
                for b in range(1, B + 1):
                    for jn in range(1, k + 1):
                        out.append((expected(m, b), seconds(width_of(0, m, b, jn), jn), jn))
            return out

        acts = [actions(j) for j in range(k + 1)]
        # Each action leads to one next state, so a policy ends in a cycle of
        # states and its long-run rate is the ratio of tokens to seconds around
        # it. Dinkelbach: from plain decoding's rate, while some cycle gains
        # tokens at rate rho (tokens - rho * seconds > 0), rho = its ratio.
        rate = 1.0 / seconds(1, 0)
        for _ in range(16):
            better = _positive_cycle_rate(acts, rate)
            if better is None or better <= rate * (1 + 1e-9):
                break
            rate = better
        # relative values h (h[0] = 0) of h(j) = max over actions (tokens -
        # rho * seconds + h(next)), by relative value iteration on the best
        # action per pair of states, each round half kept (so that cycles of
        # two states, masks then a chain without them, converge too)
        best: Dict[Tuple[int, int], float] = {}
        for i in range(k + 1):
            for t, s, n in acts[i]:
                best[(i, n)] = max(best.get((i, n), -math.inf), t - rate * s)
        h = [0.0] * (k + 1)
        for _ in range(12 * (k + 1)):
            step = [-math.inf] * (k + 1)
            for (i, n), w in best.items():
                step[i] = max(step[i], w + h[n])
            new = [0.5 * (h[j] + step[j]) for j in range(k + 1)]
            h = [v - new[0] for v in new]
        return Regime(rate, [max(0.0, v) for v in h])

    # --- one step ----------------------------------------------------------------------------
    def _candidates(self, drafts: StepDrafts):
        """(kind, copy, depth, branches, masks, expected drafted tokens right,
        P(fresh chain next)) of every plan this step can feed."""
        est = self.estimator
        limit = None if drafts.room < 0 else max(drafts.room - 1, 0)
        k = self.max_masks
        copy_reach: List[float] = []
        if drafts.copy is not None:
            cp = drafts.copy
            d = min(cp.length, self.max_copy, limit if limit is not None else cp.length)
            copy_reach = est.reach(cp.source, d, ngram=cp.ngram, count=cp.count) if d > 0 else []
        m_max = len(drafts.chain_probs) if limit is None else min(len(drafts.chain_probs), limit)
        chain_reach = est.reach("mtp", m_max, probs=drafts.chain_probs) if k and m_max else []
        c1 = est.calibration(1)
        first = [min(1.0, p * c1) for p in drafts.branch_probs[: self.max_branches]]
        copy_sums = [sum(copy_reach[:d]) for d in range(len(copy_reach) + 1)]
        chain_sums = [sum(chain_reach[:m]) for m in range(len(chain_reach) + 1)]
        # the whole copy beside a chain: P(run >= i) of two independent runs
        tree = []
        if self.greedy and copy_reach:
            cr, d = copy_reach, len(copy_reach)
            for m in range(1, len(chain_reach) + 1):
                mr = chain_reach[:m]
                tokens = sum(
                    1.0 - (1.0 - (cr[i] if i < d else 0.0)) * (1.0 - (mr[i] if i < m else 0.0))
                    for i in range(max(d, m))
                )
                # the accepted node lacks masks where the copy wins part-way
                tree.append((m, tokens, 1.0 - max(0.0, cr[0] - cr[-1]) * (1.0 - mr[0])))
        for masks in range(k + 1):
            fresh = 1.0 if masks else 0.0
            yield ("plain" if masks == 0 else "masks", 0, 0, 1, masks, 0.0, fresh)
            for d in range(1, len(copy_reach) + 1):
                # with masks, the accepted node has them when none or all of the copy is right
                f = (1.0 - copy_reach[0]) + copy_reach[d - 1] if masks else 0.0
                yield ("copy", d, 0, 1, masks, copy_sums[d], f)
            for m in range(1, len(chain_reach) + 1):
                yield ("chain", 0, m, 1, masks, chain_sums[m], fresh)
            if not (self.greedy and masks):  # trees need a layout: with masks only
                continue
            for m in range(1, len(chain_reach) + 1):
                # any branch's first token right, then its rest as the chain's
                rest = chain_sums[m] / chain_reach[0] - 1.0 if chain_reach[0] > 0 else 0.0
                for b in range(2, len(first) + 1):
                    yield ("branches", 0, m, b, masks, sum(first[:b]) * (1.0 + rest), 1.0)
            for m, tokens, f in tree:
                yield ("tree", len(copy_reach), m, 1, masks, tokens, f)

    def plans(self, drafts: StepDrafts) -> List[Choice]:
        """Every plan this step can feed, with its expected tokens and seconds."""
        out = []
        for kind, copy, depth, branches, masks, tokens, fresh in self._candidates(drafts):
            w = width_of(copy, depth, branches, masks)
            out.append(
                Choice(
                    kind,
                    copy,
                    depth,
                    branches,
                    masks,
                    w,
                    1.0 + tokens,
                    self.seconds(w, masks, drafts.context, drafts.load),
                    fresh,
                    scaled=self.measured(w, masks),
                    load=drafts.load,
                )
            )
        return out

    def choose(self, drafts: StepDrafts) -> Choice:
        """The plan to feed this step (see the module docstring), priced in
        the batch's forward where ``drafts.load`` has other rows
        (:meth:`seconds`); ties go to the narrower forward."""
        load = drafts.load
        regime = self.regime(drafts.context, load)
        rate, value, C = regime.rate, regime.chain_value, drafts.context
        best, best_score, best_width, plain = None, -math.inf, 0, -math.inf
        for cand in self._candidates(drafts):
            kind, copy, depth, branches, masks, tokens, fresh = cand
            w = width_of(copy, depth, branches, masks)
            score = 1.0 + tokens + fresh * value[masks] - rate * self.seconds(w, masks, C, load)
            if kind == "plain":
                plain = score
            if score > best_score + 1e-9 or (score > best_score - 1e-9 and w < best_width):
                best, best_score, best_width = cand, score, w
        kind, copy, depth, branches, masks, tokens, fresh = best
        seconds = self.seconds(best_width, masks, C, load)
        gain = max(0.0, best_score - plain)
        return Choice(
            kind,
            copy,
            depth,
            branches,
            masks,
            best_width,
            1.0 + tokens,
            seconds,
            fresh,
            gain,
            self.measured(best_width, masks),
            load,
        )

    # --- launching plain steps ahead ---------------------------------------------------------
    def pipelines(self, context: int, room: int = -1) -> Optional[Choice]:
        """Whether to launch the next step, a plain one, before the current
        plain step is read (as mlx-lm does), and the plain choice if so.

        Launched ahead, the step hides the host's work between two steps
        (:attr:`host_seconds`, measured; :data:`HOST_SHARE` of a plain step
        until then), worth ``rho * host_seconds`` tokens; but it is plain
        whatever the current step's token offers (a copy), and the plans
        chosen after plain steps have gained this generation's mean
        :meth:`after_plain` over plain ones. It pipelines where plain is
        the choice without a copy and the hidden time is worth more.

        Args:
            context: tokens in the cache when the step runs.
            room: tokens that may still be generated by then (-1: no limit).
        """
        choice = self.choose(StepDrafts(context=context, room=room))
        if choice.kind != "plain":
            return None
        host = self.host_seconds if self.host_seconds is not None else HOST_SHARE * self.seconds(1, 0, context)
        total, count = self._after_plain
        gain = total / (count + GAIN_PRIOR_STEPS)
        return choice if gain < self.regime(context).rate * host else None

    def after_plain(self, choice: Choice):
        """Record the plan chosen (or that would have been chosen, where a
        plain step was launched ahead) for the step after a plain one."""
        self._after_plain[0] += choice.gain
        self._after_plain[1] += 1

    def observe_host(self, seconds: float):
        """Record the host seconds that launching a plain step ahead would
        have hidden: the host's work from reading the last plain step to
        handing the next one's graph to the device, at most what the host
        then waited for the last one (a backend that computes most of a step
        inside the launch, as MLX's CPU backend does, leaves only that wait
        to overlap). A running geometric mean over ~``SCALE_STEPS``."""
        if seconds <= 0:
            return
        old = self.times.host_seconds
        self.times.host_seconds = seconds if old is None else _running_mean(old, seconds)

    def observe(
        self,
        choice: Choice,
        copy_right: int = 0,
        chain_right: Sequence[int] = (),
        chain_probs: Sequence[float] = (),
        copy_source: str = "lookup",
        seconds: Optional[float] = None,
    ):
        """Record a verified step: ``copy_right`` leading copied tokens were
        right, and ``chain_right[i]`` leading tokens of branch i (the base
        model's tokens decide: under greedy decoding every branch's run is
        known; under sampling, pass the accepted run only); ``seconds``: what
        the step took, measured (host work included), against which the
        calibrated costs of its path are scaled from then on (a running
        geometric mean over the last ~``SCALE_STEPS`` steps of the path),
        and those of its band of widths by that band's own steps (so that
        wide steps that cost more than calibrated, or narrow ones whose
        host work weighs more, are priced as measured; a band not measured
        yet takes the path's). A step verified in a batch is not timed against
        its price (its time is the whole batch's forward, its price a part
        of it): ``seconds`` is ignored there."""
        self._steps += 1
        alone = choice.load.rows == 0
        if seconds is not None and seconds > 0 and choice.seconds > 0 and alone:
            gated = choice.masks > 0
            band = (gated, choice.width.bit_length())
            # the calibrated seconds: the choice's, without the scale it was priced at
            predicted = choice.seconds / choice.scaled
            ratio = min(max(seconds / predicted, 0.1), 10.0)
            self.band_scale[band] = _running_mean(self.band_scale.get(band, self.scale[gated]), ratio)
            self.scale[gated] = _running_mean(self.scale[gated], ratio)
        if choice.copy:
            self.estimator.observe(copy_source, choice.copy, copy_right)
        if choice.depth and chain_right:
            self.estimator.observe("mtp", choice.depth, chain_right[0], chain_probs)
