"""Load test of ``peftlab serve`` on loopback: SmolLM2-135M with adapters of every method, many
concurrent clients asking for different adapters, batched serving vs one request at a time.

    python benchmarks/serve_load.py [--requests 96] [--clients 16] [--max-tokens 16]
        [--max-batch-size 16] [--max-wait-ms 10] [--threads 2] [--time-limit 240] [--json out.json]

Adapters (random, away from identity, saved in PEFT format to a temporary folder): two LoRAs
(r=8 on q/v, r=16 on all linear layers), IA3, a bottleneck adapter and prefix tuning (20
virtual tokens); requests also go to the base model. The same list of requests (adapter,
prompt; greedy, ``max_tokens`` each) is sent twice, each time to a fresh ``peftlab serve``
process started with the real command line:

* ``batched``: ``--max-batch-size N``: concurrent requests for any adapters share a batch,
* ``one-at-a-time``: ``--max-batch-size 1``: what a server without mixed batches does when
  each request may want a different adapter.

Reported per mode: requests/s, generated tokens/s, latency p50/p95/p99 (client side, from send
to full response), the server's batch statistics, and whether each request got the same text
in both modes. Each mode stops issuing requests after ``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab import BottleneckConfig, IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, get_peft_model
from peftlab.models import load_causal_lm

BASE = "smollm2-135m"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "Translate to German: The weather is nice today.",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village by the mountains, there lived",
    "List three uses of a paperclip:",
    "The most important idea in machine learning is",
]


def adapter_configs() -> dict[str, PeftConfig]:
    return {
        "lora-qv": LoraConfig(r=8, lora_alpha=16, init_lora_weights=False),
        "lora-all": LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
        "ia3": IA3Config(init_ia3_weights=False),
        "bottleneck": BottleneckConfig(reduction_factor=16),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    }


def save_adapters(root: Path) -> dict[str, Path]:
    """Each adapter trained on nothing but moved away from identity, so it changes the output."""
    folders = {}
    for seed, (name, config) in enumerate(adapter_configs().items()):
        base, _ = load_causal_lm()
        model = get_peft_model(base, config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.adapter_parameters("default").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def start_server(
    folders: dict[str, Path], args: argparse.Namespace, batch: int
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "peftlab", "serve", "--port", str(port), "--threads", str(args.threads)]
    cmd += ["--max-batch-size", str(batch), "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
    cmd += ["--max-queue", str(max(256, args.requests))]
    for name, folder in folders.items():
        cmd += ["--adapter", f"{name}={folder}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"peftlab serve exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if call(port, "GET", "/health")[0] == 200:
                return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("peftlab serve did not come up within 300 s")
        time.sleep(0.5)


def run_mode(
    label: str,
    batch: int,
    workload: list[tuple[str, str]],
    folders: dict[str, Path],
    args: argparse.Namespace,
) -> dict[str, Any]:
    proc, port = start_server(folders, args, batch)
    try:
        for model in ("lora-qv", "prefix"):  # warm-up, not measured
            call(port, "POST", "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": 4,
                                                   "temperature": 0})  # fmt: skip
        before = call(port, "GET", "/health")[1]["stats"]
        results: list[dict[str, Any] | None] = [None] * len(workload)
        lock = threading.Lock()
        next_index = iter(range(len(workload)))
        start = time.perf_counter()
        stop_at = start + args.time_limit

        def client() -> None:
            while time.perf_counter() < stop_at:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                model, prompt = workload[i]
                body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
                t0 = time.perf_counter()
                status, out = call(port, "POST", "/v1/completions", body)
                latency = time.perf_counter() - t0
                ok = status == 200
                results[i] = {
                    "status": status,
                    "latency": latency,
                    "tokens": out["usage"]["completion_tokens"] if ok else 0,
                    "text": out["choices"][0]["text"] if ok else None,
                }

        with ThreadPoolExecutor(args.clients) as pool:
            for f in [pool.submit(client) for _ in range(args.clients)]:
                f.result()
        wall = time.perf_counter() - start
        after = call(port, "GET", "/health")[1]["stats"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    done = [r for r in results if r is not None]
    ok = [r for r in done if r["status"] == 200]
    lat = np.array([r["latency"] for r in ok]) * 1000
    batches = after["batches"] - before["batches"]
    rows = after["rows"] - before["rows"]
    return {
        "mode": label,
        "max_batch_size": batch,
        "sent": len(done),
        "ok": len(ok),
        "errors": len(done) - len(ok),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
        "latency_ms": {q: round(float(np.percentile(lat, int(q[1:]))), 1) for q in ("p50", "p95", "p99")}
        if len(lat)
        else {},
        "server_batches": batches,
        "mean_batch_rows": round(rows / batches, 2) if batches else 0.0,
        "mixed_batches": after["mixed_batches"] - before["mixed_batches"],
        "texts": [r["text"] if r is not None else None for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    models = [BASE, *adapter_configs()]
    rng = random.Random(args.seed)
    workload = [(models[i % len(models)], rng.choice(PROMPTS)) for i in range(args.requests)]
    rng.shuffle(workload)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        folders = save_adapters(Path(tmp))
        modes = [run_mode("batched", args.max_batch_size, workload, folders, args)]
        modes.append(run_mode("one-at-a-time", 1, workload, folders, args))

    both = [
        (a, b)
        for a, b in zip(modes[0]["texts"], modes[1]["texts"], strict=True)
        if a is not None and b is not None
    ]
    same = sum(a == b for a, b in both)
    distinct = {
        m: {t for (mm, _), t in zip(workload, modes[0]["texts"], strict=True) if mm == m} for m in models
    }
    speedup = modes[0]["requests_per_s"] / modes[1]["requests_per_s"] if modes[1]["requests_per_s"] else 0.0

    cpu = platform.processor() or platform.machine()
    print(
        f"\nSmolLM2-135M, {len(models) - 1} adapters + base, {args.clients} clients, "
        f"{args.requests} requests, max_tokens {args.max_tokens}, greedy, torch threads {args.threads}, {cpu}"
    )
    header = ["mode", "max batch", "ok / sent", "wall s", "req/s", "gen tok/s", "p50 ms", "p95 ms", "p99 ms"]
    header += ["batches", "mean rows/batch", "mixed batches"]
    print("\n| " + " | ".join(header) + " |")
    print("|---" + "|---:" * (len(header) - 1) + "|")
    for m in modes:
        lat = m["latency_ms"]
        cells = [m["mode"], m["max_batch_size"], f"{m['ok']} / {m['sent']}", m["wall_s"], m["requests_per_s"]]
        cells += [m["tokens_per_s"], lat.get("p50"), lat.get("p95"), lat.get("p99"), m["server_batches"]]
        cells += [m["mean_batch_rows"], m["mixed_batches"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"\nthroughput batched / one-at-a-time: {speedup:.2f}x")
    print(f"same text in both modes: {same} / {len(both)} requests")
    print(
        "distinct completions per model (batched): " + ", ".join(f"{m} {len(t)}" for m, t in distinct.items())
    )
    if args.json:
        out = {"args": vars(args), "modes": modes, "speedup": speedup, "same_text": [same, len(both)]}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
