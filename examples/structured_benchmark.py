"""Structured output through the server with the official ``openai`` client
(issue #38): do the responses parse and fit their schemas, are they what
constrained decoding without speculation writes, and how much faster.

    python examples/structured_benchmark.py [--model M] [--per-schema 10] [--pydantic-per-model 5]
        [--max-tokens 256] [--baseline mlx-lm|server] [--plain-flags "--num-masks 0 --lookup 0 --no-policy"]
        [--spec-url URL --plain-url URL] [--json-out FILE]

The server under test runs on 127.0.0.1 as its own process, speculation on
(``--spec-url``: one already running). The baseline, constrained decoding
without speculation, is either ``mlx-lm`` (the default): mlx-lm's own loop
(``generate_step``) in this process with the same constraint as a logits
processor, one token per step, the reference the issue's targets name; or
``server``: a second server started with ``--plain-flags`` (no masks or
copies; the grammar's forced tokens are still drafted for free, so it is
not one token per step), or ``--plain-url``. Each request goes to both, one
after the other (which one first alternates), so both see the same load.

Requests: every schema of ``--schemas`` (examples/data/structured_schemas.json:
nested objects, arrays, enums, numbers, required and optional fields, string
patterns) with ``--per-schema`` of its subjects, as ``response_format:
{"type": "json_schema"}``, streamed (so decoding is timed apart from the
prompt); then the pydantic models below through
``client.beta.chat.completions.parse``. Greedy throughout.

Printed: how many responses parse as JSON and validate against their schema
(``jsonschema``; pydantic's own parse for ``parse``), how many equal the
plain server's, tokens/s of both (end to end and decoding alone) and their
ratio, tokens per step, and the tokens the grammar forced where the server
reports them (``speculation.forced_tokens``).
"""

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

SCHEMAS = Path(__file__).resolve().parent / "data" / "structured_schemas.json"
SYSTEM = "You answer with one JSON object that fits this JSON schema, and nothing else:\n{schema}"


@dataclass
class Case:
    kind: str  # "json_schema" or "pydantic"
    name: str  # the schema's or model's name
    messages: List[dict]
    schema: Dict[str, Any]


@dataclass
class Answer:
    text: Optional[str]  # None: the request failed (error says why)
    completion_tokens: int = 0
    seconds: float = 0.0  # end to end
    decode_seconds: float = 0.0  # from the first token to the last (streamed requests)
    finish_reason: Optional[str] = None
    speculation: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    parsed: bool = False
    valid: bool = False


# --------------------------------------------------------------------------- the requests


def schema_cases(path: Path, per_schema: int) -> List[Case]:
    cases = []
    for entry in json.loads(Path(path).read_text()):
        system = SYSTEM.format(schema=json.dumps(entry["schema"]))
        for subject in entry["subjects"][:per_schema]:
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"{entry['task']} Subject: {subject}."},
            ]
            cases.append(Case("json_schema", entry["name"], messages, entry["schema"]))
    return cases


def pydantic_models():
    """The models ``parse`` is asked for, with bounds a small greedy model
    can finish within ``max_tokens``; (model, task, subjects)."""
    from pydantic import BaseModel, Field

    class CalendarEvent(BaseModel):
        name: str = Field(max_length=40)
        date: str = Field(pattern=r"^20[0-9]{2}-[01][0-9]-[0-3][0-9]$")
        participants: List[str] = Field(max_length=3)

    class Step(BaseModel):
        explanation: str = Field(max_length=80)
        output: str = Field(max_length=20)

    class MathReasoning(BaseModel):
        steps: List[Step] = Field(max_length=3)
        final_answer: str = Field(max_length=20)

    class Pet(BaseModel):
        name: str = Field(max_length=20)
        species: Literal["dog", "cat", "bird", "fish", "rabbit"]
        age_years: int = Field(ge=0, le=40)
        vaccinated: bool

    class Trip(BaseModel):
        destination: str = Field(max_length=40)
        nights: int = Field(ge=1, le=30)
        budget_eur: float = Field(ge=0, le=100000)
        activities: List[str] = Field(max_length=3)

    return [
        (
            CalendarEvent,
            "Extract the event.",
            [
                "Alice and Bob meet for lunch on 2025-03-14.",
                "Team sync with Carol on 2024-11-02.",
                "Dan's birthday party on 2026-07-21 with Eve.",
                "Science fair on 2025-05-09.",
                "Frank and Grace go hiking on 2024-09-30.",
            ],
        ),
        (MathReasoning, "Solve step by step.", ["8x + 7 = -23", "3 + 4 * 2", "x / 2 = 9", "12 - 3 * 3", "2x = 14"]),
        (
            Pet,
            "Describe the pet.",
            ["a young tabby cat", "an old sheepdog", "a green parrot", "a goldfish", "a white rabbit"],
        ),
        (
            Trip,
            "Plan the trip.",
            [
                "a weekend in Rome",
                "two weeks in Japan",
                "a ski week in the Alps",
                "a beach holiday in Spain",
                "a city break in Prague",
            ],
        ),
    ]


