#!/usr/bin/env python
"""Load test of `alignkit serve reward` on loopback: many concurrent clients for a fixed time.

Builds a small reward model (random Llama, hidden 256, 4 layers, the project's byte tokenizer),
starts the real server in a subprocess (`alignkit serve reward`), and runs `--clients` threads
that each send requests of `--per-request` (prompt, response) pairs back to back for `--seconds`.
Reports requests/s, responses/s, p50 / p99 latency, the error count (goal: 0), and the server's
own batch count (how many forward batches served all requests).

    .venv/bin/python benchmarks/reward_server_load.py                  # 32 clients, 20 s
    .venv/bin/python benchmarks/reward_server_load.py --clients 64 --seconds 60
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--per-request", type=int, default=4, help="(prompt, response) pairs per request")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    a = p.parse_args()

    import httpx
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignkit.config import ModelConfig, RandomInitConfig
    from alignkit.models.loading import load_sequence_scorer, save_causal_lm
    from alignkit.models.reward import RewardModelInfo
    from alignkit.models.tokenizer import byte_tokenizer

    work = Path(tempfile.mkdtemp(prefix="rm_load_"))
    tokenizer = byte_tokenizer()
    model = load_sequence_scorer(
        ModelConfig(
            random_init=RandomInitConfig(
                hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688
            )
        ),
        tokenizer,
        1,
    )
    with torch.no_grad():
        model.score.weight.normal_()
    params = sum(p.numel() for p in model.parameters())
    rm_dir = save_causal_lm(
        model,
        model.state_dict(),
        tokenizer,
        work / "rm",
        auto_class=AutoModelForSequenceClassification,
        config_updates=RewardModelInfo(["reward"], [1.0]).config_updates(),
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alignkit.cli",
            "serve",
            "reward",
            "--model",
            str(rm_dir),
            "--port",
            str(port),
            "--max-batch",
            str(a.max_batch),
            "--max-delay-ms",
            str(a.max_delay_ms),
        ],
        cwd=REPO,
        env=dict(os.environ),
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.ConnectError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)

        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.time() + a.seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(timeout=60) as http:
                while time.time() < stop_at:
                    n = a.per_request
                    body = {
                        "prompts": [f"What is {rng.randint(1, 99)} + {rng.randint(1, 99)}?" for _ in range(n)],
                        "responses": [
                            "The answer is " + str(rng.randint(1, 200)) + "." * rng.randint(1, 30) for _ in range(n)
                        ],
                    }
                    t = time.perf_counter()
                    try:
                        answer = http.post(f"{url}/score", json=body)
                        ok = answer.status_code == 200 and len(answer.json()["rewards"]) == n
                        problem = None if ok else f"HTTP {answer.status_code}"
                    except httpx.HTTPError as exc:
                        problem = type(exc).__name__
                    with lock:
                        (errors.append(problem) if problem else latencies.append(time.perf_counter() - t))

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        health = httpx.get(f"{url}/health").json()
    finally:
        server.terminate()
        server.wait(10)
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")  # noqa: E731
    print(
        f"{a.clients} clients x {a.seconds:.0f} s, {a.per_request} responses per request, server max batch "
        f"{a.max_batch}, max delay {a.max_delay_ms} ms; model: {params / 1e6:.1f}M-parameter Llama (byte tokenizer)"
    )
    print(
        f"requests {len(latencies)} ok, {len(errors)} errors; {len(latencies) / elapsed:.1f} requests/s, "
        f"{len(latencies) * a.per_request / elapsed:.1f} responses/s; latency p50 {pct(0.5):.0f} ms, "
        f"p99 {pct(0.99):.0f} ms; server forward batches {health['batches']} for {health['requests']} requests"
    )
    if errors:
        print("errors:", sorted(set(errors)))


if __name__ == "__main__":
    main()
