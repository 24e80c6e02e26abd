"""Benchmark of `gguf-trace serve` (run by scripts/bench with GGUF_TRACE_BENCH=serve, or as part of
the whole benchmark): requests/s and p50/p99 latency for 1, 4 and 16 concurrent clients on
loopback, the same generations through `trace`, and the cost per token of what a request asks
to capture. Prints `name: value` lines. Usage: bench-serve.py GGUF_TRACE_BINARY MODEL.gguf"""

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN, MODEL = sys.argv[1], sys.argv[2]
THREADS = str(os.cpu_count() or 2)
MAX_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "Once upon a time there was",
    "The best way to learn Rust is",
    "My favourite fruit is",
    "In 1492 Columbus",
    "Water boils at",
    "The meaning of life is",
    "def fibonacci(n):",
]


def start(extra):
    p = subprocess.Popen(
        [BIN, "serve", MODEL, "--port", "0", "--threads", THREADS] + extra,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = p.stdout.readline()
    url = next(w for w in line.split() if w.startswith("http://"))
    host, port = url[len("http://"):].rstrip("/").split(":")
    return p, host, int(port)


def request(host, port, body):
    c = http.client.HTTPConnection(host, port, timeout=600)
    t = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    dt = time.perf_counter() - t
    c.close()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {data[:200]}")
    return dt, json.loads(data)


def clients(host, port, n_clients, n_requests, trace=None):
    latencies, tokens = [], []
    lock = threading.Lock()
    todo = list(range(n_requests))

    def work():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS}
            if trace:
                body["trace"] = trace
            dt, r = request(host, port, body)
            with lock:
                latencies.append(dt)
                tokens.append(r["usage"]["completion_tokens"])

    t = time.perf_counter()
    ts = [threading.Thread(target=work) for _ in range(n_clients)]
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    wall = time.perf_counter() - t
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    return wall, statistics.median(latencies), p99, sum(tokens)


def main():
    print(f"serve model: {os.path.basename(MODEL)}, {MAX_TOKENS} tokens per request, {THREADS} threads")
    p, host, port = start(["--parallel", "16", "--queue", "64"])
    try:
        request(host, port, {"prompt": "warm up", "max_tokens": 4})
        for c in (1, 4, 16):
            n = max(16, 2 * c)
            wall, p50, p99, toks = clients(host, port, c, n)
            print(f"serve clients={c}: {n / wall:.2f} requests/s, p50 {p50:.2f} s, p99 {p99:.2f} s, {toks / wall:.1f} tokens/s")
        # What a request asks to capture, one client (per generated token).
        base = None
        for name, trace in [
            ("states none (last point only)", None),
            ("every point, inline states", {"states": "inline", "positions": "last"}),
            ("every point, inline states + lens top-1", {"states": "inline", "positions": "last", "lens_top_k": 1}),
        ]:
            wall, _, _, toks = clients(host, port, 1, 8, trace)
            per = wall / toks
            base = base or per
            print(f"serve per token, {name}: {per * 1000:.1f} ms ({per / base:.3f}x)")
    finally:
        p.terminate()
        p.wait()
    # The same generations through `trace` (one process per run: model load included, as a user
    # would run it), one prompt at a time and all 16 together.
    with tempfile.TemporaryDirectory() as d:
        prompts = os.path.join(d, "p.txt")
        with open(prompts, "w") as f:
            for i in range(16):
                f.write(PROMPTS[i % len(PROMPTS)] + "\n")
        for n_seq in ("1", "16"):
            t = time.perf_counter()
            subprocess.run(
                [BIN, "trace", MODEL, "-f", prompts, "--generate", str(MAX_TOKENS), "--positions", "last",
                 "--points", "30", "--n-seq", n_seq, "--threads", THREADS, "-o", os.path.join(d, "run" + n_seq),
                 "--answers", "never"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            wall = time.perf_counter() - t
            print(f"trace --generate {MAX_TOKENS} --n-seq {n_seq}, 16 prompts: {16 / wall:.2f} prompts/s ({wall:.1f} s, model load included)")


main()
