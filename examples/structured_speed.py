"""Speed of structured output (issue #38): constrained speculative decoding
(``stream_generate(..., response_format=...)``) against mlx-lm's own loop
(``generate_step``) with the same llguidance constraint as a logits
processor, both greedy, in the same run, schema after schema.

    python examples/structured_speed.py [--model M] [--max-tokens 128]
        [--schemas flat,tool_call] [--repeats 3] [--num-masks K --lookup D]

The schemas are those of examples/grammar_cost.py (nested objects, arrays,
enums, bounds, patterns, formats, unions, recursion, json_object), each
asked for in a chat message that shows it. Per schema: tokens, tokens/s of
each, the ratio, tokens per step, how many tokens the grammar forced (drafted
for free), and the constraint's host time as a share of the speculative
run's time. Each side runs ``--repeats`` times, alternating, and keeps its
fastest run (on shared cores the fastest is the least disturbed). The outputs
must be identical (checked: a difference is an error). Figures:
docs/structured_output.md.
"""

import mlx_mtp  # noqa: F401, I001  (first: it loads a fast BLAS before MLX on Linux)

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_mtp import load, stream_generate
from mlx_mtp.decoding.constraint import Constraint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grammar_cost import DECODE, SCHEMAS  # noqa: E402  (the schemas measured there)

REQUESTS = dict(DECODE)
DEFAULT_REQUEST = "Give an example."


def chat_prompt(tokenizer, name, schema):
    request = REQUESTS.get(name, DEFAULT_REQUEST)
    content = f"{request} Answer in JSON following this schema: {json.dumps(schema)}"
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def baseline(model, tokenizer, prompt, constraint, max_tokens):
    """mlx-lm's loop with the constraint as a logits processor: (tokens, seconds)."""
    eos = set(tokenizer.eos_token_ids)
    tokens = []
    tic = time.perf_counter()
    steps = generate_step(
        mx.array(prompt), model.model, max_tokens=max_tokens, logits_processors=[constraint.logits_processor()]
    )
    for token, _ in steps:
        tokens.append(int(token))
        if tokens[-1] in eos:
            break
    return tokens, time.perf_counter() - tic


def speculative(model, tokenizer, state, prompt, response_format, max_tokens, settings):
    """Constrained speculative decoding: (tokens, seconds, last response)."""
    tokens, last = [], None
    tic = time.perf_counter()
    for r in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, response_format=response_format, state=state, **settings
    ):
        tokens.append(r.token)
        last = r
    return tokens, time.perf_counter() - tic, last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory or hub id (default: the default model)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--schemas", default=",".join(name for name, _, _ in SCHEMAS), help="comma-separated names")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of each side per schema, alternating; the fastest counts"
    )
    p.add_argument("--num-masks", type=int, default=None, help="fixed settings instead of the policy")
    p.add_argument("--lookup", type=int, default=None, help="fixed settings instead of the policy")
    args = p.parse_args(argv)
    settings = {k: v for k, v in (("num_masks", args.num_masks), ("lookup", args.lookup)) if v is not None}
    model, tokenizer, state = load(args.model, return_state=True)
    wanted = args.schemas.split(",")
    chosen = [(name, schema) for name, schema, _ in SCHEMAS if name in wanted]
    print(f"model: {args.model or 'default'}, {model.num_masks} masks in the adapter, settings: {settings or 'policy'}")
    # warm-up: both paths once (compilation, calibration)
    warm = chat_prompt(tokenizer, chosen[0][0], chosen[0][1])
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": chosen[0][1]}}
    baseline(model, tokenizer, warm, Constraint.from_response_format(fmt, tokenizer, model.vocab_size), 8)
    speculative(model, tokenizer, state, warm, fmt, 8, settings)

    header = "schema            tokens  mlx-lm tok/s  spec tok/s  ratio  tokens/step  forced  constraint share"
    print(header)
    totals = dict(tokens=0, base=0.0, spec=0.0, steps=0, forced=0, constraint=0.0)
    for name, schema in chosen:
        if schema == {"type": "object"}:
            fmt = {"type": "json_object"}
        else:
            fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        prompt = chat_prompt(tokenizer, name, schema)
        constraint = Constraint.from_response_format(fmt, tokenizer, model.vocab_size)
        base_s = spec_s = float("inf")
        for _ in range(args.repeats):
            ref, seconds = baseline(model, tokenizer, prompt, constraint, args.max_tokens)
            base_s = min(base_s, seconds)
            got, seconds, run = speculative(model, tokenizer, state, prompt, fmt, args.max_tokens, settings)
            if seconds < spec_s:
                spec_s, last = seconds, run
        if got != ref:
            print(f"error: {name}: the speculative output differs from mlx-lm's", file=sys.stderr)
            return 1
        n = len(got)
        share = last.constraint_seconds / spec_s
        print(
            f"{name:<17} {n:>6}  {n / base_s:>12.1f}  {n / spec_s:>10.1f}  {base_s / spec_s:>5.2f}x"
            f"  {last.tokens_per_step:>11.2f}  {last.forced:>6}  {100 * share:>15.2f}%"
        )
        totals["tokens"] += n
        totals["base"] += base_s
        totals["spec"] += spec_s
        totals["steps"] += last.steps
        totals["forced"] += last.forced
        totals["constraint"] += last.constraint_seconds
    t = totals
    print(
        f"{'all':<17} {t['tokens']:>6}  {t['tokens'] / t['base']:>12.1f}  {t['tokens'] / t['spec']:>10.1f}"
        f"  {t['base'] / t['spec']:>5.2f}x  {t['tokens'] / t['steps']:>11.2f}  {t['forced']:>6}"
        f"  {100 * t['constraint'] / t['spec']:>15.2f}%"
    )
    print("outputs identical to mlx-lm's with the same constraint: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
