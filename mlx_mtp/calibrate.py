"""Calibration: what one forward costs on this machine for this model.

    python -m mlx_mtp.calibrate [--model M] [--adapter-path A] [--max-width T]

A step of speculative decoding is one forward over T new tokens (the pending
token, its drafts and, with masks, the mask tokens) after C cached ones. Its
cost depends on the machine, the weights' format and the path it takes:

- ``plain``: the model's own causal forward (plain decoding; copied drafts
  without masks);
- ``gated``: a decoding layout with mask tokens, gated LoRA and an explicit
  attention mask (:meth:`MTPModel.forward_layout`).

:func:`calibrate` times both for T = 1, 2, 4, 8, then 4x wider, up to the
widest forward the decoder feeds, at a short context, the plain path's
narrowest and widest at a long one (the KV cache is filled with zeros, not
computed: attention costs the same), and the sampler head's call (one per
drafted token). :class:`CostModel` interpolates the table (linear in T between
measured widths, linear in C: attention is). :func:`cost_model` measures once
per (model shape, weights' format, adapter, device, BLAS, MLX version) and
caches the table as JSON in ``calibration/`` under the cache root
(:func:`mlx_mtp.user_cache.cache_root`; ``$MLX_MTP_CALIBRATION`` names the
directory itself); a cache that cannot be read, does not parse, or was
measured for something else is measured again and rewritten, and one that
cannot be written is skipped. How the policy uses the costs: docs/calibration.md.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .arguments import add_model_args
from .errors import USER_ERROR_EXIT, MTPError, WriteError
from .files import atomic_write
from .user_cache import cache_root

FORMAT = 1  # of the cache files; a file of another format is measured again
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


def weights_dtype(model) -> str:
    """The layers' weight format: "float32", "float16", "4-bit", ... (quantized
    embeddings of another width are named too)."""
    import mlx.nn as nn

    def name(module) -> str:
        if hasattr(module, "bits"):
            return f"{module.bits}-bit"
        return str(module.weight.dtype).replace("mlx.core.", "")

    linear = next(m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))
    layers, embed = name(linear), name(model.model.embed_tokens)
    return layers if embed == layers else f"{layers} (embeddings {embed})"


def widths_up_to(max_width: int) -> List[int]:
    """1, 2, 4, ... doubling up to :data:`BEND`, then every 4x, up to
    ``max_width`` (which is included): 1, 2, 4, 8, 32 for 32; 1, 2, 4, 8, 32,
    64 for 64."""
    widths, w = [], 1
    while w < max_width:
        widths.append(w)
        w *= 2 if w < BEND else 4
    return widths + [max_width]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def identity(model) -> Dict[str, object]:
    """What the costs depend on: the model's shapes and weights' format, the
    adapter's (LoRA rank and layers, masks), the device, the BLAS, MLX."""
    from .blas import blas_info
    from .model.mtp_model import base_model_identity

    base = model.model
    args = getattr(base, "args", None)
    shape = dict(base_model_identity(base))
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        value = getattr(args, key, None)
        if isinstance(value, (int, float, str)):
            shape[key] = value
    config = getattr(model, "config", None)
    device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    return {
        "format": FORMAT,
        "model": shape,
        "dtype": weights_dtype(base),
        "adapter": None if config is None else {"num_masks": config.num_masks, "lora": asdict(config.lora)},
        "device": f"{device}:{platform.machine()}:{_cpu_name()}:{os.cpu_count()}",
        "blas": blas_info().name,
        "mlx": mx.__version__,
    }


