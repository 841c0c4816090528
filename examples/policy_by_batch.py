"""What the per-step policy chooses in a batch of requests, by batch size,
from two cost models: this machine's calibration (batched forwards measured,
``python -m mlx_mtp.calibrate``) and an assumed Apple-GPU-like curve (an
estimate, not a measurement: a forward costs nearly the same up to 64 tokens
in all, then ~linear; gated path 1.1x; a sampler-head call 0.05x).

    python examples/policy_by_batch.py [--model M] [--table costs.json] [--context 300]

(``--table``: a cost table's JSON, e.g. a calibration cache file, instead of
the model's calibration here.)

For each batch size B (1, 2, 4, 8) and each kind of draft (typical
confidences) it prints the plans each row's policy picks and the predicted
tokens/s of the batch over plain batched decoding (every row feeding one
token). The rows are alike: every step each has the same copy at hand, and
the masks' chain the last step's masks gave it, with the sampler head's
probabilities given (beside a copy, ~35% for its first token); acceptance is what the policy expects (its priors and
those probabilities). A step's load is what the others pick, so each
step's choice is iterated from "the others feed one token each" until it
repeats (at most 8 rounds). The batch runs 16 steps from no chain at hand;
the gain is the last 8 steps' tokens per second, B x expected tokens over
cost(B rows, B x width) plus the sampler chain, against B / cost(B rows, B
tokens). The plans listed are those of the last 8 steps.
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import List, Tuple

import mlx_mtp  # noqa: F401, I001  (first: a fast BLAS before MLX is imported)
from mlx_mtp.calibration import CostModel, CostTable, cost_model
from mlx_mtp.decoding.policy import ALONE, MAX_BRANCHES, BatchLoad, Choice, CopyDraft, Policy, StepDrafts

BATCHES = (1, 2, 4, 8)
MAX_COPY = 16  # the default decoder's longest copy (drafts.POLICY_MAX_COPY)
STEPS, COUNTED = 16, 8  # steps run from no chain at hand, and the last of them counted

# the masks' chain beside a copy: the sampler head's probabilities as the
# shipped adapter's first speculation is right (~35%; Priors.mtp)
TYPICAL_CHAIN = ((0.35, 0.5, 0.55, 0.6), (0.35, 0.15, 0.1))
# name: (a copy at hand every step, the sampler head's probabilities of a chain's tokens and of the first branches)
SCENARIOS = {
    "prompt-lookup copy of 8, 3-gram": (CopyDraft(8, "lookup", ngram=3), *TYPICAL_CHAIN),
    "prompt-lookup copy of 8, 6-gram": (CopyDraft(8, "lookup", ngram=6), *TYPICAL_CHAIN),
    "datastore copy of 4, 3-gram": (CopyDraft(4, "datastore", ngram=3), *TYPICAL_CHAIN),
    "masks' chain, q = 0.5 each": (None, (0.5,) * 4, (0.5, 0.2, 0.1)),
    "masks' chain, q = 0.9 0.9 0.8 0.8": (None, (0.9, 0.9, 0.8, 0.8), (0.9, 0.05)),
}


def gpu_like(one: float = 0.004) -> CostModel:
    """The assumed Apple-GPU-like costs (an estimate): a forward over N new
    tokens in all costs ``one`` x (1 + N/512) up to 64 tokens, then 1/64 of a
    one-token forward per token more; a batch costs one row of its tokens."""

    def shape(n: float) -> float:
        return 1.0 + min(n, 64) / 512 + max(n - 64, 0) / 64

    def cost(width, context, gated):
        return one * shape(width) * (1.1 if gated else 1.0)

    widths = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    return CostModel.from_function(cost, widths, sampler_call=0.05 * one, batch=lambda r, w: cost(r * w, 0, False))


def step_seconds(costs: CostModel, rows: int, width: int, masks: int, context: int) -> float:
    """The batch's forward when every row feeds ``width`` tokens (the
    sampler head's chain once: batched over the rows)."""
    return costs.batch_cost(rows, rows * width, context, masks > 0) + costs.chain(masks)


def choose_in_batch(policy: Policy, drafts: StepDrafts, rows: int) -> Choice:
    """The plan a row picks where every other row of ``rows`` picks it too:
    iterated from the others feeding one token each until it repeats."""
    load, seen = (ALONE if rows == 1 else BatchLoad(rows - 1, rows - 1)), set()
    choice = None
    for _ in range(8):
        choice = policy.choose(replace(drafts, load=load))
        if rows == 1 or load in seen:
            break
        seen.add(load)
        load = BatchLoad(rows - 1, (rows - 1) * choice.width, choice.masks > 0)
    return choice


