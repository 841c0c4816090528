"""Measuring the cost table here: :func:`calibrate`.

It times the plain path and (with an adapter) the gated path for T = 1, 2,
4, 8, then 4x wider, up to the widest forward the decoder feeds, at a short
context, the plain path's narrowest and widest at a long one (the KV cache is
filled with zeros, not computed: attention costs the same), and the sampler
head's call (one per drafted token); with ``batch``, batched forwards of 2,
4 and 8 rows x 1-16 tokens each at a context of 256 (:func:`calibrate_batch`).
Timings go round robin over the shapes (a burst of load from other processes
hits every shape alike), the fastest of each shape's counting.
"""

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..model.cache import commit
from ..model.layouts import Layout
from ..model.mtp_model import MTPModel
from .costs import CostModel, CostTable, interpolate
from .store import identity

__all__ = [
    "BATCH_CONTEXT",
    "BATCH_ROWS",
    "BATCH_WIDTHS",
    "CONTEXTS",
    "MAX_WIDTH",
    "Progress",
    "add_batch",
    "batch_widths",
    "calibrate",
    "calibrate_batch",
    "fill_cache",
    "forward_cost",
    "time_round_robin",
    "widths_up_to",
]

# contexts measured: a short prompt and a long answer; costs are linear in
# between and beyond (attention over C cached tokens costs ~C)
CONTEXTS = (64, 1024)
# the widest forward measured by default: quadratic decoding at k=4 feeds
# (k+1)^2 = 25 tokens; wider ones are extrapolated (``--max-width``)
MAX_WIDTH = 32
# widths doubled up to here, where a forward's cost stops bending (a fixed cost
# of reading the weights, then ~linear in T), then every 4x
BEND = 8
# a forward whose cost at the bend is at least this share of the bend times a
# one-token forward's is compute-bound (4-bit weights on a CPU): wider ones
# are extrapolated along the last measured slope rather than timed
LINEAR_SHARE = 0.5
REPEATS = 2  # timings of a shape at most (the fastest counts); fewer where two agree within AGREE
AGREE = 0.05  # two timings this close (relative) settle a shape
# batched forwards: rows x new tokens per row, at a context of a short chat
# (each row's cache this long); a cost there is ~ one row's forward over all
# the rows' tokens (docs/calibration.md), so a few shapes settle it
BATCH_ROWS = (2, 4, 8)
BATCH_WIDTHS = (1, 2, 4, 8, 16)
BATCH_CONTEXT = 256
# where the forward is compute-bound, batched widths up to this only (the
# policy feeds one token there; wider ones cost as many forwards as tokens)
BATCH_WIDTH_COMPUTE_BOUND = 4

# called after each timing with (timings made, the most there may be)
Progress = Callable[[int, int], None]


def widths_up_to(max_width: int) -> List[int]:
    """1, 2, 4, ... doubling up to :data:`BEND`, then every 4x, up to
    ``max_width`` (which is included): 1, 2, 4, 8, 32 for 32; 1, 2, 4, 8, 32,
    64 for 64."""
    widths, w = [], 1
    while w < max_width:
        widths.append(w)
        w *= 2 if w < BEND else 4
    return widths + [max_width]


def fill_cache(model, context: int, room: int, rows: int = 1):
    """A cache of ``rows`` rows that each hold ``context`` zero entries
    (timing only: attention costs the same whatever the keys are), with room
    for ``room`` more."""
    cache = model.make_cache()
    model(mx.ones((1, 1), dtype=mx.int32), cache)  # learns the shapes and dtype
    for c in cache:
        _, H, _, D = c.keys.shape
        size = context + room + 1
        c.keys = mx.zeros((rows, H, size, D), c.keys.dtype)
        c.values = mx.zeros((rows, H, size, c.values.shape[3]), c.values.dtype)
        c.committed = 0
    commit(cache, [])
    for c in cache:
        c.committed = context
    mx.eval([c.keys for c in cache] + [c.values for c in cache])
    return cache


