"""Throughput of many requests at once against mlx-lm's, on the same model
(prints figures; docs/serving.md has them).

    python examples/serve_benchmark.py [--model M] [--adapter-path A]
        [--clients 1,4,8] [--requests 3] [--max-tokens 64] [--batch N] [--no-mlx-lm]
        [--json OUT]

``--clients``: through the servers. ``mlx_lm.server`` is timed before and
after ``mlx_mtp.server`` in the same run, each its own process on 127.0.0.1
started as a user starts it, except that mlx_lm.server is started through
a one-line bootstrap that first loads the fast BLAS this package loads (a
wheel's BLAS reaches MLX through an in-memory forwarding shim, which
``LD_PRELOAD`` cannot name), so both multiply alike. For each concurrency N, N
clients (each its own ``openai`` client session) send R streamed greedy chat
completions of up to T tokens one after another, all clients at once, with
no ``seed`` (a seed turns mlx_lm.server's batching off); Spec-Bench prompts,
a different one per request. Per server and concurrency: generated tokens/s
over the whole load, the median time to first token, and how many texts
equal the prompt's solo text (mlx-lm's greedy generation of that prompt
alone, in this process); for ours also its tokens per step and what its
policy's steps fed (from the responses' ``speculation`` blocks); then ours
against the mean of mlx_lm.server's two runs. ``--clients 0``: no servers.

``--batch N``: in this process, N Spec-Bench prompts of up to T tokens
through mlx-lm's ``batch_generate``, ours, then mlx-lm's again: generated
tokens/s (wall time, prefill included), the prefill's seconds and the
tokens/s after it (each library's ``prompt_time`` and ``decode_time``), and
texts against the solo texts.

Figures are only comparable within one run: take ratios from the same run.
"""

import mlx_mtp  # noqa: F401, I001  (first: it loads a fast BLAS before MLX is imported)

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

from mlx_lm.generate import batch_generate as lm_batch_generate
from mlx_lm.generate import stream_generate as lm_stream_generate

from mlx_mtp import batch_generate, load
from mlx_mtp.blas import blas_info

QUESTIONS = Path(__file__).resolve().parent.parent / "mlx_mtp" / "spec_bench" / "question.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(n: int) -> List[str]:
    """``n`` Spec-Bench first turns, spread over the file's categories."""
    lines = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    return [lines[i * 37 % len(lines)]["turns"][0] for i in range(n)]


def chat_ids(tokenizer, question: str) -> List[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True))


def solo_texts(model, tokenizer, qs: List[str], max_tokens: int) -> Dict[str, str]:
    """Each question's text alone: mlx-lm's greedy generation."""
    return {
        q: "".join(r.text for r in lm_stream_generate(model.model, tokenizer, chat_ids(tokenizer, q), max_tokens))
        for q in qs
    }


# --- servers ------------------------------------------------------------------------------


class Server:
    """A server process on 127.0.0.1 (``with``: started and ready, then stopped)."""

    def __init__(self, name: str, cmd: List[str]):
        self.name, self.port = name, free_port()
        self.cmd = cmd + ["--port", str(self.port)]

    def __enter__(self):
        import openai

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        client = openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=600)
        for _ in range(1200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:  # ready once it answers (this also warms it up)
                client.chat.completions.create(
                    model="default_model", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
                )
                return self
            except openai.APIConnectionError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=60)


# ``python -m mlx_lm.server`` with this package's BLAS loaded first (mlx_lm loads none itself)
LM_SERVER_WITH_OUR_BLAS = (
    "import mlx_mtp.blas, runpy; mlx_mtp.blas.preload(); "
    "runpy.run_module('mlx_lm.server', run_name='__main__', alter_sys=True)"
)