@dataclass
class CostTable:
    """Measured seconds per forward: ``plain[c][w]`` and ``gated[c][w]`` at
    ``contexts[c]`` cached tokens and ``widths[w]`` new tokens; ``gated`` is
    None for a model without an adapter."""

    widths: List[int]
    contexts: List[int]
    plain: List[List[float]]
    gated: Optional[List[List[float]]] = None
    sampler_call: float = 0.0  # seconds per sampler-head call (0: no adapter)
    seconds: float = 0.0  # how long the measurement took
    timings: int = 0  # forwards (and sampler chains) timed
    identity: Dict[str, object] = field(default_factory=dict)

    def validate(self):
        """Raise ValueError unless the table is well formed (a cache file is
        trusted only then)."""
        if not self.widths or self.widths != sorted(set(self.widths)) or self.widths[0] < 1:
            raise ValueError(f"widths must be increasing and >= 1: {self.widths}")
        if not self.contexts or self.contexts != sorted(set(self.contexts)) or self.contexts[0] < 0:
            raise ValueError(f"contexts must be increasing and >= 0: {self.contexts}")
        for name, rows in (("plain", self.plain), ("gated", self.gated)):
            if rows is None and name == "gated":
                continue
            if len(rows) != len(self.contexts) or any(len(r) != len(self.widths) for r in rows):
                raise ValueError(f"{name}: expected {len(self.contexts)} x {len(self.widths)} costs")
            if not all(isinstance(c, (int, float)) and math.isfinite(c) and c > 0 for r in rows for c in r):
                raise ValueError(f"{name}: costs must be finite and > 0")
        call = self.sampler_call
        if not (isinstance(call, (int, float)) and math.isfinite(call) and call >= 0):
            raise ValueError("sampler_call must be finite and >= 0")

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "CostTable":
        """A table from its JSON form; ValueError unless every field has its
        type and the table is well formed."""

        def numbers(x, kind=float) -> list:
            if not isinstance(x, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
                raise ValueError(f"expected a list of numbers, got {x!r:.40}")
            return [kind(v) for v in x]

        def rows(x) -> List[List[float]]:
            if not isinstance(x, list):
                raise ValueError("expected a list of rows")
            return [numbers(r) for r in x]

        if not isinstance(d, dict) or not isinstance(d.get("identity", {}), dict):
            raise ValueError("expected a JSON object with an identity object")
        table = cls(
            widths=numbers(d["widths"], int),
            contexts=numbers(d["contexts"], int),
            plain=rows(d["plain"]),
            gated=None if d.get("gated") is None else rows(d["gated"]),
            sampler_call=float(d.get("sampler_call", 0.0)),
            seconds=float(d.get("seconds", 0.0)),
            timings=int(d.get("timings", 0)),
            identity=dict(d.get("identity", {})),
        )
        table.validate()
        return table


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through (xs, ys), extended linearly past both ends
    (constant where there is one point)."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class CostModel:
    """Seconds per forward, interpolated from a :class:`CostTable`."""

    def __init__(self, table: CostTable):
        table.validate()
        self.table = table

    def cost(self, width: int, context: int, gated: bool = False) -> float:
        """Seconds for one forward over ``width`` new tokens after ``context``
        cached ones; ``gated``: with mask tokens (gated LoRA, explicit mask)."""
        t = self.table
        rows = t.gated if gated else t.plain
        if rows is None:
            raise ValueError("no gated costs: the model has no adapter")
        # never below the shortest context measured (a fixed cost dominates there)
        c = max(context, t.contexts[0])
        at_width = [_interp(t.widths, row, width) for row in rows]
        # a forward never costs less than the narrowest one
        return max(_interp(t.contexts, at_width, c), min(row[0] for row in rows))

    def chain(self, depth: int) -> float:
        """Seconds for a sampler-head chain of ``depth`` drafted tokens."""
        return depth * self.table.sampler_call

    @classmethod
    def from_function(
        cls,
        cost: Callable[[int, int, bool], float],
        widths: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
        contexts: Sequence[int] = (64, 1024),
        sampler_call: float = 0.0,
    ) -> "CostModel":
        """A cost model sampled from ``cost(width, context, gated)`` (tests,
        what-if studies)."""
        table = CostTable(
            widths=list(widths),
            contexts=list(contexts),
            plain=[[cost(w, c, False) for w in widths] for c in contexts],
            gated=[[cost(w, c, True) for w in widths] for c in contexts],
            sampler_call=sampler_call,
        )
        return cls(table)

    def describe(self, context: Optional[int] = None) -> str:
        """The table as text: ms per forward by width, per context (or at one
        ``context``), and relative to the plain one-token forward."""
        t = self.table
        contexts = t.contexts if context is None else [context]
        lines = []
        header = f"{'context':>8} {'path':<6}" + "".join(f"{'T=' + str(w):>9}" for w in t.widths)
        lines.append(header)
        for c in contexts:
            one = self.cost(1, c)
            for gated in (False, True) if t.gated is not None else (False,):
                name = "gated" if gated else "plain"
                ms = "".join(f"{self.cost(w, c, gated) * 1e3:>7.1f}ms" for w in t.widths)
                rel = "".join(f"{self.cost(w, c, gated) / one:>8.2f}x" for w in t.widths)
                lines.append(f"{c:>8} {name:<6}{ms}")
                lines.append(f"{'':>8} {'':<6}{rel}")
        if t.gated is not None:
            one = self.cost(1, contexts[0])
            lines.append(f"sampler-head call: {t.sampler_call * 1e3:.2f} ms ({t.sampler_call / one:.2f}x)")
        return "\n".join(lines)


# --- measuring -------------------------------------------------------------------------
def fill_cache(model, context: int, room: int):
    """A cache that holds ``context`` zero entries (timing only: attention
    costs the same whatever the keys are), with room for ``room`` more."""
    from .model.cache import commit

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
    from .model.layouts import Layout

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
    from .model.cache import commit

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
    from .model.mtp_model import MTPModel

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
            slope = (best[(0, g, b)] - best[(0, g, narrow[-2])]) / (b - narrow[-2])
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
            row = [c + (_interp(ends, change, w) if len(ends) > 1 else change[0]) for c, w in zip(first, widths)]
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


# --- the cache on disk --------------------------------------------------------------------
def cache_dir() -> Path:
    """``$MLX_MTP_CALIBRATION``, else ``calibration/`` under the cache root
    (:func:`mlx_mtp.user_cache.cache_root`)."""
    own = os.environ.get("MLX_MTP_CALIBRATION")
    return Path(own) if own else cache_root() / "calibration"


def cache_path(ident: Dict[str, object], directory: Optional[Path] = None) -> Path:
    """The cache file of a calibration identity."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return (directory or cache_dir()) / f"costs-{digest}.json"


def read_cached(path: Path, ident: Dict[str, object]) -> Optional[CostTable]:
    """The table cached at ``path`` if it is whole, well formed and measured
    for ``ident``; None otherwise (never raises)."""
    try:
        table = CostTable.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return table if table.identity == ident else None


def write_cached(path: Path, table: CostTable) -> bool:
    """Write ``table`` to ``path`` atomically; False where it cannot be
    written (a read-only cache never fails a run)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(asdict(table), indent=1)))
        return True
    except (OSError, WriteError):  # atomic_write reports an OSError as a WriteError
        return False


