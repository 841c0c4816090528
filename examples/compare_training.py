"""Short trainings from the same start and seed, one per set of options, in
one table: seconds per step, sequences per hour, response tokens (the data
covered) per second, and validation top-1 per depth at the start and the
end (issue #16's controlled comparisons).

    python examples/compare_training.py --run "" --run "mask_positions=0.5" \\
        --run "sampler_hidden_dims=1152 sampler_layers=3" -- \\
        --model M --data DIR --iters 40 --batch-size 2 --steps-per-eval 40 --val-batches 8

Every run is ``python -m mlx_mtp.lora --train`` with the options after ``--``
(common to all runs) and its own ``--run`` options (``name=value`` with the
CLI's option names, underscores or dashes; ``true``/``false`` for switches;
``""``: the common options alone), each in its own process and adapter
directory under ``--out``. The same ``--seed`` gives every run the same
initial LoRA and masks (a sampler head of another shape is drawn after them)
and the same batch order. Timings come from each run's ``train_log.jsonl``:
the mean step after the first. Give ``--steps-per-eval`` = ``--iters`` for
one validation at the start and one at the end (0: none, speed only), and run
it alone or under ``nice`` on a shared machine (only the ratios compare).

With ``--out``, an interrupted comparison continues where it stopped: a run
whose checkpoint has reached ``--iters`` is not run again, one with an
earlier checkpoint resumes from it (``--save-every`` sets how much is redone).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.callbacks import LOG_FILE, read_log, train_reports
from mlx_mtp.training.checkpoint import STATE_FILE, read_checkpoint


def run_flags(spec: str) -> List[str]:
    """CLI flags of a run's ``name=value`` options."""
    flags = []
    for item in spec.split():
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --run option '{item}' is not name=value")
        flag = "--" + name.replace("_", "-")
        if value.lower() == "true":
            flags.append(flag)
        elif value.lower() == "false":
            flags.append("--no-" + flag[2:])
        else:
            flags += [flag, value]
    return flags


def _rate(train: List[dict], key: str) -> float:
    """Tokens per second over all the steps of ``train`` (one record per step)."""
    return sum(r[key] / r["steps_per_sec"] for r in train) / sum(1.0 / r["steps_per_sec"] for r in train)


def summarize(records: List[dict], batch_size: int) -> Dict:
    """Step time, sequences/hour and the last validation of one run's log."""
    train = train_reports(records)
    val = [r for r in records if r["type"] == "val"]
    times = [1.0 / r["steps_per_sec"] for r in train]
    timed = times[1:] if len(times) > 1 else times  # the first step also allocates
    step = sum(timed) / len(timed)  # a mean: batches differ in length, an hour holds all of them
    end = [v for v in val if v["step"] > 0]
    return {
        "seconds_per_step": step,
        "sequences_per_hour": batch_size * 3600.0 / step,
        "layout_tokens_per_sec": _rate(train[1:] or train, "tokens_per_sec"),
        "response_tokens_per_sec": _rate(train[1:] or train, "response_tokens_per_sec"),
        "first_val": val[0] if val and val[0]["step"] == 0 else None,
        "last_val": end[-1] if end else None,
    }


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of the run's last checkpoint in ``path`` (None: none yet)."""
    state = path / STATE_FILE
    return read_checkpoint(state).step if state.exists() else None


def option(common: List[str], flags: List[str], name: str, default):
    """The value of ``--name`` in a run's flags (its own win), else ``default``."""
    value = default
    for args in (common, flags):
        if name in args:
            value = args[args.index(name) + 1]
    return value


def table(rows: List[Dict]) -> str:
    base = rows[0]["sequences_per_hour"]
    out = [
        f"{'run':34s} {'s/step':>7s} {'seq/hour':>9s} {'ratio':>6s} {'resp tok/s':>10s}  "
        "val top-1 per depth (start -> end)"
    ]
    for r in rows:
        acc = ""
        if r["last_val"]:
            acc = " ".join(f"{a:.3f}" for a in r["last_val"]["accuracy"])
            if r["first_val"]:
                acc = " ".join(f"{a:.3f}" for a in r["first_val"]["accuracy"]) + " -> " + acc
        out.append(
            f"{r['name'][:34]:34s} {r['seconds_per_step']:7.2f} {r['sequences_per_hour']:9.0f} "
            f"{r['sequences_per_hour'] / base:5.2f}x {r['response_tokens_per_sec']:10.1f}  {acc}"
        )
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="one run's options: 'name=value ...' ('' for none)")
    p.add_argument("--out", default=None, help="directory for the runs' adapters (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the table's figures here")
    args = p.parse_args(own)
    out = Path(args.out or tempfile.mkdtemp(prefix="compare_training_"))
    rows = []
    for i, spec in enumerate(args.run):
        flags = run_flags(spec)
        path = out / f"run{i}"
        cmd = [sys.executable, "-m", "mlx_mtp.lora", "--train", *common, *flags, "--adapter-path", str(path),
               "--steps-per-report", "1", "--no-progress"]  # fmt: skip
        name = spec.strip() or "default"
        step = checkpoint_step(path)
        iters = int(option(common, flags, "--iters", TrainArgs.iters))
        if step is not None and step >= iters:
            print(f"[{name}] done before (step {step}): {path}", flush=True)
        else:
            if step is not None:
                cmd += ["--resume-adapter-file", str(path)]
            print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
            if done.returncode != 0:
                print(f"error: run '{name}' failed: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                return done.returncode
        batch_size = int(option(common, flags, "--batch-size", TrainArgs.batch_size))
        rows.append({"name": name, **summarize(read_log(path / LOG_FILE), batch_size)})
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