def pydantic_cases(per_model: int):
    cases = []
    for model, task, subjects in pydantic_models():
        for subject in subjects[:per_model]:
            messages = [{"role": "user", "content": f"{task} {subject}"}]
            cases.append((Case("pydantic", model.__name__, messages, model.model_json_schema()), model))
    return cases


def response_format(case: Case) -> dict:
    return {"type": "json_schema", "json_schema": {"name": case.name, "schema": case.schema, "strict": True}}


def check(answer: Answer, schema: dict, pydantic_model=None) -> Answer:
    """Whether the answer's text parses as JSON and fits its schema
    (``jsonschema``, or the pydantic model itself)."""
    import jsonschema

    try:
        value = json.loads(answer.text)
    except json.JSONDecodeError:
        return answer
    answer.parsed = True
    if pydantic_model is None:
        answer.valid = jsonschema.Draft202012Validator(schema).is_valid(value)
    else:
        try:
            pydantic_model.model_validate(value)
            answer.valid = True
        except ValueError:
            pass
    return answer


def ask(client, model: str, case: Case, max_tokens: int) -> Answer:
    """One streamed ``json_schema`` request, checked against its schema."""
    start = time.perf_counter()
    first, text, answer = None, [], Answer(None)
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=case.messages,
            response_format=response_format(case),
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                answer.completion_tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.delta.content:
                first = first or time.perf_counter()
                text.append(choice.delta.content)
            if choice.finish_reason:
                answer.finish_reason = choice.finish_reason
                answer.speculation = (chunk.model_extra or {}).get("speculation") or {}
    except Exception as e:  # noqa: BLE001  (counted and shown: a failed request is a result here)
        answer.error = f"{type(e).__name__}: {e}"
        return answer
    end = time.perf_counter()
    answer.text, answer.seconds, answer.decode_seconds = "".join(text), end - start, end - (first or end)
    return check(answer, case.schema)


def ask_parse(client, model: str, case: Case, pydantic_model, max_tokens: int) -> Answer:
    """One ``client.beta.chat.completions.parse`` request, checked by its
    pydantic model (a response the client cannot parse is a failure)."""
    import openai

    start = time.perf_counter()
    try:
        r = client.beta.chat.completions.parse(
            model=model, messages=case.messages, response_format=pydantic_model, max_tokens=max_tokens, temperature=0
        )
    except openai.LengthFinishReasonError as e:  # cut by max_tokens: its text still counts for the comparison
        r = e.completion
    except Exception as e:  # noqa: BLE001  (pydantic's ValidationError, HTTP errors)
        return Answer(None, error=f"{type(e).__name__}: {e}")
    message = r.choices[0].message
    answer = Answer(
        message.content,
        completion_tokens=r.usage.completion_tokens,
        seconds=time.perf_counter() - start,
        finish_reason=r.choices[0].finish_reason,
        speculation=(r.model_extra or {}).get("speculation") or {},
    )
    return check(answer, case.schema, pydantic_model)


