"""A training run's learning curve: at each kept adapter (``--keep-every``),
the validation top-1 per depth that the run logged at that step, and the
Spec-Bench tokens/step of the masks alone (greedy, quadratic, no prompt
lookup, no datastore) on a few prompts, against the hours of training that
led there (issue #16).

    python examples/learning_curve.py ADAPTER_DIR [--model M] [--num-prompts 1] \\
        [--max-tokens 96] [--num-masks K] [--branches 1] [--plot curve.png]

Each point is appended to ``ADAPTER_DIR/curve.jsonl`` as soon as it is
measured, so a rerun (or a run during training) measures only the snapshots
added since. Every decoded output is compared with mlx-lm's greedy output
of the same prompt (``identical`` in each point). Tokens/step do not depend
on the machine's load, so this can run beside the training; the hours are
the training's own step times from ``train_log.jsonl`` (validation and
pauses left out).
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import mlx_mtp  # noqa: F401  (first: it loads a fast BLAS before MLX on Linux)
from mlx_mtp.benchmark import (
    acceptance_per_depth,
    accepted_per_step,
    chat_prompt,
    default_prompts_file,
    read_prompts,
)
from mlx_mtp.training.callbacks import LOG_FILE, read_log, train_reports
from mlx_mtp.training.checkpoint import list_snapshots

CURVE_FILE = "curve.jsonl"


def training_hours(records: List[dict]) -> Dict[int, float]:
    """Hours of training steps up to each reported step."""
    hours, total, last = {0: 0.0}, 0.0, 0
    for r in train_reports(records):
        total += (r["step"] - last) / r["steps_per_sec"] / 3600
        hours[r["step"]], last = total, r["step"]
    return hours


def hours_at(hours: Dict[int, float], step: int) -> float:
    """Hours at ``step``: the report at or before it, plus its share of the next window."""
    steps = sorted(hours)
    before = max(s for s in steps if s <= step)
    after = [s for s in steps if s > step]
    if not after or before == step:
        return hours[before]
    nxt = after[0]
    return hours[before] + (hours[nxt] - hours[before]) * (step - before) / (nxt - before)


def validation_at(records: List[dict], step: int) -> Optional[dict]:
    """The last validation record the run logged at ``step``."""
    found = [r for r in records if r.get("type") == "val" and r["step"] == step]
    return found[-1] if found else None


def reference_outputs(model_path: Optional[str], prompts, max_tokens: int) -> List[List[int]]:
    """mlx-lm's greedy tokens for each prompt."""
    from mlx_lm.generate import stream_generate

    from mlx_mtp import load

    model, tokenizer = load(model_path, adapter_path=False)
    return [
        [r.token for r in stream_generate(model.model, tokenizer, chat_prompt(tokenizer, text), max_tokens=max_tokens)]
        for _, text in prompts
    ]


def masks_only(model_path, snapshot: Path, prompts, references, max_tokens: int, num_masks, branches: int) -> dict:
    """Tokens/step of the masks alone with the adapter at ``snapshot``, per
    category and overall, the acceptance per depth, and identical outputs."""
    from mlx_mtp import load, stream_generate

    model, tokenizer = load(model_path, adapter_path=snapshot)
    k = model.num_masks if num_masks is None else num_masks
    settings = dict(num_masks=k, mode="quadratic", lookup=0, branches=branches, use_datastore=False)
    tokens, steps = defaultdict(int), defaultdict(int)
    accepted, identical = [], 0
    for (cat, text), ref in zip(prompts, references):
        out, flags, resp = [], [], None
        for resp in stream_generate(model, tokenizer, chat_prompt(tokenizer, text), max_tokens=max_tokens, **settings):
            out.append(resp.token)
            flags.append(resp.from_draft)
        tokens[cat] += len(out)
        steps[cat] += resp.steps if resp is not None else 0
        accepted += [n for n, _ in accepted_per_step(flags)[1:]]  # the first step verifies nothing
        identical += int(out == ref)
    per_category = {cat: tokens[cat] / max(steps[cat], 1) for cat in tokens}
    return {
        "num_masks": k,
        "branches": branches,
        "tokens_per_step": sum(tokens.values()) / max(sum(steps.values()), 1),
        "per_category": per_category,
        "acceptance_per_depth": acceptance_per_depth(accepted, k),
        "prompts": len(prompts),
        "identical": identical,
    }