def _gated_layout(width: int, num_masks: int):
    """A decoding layout of ``width`` tokens like the quadratic one: each
    regular token followed by its masks, causal attention, LoRA on masks."""
    ids = [1 if i % (num_masks + 1) == 0 else -(i % (num_masks + 1)) for i in range(width)]
    tokens = mx.array(ids, dtype=mx.int32)
    regular = tuple(i for i, t in enumerate(ids) if t > 0)
    return Layout(
        tokens=tokens,
        positions=mx.arange(width, dtype=mx.int32),
        gate=tokens < 0,
        mask=mx.tril(mx.ones((width, width), dtype=mx.bool_)),
        regular=regular,
    ), mx.array(regular)


def time_call(fn: Callable[[], mx.array], repeats: int = REPEATS) -> float:
    """Seconds of ``fn`` evaluated, the fastest of ``repeats`` (the least
    disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - tic)
    return best


def forward_fn(model, cache, width: int, gated: bool) -> Callable[[], mx.array]:
    """One forward over ``width`` new tokens (logits at the regular ones)
    after the cache's committed tokens, its new entries dropped after."""
    if gated:
        layout, regular = _gated_layout(width, model.num_masks)

        def run():
            h = model.forward_layout(layout, cache)
            out = model.lm_head(h[:, regular])
            commit(cache, [])
            return out
    else:
        tokens = mx.ones((1, width), dtype=mx.int32)

        def run():
            out = model.lm_head(model(tokens, cache))
            commit(cache, [])
            return out

    return run


def batch_fn(model, cache, rows: int, width: int) -> Callable[[], mx.array]:
    """One batched forward: ``rows`` rows of ``width`` new tokens each after
    the cache's committed tokens, with positions and an attention mask per
    row (what rows of different lengths need), its new entries dropped after."""
    C = cache[0].committed
    tokens = mx.ones((rows, width), dtype=mx.int32)
    positions = mx.broadcast_to(mx.arange(width, dtype=mx.int32), (rows, width))
    new = mx.tril(mx.ones((width, width), dtype=mx.bool_))
    mask = mx.broadcast_to(mx.concatenate([mx.ones((width, C), dtype=mx.bool_), new], axis=1), (rows, width, C + width))
    mx.eval(tokens, positions, mask)

    def run():
        out = model.lm_head(model(tokens, cache, positions, mask))
        commit(cache, [])
        return out

    return run


def forward_cost(model, cache, width: int, gated: bool, repeats: int = REPEATS) -> float:
    """Seconds for one forward (:func:`forward_fn`), the fastest of ``repeats``."""
    return time_call(forward_fn(model, cache, width, gated), repeats)


def sampler_fn(model, depth: int) -> Callable[[], mx.array]:
    """A greedy draft chain of ``depth`` sampler-head calls."""
    # a key of its own: measuring costs must not move the caller's seeded stream
    z = mx.random.normal((1, depth, model.hidden_size), key=mx.random.key(0))
    mx.eval(z)

    def run():
        prev = mx.array([1], dtype=mx.int32)
        for j in range(depth):
            prev = mx.argmax(model.sampler_logits(prev, z[:, j]), axis=-1).astype(mx.int32)
        return prev

    return run


def _settled(times: List[float], agree: float) -> bool:
    """Whether the two fastest of ``times`` agree within ``agree``."""
    if len(times) < 2:
        return False
    first, second = sorted(times)[:2]
    return second <= first * (1 + agree)


