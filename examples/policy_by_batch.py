"""What the per-step policy chooses in a batch of requests, by batch size,
from two cost models: this machine's calibration (batched forwards measured,
``python -m mlx_mtp.calibrate``) and an assumed Apple-GPU-like curve (an
estimate, not a measurement: a forward costs nearly the same up to 64 tokens
in all, then ~linear; gated path 1.1x; a sampler-head call 0.05x).

    python examples/policy_by_batch.py [--model M] [--table costs.json] [--context 300]

(``--table``: a cost table's JSON, e.g. a calibration cache file, instead of
the model's calibration here.)

For each batch size B (1, 2, 4, 8) and each kind of draft every row has at
hand (typical confidences), it prints the plan each row's policy picks, its
width and the predicted tokens/s of the batch over plain batched decoding
(every row feeding one token): B rows x expected tokens / cost(B rows, B x
width) against B / cost(B rows, B tokens). Every row of the batch is alike,
so the others' load is what this row picks: the choice is iterated from
"the others feed one token each" until it repeats (at most 8 rounds). The
gain is the step's alone: a plan that feeds masks is also worth the chain
the next step verifies, which the per-step figure leaves out.
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

# name: drafts at hand (the context is filled in)
SCENARIOS = {
    "nothing to draft": StepDrafts(0),
    "prompt-lookup copy of 8, 3-gram": StepDrafts(0, copy=CopyDraft(8, "lookup", ngram=3)),
    "prompt-lookup copy of 8, 6-gram": StepDrafts(0, copy=CopyDraft(8, "lookup", ngram=6)),
    "datastore copy of 4, 3-gram": StepDrafts(0, copy=CopyDraft(4, "datastore", ngram=3)),
    "masks' chain, q = 0.5 each": StepDrafts(0, chain_probs=(0.5,) * 4, branch_probs=(0.5, 0.2, 0.1)),
    "masks' chain, q = 0.9 0.9 0.8 0.8": StepDrafts(0, chain_probs=(0.9, 0.9, 0.8, 0.8), branch_probs=(0.9, 0.05)),
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


def choose_in_batch(policy_of, drafts: StepDrafts, rows: int) -> Choice:
    """The plan a row picks where every other row of ``rows`` picks it too:
    iterated from the others feeding one token each until it repeats."""
    load, seen = (ALONE if rows == 1 else BatchLoad(rows - 1, rows - 1)), set()
    choice = None
    for _ in range(8):
        choice = policy_of().choose(replace(drafts, load=load))
        if rows == 1 or load in seen:
            break
        seen.add(load)
        load = BatchLoad(rows - 1, (rows - 1) * choice.width, choice.masks > 0)
    return choice


def table(costs: CostModel, max_masks: int, context: int) -> List[Tuple[str, List[Tuple[Choice, float]]]]:
    """Per scenario, per batch size: the choice and its predicted gain."""

    def policy_of():
        branches = MAX_BRANCHES if max_masks else 1
        return Policy(costs, max_masks=max_masks, max_branches=branches, max_copy=MAX_COPY)

    out = []
    for name, drafts in SCENARIOS.items():
        drafts = replace(drafts, context=context)
        row = []
        for rows in BATCHES:
            c = choose_in_batch(policy_of, drafts, rows)
            plain = step_seconds(costs, rows, 1, 0, context)
            gain = c.expected_tokens * plain / step_seconds(costs, rows, c.width, c.masks, context)
            row.append((c, gain))
        out.append((name, row))
    return out


def describe(choice: Choice) -> str:
    what = {"plain": "plain", "masks": "masks only", "copy": f"copy {choice.copy}", "chain": f"chain {choice.depth}"}
    what.update(branches=f"{choice.branches} x chain {choice.depth}", tree=f"copy {choice.copy} + chain {choice.depth}")
    masks = f" +{choice.masks}m" if choice.masks else ""
    return f"{what[choice.kind]}{masks}, T={choice.width}"


def report(title: str, costs: CostModel, max_masks: int, context: int):
    print(f"\n## {title} (up to {max_masks} masks per token)\n")
    curve = " ".join(f"{b}x1={costs.batch_cost(b, b, context) / costs.cost(1, context):.2f}" for b in BATCHES[1:])
    wide = " ".join(f"1x{t}={costs.cost(t, context) / costs.cost(1, context):.2f}" for t in (8, 32, 64))
    print(f"forward over one-token forward at {context} cached tokens: {curve}; {wide}\n")
    print("| drafts at hand | " + " | ".join(f"B={b}: plan, gain" for b in BATCHES) + " |")
    print("| --- |" + " --- |" * len(BATCHES))
    for name, row in table(costs, max_masks, context):
        print(f"| {name} | " + " | ".join(f"{describe(c)}, {g:.2f}x" for c, g in row) + " |")


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
        print(f"cost table: {args.table}")
    else:
        from mlx_mtp import load

        model, _ = load(args.model)
        calibration = cost_model(model, gated=model.default_num_masks > 0, batched=True)
        costs = calibration.costs
        here = min(here, model.default_num_masks)  # what the decoder feeds here (the shipped adapter: none on a CPU)
        print(f"this machine's calibration: {calibration.path}")
    if costs.table.gated is None:  # not measured: the decoder feeds no masks here
        here = 0
    print(costs.describe())
    report("This machine (calibrated)", costs, here, args.context)
    report("Assumed Apple-GPU-like curve (an estimate, not measured)", gpu_like(), args.masks, args.context)


if __name__ == "__main__":
    main()
