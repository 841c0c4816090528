"""Benchmark MTP decoding against mlx-lm greedy decoding on Spec-Bench.

    python -m mlx_mtp.benchmark [--model M --adapter-path A] [--prompts FILE]
        [--categories a,b] [--num-prompts N] [--max-tokens N]
        [--configs policy,k=0,k=1,k=4] [--num-masks K] [--mode quadratic|linear]
        [--lookup N] [--branches B] [--no-policy] [--json OUT] [--plot OUT.png]

For each prompt, in one process and interleaved (baseline, then each
configuration, prompt after prompt), after a warm-up, it runs mlx-lm's own
greedy ``stream_generate`` and ours, records the token sequences and counts
identical outputs. A configuration is ``policy`` (the per-step policy, the
default) or ``k=N`` (fixed: N masks, with ``--mode``, ``--lookup`` and
``--branches``); ``--configs`` compares several in the same run. Per category
and overall it reports baseline and our tokens/sec, the speedup (ratio of
per-prompt medians), mean tokens/step, the share of steps per choice and
identical outputs, for each configuration, then the speedups side by side. The first configuration's
figures are the JSON's top-level fields; every one's are under ``configs``. It also measures
the cost of one forward over T new tokens (T = 1, k+1, (k+1)^2; calibrated,
:mod:`mlx_mtp.calibrate`), which bounds
the wall-clock speedup that a given tokens/step can buy.

It also reports the acceptance per depth (the fraction of steps whose j-th
speculation was accepted) and, from it and the measured cost of a quadratic
step with j masks per block (a forward over (j+1)^2 tokens plus j sampler
calls), the tokens/step and speedup that decoding with ``--num-masks j``
would give for every j <= k: how to choose k on this machine.
"""

import argparse
import json
import platform
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mlx_lm.generate import stream_generate as lm_stream_generate

from .api import stream_generate
from .arguments import add_decoding_args, add_model_args, positive_int
from .blas import blas_info, measure_gflops
from .calibration import CostModel, cost_model
from .calibration.store import weights_dtype
from .decoding.drafts import DEFAULT_LOOKUP
from .decoding.settings import DecodeSettings
from .errors import DataError, cli_main
from .files import read_jsonl
from .loading import load

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "spec_bench" / "question.jsonl"  # Spec-Bench, Apache-2.0


@dataclass
class Row:
    category: str
    prompts: int
    baseline_tps: float
    mtp_tps: float
    speedup: float
    tokens_per_step: float
    identical: int


def default_prompts_file() -> Optional[Path]:
    return DEFAULT_PROMPTS if DEFAULT_PROMPTS.exists() else None


def read_prompts(path: Path, categories: Optional[List[str]], per_category: Optional[int]):
    """(category, prompt) of Spec-Bench rows (``turns`` or ``prompt``);
    :class:`DataError` naming the file and line of a bad one."""
    rows = []
    counts: Dict[str, int] = defaultdict(int)
    for line_no, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: not a JSON object")
        cat = row.get("category", "all")
        if not isinstance(cat, str):
            raise DataError(f"{path}:{line_no}: 'category' is not a string")
        if categories and cat not in categories:
            continue
        if per_category is not None and counts[cat] >= per_category:
            continue
        turns = row.get("turns")
        text = turns[0] if isinstance(turns, list) and turns else row.get("prompt")
        if not text or not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: no 'turns' or 'prompt' text")
        counts[cat] += 1
        rows.append((cat, text))
    return rows