def time_round_robin(
    runs: Dict[object, Callable[[], mx.array]],
    repeats: int = REPEATS,
    agree: float = AGREE,
    tick: Optional[Callable[[], None]] = None,
) -> Tuple[Dict[object, float], int]:
    """Seconds of each of ``runs``, the fastest of its timings (the least
    disturbed by other processes). They are timed in rounds, each round over
    the runs not yet settled (a burst of load from other processes hits every
    run alike); a run is settled when its two fastest timings agree within
    ``agree``, or after ``repeats`` timings. ``tick``: called after each timing.

    Returns:
        ``{key: seconds}`` and the number of timings made.
    """
    times: Dict[object, List[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        pending = [key for key, t in times.items() if not _settled(t, agree)]
        if not pending:
            break
        for key in pending:
            times[key].append(time_call(runs[key], 1))
            if tick is not None:
                tick()
    return {key: min(t) for key, t in times.items()}, sum(map(len, times.values()))


def _monotone(row: List[float]) -> List[float]:
    """Each cost at most the next wider one's: a narrower forward could be
    padded to the wider one (this drops spikes from other processes)."""
    out = list(row)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


class _Counter:
    """Timings made against the most there may be, told to a :data:`Progress`."""

    def __init__(self, progress: Optional[Progress], most: int):
        self.progress, self.done, self.most = progress, 0, most

    def __call__(self):
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, max(self.most, self.done))

    def finish(self):
        """No more timings: the most there may be is what was made."""
        self.most = self.done
        if self.progress is not None:
            self.progress(self.done, self.done)


def batch_widths(compute_bound: bool) -> List[int]:
    """The widths per row of the batched forwards measured: up to
    :data:`BATCH_WIDTH_COMPUTE_BOUND` only where the forward is compute-bound."""
    return [w for w in BATCH_WIDTHS if not compute_bound or w <= BATCH_WIDTH_COMPUTE_BOUND]


def calibrate_batch(
    model,
    rows: Sequence[int] = BATCH_ROWS,
    widths: Sequence[int] = BATCH_WIDTHS,
    context: int = BATCH_CONTEXT,
    repeats: int = REPEATS,
    tick: Optional[Callable[[], None]] = None,
) -> Tuple[List[List[float]], int]:
    """Seconds of batched forwards (:func:`batch_fn`) of each of ``rows``
    rows x each of ``widths`` new tokens per row after ``context`` cached
    tokens per row, round robin (:func:`time_round_robin`), each made at
    most what a wider forward of as many rows, or one of more rows as wide,
    cost (:func:`_monotone`: either could be padded to it).

    Returns:
        ``[r][w]`` seconds, and the number of timings made.
    """
    if not isinstance(model, MTPModel):
        model = MTPModel(model)
    caches = {r: fill_cache(model, context, widths[-1], rows=r) for r in rows}
    runs = {(r, w): batch_fn(model, caches[r], r, w) for r in rows for w in widths}
    mx.eval(runs[(rows[-1], widths[-1])]())  # one warm-up, the widest: its buffers serve the rest
    best, timings = time_round_robin(runs, repeats, tick=tick)
    caches.clear()
    runs.clear()
    mx.clear_cache()
    grid = [_monotone([best[(r, w)] for w in widths]) for r in rows]
    columns = [_monotone([row[i] for row in grid]) for i in range(len(widths))]
    return [[column[j] for column in columns] for j in range(len(rows))], timings


def add_batch(model, table: CostTable, repeats: int = REPEATS, progress: Optional[Progress] = None) -> CostTable:
    """Measure the batched forwards of ``table`` (one without them: an older
    version's), in place; compute-bound as :func:`calibrate` judges it from
    the table's plain path."""
    tic = time.perf_counter()
    costs = CostModel(table)
    c = table.contexts[0]
    compute_bound = costs.cost(BEND, c) >= LINEAR_SHARE * BEND * costs.cost(1, c)
    widths = batch_widths(compute_bound)
    tick = _Counter(progress, len(BATCH_ROWS) * len(widths) * repeats)
    table.batch, count = calibrate_batch(model, BATCH_ROWS, widths, BATCH_CONTEXT, repeats, tick)
    tick.finish()
    table.batch_rows, table.batch_widths, table.batch_context = list(BATCH_ROWS), widths, BATCH_CONTEXT
    table.timings += count
    table.seconds += time.perf_counter() - tic
    table.validate()
    return table


def calibrate(
    model,
    widths: Optional[Sequence[int]] = None,
    contexts: Sequence[int] = CONTEXTS,
    repeats: int = REPEATS,
    gated: bool = True,
    batch: bool = False,
    progress: Optional[Progress] = None,
) -> CostTable:
    """Measure the cost table of ``model`` (an :class:`MTPModel`) here:
    the plain path, and the gated path and the sampler head where the model
    has an adapter and ``gated`` (False: a decoder that feeds no masks here
    needs neither), and with ``batch`` batched forwards
    (:func:`calibrate_batch`; widths per row up to
    :data:`BATCH_WIDTH_COMPUTE_BOUND` where compute-bound). ``progress``:
    told after each timing.

    Every width is measured on every path at the first context; at the
    others only the plain path's narrowest and widest. Where the forward
    at the bend (T = ``BEND``) costs ``LINEAR_SHARE`` x T one-token
    forwards or more (compute-bound: 4-bit weights on a CPU), the wider
    widths are extrapolated along the slope to the bend instead of timed,
    and the longer contexts are timed at the bend. The change in cost
    from the first context is interpolated linearly in the width (attention
    over the cache costs ~width x context) and added to both paths' rows
    (both attend over the same cache; the gated path's explicit mask adds
    ~width x context booleans). Each shape is timed up to ``repeats`` times
    (:func:`time_round_robin`)."""
    if not isinstance(model, MTPModel):
        model = MTPModel(model)
    widths = list(widths) if widths is not None else widths_up_to(MAX_WIDTH)
    tic = time.perf_counter()
    paths = (False, True) if (gated and model.num_masks > 0) else (False,)
    caches = [fill_cache(model, context, widths[-1]) for context in contexts]
    narrow = [w for w in widths if w <= BEND]
    wide = [w for w in widths if w > BEND]
    if len(narrow) < 2:
        narrow, wide = widths, []
    # the most timings there may be: every shape and the sampler chain, each timed ``repeats`` times
    most = len(paths) * len(widths) + 2 * (len(contexts) - 1) + (True in paths)
    most += len(BATCH_ROWS) * len(BATCH_WIDTHS) if batch else 0
    tick = _Counter(progress, most * repeats)

    def runs_of(shapes) -> Dict[object, Callable[[], mx.array]]:
        return {s: forward_fn(model, caches[s[0]], s[2], s[1]) for s in shapes}

    rest = range(1, len(contexts))
    ends = sorted({widths[0], widths[-1]})
    # first every narrow width and path at the first context, and the plain path's
    # narrowest at the others (and its widest, where there is nothing wide)
    shapes = [(0, g, w) for g in paths for w in reversed(narrow)]
    shapes += [(i, False, w) for i in rest for w in (ends if not wide else ends[:1])]
    runs = runs_of(shapes)
    depth = 4  # sampler-head calls timed together (one chain)
    if True in paths:
        runs["sampler"] = sampler_fn(model, depth)
    # one warm-up, the widest of them on the last path: its buffers serve the narrower ones
    mx.eval(runs[shapes[len(narrow) * (len(paths) - 1)]]())
    best, timings = time_round_robin(runs, repeats, tick=tick)
    b, then = narrow[-1], []
    compute_bound = best[(0, False, b)] >= LINEAR_SHARE * b * best[(0, False, widths[0])]
    if wide and compute_bound:
        # compute-bound: the wide widths along the last slope, the longer contexts' change at the bend
        for g in paths:
            # never down: a wider forward timed faster than a narrower one was disturbed
            slope = max(0.0, (best[(0, g, b)] - best[(0, g, narrow[-2])]) / (b - narrow[-2]))
            for w in wide:
                best[(0, g, w)] = best[(0, g, b)] + slope * (w - b)
        ends = [widths[0], b]
        then = [(i, False, b) for i in rest]
    elif wide:
        then = [(0, g, w) for g in paths for w in reversed(wide)] + [(i, False, widths[-1]) for i in rest]
    if then:
        more, count = time_round_robin(runs_of(then), repeats, tick=tick)
        best.update(more)
        timings += count
    rows: Dict[bool, List[List[float]]] = {gated: [] for gated in paths}
    for gated in paths:
        first = [best[(0, gated, w)] for w in widths]
        rows[gated].append(_monotone(first))
        for i in range(1, len(contexts)):
            change = [best[(i, False, w)] - best[(0, False, w)] for w in ends]
            row = [c + (interpolate(ends, change, w) if len(ends) > 1 else change[0]) for c, w in zip(first, widths)]
            rows[gated].append(_monotone([max(c, 1e-6) for c in row]))
    caches.clear()
    runs.clear()
    mx.clear_cache()
    table = CostTable(
        widths=widths,
        contexts=list(contexts),
        plain=rows[False],
        gated=rows.get(True),
        sampler_call=best["sampler"] / depth if "sampler" in best else 0.0,
        timings=timings,
        identity=identity(model),
    )
    if batch:
        table.batch_rows, table.batch_widths = list(BATCH_ROWS), batch_widths(compute_bound)
        table.batch_context = BATCH_CONTEXT
        table.batch, count = calibrate_batch(model, BATCH_ROWS, table.batch_widths, BATCH_CONTEXT, repeats, tick)
        table.timings += count
    tick.finish()
    table.seconds = time.perf_counter() - tic
    return table