class MlxLmBaseline:
    """Constrained decoding without speculation, in this process: mlx-lm's
    ``generate_step`` over the base model, the request's constraint (made as
    the server makes it) as a logits processor, greedy."""

    def __init__(self, model: Optional[str], adapter: Optional[str]):
        from mlx_mtp import load

        self.model, self.tokenizer = load(model, adapter_path=adapter)

    def __call__(self, case: Case, pydantic_model, max_tokens: int) -> Answer:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        from mlx_mtp.decoding.constraint import Constraint

        if pydantic_model is None:
            fmt = response_format(case)
        else:  # what client.beta.chat.completions.parse sends for the model
            from openai.lib._parsing._completions import type_to_response_format_param

            fmt = type_to_response_format_param(pydantic_model)
        constraint = Constraint.from_response_format(fmt, self.tokenizer, self.model.vocab_size)
        ids = self.tokenizer.apply_chat_template(case.messages, add_generation_prompt=True)
        eos, tokens, first = set(self.tokenizer.eos_token_ids), [], None
        start = time.perf_counter()
        steps = generate_step(
            mx.array(ids), self.model.model, max_tokens=max_tokens, logits_processors=[constraint.logits_processor()]
        )
        for token, _ in steps:
            first = first or time.perf_counter()
            tokens.append(int(token))
            if tokens[-1] in eos:
                break
        end = time.perf_counter()
        stopped = bool(tokens) and tokens[-1] in eos
        answer = Answer(
            self.tokenizer.decode(tokens[:-1] if stopped else tokens),
            completion_tokens=len(tokens),
            seconds=end - start,
            decode_seconds=end - (first or end),
            finish_reason="stop" if stopped else "length",
            speculation={"steps": len(tokens)},
        )
        return check(answer, case.schema, pydantic_model)


# --------------------------------------------------------------------------- the report


def totals(answers: List[Answer]) -> Dict[str, float]:
    done = [a for a in answers if a.text is not None]
    tokens = sum(a.completion_tokens for a in done)
    seconds = sum(a.seconds for a in done)
    decode = sum(a.decode_seconds for a in done)
    decoded = sum(a.completion_tokens - 1 for a in done if a.decode_seconds > 0)
    steps = sum(a.speculation.get("steps", 0) for a in done)
    forced = [a.speculation["forced_tokens"] for a in done if "forced_tokens" in a.speculation]
    return {
        "requests": len(answers),
        "failed": len(answers) - len(done),
        "parsed": sum(a.parsed for a in done),
        "valid": sum(a.valid for a in done),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "decode_tokens_per_s": decoded / decode if decode else 0.0,
        "tokens_per_step": tokens / steps if steps else 0.0,
        "forced_tokens": sum(forced) if forced else None,
    }


def report(rows: List[dict], baseline: str = "no speculation") -> dict:
    """Prints and returns the figures of ``rows`` (one per request: kind,
    name, and the answers with speculation and of the baseline)."""
    summary = {}
    for kind in ("json_schema", "pydantic"):
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        spec, plain = totals([r["spec"] for r in mine]), totals([r["plain"] for r in mine])
        same = sum(r["spec"].text is not None and r["spec"].text == r["plain"].text for r in mine)
        names = len({r["name"] for r in mine})
        ratio = spec["tokens_per_s"] / plain["tokens_per_s"] if plain["tokens_per_s"] else 0.0
        decode_ratio = spec["decode_tokens_per_s"] / plain["decode_tokens_per_s"] if plain["decode_tokens_per_s"] else 0
        what = "json_schema (streamed)" if kind == "json_schema" else "pydantic (client.beta.chat.completions.parse)"
        print(f"{what}: {len(mine)} requests over {names} {'schemas' if kind == 'json_schema' else 'models'}")
        for label, t in (("speculation", spec), (baseline, plain)):
            forced = "n/a (not reported)" if t["forced_tokens"] is None else t["forced_tokens"]
            decode = f", decoding {t['decode_tokens_per_s']:.2f} tokens/s" if kind == "json_schema" else ""
            print(
                f"  {label}: {t['parsed']} parsed, {t['valid']} valid, {t['failed']} failed; {t['tokens']} tokens, "
                f"{t['tokens_per_s']:.2f} tokens/s end to end{decode}; {t['tokens_per_step']:.3f} tokens/step; "
                f"forced tokens {forced}"
            )
        print(f"  identical to the baseline: {same}/{len(mine)}; speed-up {ratio:.3f}x end to end", end="")
        print(f", {decode_ratio:.3f}x decoding" if kind == "json_schema" else "")
        for r in mine:
            if r["spec"].text != r["plain"].text or not r["spec"].valid:
                print(f"  - {r['name']}: valid {r['spec'].valid}, equal {r['spec'].text == r['plain'].text}: "
                      f"{(r['spec'].error or r['spec'].text or '')[:160]!r}")  # fmt: skip
        summary[kind] = {"speculation": spec, "plain": plain, "identical": same, "speedup": ratio}
    return summary


