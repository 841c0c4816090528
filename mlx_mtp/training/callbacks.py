"""What the training loop reports to, so that the loop itself owns no
printing, files or signals (``mlx_lm.tuner``'s ``TrainingCallback``).

:class:`TrainingCallback` is the interface (every hook does nothing);
:class:`ReportingCallback` is what the lora CLI uses: a progress bar, one
line per report, ``train_log.jsonl`` in the adapter directory, and
SIGINT/SIGTERM turned into "save a checkpoint after this step and stop".
"""

import json
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional, Protocol, Union

from tqdm import tqdm

from .args import TrainArgs
from .losses import TERMS

LOG_FILE = "train_log.jsonl"


def read_log(path: Union[str, Path]) -> List[dict]:
    """The records of a ``train_log.jsonl`` (or any JSON-lines file), in
    order; none where the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_reports(records: List[dict]) -> List[dict]:
    """The ``train`` records by step. A resumed run logs the steps after its
    checkpoint again; the later record of a step wins."""
    by_step = {r["step"]: r for r in records if r.get("type") == "train"}
    return [by_step[s] for s in sorted(by_step)]


class TrainerView(Protocol):
    """What a callback sees of :class:`~mlx_mtp.training.trainer.Trainer`
    (a protocol, so that this module does not import the loop that calls it)."""

    args: TrainArgs
    k: int  # mask tokens
    step: int  # steps done
    stop_requested: bool
    saving: bool  # while a checkpoint is written

    def request_stop(self) -> None: ...


class TrainingCallback:
    """Hooks of the training loop; subclasses override what they need."""

    def on_train_begin(self, trainer: TrainerView):
        """Before the first step (and the first validation)."""

    def on_step_end(self, trainer: TrainerView):
        """After every step; ``trainer.step`` is the number of steps done."""

    def on_train_report(self, trainer: TrainerView, record: dict):
        """Training losses and speed averaged since the last report."""

    def on_val_report(self, trainer: TrainerView, record: dict):
        """Validation losses, accuracies and expected tokens/step."""

    def on_train_end(self, trainer: TrainerView):
        """After the loop, also when it stops on an interrupt or an error."""


class ReportingCallback(TrainingCallback):
    """Progress bar, printed reports and the JSONL log (process 0 only), and
    SIGINT/SIGTERM handling (every process): the first signal asks the loop
    to save and stop after this step, a second one stops at once unless a
    checkpoint is being written."""

    def __init__(self, adapter_path, progress: bool = True, rank: int = 0):
        self.path = Path(adapter_path)
        self.progress = progress
        self.rank = rank
        self.bar = None
        self._old = {}
        self._trainer: Optional[TrainerView] = None

    # --- signals ----------------------------------------------------------------
    def _handle(self, signum, frame):
        trainer = self._trainer
        if trainer.stop_requested and not trainer.saving:
            raise KeyboardInterrupt
        if not trainer.stop_requested and self.rank == 0:
            print(
                "\nInterrupt received: saving a checkpoint after this step "
                "(press Ctrl-C again to stop without saving).",
                file=sys.stderr,
                flush=True,
            )
        trainer.request_stop()

    def on_train_begin(self, trainer):
        self._trainer = trainer
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        if self.rank == 0 and self.progress:
            self.bar = tqdm(
                total=trainer.args.iters,
                initial=trainer.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )

    def on_train_end(self, trainer):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_step_end(self, trainer):
        if self.bar is not None:
            self.bar.update(1)

    # --- reports ----------------------------------------------------------------
    def _log(self, record: dict):
        if self.rank != 0:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _print(self, msg: str):
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def on_train_report(self, trainer, record):
        self._log(record)
        parts = " ".join(f"{t} {record[t]:.3f}" for t in TERMS if t in record)
        self._print(
            f"step {record['step']}/{trainer.args.iters}: loss {record['loss']:.3f} ({parts}) | "
            f"lr {record['learning_rate']:.2e} | {record['tokens_per_sec']:.0f} tok/s "
            f"({record['response_tokens_per_sec']:.0f} response tok/s) | peak mem {record['peak_memory_gb']:.2f} GB"
        )

    def on_val_report(self, trainer, record):
        self._log(record)
        accs = " ".join(f"{a:.3f}" for a in record["accuracy"])
        losses = " ".join(f"{t} {record[t]:.3f}" for t in TERMS if t in record)
        tps = record["tokens_per_step"]
        self._print(
            f"val  step {record['step']}: loss {record['loss']:.3f} ({losses}) | acc@1..{trainer.k} {accs} | "
            f"tokens/step linear {tps['linear']:.2f} quadratic {tps['quadratic']:.2f} | {record['val_time']:.1f}s"
        )