def measure(args) -> List[dict]:
    """Measure every snapshot not yet in the curve file; returns all points, by step."""
    run = Path(args.adapter_dir)
    snapshots = list_snapshots(run)
    if not snapshots:
        raise SystemExit(f"error: no snapshots in {run}/snapshots (train with --keep-every N)")
    out = Path(args.out) if args.out else run / CURVE_FILE
    points = {p["step"]: p for p in read_log(out)}
    records = read_log(run / LOG_FILE)
    hours = training_hours(records)
    prompts_file = Path(args.prompts) if args.prompts else default_prompts_file()
    if prompts_file is None or not prompts_file.exists():
        raise SystemExit("error: no prompts file: pass --prompts (Spec-Bench's question.jsonl by default)")
    prompts = read_prompts(prompts_file, None, args.num_prompts)
    todo = [(s, d) for s, d in snapshots if s not in points]
    if todo:
        references = reference_outputs(args.model, prompts, args.max_tokens)
    for step, directory in todo:
        val = validation_at(records, step)
        point = {
            "step": step,
            "hours": hours_at(hours, step),
            "val_accuracy": val["accuracy"] if val else None,
            "val_tokens_per_step": val["tokens_per_step"] if val else None,
            "spec_bench": masks_only(
                args.model, directory, prompts, references, args.max_tokens, args.num_masks, args.branches
            ),
        }
        with open(out, "a") as f:
            f.write(json.dumps(point) + "\n")
        points[step] = point
        sb = point["spec_bench"]
        acc = " ".join(f"{a:.3f}" for a in point["val_accuracy"]) if val else "-"
        print(
            f"step {step} ({point['hours']:.2f} h): val top-1 {acc} | Spec-Bench masks-only "
            f"{sb['tokens_per_step']:.2f} tokens/step, identical {sb['identical']}/{sb['prompts']}",
            flush=True,
        )
    return [points[s] for s in sorted(points)]


def plot(points: List[dict], path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install 'mlx-mtp[plot]'") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    with_val = [p for p in points if p["val_accuracy"]]
    if with_val:
        for j in range(len(with_val[0]["val_accuracy"])):
            depth = [p["val_accuracy"][j] for p in with_val]
            left.plot([p["hours"] for p in with_val], depth, "o-", label=f"depth {j + 1}")
        left.legend()
    left.set(xlabel="training hours", ylabel="validation top-1", title="held-out split")
    right.plot([p["hours"] for p in points], [p["spec_bench"]["tokens_per_step"] for p in points], "o-")
    right.set(xlabel="training hours", ylabel="tokens/step", title="Spec-Bench, masks only (quadratic, greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="A training run's learning curve from its kept adapters.")
    p.add_argument("adapter_dir", help="the run's --adapter-path (trained with --keep-every N)")
    p.add_argument("--model", default=None, help="the base model (default: the default model)")
    p.add_argument("--prompts", default=None, help="Spec-Bench-style jsonl (default: Spec-Bench)")
    p.add_argument("--num-prompts", type=int, default=1, help="prompts per category (default: 1)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--num-masks", type=int, default=None, help="masks per step (default: the adapter's k)")
    p.add_argument("--branches", type=int, default=1)
    p.add_argument("--out", default=None, help=f"the points, jsonl (default: ADAPTER_DIR/{CURVE_FILE})")
    p.add_argument("--plot", default=None, help="write the curve to this PNG")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    points = measure(args)
    if args.plot:
        plot(points, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