# --------------------------------------------------------------------------- the servers


def server(model: Optional[str], adapter: Optional[str], flags: List[str]):
    """A server process on a free port of 127.0.0.1 (``with``: started and ready, then stopped)."""
    from serve_benchmark import Server  # this folder's

    cmd = [sys.executable, "-m", "mlx_mtp.server", *flags]
    cmd += ["--model", model] if model else []
    cmd += ["--adapter-path", adapter] if adapter else []
    return Server("mlx_mtp.server " + " ".join(flags), cmd, dict(os.environ))


def server_side(client, model: str):
    """A server's answer to a case (streamed json_schema, or ``parse``)."""

    def answer(case: Case, pydantic_model, max_tokens: int) -> Answer:
        if pydantic_model is None:
            return ask(client, model, case, max_tokens)
        return ask_parse(client, model, case, pydantic_model, max_tokens)

    return answer


def run(spec, baseline, args) -> List[dict]:
    """Every request to both sides (``spec``, ``baseline``: callables of a
    case, its pydantic model or None, and max_tokens); one row per request."""
    rows = []
    cases = [(c, None) for c in schema_cases(args.schemas, args.per_schema)]
    cases += pydantic_cases(args.pydantic_per_model)
    for i, (case, pydantic_model) in enumerate(cases):
        answers = {}
        order = [("spec", spec), ("plain", baseline)]
        for label, side in order if i % 2 == 0 else order[::-1]:
            answers[label] = side(case, pydantic_model, args.max_tokens)
        rows.append({"kind": case.kind, "name": case.name, **answers})
        if args.verbose:
            a = answers["spec"]
            equal = a.text == answers["plain"].text
            print(f"[{i + 1}/{len(cases)}] {case.name}: valid {a.valid}, equal {equal}, {a.completion_tokens} tokens")
    return rows


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines as they come
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the servers' default model)")
    p.add_argument("--adapter-path", default=None)
    p.add_argument("--schemas", type=Path, default=SCHEMAS, help="the JSON schemas and their prompts")
    p.add_argument("--per-schema", type=int, default=10, help="requests per schema (its first subjects)")
    p.add_argument("--pydantic-per-model", type=int, default=5, help="parse requests per pydantic model")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument(
        "--baseline",
        choices=["mlx-lm", "server"],
        default="mlx-lm",
        help="without speculation: mlx-lm's loop in this process, or a second server (default: %(default)s)",
    )
    p.add_argument(
        "--plain-flags",
        default="--num-masks 0 --lookup 0 --no-policy",
        help="the server flags that turn speculation off (default: %(default)s)",
    )
    p.add_argument("--spec-url", help="a running server with speculation (instead of starting one)")
    p.add_argument("--plain-url", help="a running server without speculation (--baseline server)")
    p.add_argument("--json-out", type=Path, help="write every answer and the summary here")
    p.add_argument("--verbose", action="store_true", help="a line per request")
    args = p.parse_args(argv)
    import openai

    urls = {"spec": args.spec_url, "plain": args.plain_url}
    wanted = [("spec", [])] + ([("plain", shlex.split(args.plain_flags))] if args.baseline == "server" else [])
    with contextlib.ExitStack() as servers:
        for label, flags in wanted:
            if urls[label] is None:
                urls[label] = servers.enter_context(server(args.model, args.adapter_path, flags)).url
        clients = {k: openai.OpenAI(base_url=urls[k], api_key="unused", max_retries=0, timeout=3600) for k, _ in wanted}
        model = clients["spec"].models.list().data[0].id
        if args.baseline == "server":
            baseline, label = server_side(clients["plain"], model), "no speculation (server)"
        else:
            baseline, label = MlxLmBaseline(args.model, args.adapter_path), "no speculation (mlx-lm's loop)"
        start = time.perf_counter()
        rows = run(server_side(clients["spec"], model), baseline, args)
        print(f"model {model}, greedy, max_tokens {args.max_tokens}, {time.perf_counter() - start:.0f} s in all")
        summary = report(rows, label)
    if args.json_out:
        answers = [{**r, "spec": asdict(r["spec"]), "plain": asdict(r["plain"])} for r in rows]
        args.json_out.write_text(json.dumps({"summary": summary, "answers": answers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
