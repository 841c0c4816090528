"""Replay copied-draft decisions on recorded greedy outputs.

Greedy output does not depend on what is drafted, so once the base model's
outputs are recorded, any way of choosing copied drafts (prompt lookup, the
datastore, the per-step policy, fixed lengths) can be replayed on the host in
seconds: which tokens each step would verify, how many would be accepted, and
what the steps would cost under a cost model. This is how the policy's copy
settings were chosen (docs/calibration.md, "Choosing the copy settings").

    # record: the default model's greedy outputs on Spec-Bench (evaluation only)
    python examples/replay_drafts.py record --out outputs.jsonl --num-prompts 2 --max-tokens 256
    # replay: tokens/step and modelled speedup of each variant, at 96 and 256 tokens
    python examples/replay_drafts.py replay outputs.jsonl --max-tokens 96 256

The modelled speedup is plain decoding's cost over the replayed steps' cost;
``--costs quiet`` is a quiet 2-core CPU in fp32 with OpenBLAS (a forward over
T = 2, 4, 8, 16, 32 tokens costs 1.1, 1.3, 1.55, 2.0, 3.0 times one),
``--costs cached`` the calibrated table of this machine.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx

import mlx_mtp  # noqa: F401, I001  (first: a fast BLAS before MLX is imported)
from mlx_mtp.calibration import CostModel, cost_model
from mlx_mtp.decoding.drafts import DATASTORE_TOKENS, MAX_NGRAM
from mlx_mtp.decoding.lookup import Match, NGramLookup
from mlx_mtp.decoding.policy import CopyDraft, Policy, StepDrafts

QUIET_CPU = {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.55, 16: 2.0, 32: 3.0, 64: 5.0}

# name: (policy or fixed length, shortest n-gram, longest copy, datastore where lookup has none)
VARIANTS = {
    "fixed 3-8 grams, 6 tokens": ("fixed", 3, 6, True),
    "fixed 1-8 grams, 10 tokens": ("fixed", 1, 10, True),
    "policy 3-8 grams, up to 10": ("policy", 3, 10, True),
    "policy 1-8 grams, up to 10": ("policy", 1, 10, True),
    "policy 1-8 grams, up to 16": ("policy", 1, 16, True),
    "policy 1-8 grams, up to 16, no datastore": ("policy", 1, 16, False),
}


def quiet_costs() -> CostModel:
    widths = sorted(QUIET_CPU)

    def cost(width, context, gated):
        for a, b in zip(widths, widths[1:]):
            if a <= width <= b:
                y = QUIET_CPU[a] + (QUIET_CPU[b] - QUIET_CPU[a]) * (width - a) / (b - a)
                break
        else:
            y = QUIET_CPU[widths[-1]]
        return 0.05 * y * (1 + context / 4000) * (1.4 if gated else 1.0)

    return CostModel.from_function(cost, sampler_call=0.001)


def record(args):
    from mlx_lm.generate import generate_step

    from mlx_mtp import load
    from mlx_mtp.benchmark import DEFAULT_PROMPTS, read_prompts

    model, tokenizer = load(args.model)
    eos = set(tokenizer.eos_token_ids)
    with open(args.out, "w") as f:
        for category, text in read_prompts(DEFAULT_PROMPTS, None, args.num_prompts):
            messages = [{"role": "user", "content": text}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            output = []
            for token, _ in generate_step(mx.array(prompt), model.model, max_tokens=args.max_tokens):
                output.append(int(token))
                if token in eos:
                    break
            f.write(json.dumps({"category": category, "prompt": list(prompt), "output": output}) + "\n")
            print(category, len(output), flush=True)


def replay_one(row, costs, datastore, kind, min_n, max_copy, use_datastore):
    """(tokens, steps, seconds, plain seconds) of one recorded output."""
    prompt, out = row["prompt"], row["output"]
    lookup = NGramLookup(min_n, max(min_n, MAX_NGRAM))
    lookup.extend(prompt)
    policy = Policy(costs, max_masks=0, max_copy=max_copy) if kind == "policy" else None
    i = steps = 0
    seconds = 0.0
    while i < len(out):
        context = len(prompt) + i
        match, source = lookup.match(max_copy), "lookup"
        if not match.tokens and use_datastore and datastore is not None:
            match, source = datastore.match(lookup.tokens[-MAX_NGRAM:], min(max_copy, DATASTORE_TOKENS)), "datastore"
        match = match if match.tokens else Match([], 0)
        room = len(out) - i
        if policy is not None:
            offer = CopyDraft(len(match.tokens), source, match.ngram, match.count) if match.tokens else None
            choice = policy.choose(StepDrafts(context, copy=offer, room=room))
            d = choice.copy
        else:
            d = min(len(match.tokens), max(room - 1, 0))
        right = 0
        while right < d and out[i + right] == match.tokens[right]:
            right += 1
        if policy is not None:
            policy.observe(choice, copy_right=right, copy_source=source)
        lookup.extend(out[i : i + right + 1])
        seconds += costs.cost(1 + d, context, False)
        i += right + 1
        steps += 1
    plain = sum(costs.cost(1, len(prompt) + t, False) for t in range(len(out)))
    return len(out), steps, seconds, plain


def replay(args):
    rows = [json.loads(line) for line in Path(args.outputs).read_text().splitlines() if line.strip()]
    datastore = None
    if args.costs == "cached" or not args.no_datastore:
        from mlx_mtp import load

        model, _, state = load(args.model, return_state=True)
        datastore = state.datastore
        costs = cost_model(model).costs if args.costs == "cached" else quiet_costs()
    else:
        costs = quiet_costs()
    for n in args.max_tokens:
        print(f"\n{n} tokens, {len(rows)} outputs ({args.costs} costs):")
        print(f"{'variant':<44}{'tok/step':>9}{'speedup':>9}  worst category")
        for name, (kind, min_n, max_copy, use_ds) in VARIANTS.items():
            per_category = {}
            for row in rows:
                r = dict(row, output=row["output"][:n])
                t, s, sec, plain = replay_one(r, costs, datastore, kind, min_n, max_copy, use_ds)
                c = per_category.setdefault(row["category"], [0, 0, 0.0, 0.0])
                for j, v in enumerate((t, s, sec, plain)):
                    c[j] += v
            tot = [sum(c[j] for c in per_category.values()) for j in range(4)]
            worst = min(per_category.items(), key=lambda kv: kv[1][3] / kv[1][2])
            print(
                f"{name:<44}{tot[0] / tot[1]:>9.2f}{tot[3] / tot[2]:>8.3f}x  "
                f"{worst[0]} {worst[1][3] / worst[1][2]:.2f}x"
            )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="record greedy outputs on Spec-Bench")
    r.add_argument("--model", default=None)
    r.add_argument("--out", required=True)
    r.add_argument("--num-prompts", type=int, default=2, help="per category")
    r.add_argument("--max-tokens", type=int, default=256)
    q = sub.add_parser("replay", help="replay copied-draft variants on recorded outputs")
    q.add_argument("outputs")
    q.add_argument("--model", default=None, help="its adapter's datastore (default: the default model's)")
    q.add_argument("--max-tokens", type=int, nargs="+", default=[96, 256])
    q.add_argument("--costs", choices=["quiet", "cached"], default="quiet")
    q.add_argument("--no-datastore", action="store_true", help="do not load a datastore (no model needed)")
    args = p.parse_args()
    record(args) if args.command == "record" else replay(args)


if __name__ == "__main__":
    main()
