"""Calibration: what one forward costs on this machine for this model.

:func:`cost_model` gives the :class:`~mlx_mtp.calibration.costs.CostModel`
the per-step policy chooses from: read from the cache on disk
(:mod:`mlx_mtp.calibration.store`), or measured
(:func:`mlx_mtp.calibration.measure.calibrate`) and cached. The command line
is :mod:`mlx_mtp.calibrate`; how the policy uses the costs: docs/calibration.md.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..model.mtp_model import MTPModel
from .costs import CostModel, CostTable
from .measure import MAX_WIDTH, Progress, add_batch, calibrate, widths_up_to
from .store import cache_path, identity, read_cached, write_cached

__all__ = ["Calibration", "CostModel", "CostTable", "cost_model", "feeds_masks"]


@dataclass
class Calibration:
    """What :func:`cost_model` used."""

    costs: CostModel
    path: Path
    cached: bool  # read from the cache (else measured now)
    written: bool  # measured now and written to the cache
    notice: str = ""  # what was done to a cached table, told on stderr too


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
    batched: bool = False,
    progress: Optional[Progress] = None,
) -> Calibration:
    """The :class:`CostModel` of ``model`` here: from the cache, or measured
    (``refresh``: always; T up to ``max_width``) and cached. A cached table
    is used whatever widths it holds (wider ones extrapolate), and with the
    gated path where ``gated`` and the model has an adapter (one without it
    is measured again, both paths); ``gated=False``: the plain path is
    enough (a decoder that feeds no masks here). ``batched``: with batched
    forwards (a decoder that verifies several requests in one forward); a
    cached table without them (an older version's, or one measured without
    ``batched``) gets them measured and added, with a notice on stderr.
    ``progress``: told after each timing."""
    if not isinstance(model, MTPModel):
        model = MTPModel(model)
    ident = identity(model)
    path = cache_path(ident, directory)
    gated = gated and model.num_masks > 0
    table = None if refresh else read_cached(path, ident)
    if table is not None and (table.gated is not None or not gated):
        if table.batch is not None or not batched:
            return Calibration(CostModel(table), path, cached=True, written=False)
        notice = f"calibration: {path} has no batched forwards yet: measuring them now (once)"
        print(notice, file=sys.stderr)
        add_batch(model, table, progress=progress)
        return Calibration(CostModel(table), path, cached=True, written=write_cached(path, table), notice=notice)
    widths = widths_up_to(max_width) if max_width != MAX_WIDTH else None
    table = calibrate(model, widths, gated=gated, batch=batched, progress=progress)
    table.identity = ident
    return Calibration(CostModel(table), path, cached=False, written=write_cached(path, table))