def chat_prompt(tokenizer, text: str) -> str:
    """A benchmark prompt as the user's turn of the tokenizer's chat template
    (the text as it is where there is none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    return text


def step_shapes(k: int, branches: int = 1) -> List[Tuple[int, int]]:
    """(regular tokens n, masks per block j) of the forwards to time: one
    token; one token with k masks (T = k+1); quadratic steps with j masks,
    T = (j+1)^2, j = 1..k; with b branches, also T = (1 + b j)(j+1)."""
    shapes = [(1, 0), (1, k)] + [(j + 1, j) for j in range(1, k + 1)]
    return shapes + ([(1 + branches * j, j) for j in range(1, k + 1)] if branches > 1 else [])


def forward_costs(model, shapes: List[Tuple[int, int]], costs: CostModel, context: int = 300) -> Dict[int, float]:
    """Seconds per forward over T = n(j+1) new tokens (n regular tokens, each
    followed by j masks: the gated path where j > 0) after ``context`` cached
    tokens, keyed by T, from the calibrated ``costs``."""
    return {n * (j + 1): costs.cost(n * (j + 1), context, gated=j > 0) for n, j in sorted(set(shapes))}


def accepted_per_step(from_draft: List[bool], sources: Optional[List[str]] = None) -> List[Tuple[int, str]]:
    """(accepted speculations, their source) of each step, from the tokens'
    ``from_draft`` flags (a step emits its accepted drafts, then the base
    model's token) and ``draft_source`` (default: all "mtp")."""
    counts, run = [], 0
    for i, flag in enumerate(from_draft):
        if flag:
            run += 1
        else:
            counts.append((run, sources[i] if sources else "mtp"))
            run = 0
    return counts


def acceptance_per_depth(counts: List[int], k: int) -> List[float]:
    """Fraction of steps that accepted at least j speculations, j = 1..k."""
    if not counts:
        return [0.0] * k
    return [sum(c >= j for c in counts) / len(counts) for j in range(1, k + 1)]


def projection(acceptance: List[float], fwd: Dict[int, float], chain: float, branches: int = 1) -> List[dict]:
    """Tokens/step, step cost (relative to a one-token forward) and speedup of
    quadratic decoding with j <= k masks (and b branches: a forward over
    (1 + b j)(j+1) tokens), from the acceptance per depth measured at k (the
    j-th speculation does not depend on k) and measured costs. Verification
    alone bounds it: overheads outside the forward and the chain are not
    counted."""
    rows = []
    for j in range(1, len(acceptance) + 1):
        tps = 1.0 + sum(acceptance[:j])
        cost = (fwd[(1 + branches * j) * (j + 1)] + j * chain) / fwd[1]
        rows.append({"num_masks": j, "tokens_per_step": tps, "step_cost": cost, "speedup": tps / cost})
    return rows


def summarize(category: str, records: List[dict]) -> Row:
    base = [r["baseline_tps"] for r in records]
    ours = [r["mtp_tps"] for r in records]
    steps = sum(r["steps"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return Row(
        category=category,
        prompts=len(records),
        baseline_tps=statistics.median(base),
        mtp_tps=statistics.median(ours),
        speedup=statistics.median(ours) / statistics.median(base),
        tokens_per_step=tokens / max(steps, 1),
        identical=sum(r["identical"] for r in records),
    )


def print_table(rows: List[Row]):
    print(f"{'category':<16}{'n':>4}{'base tok/s':>12}{'mtp tok/s':>11}{'speedup':>9}{'tok/step':>10}{'identical':>11}")
    for r in rows:
        print(
            f"{r.category:<16}{r.prompts:>4}{r.baseline_tps:>12.2f}{r.mtp_tps:>11.2f}"
            f"{r.speedup:>8.2f}x{r.tokens_per_step:>10.2f}{r.identical:>6}/{r.prompts}"
        )


def plot(rows: List[Row], path: str):
    try:  # matplotlib is optional: only --plot needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install 'mlx-mtp[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [r.category for r in rows]
    axes[0].bar(names, [r.tokens_per_step for r in rows])
    axes[0].set_title("tokens per step")
    axes[1].bar(names, [r.speedup for r in rows], color="tab:orange")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set_title("wall-clock speedup over mlx-lm greedy")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args) -> int:
    """The benchmark: load, calibrate, decode every prompt with the baseline
    and each configuration, report (and write ``--json``, ``--plot``)."""
    prompts = _prompts(args)
    model, tokenizer, state = load(args.model, adapter_path=args.adapter_path, return_state=True)
    if model.num_masks == 0:
        raise ValueError("the model has no MTP adapter: pass --adapter-path")
    # every configuration checked against the model before anything is timed
    configs = parse_configs(args, model)
    main = configs[0]
    use_datastore = state.datastore is not None and not args.no_datastore and main.lookup > 0
    print(
        f"platform: {platform.platform()}, weights: {weights_dtype(model.model)}, "
        f"configurations: {', '.join(c.name for c in configs)}; "
        f"{main.name}: k={main.num_masks}, mode={main.mode}, branches={main.branches}, lookup={main.lookup}, "
        f"datastore={use_datastore}"
    )
    print(f"BLAS: {blas_info().describe()}; a 256x256 fp32 matmul runs at {measure_gflops():.0f} GFLOP/s")
    calibration, costs = _costs(model, configs)
    _warm_up(model, tokenizer, state, configs)
    records = _decode_prompts(args, model, tokenizer, state, configs, prompts)
    if not records[main.name]:
        return 1
    chain = calibration.costs.table.sampler_call
    reports = [report(config, records[config.name], costs, chain) for config in configs]
    if len(configs) > 1:
        print_comparison(reports)
    if args.json:
        result = _result(args, model, main, use_datastore, calibration, costs, reports)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        first = reports[0]
        plot([Row(**r) for r in first["results"]] + [Row(**first["overall"])], args.plot)
    return 0


def _prompts(args) -> List[Tuple[str, str]]:
    """The (category, text) prompts selected by ``--prompts``, ``--categories``, ``--num-prompts``."""
    prompts_file = Path(args.prompts) if args.prompts else default_prompts_file()
    if prompts_file is None or not prompts_file.exists():
        raise ValueError("no prompts file: pass --prompts (Spec-Bench's question.jsonl by default)")
    categories = args.categories.split(",") if args.categories else None
    prompts = read_prompts(prompts_file, categories, args.num_prompts)
    if not prompts:
        raise ValueError(f"no prompts selected from {prompts_file}")
    return prompts


def _costs(model, configs: List["Config"]):
    """The calibration (printed) and the forward costs of the widths the
    projections need: the first configuration's, and those of every fixed
    one (each projects its own k and branches)."""
    calibration = cost_model(model)
    source = f"cached in {calibration.path}" if calibration.cached else "measured now"
    print(f"calibrated costs ({source}), seconds per forward over T new tokens after C cached ones:")
    print(calibration.costs.describe())
    projected = [configs[0]] + [c for c in configs[1:] if not c.policy]
    shapes = [s for c in projected for s in step_shapes(c.num_masks, c.branches)]
    costs = forward_costs(model, shapes, calibration.costs)
    print(
        "costs used (300 cached), relative to T=1: "
        + ", ".join(f"T={T}: {c * 1e3:.1f} ms ({c / costs[1]:.2f}x)" for T, c in costs.items())
    )
    return calibration, costs


def _warm_up(model, tokenizer, state, configs: List["Config"]):
    hello = chat_prompt(tokenizer, "Hello")
    for _ in lm_stream_generate(model.model, tokenizer, hello, max_tokens=8):
        pass
    for config in configs:
        for _ in stream_generate(model, tokenizer, hello, max_tokens=8, settings=config.decoding, state=state):
            pass


def _decode_prompts(args, model, tokenizer, state, configs: List["Config"], prompts) -> Dict[str, Dict[str, list]]:
    """Each prompt decoded by mlx-lm, then by each configuration: the records
    per configuration and category (a prompt counts once every configuration
    has run it; Ctrl-C keeps those done)."""
    records = {config.name: defaultdict(list) for config in configs}
    try:  # a progress bar where tqdm (optional) is installed
        from tqdm import tqdm

        bar = tqdm(prompts, desc="prompts", unit="prompt")
    except ImportError:
        bar = prompts
    try:
        for cat, text in bar:
            prompt = chat_prompt(tokenizer, text)
            base_tokens, base_tps = [], 0.0
            for resp in lm_stream_generate(model.model, tokenizer, prompt, max_tokens=args.max_tokens):
                base_tokens.append(resp.token)
                base_tps = resp.generation_tps
            done = [
                (config.name, _decode(model, tokenizer, state, config, prompt, args.max_tokens, base_tokens, base_tps))
                for config in configs
            ]
            for name, record in done:
                records[name][cat].append(record)
    except KeyboardInterrupt:
        print("\ninterrupted: partial results")
    return records


def _decode(model, tokenizer, state, config: "Config", prompt: str, max_tokens: int, base_tokens, base_tps) -> dict:
    """One prompt decoded with one configuration: its record."""
    ours, flags, sources, resp = [], [], [], None
    for resp in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, settings=config.decoding, state=state):
        ours.append(resp.token)
        flags.append(resp.from_draft)
        # steps that verified no draft ("plain", "masks") count for no source
        sources.append("none" if resp.choice in ("plain", "masks") else resp.draft_source)
    return {
        "baseline_tps": base_tps,
        "mtp_tps": resp.generation_tps,
        "steps": resp.steps,
        "tokens": len(ours),
        "identical": int(ours == base_tokens),
        "choices": resp.choices or {},
        # the first step has nothing to verify; the last may be cut short
        "accepted": accepted_per_step(flags, sources)[1:],
    }


def _result(args, model, main: "Config", use_datastore: bool, calibration, costs, reports: List[dict]) -> dict:
    """The ``--json`` file's contents."""
    first = reports[0]
    return {
        "model": args.model or "default",
        "adapter": args.adapter_path or "shipped",
        "dtype": weights_dtype(model.model),
        "blas": blas_info().name,
        "platform": platform.platform(),
        "num_masks": main.num_masks,
        "mode": main.mode,
        "branches": main.branches,
        "lookup": main.lookup,
        "policy": main.policy,
        "datastore": use_datastore,
        "max_tokens": args.max_tokens,
        "forward_cost_ms": {str(T): c * 1e3 for T, c in costs.items()},
        "sampler_call_ms": calibration.costs.table.sampler_call * 1e3,
        "calibration": asdict(calibration.costs.table),
        **{key: first[key] for key in REPORT_KEYS},
        "configs": reports,
    }


@dataclass
class Config:
    """One configuration the benchmark decodes with."""

    name: str  # "policy" or "k=N"
    settings: dict  # the settings given (stream_generate's arguments), as the report shows them
    decoding: DecodeSettings  # resolved for the model

    @property
    def num_masks(self) -> int:  # the most masks a step may feed
        return self.decoding.num_masks

    @property
    def mode(self) -> str:
        return self.decoding.mode

    @property
    def lookup(self) -> int:  # the longest copy a step may verify
        return self.decoding.lookup

    @property
    def branches(self) -> int:
        return self.decoding.branches

    @property
    def policy(self) -> bool:
        return self.decoding.policy


def parse_configs(args, model) -> List[Config]:
    """The configurations to run, each checked against the model:
    ``--configs`` (``policy`` or ``k=N``), else the policy unless a setting
    is fixed (``--num-masks``, ``--mode``, ``--lookup``, ``--branches``,
    ``--no-policy``), then that one."""
    fixed = dict(mode=args.mode, lookup=args.lookup, branches=args.branches)
    fixed_given = any(v is not None for v in fixed.values()) or args.num_masks is not None or args.no_policy
    names = args.configs.split(",") if args.configs else (["fixed"] if fixed_given else ["policy"])
    configs = []
    for name in names:
        name = name.strip()
        common = dict(use_datastore=not args.no_datastore)
        if name == "policy":
            configs.append(Config(name, common, DecodeSettings(**common).resolve(model)))
            continue
        if name == "fixed":
            num_masks = args.num_masks
        elif name.startswith("k=") and name[2:].isdigit():
            num_masks = int(name[2:])
        else:
            raise ValueError(f"--configs: '{name}' is not 'policy' or 'k=N'")
        settings = dict(
            num_masks=model.default_num_masks if num_masks is None else num_masks,
            mode=args.mode or "quadratic",
            lookup=DEFAULT_LOOKUP if args.lookup is None else args.lookup,
            branches=args.branches or 1,
            **common,
        )
        label = f"k={settings['num_masks']}" if name == "fixed" else name
        configs.append(Config(label, settings, DecodeSettings(**settings).resolve(model)))
    if len({c.name for c in configs}) < len(configs):
        raise ValueError(f"--configs names a configuration twice: {args.configs}")
    return configs


REPORT_KEYS = ("results", "overall", "choices", "acceptance_per_depth", "lookup_steps", "datastore_steps", "projection")


def report(config: Config, records: Dict[str, List[dict]], costs: Dict[int, float], chain: float) -> dict:
    """Print one configuration's table and figures; returns them (the JSON's fields)."""
    k = config.num_masks
    print(f"\n== {config.name}" + (" (the per-step policy)" if config.policy else ""))
    rows = [summarize(cat, recs) for cat, recs in records.items()]
    everything = [r for recs in records.values() for r in recs]
    overall = summarize("overall", everything)
    print_table(rows + [overall])
    counts: Dict[str, int] = defaultdict(int)
    for r in everything:
        for kind, n in r["choices"].items():
            counts[kind] += n
    total = sum(counts.values())
    choices = {kind: n / total for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])} if total else {}
    print("steps per choice: " + ", ".join(f"{kind} {share:.0%}" for kind, share in choices.items()))
    steps = [c for r in everything for c in r["accepted"]]
    chain_steps = [c for c, src in steps if src == "mtp"]
    acceptance = acceptance_per_depth(chain_steps, k)
    if k and (chain_steps or not config.policy):
        print(
            "acceptance per depth (steps with the masks' speculations whose j-th was accepted): "
            + ", ".join(f"{j}: {a:.2f}" for j, a in enumerate(acceptance, 1))
        )

    def source_stats(source):
        accepted = [c for c, src in steps if src == source]
        return {
            "share_of_steps": len(accepted) / max(len(steps), 1),
            "accepted_per_step": sum(accepted) / max(len(accepted), 1),
        }

    lookup_stats, datastore_stats = source_stats("lookup"), source_stats("datastore")
    if config.lookup:
        print(
            f"prompt lookup (up to {config.lookup} copied tokens): {lookup_stats['share_of_steps']:.0%} of steps, "
            f"{lookup_stats['accepted_per_step']:.2f} copied tokens accepted per such step"
        )
        if datastore_stats["share_of_steps"]:
            print(
                f"datastore drafts: {datastore_stats['share_of_steps']:.0%} of steps, "
                f"{datastore_stats['accepted_per_step']:.2f} drafted tokens accepted per such step"
            )
    proj = []
    if not config.policy and config.mode == "quadratic" and k:
        if config.lookup:
            print("(the projection counts the masks' speculations only, without prompt lookup or datastore)")
        proj = projection(acceptance, costs, chain, config.branches)
        branches = f" and {config.branches} branches" if config.branches > 1 else ""
        print(f"quadratic decoding with j masks{branches}, projected from these measurements:")
        print(f"{'j':>4}{'tok/step':>10}{'step cost':>11}{'speedup':>9}")
        for p in proj:
            print(f"{p['num_masks']:>4}{p['tokens_per_step']:>10.2f}{p['step_cost']:>10.2f}x{p['speedup']:>8.2f}x")
        best = max(proj, key=lambda p: p["speedup"])
        print(f"fastest here: --num-masks {best['num_masks']}")
    return {
        "name": config.name,
        "policy": config.policy,
        "settings": config.settings,
        "results": [asdict(r) for r in rows],
        "overall": asdict(overall),
        "choices": choices,
        "acceptance_per_depth": acceptance,
        "lookup_steps": lookup_stats,
        "datastore_steps": datastore_stats,
        "projection": proj,
    }