@dataclass
class Calibration:
    """What :func:`cost_model` used."""

    costs: CostModel
    path: Path
    cached: bool  # read from the cache (else measured now)
    written: bool  # measured now and written to the cache


def feeds_masks(model) -> bool:
    """Whether the decoder's policy may feed masks on this device (the
    adapter's ``default_num_masks``), so that the gated path's costs are
    needed."""
    return getattr(model, "default_num_masks", 0) > 0


def cost_model(
    model,
    refresh: bool = False,
    directory: Optional[Path] = None,
    max_width: int = MAX_WIDTH,
    gated: bool = True,
) -> Calibration:
    """The :class:`CostModel` of ``model`` here: from the cache, or measured
    (``refresh``: always; T up to ``max_width``) and cached. A cached table
    is used whatever widths it holds (wider ones extrapolate), and with the
    gated path where ``gated`` and the model has an adapter (one without it
    is measured again, both paths); ``gated=False``: the plain path is
    enough (a decoder that feeds no masks here)."""
    from .model.mtp_model import MTPModel

    if not isinstance(model, MTPModel):
        model = MTPModel(model)
    ident = identity(model)
    path = cache_path(ident, directory)
    gated = gated and model.num_masks > 0
    table = None if refresh else read_cached(path, ident)
    if table is not None and (table.gated is not None or not gated):
        return Calibration(CostModel(table), path, cached=True, written=False)
    widths = widths_up_to(max_width) if max_width != MAX_WIDTH else None
    table = calibrate(model, widths, gated=gated)
    table.identity = ident
    return Calibration(CostModel(table), path, cached=False, written=write_cached(path, table))


# --- CLI ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.calibrate",
        description="Measure the cost of a forward for this model on this machine, print it and cache it.",
    )
    add_model_args(p)
    p.add_argument(
        "--max-width",
        type=int,
        default=MAX_WIDTH,
        help=f"widest forward to measure (default: {MAX_WIDTH}; wider ones extrapolate)",
    )
    p.add_argument(
        "--gated",
        action="store_true",
        help="measure the gated path (masks) too where the adapter feeds none on this device "
        "(by default only what the decoder uses here is measured)",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .blas import describe
    from .loading import load

    try:
        if args.max_width < 2:
            raise ValueError(f"--max-width must be >= 2, got {args.max_width}")
        model, _ = load(args.model, adapter_path=args.adapter_path)
    except (MTPError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    result = cost_model(model, refresh=True, max_width=args.max_width, gated=args.gated or feeds_masks(model))
    table = result.costs.table
    print(f"BLAS: {describe()}")
    print(f"weights: {table.identity['dtype']}, device: {table.identity['device']}, MLX {table.identity['mlx']}")
    took = f"measured in {table.seconds:.1f} s, {table.timings} timings"
    print(f"seconds per forward over T new tokens after C cached ones ({took}):")
    print(result.costs.describe())
    where = f"cached in {result.path}" if result.written else f"not cached ({result.path.parent} is not writable)"
    print(where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