def run_batch(costs: CostModel, scenario, rows: int, max_masks: int, context: int) -> Tuple[List[Choice], float]:
    """The plans of the counted steps and the batch's gain over plain batched decoding."""
    copy, probs, first = scenario
    policy = Policy(costs, max_masks=max_masks, max_branches=MAX_BRANCHES if max_masks else 1, max_copy=MAX_COPY)
    depth, plans, tokens, seconds = 0, [], 0.0, 0.0
    for step in range(STEPS):
        at_hand = probs[:depth]
        drafts = StepDrafts(context, copy=copy, chain_probs=at_hand, branch_probs=first if at_hand else ())
        c = choose_in_batch(policy, drafts, rows)
        depth = c.masks
        if step >= STEPS - COUNTED:
            plans.append(c)
            tokens += rows * c.expected_tokens
            seconds += step_seconds(costs, rows, c.width, c.masks, context)
    plain = rows / step_seconds(costs, rows, 1, 0, context)
    return plans, tokens / seconds / plain


def describe(choice: Choice) -> str:
    what = {"plain": "plain", "masks": "masks only", "copy": f"copy {choice.copy}", "chain": f"chain {choice.depth}"}
    what.update(branches=f"{choice.branches} x chain {choice.depth}", tree=f"copy {choice.copy} + chain {choice.depth}")
    masks = f" +{choice.masks}m" if choice.masks else ""
    return f"{what[choice.kind]}{masks} (T={choice.width})"


def cycle(plans: List[Choice]) -> str:
    """The distinct plans of the counted steps, in order of first use."""
    return " / ".join(dict.fromkeys(describe(c) for c in plans))


def table(costs: CostModel, max_masks: int, context: int) -> List[Tuple[str, List[Tuple[List[Choice], float]]]]:
    """Per scenario (those with a chain only where masks are fed), per batch size: plans and gain."""
    return [
        (name, [run_batch(costs, scenario, rows, max_masks, context) for rows in BATCHES])
        for name, scenario in SCENARIOS.items()
        if max_masks or scenario[0] is not None
    ]


def report(title: str, costs: CostModel, max_masks: int, context: int):
    masks = f"up to {max_masks} masks per token" if max_masks else "no masks"
    print(f"\n## {title} ({masks})\n")
    one = costs.cost(1, context)
    curve = " ".join(f"{b}x1 {costs.batch_cost(b, b, context) / one:.2f}" for b in BATCHES[1:])
    wide = " ".join(f"1x{t} {costs.cost(t, context) / one:.2f}" for t in (8, 32, 64))
    print(f"forward over a one-token one at {context} cached tokens (rows x tokens each): {curve}; {wide}\n")
    print("| drafts at hand | " + " | ".join(f"B={b}" for b in BATCHES) + " |")
    print("| --- |" + " --- |" * len(BATCHES))
    for name, row in table(costs, max_masks, context):
        print(f"| {name} | " + " | ".join(f"{cycle(plans)}: **{gain:.2f}x**" for plans, gain in row) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model whose calibration to read (default: the default model)")
    p.add_argument("--context", type=int, default=300, help="cached tokens per row (default: 300)")
    p.add_argument("--masks", type=int, default=4, help="most masks per token (default: 4, the shipped adapter's)")
    p.add_argument("--table", type=Path, default=None, help="a cost table's JSON (default: the model's calibration)")
    args = p.parse_args()
    here = args.masks
    if args.table is not None:
        costs = CostModel(CostTable.from_dict(json.loads(args.table.read_text())))
        title = f"Cost table {args.table}"
    else:
        from mlx_mtp import load

        model, _ = load(args.model)
        calibration = cost_model(model, gated=model.default_num_masks > 0, batched=True)
        costs = calibration.costs
        here = min(here, model.default_num_masks)  # what the decoder feeds here (the shipped adapter: none on a CPU)
        title = f"This machine (calibrated: {calibration.path})"
    if costs.table.gated is None:  # not measured: the decoder feeds no masks here
        here = 0
    print(costs.describe())
    report(title, costs, here, args.context)
    report("Assumed Apple-GPU-like curve (an estimate, not measured)", gpu_like(), args.masks, args.context)


if __name__ == "__main__":
    main()