def print_comparison(reports: List[dict]):
    """The configurations' speedups side by side, per category and overall."""
    names = [r["name"] for r in reports]
    print("\nspeedup over mlx-lm (same run), by configuration:")
    print(f"{'category':<16}" + "".join(f"{n:>10}" for n in names))
    cats = [row["category"] for row in reports[0]["results"]] + ["overall"]
    for cat in cats:
        cells = []
        for r in reports:
            row = r["overall"] if cat == "overall" else next(x for x in r["results"] if x["category"] == cat)
            cells.append(f"{row['speedup']:>9.2f}x")
        print(f"{cat:<16}" + "".join(cells))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.benchmark", description="Benchmark MTP decoding against mlx-lm greedy decoding."
    )
    add_model_args(p)
    p.add_argument("--prompts", default=None, help="jsonl with Spec-Bench rows (default: Spec-Bench's question.jsonl)")
    p.add_argument("--categories", default=None, help="comma-separated categories")
    p.add_argument("--num-prompts", type=positive_int, default=None, help="prompts per category")
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument(
        "--configs",
        default=None,
        help=(
            "comma-separated configurations to compare in the same run: 'policy' (the per-step policy) or "
            "'k=N' (fixed: N masks, with --mode/--lookup/--branches); default: the policy, or the fixed "
            "setting that --num-masks/--mode/--lookup/--branches/--no-policy give"
        ),
    )
    add_decoding_args(p)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    return p


@cli_main(user_errors=(ValueError, OSError))  # MTPError is a ValueError
def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
