"""Seconds per forward on this machine: :class:`CostTable` (as measured) and
:class:`CostModel` (interpolated), what the per-step policy chooses from.

A step of speculative decoding is one forward over T new tokens after C
cached ones, on the ``plain`` path (the model's own causal forward) or the
``gated`` one (mask tokens, gated LoRA, an explicit mask). The table holds
measured costs at a few widths and contexts; the model interpolates them
(linear in T between measured widths, linear in C: attention is).

A batch of R rows (requests) verified together is one forward over all their
new tokens; the table also holds such batched forwards, measured at one
context for a few row counts and widths per row, which the model
interpolates (:meth:`CostModel.batch_cost`).
:mod:`mlx_mtp.calibration.measure` measures them, :mod:`mlx_mtp.calibration.store`
caches them on disk.
"""

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["VERSION", "CostModel", "CostTable", "interpolate"]

# of a table's JSON form: 1 had no batched forwards (their costs are then
# derived: a batch priced as one row of its total tokens), 2 has them
VERSION = 2


@dataclass
class CostTable:
    """Measured seconds per forward: ``plain[c][w]`` and ``gated[c][w]`` at
    ``contexts[c]`` cached tokens and ``widths[w]`` new tokens; ``gated`` is
    None for a model without an adapter. ``batch[r][w]``: a batched forward
    (plain path, explicit per-row attention mask) of ``batch_rows[r]`` rows
    feeding ``batch_widths[w]`` new tokens each after ``batch_context``
    cached tokens each; None where not measured (a table of version 1)."""

    widths: List[int]
    contexts: List[int]
    plain: List[List[float]]
    gated: Optional[List[List[float]]] = None
    sampler_call: float = 0.0  # seconds per sampler-head call (0: no adapter)
    seconds: float = 0.0  # how long the measurement took
    timings: int = 0  # forwards (and sampler chains) timed
    identity: Dict[str, object] = field(default_factory=dict)
    batch_rows: List[int] = field(default_factory=list)
    batch_widths: List[int] = field(default_factory=list)
    batch_context: int = 0
    batch: Optional[List[List[float]]] = None
    version: int = VERSION

    def validate(self):
        """Raise ValueError unless the table is well formed (a cache file is
        trusted only then)."""
        if not self.widths or self.widths != sorted(set(self.widths)) or self.widths[0] < 1:
            raise ValueError(f"widths must be increasing and >= 1: {self.widths}")
        if not self.contexts or self.contexts != sorted(set(self.contexts)) or self.contexts[0] < 0:
            raise ValueError(f"contexts must be increasing and >= 0: {self.contexts}")
        if self.batch is not None:
            if not self.batch_rows or self.batch_rows != sorted(set(self.batch_rows)) or self.batch_rows[0] < 2:
                raise ValueError(f"batch_rows must be increasing and >= 2: {self.batch_rows}")
            if not self.batch_widths or self.batch_widths != sorted(set(self.batch_widths)) or self.batch_widths[0] < 1:
                raise ValueError(f"batch_widths must be increasing and >= 1: {self.batch_widths}")
            if self.batch_context < 0:
                raise ValueError(f"batch_context must be >= 0: {self.batch_context}")
        shapes = (
            ("plain", self.plain, self.contexts, self.widths),
            ("gated", self.gated, self.contexts, self.widths),
            ("batch", self.batch, self.batch_rows, self.batch_widths),
        )
        for name, rows, along, across in shapes:
            if rows is None and name != "plain":
                continue
            if len(rows) != len(along) or any(len(r) != len(across) for r in rows):
                raise ValueError(f"{name}: expected {len(along)} x {len(across)} costs")
            if not all(isinstance(c, (int, float)) and math.isfinite(c) and c > 0 for r in rows for c in r):
                raise ValueError(f"{name}: costs must be finite and > 0")
        call = self.sampler_call
        if not (isinstance(call, (int, float)) and math.isfinite(call) and call >= 0):
            raise ValueError("sampler_call must be finite and >= 0")

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "CostTable":
        """A table from its JSON form (version 1, without batched forwards,
        or 2); ValueError unless every field has its type and the table is
        well formed."""

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
        version = d.get("version", 1)
        if version not in (1, VERSION):
            raise ValueError(f"unknown version {version!r:.20} (this one reads 1 and {VERSION})")
        batched = version >= 2 and d.get("batch") is not None
        table = cls(
            widths=numbers(d["widths"], int),
            contexts=numbers(d["contexts"], int),
            plain=rows(d["plain"]),
            gated=None if d.get("gated") is None else rows(d["gated"]),
            sampler_call=float(d.get("sampler_call", 0.0)),
            seconds=float(d.get("seconds", 0.0)),
            timings=int(d.get("timings", 0)),
            identity=dict(d.get("identity", {})),
            batch_rows=numbers(d["batch_rows"], int) if batched else [],
            batch_widths=numbers(d["batch_widths"], int) if batched else [],
            batch_context=numbers([d["batch_context"]], int)[0] if batched else 0,
            batch=rows(d["batch"]) if batched else None,
            version=VERSION,
        )
        table.validate()
        return table


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
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
        at_width = [interpolate(t.widths, row, width) for row in rows]
        # a forward never costs less than the narrowest one
        return max(interpolate(t.contexts, at_width, c), min(row[0] for row in rows))

    def batch_cost(self, rows: int, tokens: int, context: int, gated: bool = False) -> float:
        """Seconds for one batched forward of ``rows`` rows feeding ``tokens``
        new tokens in all after ``context`` cached tokens each (one row:
        :meth:`cost`). From the batched forwards measured at the batch's
        context: piecewise linear in the tokens per row, then in the rows
        (both extended linearly past the measured ones); then the change in
        context and the gated path's share as one row's forward of the same
        tokens has them (attention over the cache costs ~tokens x context
        whatever the rows). Without batched forwards (a table of version 1):
        one row's forward of the same tokens, within a few percent of the
        measured on a CPU (docs/calibration.md)."""
        t = self.table
        if rows <= 1 or t.batch is None:
            return self.cost(tokens, context, gated)
        per_row = [interpolate(t.batch_widths, measured, tokens / rows) for measured in t.batch]
        # never below the cheapest batch measured (a batch cannot cost less than fewer rows)
        seconds = max(interpolate(t.batch_rows, per_row, rows), t.batch[0][0])
        plain = self.cost(tokens, context)
        seconds += plain - self.cost(tokens, t.batch_context)
        return seconds * (self.cost(tokens, context, True) / plain if gated else 1.0)

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
        batch: Optional[Callable[[int, int], float]] = None,
        batch_rows: Sequence[int] = (2, 4, 8),
        batch_widths: Sequence[int] = (1, 2, 4, 8, 16),
        batch_context: int = 256,
    ) -> "CostModel":
        """A cost model sampled from ``cost(width, context, gated)`` and
        ``batch(rows, width per row)``, the seconds of a batched forward at
        ``batch_context`` (None: none; tests, what-if studies)."""
        table = CostTable(
            widths=list(widths),
            contexts=list(contexts),
            plain=[[cost(w, c, False) for w in widths] for c in contexts],
            gated=[[cost(w, c, True) for w in widths] for c in contexts],
            sampler_call=sampler_call,
        )
        if batch is not None:
            table.batch_rows, table.batch_widths = list(batch_rows), list(batch_widths)
            table.batch_context = batch_context
            table.batch = [[batch(r, w) for w in batch_widths] for r in batch_rows]
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
        lines.append(self.describe_batch())
        return "\n".join(lines)

    def describe_batch(self) -> str:
        """The batched forwards as text: ms per forward by rows and width per
        row, and relative to one row's one-token forward."""
        t = self.table
        if t.batch is None:
            return "batched forwards: not measured (priced as one row of the same tokens)"
        C = t.batch_context
        one = self.cost(1, C)
        lines = [f"batched forwards over R rows x T new tokens each, {C} cached tokens per row:"]
        lines.append(f"{'rows':>8} {'':<6}" + "".join(f"{'T=' + str(w):>9}" for w in t.batch_widths))
        for r, measured in zip(t.batch_rows, t.batch):
            lines.append(f"{r:>8} {'':<6}" + "".join(f"{s * 1e3:>7.1f}ms" for s in measured))
            lines.append(f"{'':>8} {'':<6}" + "".join(f"{s / one:>8.2f}x" for s in measured))
        return "\n".join(lines)
