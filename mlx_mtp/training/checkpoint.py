"""Training checkpoints on disk: writing one (all files or none), reading
one back, and checking that its tensors fit the model being trained.

A checkpoint is a directory holding the adapter (``adapter_config.json`` +
``adapters.safetensors``, usable as is) and ``training_state.safetensors``:
tensors ``adapter.<name>`` (the adapter weights) and ``optimizer.<path>``
(the optimizer state, ``tree_flatten`` names), metadata ``format``
(``mlx-mtp-training-state``), ``version`` (``"1"``), ``step``,
``mtp_config`` and ``train_args`` (JSON). Resuming reads the state file only.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from ..adapter import CONFIG_FILE, DRAFT_VOCAB, WEIGHTS_FILE, check_adapter_tensors, save_adapter
from ..errors import AdapterError, MTPError
from ..files import atomic_write, failure_reason, is_write_failure, read_safetensors
from ..model.mtp_model import MTPModel

STATE_FILE = "training_state.safetensors"
STATE_FORMAT = "mlx-mtp-training-state"
STATE_VERSION = "1"
STAGING_PREFIX = ".checkpoint."  # a checkpoint being written; left behind only by a kill
SNAPSHOTS = "snapshots"  # kept adapters (--keep-every), one directory per step


def snapshot_dir(path: Path, step: int) -> Path:
    """Where the adapter of ``step`` is kept inside the adapter directory ``path``."""
    return Path(path) / SNAPSHOTS / f"step_{step:07d}"


def list_snapshots(path: Path) -> List[Tuple[int, Path]]:
    """The kept adapters of the run at ``path``, as (step, directory), by step."""
    out = []
    for d in (Path(path) / SNAPSHOTS).glob("step_*"):
        step = d.name.removeprefix("step_")
        if step.isdigit() and (d / WEIGHTS_FILE).exists() and (d / CONFIG_FILE).exists():
            out.append((int(step), d))
    return sorted(out)


class CheckpointWriteError(MTPError):
    """A checkpoint that could not be written (disk full, read-only directory);
    the previous one is left as it was."""


class TrainingState(NamedTuple):
    """A checkpoint's training state, as read from its state file."""

    step: int
    weights: Dict[str, mx.array]  # adapter parameter name -> tensor
    optimizer: Dict[str, mx.array]  # tree_flatten name of the optimizer state -> tensor
    mtp_config: dict
    path: Path


def save_checkpoint(
    path: Path,
    mtp: MTPModel,
    optimizer_state: dict,
    step: int,
    train_args: dict,
    recipe: dict,
    keep: bool = False,
):
    """Write the checkpoint of ``step`` to the directory ``path``.

    Every file is first written completely into a staging directory inside
    ``path``, then renamed into place (the state file last): a failed write
    (disk full, read-only directory) changes nothing, and a kill leaves each
    file whole. With ``keep`` the adapter is also kept as
    :func:`snapshot_dir` (written before the state file is renamed, so a
    resumed run writes it again if a kill came between). Raises
    :class:`CheckpointWriteError` naming the directory.
    """
    path = Path(path)
    weights = mtp.adapter_parameters()
    arrays = {f"adapter.{k}": v for k, v in weights.items()}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer_state)})
    metadata = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": str(step),
        "mtp_config": json.dumps(mtp.config.to_dict()),
        "train_args": json.dumps(train_args),
    }
    staging = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(old, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=path, prefix=STAGING_PREFIX, suffix=".tmp"))
        atomic_write(staging / STATE_FILE, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=metadata))
        save_adapter(mtp, staging, recipe=recipe, weights=weights)
        if keep:
            _keep_snapshot(staging, snapshot_dir(path, step))
        for name in (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE):
            os.replace(staging / name, path / name)
    except (OSError, MTPError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not is_write_failure(e):
            raise
        kept = "the previous checkpoint is unchanged" if (path / STATE_FILE).exists() else "nothing was written"
        raise CheckpointWriteError(
            f"cannot write the checkpoint of step {step} to {path}: {failure_reason(e)} ({kept})"
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _keep_snapshot(staging: Path, target: Path):
    """Copy the adapter files in ``staging`` to the directory ``target``,
    replacing it whole (a directory renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging / "snapshot"
    tmp.mkdir()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copyfile(staging / name, tmp / name)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def resolve_state_file(path: Path) -> Path:
    """The training-state file that ``--resume-adapter-file`` points at: the
    file itself, the one next to an ``adapters.safetensors``, or the one in
    an adapter directory."""
    path = Path(path)
    if path.is_dir():
        return path / STATE_FILE
    if path.name == STATE_FILE:
        return path
    return path.parent / STATE_FILE


def read_checkpoint(state_file: Path) -> TrainingState:
    """The training state in ``state_file``; :class:`AdapterError` if it is
    not one or cannot be read."""
    arrays, metadata = read_safetensors(state_file, AdapterError, metadata=True)
    if metadata.get("format") != STATE_FORMAT:
        raise AdapterError(f"'{state_file}' is not an mlx-mtp training state")
    try:
        step = int(metadata["step"])
        config = json.loads(metadata.get("mtp_config", "{}"))
    except (KeyError, ValueError):
        raise AdapterError(f"'{state_file}': corrupt training-state metadata (step or mtp_config)") from None
    weights = {k[len("adapter.") :]: v for k, v in arrays.items() if k.startswith("adapter.")}
    opt = {k[len("optimizer.") :]: v for k, v in arrays.items() if k.startswith("optimizer.")}
    return TrainingState(step, weights, opt, config, Path(state_file))


def read_weights(path: Path):
    """The adapter weights at ``path`` (a directory or its weights file),
    without the draft vocabulary, and the file they came from."""
    path = Path(path)
    weights_file = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights_file.exists():
        raise AdapterError(f"no adapter weights at '{weights_file}'")
    weights = dict(read_safetensors(weights_file, AdapterError))
    weights.pop(DRAFT_VOCAB, None)
    return weights, weights_file


def check_weights(
    weights: Dict[str, mx.array], expected: Dict[str, mx.array], source: Path, exclude: Optional[str] = None
) -> Dict[str, mx.array]:
    """``weights`` cast to the dtypes of ``expected`` after checking they are
    exactly its names with its shapes; names starting with ``exclude`` are
    left out on both sides."""
    if exclude:
        expected = {k: v for k, v in expected.items() if not k.startswith(exclude)}
        weights = {k: v for k, v in weights.items() if not k.startswith(exclude)}
    check_adapter_tensors(weights, expected, source)
    return {k: v.astype(expected[k].dtype) for k, v in weights.items()}


def config_diffs(saved: dict, mine: dict, prefix: str = "") -> List[str]:
    """``key: checkpoint X, now Y`` for every entry where two configs differ."""
    out = []
    for key in sorted(set(saved) | set(mine)):
        a, b = saved.get(key), mine.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diffs(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out
