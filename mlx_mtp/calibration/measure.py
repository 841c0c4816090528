"""Measuring the cost table here: :func:`calibrate`.

It times the plain path and (with an adapter) the gated path for T = 1, 2,
4, 8, then 4x wider, up to the widest forward the decoder feeds, at a short
context, the plain path's narrowest and widest at a long one (the KV cache is
filled with zeros, not computed: attention costs the same), and the sampler
head's call (one per drafted token). Timings go round robin over the shapes
(a burst of load from other processes hits every shape alike), the fastest
of each shape's counting.
"""

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..model.cache import commit
from ..model.layouts import Layout
from ..model.mtp_model import MTPModel
from .costs import CostTable, interpolate
from .store import identity

__all__ = ["CONTEXTS", "MAX_WIDTH", "calibrate", "fill_cache", "forward_cost", "time_round_robin", "widths_up_to"]

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


def widths_up_to(max_width: int) -> List[int]:
    """1, 2, 4, ... doubling up to :data:`BEND`, then every 4x, up to
    ``max_width`` (which is included): 1, 2, 4, 8, 32 for 32; 1, 2, 4, 8, 32,
    64 for 64."""
    widths, w = [], 1
    while w < max_width:
        widths.append(w)
        w *= 2 if w < BEND else 4
    return widths + [max_width]


def fill_cache(model, context: int, room: int):
    """A cache that holds ``context`` zero entries (timing only: attention
    costs the same whatever the keys are), with room for ``room`` more."""
    cache = model.make_cache()
    model(mx.ones((1, 1), dtype=mx.int32), cache)  # learns the shapes and dtype
    for c in cache:
        B, H, _, D = c.keys.shape
        size = context + room + 1
        c.keys = mx.zeros((B, H, size, D), c.keys.dtype)
        c.values = mx.zeros((B, H, size, c.values.shape[3]), c.values.dtype)
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
    runs: Dict[object, Callable[[], mx.array]], repeats: int = REPEATS, agree: float = AGREE
) -> Tuple[Dict[object, float], int]:
    """Seconds of each of ``runs``, the fastest of its timings (the least
    disturbed by other processes). They are timed in rounds, each round over
    the runs not yet settled (a burst of load from other processes hits every
    run alike); a run is settled when its two fastest timings agree within
    ``agree``, or after ``repeats`` timings.

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
    return {key: min(t) for key, t in times.items()}, sum(map(len, times.values()))


def _monotone(row: List[float]) -> List[float]:
    """Each cost at most the next wider one's: a narrower forward could be
    padded to the wider one (this drops spikes from other processes)."""
    out = list(row)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def calibrate(
    model,
    widths: Optional[Sequence[int]] = None,
    contexts: Sequence[int] = CONTEXTS,
    repeats: int = REPEATS,
    gated: bool = True,
) -> CostTable:
    """Measure the cost table of ``model`` (an :class:`MTPModel`) here:
    the plain path, and the gated path and the sampler head where the model
    has an adapter and ``gated`` (False: a decoder that feeds no masks here
    needs neither).

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
    best, timings = time_round_robin(runs, repeats)
    b, then = narrow[-1], []
    if wide and best[(0, False, b)] >= LINEAR_SHARE * b * best[(0, False, widths[0])]:
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
        more, count = time_round_robin(runs_of(then), repeats)
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
    return CostTable(
        widths=widths,
        contexts=list(contexts),
        plain=rows[False],
        gated=rows.get(True),
        sampler_call=best["sampler"] / depth if "sampler" in best else 0.0,
        seconds=time.perf_counter() - tic,
        timings=timings,
        identity=identity(model),
    )
