"""``adaptkit serve`` under the probe's attacks, on 127.0.0.1: what the limits cost an honest client.

The server runs in its own process (the CLI, default limits unless flags say otherwise) over a tiny
random Llama with one LoRA. For each attack, bounded in count and time, the script measures the
latency of ``GET /health`` and of a short completion from an honest client while the attack runs,
and what the attack itself got:

- big body: a 32 MiB prompt (413 expected, and how fast);
- half-sent requests: N connections that send a request line and some headers, then nothing;
- idle connections: M connections opened and left open;
- poison: sampled requests with seed 2**70, a mix weight of 1e308 and NaN, while honest requests run.

    python benchmarks/bench_attack.py [--half 200] [--idle 3000] [--out bench-results/attack.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from bench_serve import ServerProcess

from adaptkit.benchmarking.timing import format_table, write_results
from adaptkit.demo import build_tiny_model, random_lora
from adaptkit.formats.peft import write_lora


def honest(url: str, seconds: float) -> dict:
    """/health and completion latencies (ms) sampled for ``seconds``; failures counted."""
    health, completion, failures = [], [], 0
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < end:
            try:
                start = time.perf_counter()
                client.get("/health").raise_for_status()
                health.append(1000 * (time.perf_counter() - start))
                start = time.perf_counter()
                client.post("/v1/completions", json={"model": "lora", "prompt": "the quick brown", "max_tokens": 4,
                                                     "temperature": 0}).raise_for_status()
                completion.append(1000 * (time.perf_counter() - start))
            except httpx.HTTPError:
                failures += 1
                time.sleep(0.05)
    return {"health_p50_ms": statistics.median(health) if health else None,
            "health_max_ms": max(health) if health else None,
            "completion_p50_ms": statistics.median(completion) if completion else None,
            "honest_failures": failures}


def still_open(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the server has not closed."""
    count = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            count += sock.recv(1) != b""
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


def open_many(url: str, count: int, payload: bytes | None) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(count):
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
            if payload:
                sock.sendall(payload)
            sockets.append(sock)
        except OSError:
            break
    return sockets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", type=int, default=200, help="Half-sent requests.")
    parser.add_argument("--idle", type=int, default=3000, help="Idle connections (bounded by this process's files).")
    parser.add_argument("--seconds", type=float, default=20.0, help="How long each attack is held.")
    parser.add_argument("--out", default="bench-results/attack.json")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args.idle = min(args.idle, hard - 512)  # this process's own files: the attacker is bounded too
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_model(Path(tmp) / "base", "llama")
        write_lora(random_lora(base, ("q_proj", "v_proj"), seed=1), Path(tmp) / "lora")
        server = ServerProcess(base, {"lora": Path(tmp) / "lora"}, max_batch=8, max_queue=64)
        try:
            rows.append({"attack": "none", **honest(server.url, 3)})

            start = time.perf_counter()
            body = json.dumps({"model": "lora", "prompt": "x" * (32 * 2**20)})
            answer = httpx.post(server.url + "/v1/completions", content=body, timeout=120)
            rows.append({"attack": "32 MiB prompt", "status": answer.status_code,
                         "answered_ms": 1000 * (time.perf_counter() - start), **honest(server.url, 2)})

            for name, count, payload in (
                ("half-sent requests", args.half, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: a"),
                ("idle connections", args.idle, None),
            ):
                sockets = open_many(server.url, count, payload)
                measured = honest(server.url, args.seconds)
                rows.append({"attack": name, "opened": len(sockets), "still_open_after": still_open(sockets),
                             "held_s": args.seconds, **measured})
                for sock in sockets:
                    sock.close()

            results: dict[str, int] = {}
            poisons = [{"seed": 2**70, "temperature": 0.7}, {"model": "base", "adapters": {"lora": 1e308}},
                       {"model": "base", "adapters": {"lora": float("nan")}}, {"temperature": 1e-40}]

            def poison(fields):
                body = {"model": "lora", "prompt": "SELECT", "max_tokens": 4, **fields}
                code = httpx.post(server.url + "/v1/completions", content=json.dumps(body),
                                  headers={"content-type": "application/json"}, timeout=60).status_code
                results[json.dumps(fields)] = code

            threads = [threading.Thread(target=poison, args=(p,)) for p in poisons]
            for thread in threads:
                thread.start()
            measured = honest(server.url, 3)
            for thread in threads:
                thread.join()
            rows.append({"attack": "poison requests", "status": json.dumps(results), **measured})
        finally:
            server.close()
    print(format_table(rows, ["attack", "status", "answered_ms", "opened", "still_open_after", "health_p50_ms",
                              "health_max_ms", "completion_p50_ms", "honest_failures"]))
    write_results(args.out, rows, note="server (adaptkit serve, default limits) and attacker on one machine, 127.0.0.1")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
