"""Throughput of ``python -m mlx_mtp.server`` under concurrent clients, against
``mlx_lm.server`` on the same model (prints figures; docs/serving.md has them).

    python examples/serve_benchmark.py [--model M] [--clients 8] [--requests 5]
        [--max-tokens 128] [--no-mlx-lm]

Each server runs as its own process on 127.0.0.1; each client sends its
requests one after another (non-streamed chat completions, greedy, prompts
from Spec-Bench), all clients at once. Reported per server: requests/s and
generated tokens/s over the whole load, and one client alone for reference.
Both servers give the same greedy text (checked).
"""

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

QUESTIONS = Path(__file__).resolve().parent.parent / "mlx_mtp" / "spec_bench" / "question.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 600) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data}")
    return data


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


def prompts(n: int):
    lines = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    return [lines[i * 37 % len(lines)]["turns"][0] for i in range(n)]


def load_test(port: int, clients: int, requests: int, max_tokens: int, model: str):
    """(requests/s, tokens/s, texts by prompt) of ``clients`` clients at once."""
    texts, tokens, errors = {}, [0], []
    lock = threading.Lock()
    qs = prompts(clients * requests)

    def client(i):
        try:
            for j in range(requests):
                q = qs[i * requests + j]
                r = post(
                    port,
                    {
                        "model": model,
                        "messages": [{"role": "user", "content": q}],
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    },
                )
                with lock:
                    texts[q] = r["choices"][0]["message"]["content"]
                    tokens[0] += r["usage"]["completion_tokens"]
        except Exception as e:  # noqa: BLE001
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
    return clients * requests / elapsed, tokens[0] / elapsed, texts


def run_server(cmd, port):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, proc)
    return proc


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the default model)")
    p.add_argument("--adapter-path", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--no-mlx-lm", action="store_true", help="skip mlx_lm.server")
    args = p.parse_args()
    if args.model is None:
        from mlx_mtp.loading import default_model_path

        args.model = str(default_model_path())
    servers = {"mlx_mtp.server": [sys.executable, "-m", "mlx_mtp.server", "--model", args.model]}
    if args.adapter_path:
        servers["mlx_mtp.server"] += ["--adapter-path", args.adapter_path]
    if not args.no_mlx_lm:
        servers["mlx_lm.server"] = [sys.executable, "-m", "mlx_lm.server", "--model", args.model]
    results, texts = {}, {}
    for name, cmd in servers.items():
        port = free_port()
        proc = run_server(cmd + ["--port", str(port)], port)
        try:
            post(
                port, {"model": args.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            )  # warm up
            solo = load_test(port, 1, args.requests, args.max_tokens, args.model)
            load = load_test(port, args.clients, args.requests, args.max_tokens, args.model)
            results[name] = {"solo_req_s": solo[0], "solo_tok_s": solo[1], "load_req_s": load[0], "load_tok_s": load[1]}
            texts[name] = load[2]
            print(name, json.dumps(results[name]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(
        f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, greedy, model {args.model}"
    )
    print("| server | 1 client req/s | 1 client tok/s | load req/s | load tok/s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['solo_req_s']:.2f} | {r['solo_tok_s']:.1f} "
            f"| {r['load_req_s']:.2f} | {r['load_tok_s']:.1f} |"
        )
    if len(texts) == 2:
        a, b = texts.values()
        same = sum(a[q] == b.get(q) for q in a)
        print(f"identical texts: {same}/{len(a)}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
