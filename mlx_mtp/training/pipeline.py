"""The one-command adapter's stages, its plan and its resume state (the
stages themselves run in :mod:`mlx_mtp.make_adapter`).

``python -m mlx_mtp.lora --train --model M`` without ``--data`` makes a
complete adapter in the directory ``--adapter-path`` in these stages, each
recorded as done in ``<out>/pipeline_state.json`` (written atomically) when
it ends, each resumable from where it stopped:

- ``plan`` (with a time budget only): measure this machine's rates on a few
  prompts (writing, distilling, a few training steps) and choose the counts;
- ``write``: prompts in the model's own words (:mod:`.prompt_writer`), or for
  a base model text it samples itself (:mod:`.text_writer`);
- ``distill``: its greedy responses (:mod:`mlx_mtp.distill`);
- ``split``: train and held-out rows;
- ``train``: :mod:`mlx_mtp.lora` with the measured recipe (:mod:`.recipe`);
- ``package``: fp16 adapter, draft vocabulary, datastore, recipe;
- ``measure``: masks-only tokens/step on held-out prompts.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import DataError
from ..files import atomic_write
from .recipe import DECAY_FRACTION, EPOCHS, VALID_FRACTION

STATE_FILE = "pipeline_state.json"
STAGES = ("plan", "write", "distill", "split", "train", "package", "measure")
DEFAULT_HOURS = 8.0  # an overnight run on a laptop; the plan sizes the data and the steps to it
MIN_PROMPTS = 24  # the fewest the plan chooses: a few batches and a held-out row
MEASURE_PROMPTS = 4  # held-out prompts of the final masks-only measurement
MEASURE_TOKENS = 96  # tokens per prompt there (the benchmark's Spec-Bench length)

# mlx_mtp.lora's options that only the pipeline reads: (name, default, help, argparse keywords)
PIPELINE_OPTIONS = [
    (
        "hours",
        None,
        "--train without --data: time budget of the whole run in hours; the data and the steps are sized "
        f"to it from rates measured first (default: {DEFAULT_HOURS:g} when neither --num-prompts nor --iters is given)",
        {"type": float},
    ),
    (
        "num_prompts",
        None,
        "--train without --data: prompts to write and distil (default: from --hours or --iters)",
        {"type": int},
    ),
    (
        "processes",
        1,
        "--train without --data: data-parallel training processes on this machine (mlx_mtp.launch)",
        {"type": int},
    ),
]


class PipelineError(DataError):
    """A pipeline that cannot go on (its directory, its settings, a stage that failed)."""


@dataclass
class Rates:
    """Seconds per unit of each stage, measured on this machine."""

    write: float  # per prompt kept
    distill: float  # per response
    train: float  # per training step


@dataclass
class Plan:
    prompts: int
    iters: int
    estimate: Dict[str, float] = field(default_factory=dict)  # seconds per stage (with rates)


def train_rows(prompts: int) -> int:
    """Training rows that ``prompts`` responses give after the held-out split."""
    return prompts - math.ceil(prompts * VALID_FRACTION)


def iters_for(prompts: int, batch_size: int) -> int:
    """Steps that see each training response :data:`EPOCHS` times."""
    return max(1, round(train_rows(prompts) * EPOCHS / batch_size))


def prompts_for(iters: int, batch_size: int) -> int:
    """Prompts whose training responses make ``iters`` steps at :data:`EPOCHS`."""
    return max(MIN_PROMPTS, math.ceil(iters * batch_size / EPOCHS / (1 - VALID_FRACTION)))


def schedule(iters: int, warmup: int) -> Dict[str, int]:
    """The learning-rate schedule's step counts for ``iters`` steps: the
    recipe's decay share, and a warm-up of at most a tenth of the run."""
    return {"decay_steps": round(iters * DECAY_FRACTION), "warmup": min(warmup, max(1, iters // 10))}


def held_out(prompts: int) -> int:
    return prompts - train_rows(prompts)


def estimate(prompts: int, iters: int, rates: Rates, val_batches: int, batch_size: int) -> Dict[str, float]:
    """Seconds per stage: the rates times the counts; validation (before and
    after training) at a step's time per batch, the measurement at a
    response's time per prompt."""
    batches = min(val_batches, math.ceil(held_out(prompts) / batch_size))
    out = {
        "write": prompts * rates.write,
        "distill": prompts * rates.distill,
        "train": (iters + 2 * batches) * rates.train,
        "measure": min(MEASURE_PROMPTS, held_out(prompts)) * rates.distill,
    }
    out["total"] = sum(out.values())
    return out


def plan_counts(seconds: float, rates: Rates, batch_size: int, val_batches: int) -> Plan:
    """The most prompts (and their steps) whose stages fit in ``seconds``:
    each prompt costs its writing, its response and its share of steps."""
    fixed = 2 * val_batches * rates.train + MEASURE_PROMPTS * rates.distill  # at most
    per_prompt = rates.write + rates.distill + (1 - VALID_FRACTION) * EPOCHS / batch_size * rates.train
    prompts = max(MIN_PROMPTS, int((seconds - fixed) / per_prompt))
    iters = iters_for(prompts, batch_size)
    return Plan(prompts, iters, estimate(prompts, iters, rates, val_batches, batch_size))


def hours(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def describe(plan: Plan, batch_size: int) -> str:
    """The plan in one line: counts and, with rates, the time per stage."""
    text = f"plan: {plan.prompts} prompts and their responses, {plan.iters} training steps of batch {batch_size}"
    if plan.estimate:
        parts = ", ".join(f"{k} {hours(v)}" for k, v in plan.estimate.items() if k != "total")
        text += f"; estimated {parts}: {hours(plan.estimate['total'])} in all"
    return text


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


@dataclass
class State:
    settings: Dict[str, Any]
    plan: Optional[Dict[str, Any]] = None
    rates: Optional[Dict[str, float]] = None
    done: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # stage -> its figures (seconds, counts)


def state_path(out: Path) -> Path:
    return Path(out) / STATE_FILE


def save_state(out: Path, state: State):
    atomic_write(state_path(out), lambda tmp: Path(tmp).write_text(json.dumps(asdict(state), indent=1)))


def open_state(out: Path, settings: Dict[str, Any]) -> State:
    """The state of the pipeline in ``out`` (a new one if there is none);
    refuses a directory that another command wrote, or the same pipeline
    with other settings."""
    out = Path(out)
    path = state_path(out)
    if path.exists():
        try:
            state = State(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise PipelineError(f"{path} is corrupt ({e}); remove {out} to start over") from None
        diffs = sorted(k for k in set(settings) | set(state.settings) if settings.get(k) != state.settings.get(k))
        if diffs:
            what = ", ".join(f"{k} {state.settings.get(k)!r} -> {settings.get(k)!r}" for k in diffs)
            raise PipelineError(
                f"{out} was started with other settings ({what}); run the same command to resume, "
                "or give another --adapter-path"
            )
        return state
    if out.exists() and any(out.iterdir()):
        raise PipelineError(f"{out} is not empty and holds no {STATE_FILE}; give another --adapter-path")
    out.mkdir(parents=True, exist_ok=True)
    state = State(settings)
    save_state(out, state)
    return state