def load_test(url: str, qs: List[str], clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` openai sessions at once, each sending ``requests`` streamed
    greedy chat completions in turn (question ``i * requests + j``)."""
    import openai

    texts, ttft, tokens, errors = {}, [], [0], []
    spec = {"steps": 0, "choices": {}}  # mlx_mtp.server's speculation blocks, summed over requests
    lock = threading.Lock()

    def client(i):
        session = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        try:
            for j in range(requests):
                q = qs[i * requests + j]
                sent, first, parts, used, block = time.perf_counter(), None, [], 0, None
                stream = session.chat.completions.create(
                    model="default_model",
                    messages=[{"role": "user", "content": q}],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        parts.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        used = chunk.usage.completion_tokens
                    block = (chunk.model_extra or {}).get("speculation") or block
                with lock:
                    texts[q] = "".join(parts)
                    tokens[0] += used
                    if block:
                        spec["steps"] += block["steps"]
                        for kind, share in block["choices"].items():
                            spec["choices"][kind] = spec["choices"].get(kind, 0) + share * block["steps"]
                    ttft.append((first or time.perf_counter()) - sent)
        except Exception as e:  # noqa: BLE001  (raised below)
            errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    result = {"tokens_s": tokens[0] / elapsed, "ttft_s": statistics.median(ttft), "tokens": tokens[0], "texts": texts}
    if spec["steps"]:
        result["tokens_per_step"] = tokens[0] / spec["steps"]
        result["choices"] = {k: round(n / spec["steps"], 3) for k, n in spec["choices"].items() if n}
    return result


def run_servers(args, qs: List[str], solo: Dict[str, str]) -> dict:
    """mlx_lm.server, ours, mlx_lm.server again: each concurrency's figures."""
    ours = [sys.executable, "-m", "mlx_mtp.server", "--model", args.model]
    if args.adapter_path:
        ours += ["--adapter-path", args.adapter_path]
    lm = [sys.executable, "-c", LM_SERVER_WITH_OUR_BLAS, "--model", args.model]
    order = [("mlx_mtp.server", ours)]
    if not args.no_mlx_lm:
        order = [("mlx_lm.server (before)", lm)] + order + [("mlx_lm.server (after)", lm)]
    results: Dict[str, Dict[int, dict]] = {}
    for name, cmd in order:
        with Server(name, cmd) as server:
            results[name] = {}
            for n in args.clients:
                r = load_test(server.url, qs, n, args.requests, args.max_tokens)
                r["same_as_solo"] = sum(r["texts"][q] == solo[q] for q in r["texts"])
                results[name][n] = r
                policy = ""
                if "tokens_per_step" in r:  # what the policy chose at this concurrency
                    mix = ", ".join(f"{k} {v:.0%}" for k, v in sorted(r["choices"].items(), key=lambda kv: -kv[1]))
                    policy = f", {r['tokens_per_step']:.2f} tokens/step (steps: {mix})"
                print(
                    f"{name}, {n} clients: {r['tokens_s']:.1f} tokens/s, median TTFT {r['ttft_s']:.2f} s, "
                    f"{r['same_as_solo']}/{len(r['texts'])} texts as solo{policy}",
                    flush=True,
                )
    print(f"\n{args.requests} requests per client x {args.max_tokens} tokens, greedy, streamed, model {args.model}")
    print("| clients | server | tokens/s | median TTFT (s) | texts as solo |")
    print("|---|---|---|---|---|")
    for n in args.clients:
        for name in results:
            r = results[name][n]
            print(f"| {n} | {name} | {r['tokens_s']:.1f} | {r['ttft_s']:.2f} | {r['same_as_solo']}/{len(r['texts'])} |")
    if not args.no_mlx_lm:
        print("\nmlx_mtp.server / mean of mlx_lm.server's two runs (same run):")
        for n in args.clients:
            lm_runs = [results[k][n] for k in results if k.startswith("mlx_lm")]
            ours_n = results["mlx_mtp.server"][n]
            tps = ours_n["tokens_s"] / statistics.mean(r["tokens_s"] for r in lm_runs)
            ttft = ours_n["ttft_s"] / statistics.mean(r["ttft_s"] for r in lm_runs)
            print(f"{n} clients: {tps:.2f}x tokens/s, {ttft:.2f}x median time to first token")
    figures = {
        name: {n: {k: v for k, v in r.items() if k != "texts"} for n, r in rs.items()} for name, rs in results.items()
    }
    return figures


# --- batch_generate -----------------------------------------------------------------------


def run_batch(args, model, tokenizer, state) -> dict:
    """mlx-lm's batch_generate, ours, mlx-lm's again on the same prompts."""
    qs = questions(args.batch)
    prompts = [chat_ids(tokenizer, q) for q in qs]
    solo = solo_texts(model, tokenizer, qs, args.max_tokens)
    runs = {}
    for name in ("mlx-lm (before)", "mlx_mtp", "mlx-lm (after)"):
        tic = time.perf_counter()
        if name == "mlx_mtp":
            r = batch_generate(model, tokenizer, prompts, max_tokens=args.max_tokens, state=state)
            tokens = r.stats.generation_tokens
        else:
            r = lm_batch_generate(model.model, tokenizer, prompts, max_tokens=args.max_tokens, return_token_ids=True)
            tokens = sum(len([t for t in ids if t not in tokenizer.eos_token_ids]) for ids in r.token_ids)
        seconds = time.perf_counter() - tic
        same = sum(text == solo[q] for text, q in zip(r.texts, qs))
        # the prompts' prefill and the decoding after it, as each library's stats split them
        prefill, decoding = r.stats.prompt_time, tokens / max(r.stats.decode_time, 1e-9)
        runs[name] = {
            "tokens_s": tokens / seconds,
            "tokens": tokens,
            "seconds": seconds,
            "prefill_s": prefill,
            "decoding_tokens_s": decoding,
            "same_as_solo": same,
        }
        extra = f", {r.stats.tokens_per_step:.2f} tokens/step" if name == "mlx_mtp" else ""
        print(
            f"batch of {args.batch}, {name}: {tokens / seconds:.1f} tokens/s ({tokens} tokens in {seconds:.1f} s; "
            f"prefill {prefill:.1f} s, then {decoding:.1f} tokens/s){extra}, {same}/{len(qs)} texts as solo",
            flush=True,
        )
    lm = statistics.mean(runs[k]["tokens_s"] for k in runs if k.startswith("mlx-lm"))
    ratio = runs["mlx_mtp"]["tokens_s"] / lm
    decoding = runs["mlx_mtp"]["decoding_tokens_s"] / statistics.mean(
        runs[k]["decoding_tokens_s"] for k in runs if k.startswith("mlx-lm")
    )
    print(
        f"batch_generate of {args.batch} x {args.max_tokens}: ours / mlx-lm's = {ratio:.2f}x, "
        f"{decoding:.2f}x after the prefill (same run)"
    )
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the default model)")
    p.add_argument("--adapter-path", default=None)
    p.add_argument("--clients", default="1,4,8", help="concurrencies to time through the servers (0: none)")
    p.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=0, help="prompts for batch_generate against mlx-lm's (0: none)")
    p.add_argument("--no-mlx-lm", action="store_true", help="skip mlx_lm.server")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    args.clients = [int(n) for n in args.clients.split(",") if int(n) > 0]
    if args.model is None:
        from mlx_mtp.loading import default_model_path

        args.model = str(default_model_path())
    print(f"BLAS: {blas_info().describe()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    model, tokenizer, state = load(args.model, adapter_path=args.adapter_path, return_state=True)
    result = {"model": args.model, "requests": args.requests, "max_tokens": args.max_tokens}
    if args.clients:
        qs = questions(max(args.clients) * args.requests)
        result["servers"] = run_servers(args, qs, solo_texts(model, tokenizer, qs, args.max_tokens))
    if args.batch:
        result["batch"] = run_batch(args, model, tokenizer, state)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
